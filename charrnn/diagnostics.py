"""Diagnostics of exploding gradients: W_hh's spectrum, BPTT Jacobians, clipping.

For the tanh RNN h_t = tanh(x_t W_xh + h_{t-1} W_hh + b) the Jacobian of one
step is ∂h_t/∂h_{t-1} = diag(1 - h_t²) W_hhᵀ, so k steps of BPTT multiply k
such factors: their norm is at most ||W_hh||₂^k (|tanh'| ≤ γ = 1), and for a
linear RNN it grows like ρ(W_hh)^k (Pascanu, Mikolov & Bengio 2013, §2).

:func:`jacobian_norms` measures ||∂h_T/∂h_{T-k}||₂ for k = 1..K by reverse-mode
autodiff through the reference time loop (``models.reference_scan`` over the
cell's Flax module: the same update as training's fast scan, whose custom
backward gives no per-step Jacobian);
:func:`tree_cosine` measures how much a clipping rule turns the gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from charrnn import models


def spectral_radius(w) -> float:
    """max |λ| over the eigenvalues of a square matrix [H, H]."""
    return float(np.max(np.abs(np.linalg.eigvals(np.asarray(w, np.float64)))))


def top_singular_value(w) -> float:
    """||W||₂, the largest singular value."""
    return float(np.linalg.norm(np.asarray(w, np.float64), 2))


def gate_blocks(w_hh) -> list:
    """Split W_hh [H, G*H] into its G square per-gate blocks [H, H]."""
    w = np.asarray(w_hh)
    return np.split(w, w.shape[1] // w.shape[0], axis=1)


def whh_summary(params: dict) -> dict:
    """Spectral radius and top singular value of every layer's W_hh.

    For gated cells (G > 1 blocks) the spectral radius is the largest over the
    square gate blocks and the singular value is that of the whole [H, G*H].
    Keys: ``whh_spectral_radius/<layer>``, ``whh_top_singular/<layer>``.
    """
    out = {}
    for layer, w in enumerate(models.recurrent_weights(params)):
        out[f"whh_spectral_radius/{layer}"] = max(spectral_radius(b) for b in gate_blocks(w))
        out[f"whh_top_singular/{layer}"] = top_singular_value(w)
    return out



def tree_cosine(a, b) -> jax.Array:
    """cos∠(a, b) = <a, b> / (||a||₂ ||b||₂) over all leaves of two same-shaped pytrees.

    1 when b is a positive multiple of a (global-norm clipping), less when a
    rule turns the gradient (clipping by value, AGC). Defined as 1 when either
    tree is all zeros (there is no direction to turn). A float32 scalar.
    """
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norms = optax.tree.norm(a) * optax.tree.norm(b)
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 1.0)


def jacobian_norms(step: Callable, carry, xs, max_k: int | None = None) -> jax.Array:
    """||∂s_T/∂s_{T-k}||₂ for k = 1..K of every sequence in a batch.

    step: ``(carry, x_t) -> (carry, y_t)`` on a batch (e.g. ``model.cell_step``);
    carry: its state, leaves [B, ...] (an LSTM's is (c, h)); xs: inputs
    [T, B, ...]. s_t is the whole state after t steps, flattened ([H] for rnn
    and gru, [2H] = (c, h) for lstm), s_0 = ``carry``. K = ``max_k`` (≤ T;
    default T). Returns float32 [B, K]; column k-1 holds the largest singular
    value of the [S, S] Jacobian ∂s_T/∂s_{T-k}.

    How: a perturbation d_t is added to the state entering step t + 1, so
    ∂s_T/∂d_t = ∂s_T/∂s_t; ``jax.jacrev`` of s_T with respect to all d_t at
    once is one reverse pass of the scan per output coordinate (vmapped), the
    same BPTT that training runs. The first T - K steps run unperturbed.
    """
    T = jax.tree.leaves(xs)[0].shape[0]
    K = T if max_k is None else int(max_k)
    if not 1 <= K <= T:
        raise ValueError(f"max_k must be in 1..{T} (the sequence length), got {max_k}")

    def one(c, x):  # one sequence: leaves [1, ...], inputs [T, 1, ...]
        c, _ = models.reference_scan(step, c, jax.tree.map(lambda a: a[:T - K], x))
        flat, unravel = ravel_pytree(c)
        tail = jax.tree.map(lambda a: a[T - K:], x)

        def final_state(deltas):  # [K, S] -> s_T [S]
            def perturbed(state, inp):
                x_t, d_t = inp
                return step(unravel(ravel_pytree(state)[0] + d_t), x_t)
            last, _ = models.reference_scan(perturbed, c, (tail, deltas))
            return ravel_pytree(last)[0]

        jac = jax.jacrev(final_state)(jnp.zeros((K, flat.size), flat.dtype))  # [S, K, S]
        sv = jnp.linalg.svd(jnp.moveaxis(jac, 1, 0), compute_uv=False)  # [K, S]
        return sv[::-1, 0]  # d_{K-1} is k = 1 step back

    def one_of_batch(c, x):
        return one(jax.tree.map(lambda a: a[None], c), jax.tree.map(lambda a: a[:, None], x))

    return jax.vmap(one_of_batch, in_axes=(0, 1))(carry, xs)


def model_jacobian_norms(model: models.CharRNN, params: dict, tokens, layer: int = 0,
                         max_k: int | None = None) -> jax.Array:
    """:func:`jacobian_norms` of one layer of a CharRNN driven by real text.

    tokens: int [B, T]. The layers below ``layer`` run first (teacher forced,
    from the zero state) to give this layer its inputs; the layer's state
    starts from zeros as well. Returns [B, K].
    """
    xs = jnp.swapaxes(params["embed"][tokens], 0, 1)  # [T, B, E]
    carry = model.initial_carry(tokens.shape[0])
    for below in range(layer):
        _, xs = models.reference_scan(model.cell_step(params, below), carry[below], xs)
    return jacobian_norms(model.cell_step(params, layer), carry[layer], xs, max_k)


def log_slope(norms) -> float:
    """Least-squares slope of ln(norm_k) against k = 1..K (nats per step).

    For a linear RNN with W_hh = ρQ (Q orthogonal) it is ln ρ exactly; for tanh
    it is at most ln ||W_hh||₂. Non-positive norms (underflow) are left out.
    """
    y = np.asarray(norms, np.float64).reshape(-1)
    k = np.arange(1, y.size + 1, dtype=np.float64)
    ok = y > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(k[ok], np.log(y[ok]), 1)[0])
