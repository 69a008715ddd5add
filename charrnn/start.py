"""The hand-over at the start of a text: how well the first characters after a line start
are predicted from the model's start state, against the same characters read in context.

Training carries the hidden state from window to window, so a model may meet its start
state (:meth:`models.CharRNN.start_carry`) rarely; yet sampling from an empty prompt,
priming and evaluation all begin there. On a split, with

- K = ``START_LINES`` line starts s (newlines; :func:`data.line_starts` spreads them
  evenly over the split, a choice that depends on the split alone),
- L = ``CURVE_CHARS`` characters after each, C = ``CONTEXT`` characters of context,

two teacher-forced reads, both from the start state, score the same targets
ids[s+1 .. s+L]:

    from the start:  read ids[s], ids[s+1], ...             nll_start[k, j]
    in context:      read ids[s-C+1 .. s] (C characters, the newline last), then the same
                     characters                              nll_context[k, j]

where nll[k, j] = -log p(ids[s_k + 1 + j] | what was read), j = 0..L-1 (position j + 1).
``start_loss`` is the mean of nll_start over k and j < ``START_CHARS``, ``context_loss``
the same of nll_context, ``start_gap`` = start_loss - context_loss (nats/char). The
curves are the means over k at each position 1..L. Rows are independent and read as
one batch of K, so nothing depends on an eval batch size.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from charrnn import data, models

START_LINES = 256  # K line starts per split
START_CHARS = 16  # characters after a line start that start_loss averages
CURVE_CHARS = 64  # positions of the loss-by-position curves
CONTEXT = data.EVAL_BURN_IN  # characters read before a line start's first target in context


def newline_id(vocab: data.Vocab) -> int | None:
    """The id of ``'\\n'``, or None for a vocabulary without line starts."""
    return vocab.chars.index("\n") if "\n" in vocab.chars else None


@functools.partial(jax.jit, static_argnames="model")
def _position_nll(params, x, y, *, model: models.CharRNN):
    """Cross-entropy [K, T] of targets y [K, T] read from the start state with inputs x [K, T]."""
    _, logits = model(params, model.start_carry(params, x.shape[0]), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def position_nll(model: models.CharRNN, params, ids: np.ndarray, newline: int | None):
    """(nll_start, nll_context), float64 [K, L] each: the two reads of every line start.

    Row k is line start s_k, column j position j + 1. (None, None) when the split has no
    line start with C characters before it and L after.
    """
    starts = (np.zeros(0, np.int64) if newline is None
              else data.line_starts(ids, newline, START_LINES, CONTEXT, CURVE_CHARS))
    if not len(starts):
        return None, None
    ids = np.asarray(ids, np.int32)
    after = starts[:, None] + np.arange(CURVE_CHARS)  # [K, L]: the newline, then L-1 more
    read = starts[:, None] + np.arange(-(CONTEXT - 1), CURVE_CHARS)  # [K, C-1+L]
    nll_start = _position_nll(params, ids[after], ids[after + 1], model=model)
    nll_context = _position_nll(params, ids[read], ids[read + 1], model=model)[:, CONTEXT - 1:]
    return np.asarray(nll_start, np.float64), np.asarray(nll_context, np.float64)


def measure(model: models.CharRNN, params, ids: np.ndarray, newline: int | None):
    """(``{"start_loss", "context_loss", "start_gap"}``, curves float64 [2, L]) of a split.

    curves[0] is the loss by position from the start state, curves[1] in context. Returns
    (None, None) when the split has no line start with C characters before it and L after.
    """
    nll_start, nll_context = position_nll(model, params, ids, newline)
    if nll_start is None:
        return None, None
    curves = np.stack([nll_start.mean(axis=0), nll_context.mean(axis=0)])
    start_loss, context_loss = curves[:, :START_CHARS].mean(axis=1)
    return {"start_loss": float(start_loss), "context_loss": float(context_loss),
            "start_gap": float(start_loss - context_loss)}, curves


def format_curves(curves: np.ndarray) -> str:
    """The loss by position after a line start as a table, one line per position."""
    lines = [f"{'position':>8} {'from start':>10} {'in context':>10} {'gap':>7}"]
    for j, (a, b) in enumerate(curves.T, start=1):
        lines.append(f"{j:>8} {a:>10.4f} {b:>10.4f} {a - b:>7.4f}")
    return "\n".join(lines)


def describe(scalars: dict) -> str:
    """One line: start_loss, context_loss and the start gap."""
    return (f"start_loss {scalars['start_loss']:.4f} | context_loss "
            f"{scalars['context_loss']:.4f} | start gap {scalars['start_gap']:.4f} nats/char "
            f"(first {START_CHARS} characters after up to {START_LINES} line starts)")
