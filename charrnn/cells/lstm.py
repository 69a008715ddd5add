"""LSTM (Hochreiter & Schmidhuber 1997; forget gate Gers et al. 2000).

Gate blocks (G = 4): input i, forget f, candidate g, output o. With
z = zx + zh (zx = x W_xh + b, zh = h_{t-1} W_hh) split into those blocks:

    c_t = σ(z_f) c_{t-1} + σ(z_i) tanh(z_g),   h_t = σ(z_o) tanh(c_t)

The carry is (c, h); the forget block's bias starts at 1 (Jozefowicz et al. 2015).
"""

import jax.numpy as jnp

from charrnn.cells.base import Cell, tanh


class LSTM(Cell):
    num_gates = 4
    title = "LSTM"

    def init_carry(self, batch_size, hidden_size):
        shape = (batch_size, hidden_size)
        return (jnp.zeros(shape), jnp.zeros(shape))  # two buffers: carries are donated

    def recurrent_input(self, carry):
        return carry[1]

    def bias_init(self, key, shape, dtype=jnp.float32):
        """Block f: ones; the others zeros."""
        del key
        H = shape[0] // 4
        return jnp.zeros(shape, dtype).at[H:2 * H].set(1.0)

    def update(self, params, carry, zx, zh):
        return self._step(carry, zx + zh, save=False)[:2]

    def _step(self, carry, z, save):
        c_prev, _ = carry
        H = z.shape[-1] // 4
        # σ(x) = ½ tanh(x/2) + ½: one tanh over the whole gate vector.
        scale = jnp.concatenate([jnp.full((2 * H,), 0.5), jnp.ones((H,)), jnp.full((H,), 0.5)])
        t = jnp.split(tanh(z * scale), 4, axis=-1)
        i, f, o = 0.5 * t[0] + 0.5, 0.5 * t[1] + 0.5, 0.5 * t[3] + 0.5
        g = t[2]
        c = f * c_prev + i * g
        tanh_c = tanh(c)
        h = o * tanh_c
        if not save:
            return (c, h), h
        # σ'(x) = ¼ (1 - tanh²(x/2)); tanh' = 1 - tanh². The backward step computes
        # dc_t = dc + dh k_c, dz = (dc_t k_i, dc_t k_f, dc_t k_g, dh k_o), dc_{t-1} = dc_t f.
        k_i = g * 0.25 * (1.0 - t[0] * t[0])
        k_f = c_prev * 0.25 * (1.0 - t[1] * t[1])
        k_g = i * (1.0 - g * g)
        k_o = tanh_c * 0.25 * (1.0 - t[3] * t[3])
        k_c = o * (1.0 - tanh_c * tanh_c)
        return (c, h), h, (k_i, k_f, k_g, k_o, k_c, f)

    # Hand-tuned backward: the coefficients above instead of the derived residuals
    # (measured faster: docs/design-notes.md; tests/test_cells.py ties it to jax.vjp).
    def tuned_forward(self, params, carry, zx, zh):
        return self._step(carry, zx + zh, save=True)

    def tuned_backward(self, params, saved, cotangents):
        (dc, dh), dy = cotangents
        k_i, k_f, k_g, k_o, k_c, f = saved
        dh = dh + dy
        dc = dc + dh * k_c
        dz = jnp.concatenate([dc * k_i, dc * k_f, dc * k_g, dh * k_o], axis=-1)
        return {}, (dc * f, jnp.zeros_like(dh)), dz, dz


CELL = LSTM
