"""A sweep's results: one table row per run from its history."""

from __future__ import annotations

import math

import numpy as np

from charrnn import step as step_lib
from charrnn.sweep.grid import Run


def summarize(run: Run, tau: float, history: dict, reference: float | None = None) -> dict:
    """One table row: final/best val bpc, diverged or not, clip fraction, max grad norm.

    A run diverged when a step was non-finite, or its final val loss is not
    finite or above its initial (step 0) val loss.
    """
    val = history["val_loss"]
    final, initial = float(val[-1]), float(val[0])
    finite_val = val[np.isfinite(val)]
    nonfinite = int(history["nonfinite"].sum())
    grad = history["grad_norm"][np.isfinite(history["grad_norm"])]
    return {
        "cell": run.cell, "optimizer": run.optimizer, "learning_rate": run.learning_rate,
        "seed": run.seed, "rule": run.rule,
        # the strength label ('0.5x', '2.5', 'none'; the column's name predates the rules
        # whose strength is not a threshold) and its value
        "threshold": run.strength, "tau": tau, "reference_norm": reference,
        "mean_clip_threshold": _finite_mean(history.get("clip_threshold")),
        "final_val_bpc": final / step_lib.LN2, "best_val_bpc": float(finite_val.min()) / step_lib.LN2
        if finite_val.size else float("nan"),
        "initial_val_bpc": initial / step_lib.LN2,
        "diverged": bool(nonfinite > 0 or not math.isfinite(final) or final > initial),
        "clip_fraction": float(history["clipped"].mean()),
        "mean_grad_norm": float(grad.mean()) if grad.size else float("nan"),
        "max_grad_norm": float(grad.max()) if grad.size else float("nan"),
        "nonfinite_steps": nonfinite,
        "steps": int(history["loss"].size),
        "clip_at": run.clip_at,  # where the rule acted (last: the columns before keep their places)
        "unit_clip_fraction": unit_clip_fraction(history),
    }


def unit_clip_fraction(history: dict) -> float:
    """The mean share of the units the placement clips that were clipped: rows
    (clip_at=example), (row, layer, time step) cotangents (bptt), else steps (the
    whole gradient or update is the unit: ``clip_fraction``)."""
    for key in ("example_clip_fraction", "bptt_clip_fraction"):
        if key in history:
            return float(np.mean(history[key]))
    return float(np.mean(history["clipped"]))


def _finite_mean(values) -> float:
    """Mean of the finite values (a threshold is inf without clipping or in a warm-up)."""
    if values is None:
        return float("nan")
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("inf")
