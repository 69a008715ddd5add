"""GRU (Cho et al. 2014), the reset gate applied after the recurrent product.

Gate blocks (G = 3): reset r, update z, candidate n. With zx = x W_xh + b and
zh = h_{t-1} W_hh split into those blocks, and b_hn [H] the candidate's
recurrent bias (scaled by r together with h W_hn, as in cuDNN and flax's GRUCell):

    r = σ(zx_r + zh_r),  z = σ(zx_z + zh_z)
    n = tanh(zx_n + r (zh_n + b_hn))
    h_t = (1 - z) n + z h_{t-1}
"""

import jax.numpy as jnp

from charrnn.cells.base import Cell, sigmoid, tanh


class GRU(Cell):
    num_gates = 3
    title = "GRU"

    def extra_params(self, hidden_size):
        return {"b_hn": ((hidden_size,), lambda key, shape: jnp.zeros(shape))}

    def update(self, params, h_prev, zx, zh):
        x_r, x_z, x_n = jnp.split(zx, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(zh, 3, axis=-1)
        r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
        n = tanh(x_n + r * (h_n + params["b_hn"]))
        h = (1.0 - z) * n + z * h_prev
        return h, h


CELL = GRU
