"""Elman tanh RNN: h_t = tanh(x_t W_xh + b + h_{t-1} W_hh), G = 1."""

from charrnn.cells.base import Cell, tanh


class RNN(Cell):
    """h_t = tanh(zx_t + zh_t); carry and output are h_t [B, H]."""
    num_gates = 1
    title = "tanh RNN"

    def update(self, params, h, zx, zh):
        h = tanh(zx + zh)
        return h, h


CELL = RNN
