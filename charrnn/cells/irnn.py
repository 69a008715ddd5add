"""IRNN (Le, Jaitly & Hinton 2015): h_t = relu(x_t W_xh + b + h_{t-1} W_hh), W_hh = I at init.

"A Simple Way to Initialize Recurrent Networks of Rectified Linear Units"
(arXiv:1504.00941): a ReLU Elman network whose recurrent matrix starts as the
identity and biases at zero, so at initialisation the state is copied
forward unchanged. ReLU does not saturate, so ||∂h_T/∂h_{T-k}|| can grow
like ||W_hh||^k unchecked: the cell whose gradients explode most readily.
"""

import jax.numpy as jnp

from charrnn.cells.base import Cell


class IRNN(Cell):
    """h_t = max(0, zx_t + zh_t); carry and output are h_t [B, H]."""
    num_gates = 1
    title = "IRNN"

    def update(self, params, h, zx, zh):
        h = jnp.maximum(zx + zh, 0.0)
        return h, h

    def recurrent_init(self, key, shape, dtype=jnp.float32):
        """W_hh = I [H, H]."""
        del key
        return jnp.eye(shape[0], shape[1], dtype=dtype)


CELL = IRNN
