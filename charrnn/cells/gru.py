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

    # Hand-tuned backward: five saved factors instead of the derived nine
    # (measured faster: docs/design-notes.md; tests/test_cells.py ties it to jax.vjp).
    def tuned_forward(self, params, h_prev, zx, zh):
        x_r, x_z, x_n = jnp.split(zx, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(zh, 3, axis=-1)
        t_r, t_z = jnp.tanh(0.5 * (x_r + h_r)), jnp.tanh(0.5 * (x_z + h_z))
        r, z = 0.5 * t_r + 0.5, 0.5 * t_z + 0.5
        hn_b = h_n + params["b_hn"]
        n = jnp.tanh(x_n + r * hn_b)
        h = (1.0 - z) * n + z * h_prev
        # with dh_t: dn = dh k_n, dr = dh k_r, dz = dh k_z (pre-activation gradients)
        k_n = (1.0 - z) * (1.0 - n * n)
        k_r = k_n * hn_b * 0.25 * (1.0 - t_r * t_r)
        k_z = (h_prev - n) * 0.25 * (1.0 - t_z * t_z)
        return h, h, (k_r, k_z, k_n, r, z)

    def tuned_backward(self, params, saved, cotangents):
        dh, dy = cotangents
        k_r, k_z, k_n, r, z = saved
        dh = dh + dy
        dn = dh * k_n
        dzh = jnp.concatenate([dh * k_r, dh * k_z, dn * r], axis=-1)
        dzx = jnp.concatenate([dh * k_r, dh * k_z, dn], axis=-1)
        return {"b_hn": jnp.sum(dn * r, axis=0)}, dh * z, dzx, dzh


CELL = GRU
