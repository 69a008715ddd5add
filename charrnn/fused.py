"""Whole-sequence recurrences with hand-written backward passes.

``recurrence(cell, params, carry, zx)`` runs one layer over T steps given its
input pre-activations ``zx = x W_xh + b`` ([T, B, G*H], computed outside the
loop as one large product) and returns (final carry, h_1..T [T, B, H]). It
computes exactly what ``models.unroll`` over the layer's Flax cell computes,
but its gradient is a ``jax.custom_vjp`` written for speed on CPU:

* Autodiff of ``lax.scan`` accumulates ∂L/∂W_hh inside the backward loop:
  one [H, B] x [B, G*H] product per time step on the sequential path. Here
  the backward loop carries only ∂L/∂h (and ∂L/∂c) and emits the gate
  pre-activation gradients dz_t = ∂L/∂z_t, doing one product per step,
  dh_{t-1} = dz_t W_hhᵀ (W_hhᵀ transposed once, before the loop). After it,
  with all T*B rows stacked, dW_hh = H_prevᵀ DZ is one large GEMM; ∂L/∂zx = DZ
  goes back through ``x W_xh + b`` by ordinary autodiff (two more GEMMs).
* Fewer operations per step: the LSTM applies one ``tanh`` to the whole 4H
  gate vector, since σ(x) = ½(1 + tanh(x/2)).

The forward loop saves, per step, the activated gates and the states that
the backward pass needs (LSTM: 4H gates and c; GRU: r, z, n and h W_hn + b_hn;
tanh RNN: nothing beyond h). Cell equations and gate orders are those of the
cells in :mod:`charrnn.models`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def recurrence(cell: str, params: dict, carry, zx, unroll: int = 1):
    """Run one layer over time with the hand-written VJP.

    cell: ``rnn``, ``gru`` or ``lstm``; params: the layer's parameters
    (``W_hh`` [H, G*H], GRU also ``b_hn`` [H]); carry: [B, H] (LSTM: (c, h));
    zx: [T, B, G*H] input pre-activations ``x_t W_xh + b``. Returns
    (carry after step T, hs [T, B, H]).
    """
    if cell == "rnn":
        return _rnn(params["W_hh"], carry, zx, unroll)
    if cell == "lstm":
        return _lstm(params["W_hh"], carry, zx, unroll)
    if cell == "gru":
        return _gru(params["W_hh"], params["b_hn"], carry, zx, unroll)
    raise ValueError(f"unknown cell {cell!r}")


def _shift(first, xs):
    """[first, xs_0, ..., xs_{T-2}]: the value before each step ([T, ...])."""
    return jnp.concatenate([first[None], xs[:-1]], axis=0)


def _flat(a):
    """[T, B, F] -> [T*B, F]: all time steps as rows of one matrix."""
    return a.reshape(-1, a.shape[-1])


def _weight_grad(h_prev, dz):
    """Σ_t h_{t-1}ᵀ dz_t as one product: [T, B, H], [T, B, G] -> [H, G]."""
    return _flat(h_prev).T @ _flat(dz)


# --- tanh RNN: h_t = tanh(zx_t + h_{t-1} W_hh) ---------------------------------

def _rnn_forward(w_hh, h, zx, unroll):
    def step(h, zx_t):
        h = jnp.tanh(zx_t + h @ w_hh)
        return h, h
    return jax.lax.scan(step, h, zx, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rnn(w_hh, h0, zx, unroll):
    return _rnn_forward(w_hh, h0, zx, unroll)


def _rnn_fwd(w_hh, h0, zx, unroll):
    h_last, hs = _rnn_forward(w_hh, h0, zx, unroll)
    return (h_last, hs), (w_hh, h0, hs)


def _rnn_bwd(unroll, residuals, cotangents):
    w_hh, h0, hs = residuals
    dh_last, dhs = cotangents
    w_hh_t = w_hh.T  # [H, H]; transposed once so each step's product is a plain one

    def step(dh, inputs):
        h, dh_out = inputs
        dz = (dh + dh_out) * (1.0 - h * h)  # tanh' = 1 - h²
        return dz @ w_hh_t, dz

    dh0, dz = jax.lax.scan(step, dh_last, (hs, dhs), reverse=True, unroll=unroll)
    return _weight_grad(_shift(h0, hs), dz), dh0, dz


_rnn.defvjp(_rnn_fwd, _rnn_bwd)


# --- LSTM: gates i, f, g, o; c_t = f c_{t-1} + i g; h_t = o tanh(c_t) ------------

def _lstm_gate_affine(hidden):
    """(scale, shift) with act = tanh(z * scale) * scale + shift for all 4 gates.

    Sigmoid blocks (i, f, o) use σ(z) = ½ tanh(z/2) + ½; the candidate g is tanh.
    """
    half, one, zero = jnp.full((hidden,), 0.5), jnp.ones((hidden,)), jnp.zeros((hidden,))
    return jnp.concatenate([half, half, one, half]), jnp.concatenate([half, half, zero, half])


def _lstm_forward(w_hh, carry, zx, unroll, save):
    scale, shift = _lstm_gate_affine(w_hh.shape[0])

    def step(carry, zx_t):
        c, h = carry
        acts = jnp.tanh((zx_t + h @ w_hh) * scale) * scale + shift
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (c, h), ((acts, c, h) if save else h)

    return jax.lax.scan(step, carry, zx, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lstm(w_hh, carry, zx, unroll):
    return _lstm_forward(w_hh, carry, zx, unroll, save=False)


def _lstm_fwd(w_hh, carry, zx, unroll):
    last, (acts, cs, hs) = _lstm_forward(w_hh, carry, zx, unroll, save=True)
    return (last, hs), (w_hh, carry, acts, cs, hs)


def _lstm_bwd(unroll, residuals, cotangents):
    w_hh, (c0, h0), acts, cs, hs = residuals
    (dc_last, dh_last), dhs = cotangents
    w_hh_t = w_hh.T  # [4H, H]

    def step(carry, inputs):
        dh, dc = carry
        a, c_prev, c, dh_out = inputs
        i, f, g, o = jnp.split(a, 4, axis=-1)
        tanh_c = jnp.tanh(c)
        dh = dh + dh_out
        dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
        dz = jnp.concatenate([dc * g * i * (1.0 - i),       # σ' = σ(1 - σ)
                              dc * c_prev * f * (1.0 - f),
                              dc * i * (1.0 - g * g),       # tanh' = 1 - tanh²
                              dh * tanh_c * o * (1.0 - o)], axis=-1)
        return (dz @ w_hh_t, dc * f), dz

    (dh0, dc0), dz = jax.lax.scan(step, (dh_last, dc_last), (acts, _shift(c0, cs), cs, dhs),
                                  reverse=True, unroll=unroll)
    return _weight_grad(_shift(h0, hs), dz), (dc0, dh0), dz


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


# --- GRU: r, z gates, candidate n = tanh(x_n + r (h W_hn + b_hn)) ----------------

def _gru_forward(w_hh, b_hn, h, zx, unroll, save):
    def step(h, zx_t):
        hh = h @ w_hh
        x_r, x_z, x_n = jnp.split(zx_t, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(hh, 3, axis=-1)
        r = 0.5 * jnp.tanh(0.5 * (x_r + h_r)) + 0.5
        z = 0.5 * jnp.tanh(0.5 * (x_z + h_z)) + 0.5
        hn_b = h_n + b_hn
        n = jnp.tanh(x_n + r * hn_b)
        h = (1.0 - z) * n + z * h
        return h, ((jnp.concatenate([r, z, n, hn_b], -1), h) if save else h)

    return jax.lax.scan(step, h, zx, unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gru(w_hh, b_hn, h0, zx, unroll):
    return _gru_forward(w_hh, b_hn, h0, zx, unroll, save=False)


def _gru_fwd(w_hh, b_hn, h0, zx, unroll):
    h_last, (acts, hs) = _gru_forward(w_hh, b_hn, h0, zx, unroll, save=True)
    return (h_last, hs), (w_hh, h0, acts, hs)


def _gru_bwd(unroll, residuals, cotangents):
    w_hh, h0, acts, hs = residuals
    dh_last, dhs = cotangents
    w_hh_t = w_hh.T  # [3H, H]

    def step(dh, inputs):
        a, h_prev, dh_out = inputs
        r, z, n, hn_b = jnp.split(a, 4, axis=-1)
        dh = dh + dh_out
        dn = dh * (1.0 - z) * (1.0 - n * n)  # through n = tanh(·)
        dr = dn * hn_b * r * (1.0 - r)
        dzg = dh * (h_prev - n) * z * (1.0 - z)
        dzx = jnp.concatenate([dr, dzg, dn], axis=-1)  # wrt x_t W_xh + b
        dhh = jnp.concatenate([dr, dzg, dn * r], axis=-1)  # wrt h_{t-1} W_hh (+ b_hn)
        return dh * z + dhh @ w_hh_t, (dzx, dhh)

    h_prev = _shift(h0, hs)
    dh0, (dzx, dhh) = jax.lax.scan(step, dh_last, (acts, h_prev, dhs), reverse=True,
                                   unroll=unroll)
    hidden = w_hh.shape[0]
    db_hn = jnp.sum(dhh[..., 2 * hidden:], axis=(0, 1))
    return _weight_grad(h_prev, dhh), db_hn, dh0, dzx


_gru.defvjp(_gru_fwd, _gru_bwd)
