"""Dropout and weight drop: which units or weights a training step zeroes.

Both draw their masks with :func:`keep_mask`, a counter-based hash of each
element's index, so a device holding some rows of a batch computes exactly
those rows of the whole batch's mask (data parallelism gives the same
numbers as one device).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def drop_recurrent_weights(params: dict, key, rate: float, num_layers: int) -> dict:
    """DropConnect on every layer's W_hh (Wan et al. 2013; Merity et al. 2018's
    AWD-LSTM): each element zeroed with probability ``rate``, the rest scaled by
    1/(1 - rate); one mask per layer for the whole window and batch. No key or
    rate 0: ``params`` unchanged."""
    if key is None or rate == 0.0:
        return params
    keep = 1.0 - rate
    params = dict(params)
    for layer in range(num_layers):
        p = dict(params[f"layer_{layer}"])
        layer_key = jax.random.fold_in(jax.random.fold_in(key, num_layers), layer)
        mask = keep_mask(layer_key, keep, p["W_hh"].shape)
        p["W_hh"] = jnp.where(mask, p["W_hh"] / keep, 0.0)
        params[f"layer_{layer}"] = p
    return params


def dropout(x, key, rate: float, layer: int, locked: bool = False, batch_rows=None):
    """Inverted dropout of a layer's outputs x [T, B, H]: zeroed with probability
    ``rate``, the rest scaled by 1/(1 - rate). The mask is [T, B, H] (a new one every
    step), or with ``locked`` [1, B, H], one per sequence for the whole window
    (variational dropout, Gal & Ghahramani 2016). ``batch_rows`` (start, total): x holds
    rows start.. of a batch of ``total``; the mask is those rows of the whole batch's.
    No key or rate 0: x unchanged."""
    if key is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (1,) + x.shape[1:] if locked else x.shape
    mask = keep_mask(jax.random.fold_in(key, layer), keep, shape, batch_rows)
    return jnp.where(mask, x / keep, 0.0)


def keep_mask(key, keep: float, shape, rows=None) -> jax.Array:
    """Bernoulli(keep) booleans of ``shape``: a dropout mask.

    Each element is an integer hash of its index, seeded by two words drawn
    from ``key``: two rounds of Chris Wellons' "lowbias32" mixer (constants
    0x7feb352d, 0x846ca68b), a bijection of 32-bit integers whose output bits
    pass avalanche tests. A few integer operations per element instead of
    threefry's rounds (timings: docs/design-notes.md, "keep_mask").

    ``rows`` (start, total): ``shape[1]`` is rows start.. of an axis of ``total``;
    the result is those rows of the mask of that larger shape, hashing only their
    own indices (one device's share of a data-parallel batch).
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    if rows is None:
        x = jax.lax.iota(jnp.uint32, math.prod(shape))
    else:
        start, total = rows
        t, b, rest = (jax.lax.broadcasted_iota(jnp.uint32, (shape[0], shape[1],
                                                            math.prod(shape[2:])), axis)
                      for axis in range(3))
        start = jnp.asarray(start).astype(jnp.uint32)  # a traced device offset under shard_map
        x = ((t * total + (start + b)) * math.prod(shape[2:]) + rest).reshape(-1)
    x = _lowbias32(_lowbias32(x ^ seed[0]) ^ seed[1])
    threshold = min(int(keep * 2.0 ** 32), 2 ** 32 - 1)  # P(x < threshold) = keep (to 2^-32)
    return (x < jnp.uint32(threshold)).reshape(shape)


def _lowbias32(x):
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)
