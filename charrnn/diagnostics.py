"""Diagnostics of exploding gradients: the recurrent matrix W_hh and its spectrum.

For the tanh RNN h_t = tanh(x_t W_xh + h_{t-1} W_hh + b) the Jacobian of one
step is ∂h_t/∂h_{t-1} = diag(1 - h_t²) W_hhᵀ, so k steps of BPTT multiply k
such factors: their norm is at most ||W_hh||₂^k (|tanh'| ≤ 1), and for a
linear RNN it grows like ρ(W_hh)^k (Pascanu, Mikolov & Bengio 2013, §2).
"""

from __future__ import annotations

import numpy as np

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
