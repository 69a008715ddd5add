"""Minimal gated unit (Zhou, Wu, Zhang & Zhou 2016, arXiv:1603.09420), one gate.

Gate blocks (G = 2): f and the candidate n. As in flax's MGUCell (and like
the GRU here) the gate scales the recurrent product instead of entering it,
f (h W_hn + b_hn) rather than (f h) W_hn, so that all of h_{t-1} W_hh is one
product per step; and f weighs the old state (flax's convention):

    f = σ(zx_f + zh_f)
    n = tanh(zx_n + f (zh_n + b_hn))
    h_t = (1 - f) n + f h_{t-1}

f's bias starts at 1 (keep the state at first, as the LSTM's forget bias).
"""

import jax.numpy as jnp

from charrnn.cells.base import Cell, sigmoid, tanh


class MGU(Cell):
    num_gates = 2
    title = "MGU"

    def extra_params(self, hidden_size):
        return {"b_hn": ((hidden_size,), lambda key, shape: jnp.zeros(shape))}

    def bias_init(self, key, shape, dtype=jnp.float32):
        """Block f: ones; block n: zeros."""
        del key
        return jnp.zeros(shape, dtype).at[:shape[0] // 2].set(1.0)

    def update(self, params, h_prev, zx, zh):
        x_f, x_n = jnp.split(zx, 2, axis=-1)
        h_f, h_n = jnp.split(zh, 2, axis=-1)
        f = sigmoid(x_f + h_f)
        n = tanh(x_n + f * (h_n + params["b_hn"]))
        h = (1.0 - f) * n + f * h_prev
        return h, h


CELL = MGU
