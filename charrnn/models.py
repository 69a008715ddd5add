"""The character-level language model: embedding -> stacked cells -> logits.

A cell is defined once in :mod:`charrnn.cells` (its parameters, carry and
update); :class:`CellModule` is the Flax module derived from it. Every cell
keeps its recurrent weights in one parameter named ``W_hh`` (shape
``[H, G*H]``, G gates) so that diagnostics can find it by name, its input
weights in ``W_xh`` (``[E, G*H]``) and its bias in ``b`` (``[G*H]``). One
matmul per weight per step computes all gates at once.

The time loop is :func:`unroll`, one ``jax.lax.scan`` over a step function;
training, evaluation, priming and sampling all go through it. For training
speed, :meth:`CharRNN.__call__` by default runs each layer as one
``jax.lax.scan`` whose backward pass is derived from the cell's update
(:mod:`charrnn.scan`); ``fast_vjp=False`` (plain autodiff of :func:`unroll`
over the Flax modules) gives the same numbers and is the reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from charrnn import cells as cell_registry
from charrnn import scan

CELLS = cell_registry.names()  # the built-in cell names (the registry's)
START_STATES = ("zero", "learned")  # the kinds of CharRNN.start_state

Carry = Any  # one carry per layer: [B, H] (rnn, irnn, gru, mgu) or a (c, h) pair (lstm)


class CellModule(nn.Module):
    """The Flax module of a cell definition: its parameters and one step.

    ``__call__(carry, x [B, E]) -> (carry, y [B, H])`` with zx = x W_xh + b and
    zh = recurrent_input(carry) W_hh. Parameters are made in the order W_xh,
    W_hh, b, extras (the order fixes which random draw each one gets).
    """
    cell: Any  # a charrnn.cells.base.Cell
    hidden_size: int
    matmul_dtype: str = "float32"  # operand type of the products (see scan.matmul)

    @nn.compact
    def __call__(self, carry, x):
        H, G, cell = self.hidden_size, self.cell.num_gates, self.cell
        w_xh = self.param("W_xh", cell.input_init, (x.shape[-1], G * H))
        w_hh = self.param("W_hh", cell.recurrent_init, (H, G * H))
        b = self.param("b", cell.bias_init, (G * H,))
        extras = {name: self.param(name, init, shape)
                  for name, (shape, init) in cell.extra_params(H).items()}
        dtype = jnp.dtype(self.matmul_dtype)
        zx = scan.matmul(x, w_xh, dtype) + b
        zh = scan.matmul(cell.recurrent_input(carry), w_hh, dtype)
        return cell.update(extras, carry, zx, zh)

    def initial_carry(self, batch_size: int) -> Carry:
        return self.cell.init_carry(batch_size, self.hidden_size)


def cell_module(name: str, hidden_size: int, matmul_dtype: str = "float32") -> CellModule:
    """The Flax module of the cell registered as ``name`` (e.g. ``cell_module("rnn", 64)``)."""
    return CellModule(cell_registry.get(name), hidden_size=hidden_size, matmul_dtype=matmul_dtype)


def unroll(step: Callable, carry, xs, unroll_steps: int = 1):
    """The one time loop: ``jax.lax.scan`` of ``step(carry, x_t) -> (carry, y_t)``.

    xs is a pytree with time as its leading axis ([T, ...]); returns
    (final carry, ys [T, ...]).
    """
    return jax.lax.scan(step, carry, xs, unroll=unroll_steps)


@dataclasses.dataclass(frozen=True)
class CharRNN:
    """embedding -> num_layers stacked cells -> logits over the vocabulary.

    Parameters are a plain pytree: ``{'embed': [V, E], 'layer_0': {...}, ...,
    'head': {'kernel': [H, V], 'bias': [V]}}``. Dropout (rate ``dropout``) is
    applied to the output of every layer while training.

    ``cell``: a registered name (:func:`charrnn.cells.names`) or
    ``package.module:Class`` naming a user's :class:`charrnn.cells.Cell` subclass.
    ``fast_vjp``: run the layers with the derived scan VJP of
    :mod:`charrnn.scan` (default) instead of autodiff of :func:`unroll`.
    ``remat``: rematerialise in the backward pass (``jax.checkpoint`` over
    chunks of about √T steps) so that activation memory stays small at long T
    (config ``model.remat``; it changes memory and time, not results).
    ``embed_init_std``: the embeddings start as N(0, std²) draws.
    ``weight_drop``: DropConnect on the recurrent matrices while training (Wan et
    al. 2013, as in Merity et al. 2018's AWD-LSTM): each W_hh element is zeroed
    with this probability, one mask per layer for the whole window and batch, so
    the recurrence itself is regularised, which dropout between layers leaves alone.
    ``dropout_mask``: ``step`` draws a new dropout mask at every time step;
    ``locked`` draws one mask per sequence (row) and layer and keeps it for all T
    steps of the window (variational dropout, Gal & Ghahramani 2016, as in Merity
    et al. 2018's AWD-LSTM): a unit dropped from a layer's output stays dropped
    for the whole window.
    ``matmul_dtype``: ``float32`` or ``bfloat16``, the operand type of every
    product of an activation with a weight matrix (float32 accumulation;
    parameters and all other arithmetic stay float32).
    ``start_state``: where every text starts (:data:`START_STATES`): ``zero``, the zero
    state; ``learned``, a trained state, one carry per layer in ``params['start']``
    (shapes of one row of the carry, e.g. ``(c [H], h [H])`` for an LSTM, initialised
    to zeros), which training restarts streams from (:meth:`start_carry`).
    """
    vocab_size: int
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embed_dim: int = 64
    dropout: float = 0.0
    fast_vjp: bool = True
    remat: bool = False
    matmul_dtype: str = "float32"
    embed_init_std: float = 1.0
    weight_drop: float = 0.0
    dropout_mask: str = "step"
    start_state: str = "zero"

    @classmethod
    def from_config(cls, model_config, vocab_size: int) -> "CharRNN":
        # .get: configs saved before a field existed still load.
        return cls(vocab_size=vocab_size, cell=model_config.cell,
                              hidden_size=model_config.hidden_size, num_layers=model_config.num_layers,
                              embed_dim=model_config.embed_dim, dropout=model_config.dropout,
                              fast_vjp=model_config.get("fast_vjp", True),
                              remat=model_config.get("remat", False),
                              matmul_dtype=model_config.get("matmul_dtype", "float32"),
                              embed_init_std=model_config.get("embed_init_std", 1.0),
                              weight_drop=model_config.get("weight_drop", 0.0),
                              dropout_mask=model_config.get("dropout_mask", "step"),
                              start_state=model_config.get("start_state", "zero"))

    @property
    def cell_def(self):
        """The cell definition (:class:`charrnn.cells.base.Cell`) named by ``cell``."""
        return cell_registry.get(self.cell)

    @property
    def cells(self):
        cell = self.cell_def
        return [CellModule(cell, hidden_size=self.hidden_size, matmul_dtype=self.matmul_dtype)
                for _ in range(self.num_layers)]

    def init(self, key) -> dict:
        keys = jax.random.split(key, self.num_layers + 2)
        params = {"embed": jax.random.normal(keys[0], (self.vocab_size, self.embed_dim))
                  * self.embed_init_std}
        in_dim = self.embed_dim
        for layer, cell in enumerate(self.cells):
            x = jnp.zeros((1, in_dim))
            params[f"layer_{layer}"] = cell.init(keys[layer + 1], cell.initial_carry(1), x)["params"]
            in_dim = self.hidden_size
        head = nn.Dense(self.vocab_size)
        params["head"] = head.init(keys[-1], jnp.zeros((1, in_dim)))["params"]
        if self.start_state == "learned":  # no random draw: the other parameters stay as they were
            params["start"] = jax.tree.map(lambda a: a[0], self.initial_carry(1))
        return params

    def initial_carry(self, batch_size: int) -> tuple:
        """Zero hidden state: a tuple with one carry per layer."""
        return tuple(cell.initial_carry(batch_size) for cell in self.cells)

    def start_carry(self, params: dict, batch_size: int) -> tuple:
        """The start state (``start_state``) for ``batch_size`` rows: zeros, or the learned
        ``params['start']`` broadcast over the rows. Sampling, evaluation and restarts begin here."""
        if self.start_state != "learned":
            return self.initial_carry(batch_size)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch_size,) + a.shape), params["start"])

    def restart(self, params: dict, carry: tuple, rows) -> tuple:
        """``carry`` with the rows where ``rows`` (bool [B]) is True set to the start state."""
        start = self.start_carry(params, rows.shape[0])
        pick = lambda s, c: jnp.where(rows.reshape((-1,) + (1,) * (c.ndim - 1)), s, c)
        return jax.tree.map(pick, start, carry)

    def cell_step(self, params: dict, layer: int) -> Callable:
        """The step function of one layer, ``(carry, x_t [B, in]) -> (carry, h_t [B, H])``."""
        cell = self.cells[layer]
        p = {"params": params[f"layer_{layer}"]}
        return lambda carry, x: cell.apply(p, carry, x)

    def __call__(self, params, carry, tokens, dropout_key=None, unroll_steps: int = 1,
                 batch_rows=None):
        """Teacher-forced forward pass.

        tokens: int [B, T]; carry: from :meth:`initial_carry` or a previous call.
        Returns (carry after the last step, logits [B, T, V]). Layers run one after
        another, each a full scan over time; dropout only when ``dropout_key`` is given.
        ``batch_rows`` (start, total): these B rows are rows start..start+B-1 of a
        batch of ``total`` (one device's share under data parallelism); dropout then
        applies to them the whole batch's mask rows, as on one device.
        """
        tokens = jnp.swapaxes(tokens, 0, 1)  # [T, B], time-major for scan
        params = self._drop_recurrent_weights(params, dropout_key)
        new_carry = []
        for layer in range(self.num_layers):
            if layer == 0:
                xs = self._first_layer_inputs(params, tokens)
            run = functools.partial(self._run_layer, layer=layer, unroll_steps=unroll_steps)
            if self.remat:
                c, xs = _remat_chunks(run, params, carry[layer], xs)
            else:
                c, xs = run(params, carry[layer], xs)
            new_carry.append(c)
            xs = self._dropout(xs, dropout_key, layer, batch_rows)
        return tuple(new_carry), jnp.swapaxes(self._head(params, xs), 0, 1)

    def _first_layer_inputs(self, params, tokens):
        """What layer 0 reads: embeddings [T, B, E], or for the fast path tokens [T, B].

        The fast path folds the embedding into layer 0's input projection: with
        the table P = embed W_xh + b [V, G*H], x_t W_xh + b is row tokens_t of P,
        looked up inside the time loop. One V x E x G*H product replaces a
        T*B x E x G*H one, and the gradient of the lookup (a scatter-add into P)
        replaces two more such products.
        """
        if self.fast_vjp and self.vocab_size <= tokens.size:
            return tokens
        return params["embed"][tokens]

    def _run_layer(self, params, carry, xs, *, layer, unroll_steps):
        """One layer over a window: xs [T, B, in] (or tokens [T, B]) -> (carry, hs [T, B, H])."""
        if not self.fast_vjp:
            return unroll(self.cell_step(params, layer), carry, xs, unroll_steps)
        p = params[f"layer_{layer}"]
        table = _input_table(params) if xs.ndim == 2 else None  # layer 0 reads token ids
        return scan.recurrence(self.cell_def, p, carry, xs, table=table, unroll=unroll_steps,
                               matmul_dtype=self.matmul_dtype)

    def step_weights(self, params) -> dict:
        """What every inference step reads, prepared once before a sampling loop.

        Per layer, ``rec``: W_hh cast to the products' operand type and the
        cell's extras; the input side: for layer 0 the table P = embed W_xh + b
        [V, G*H] of training's fast path (row token_t is x_t W_xh + b, so a step
        does one product fewer), for the others W_xh (cast) and b. The head's
        kernel (cast) and bias. (Measured: docs/design-notes.md, "step_weights".)
        """
        dtype = jnp.dtype(self.matmul_dtype)
        layers = []
        for layer in range(self.num_layers):
            p = params[f"layer_{layer}"]
            w_hh, extras, _ = scan.split_params(p)
            rec = (w_hh.astype(dtype), extras)
            inputs = ((_input_table(params),) if layer == 0
                      else (p["W_xh"].astype(dtype), p["b"]))
            layers.append((rec, inputs))
        head = (params["head"]["kernel"].astype(dtype), params["head"]["bias"])
        return {"layers": tuple(layers), "head": head}

    def step(self, weights, carry, token):
        """One character through all layers (inference): token int [B] -> (carry, logits [B, V]).

        weights: :meth:`step_weights` of the parameters, made once per loop. Each
        layer is the cell's update (:func:`charrnn.scan.cell_step`).
        """
        cell = self.cell_def
        (rec, (table,)), *upper = weights["layers"]
        c, x = scan.cell_step(cell, rec, carry[0], table[token])
        new_carry = [c]
        for layer, (rec, (w_xh, b)) in enumerate(upper, start=1):
            zx = scan.matmul(x, w_xh, w_xh.dtype) + b
            c, x = scan.cell_step(cell, rec, carry[layer], zx)
            new_carry.append(c)
        kernel, bias = weights["head"]
        return tuple(new_carry), scan.matmul(x, kernel, kernel.dtype) + bias

    def _head(self, params, h):
        """Logits [..., V] from the top layer's output h [..., H]."""
        return scan.matmul(h, params["head"]["kernel"], jnp.dtype(self.matmul_dtype)) \
            + params["head"]["bias"]

    def _drop_recurrent_weights(self, params, key):
        if key is None or self.weight_drop == 0.0:
            return params
        keep = 1.0 - self.weight_drop
        params = dict(params)
        for layer in range(self.num_layers):
            p = dict(params[f"layer_{layer}"])
            layer_key = jax.random.fold_in(jax.random.fold_in(key, self.num_layers), layer)
            mask = keep_mask(layer_key, keep, p["W_hh"].shape)
            p["W_hh"] = jnp.where(mask, p["W_hh"] / keep, 0.0)
            params[f"layer_{layer}"] = p
        return params

    def _dropout(self, x, key, layer, batch_rows=None):
        """x [T, B, H] with inverted dropout; ``batch_rows``: see :meth:`__call__`.

        The mask is [T, B, H] (``dropout_mask='step'``) or [1, B, H] broadcast over
        the T steps (``'locked'``).
        """
        if key is None or self.dropout == 0.0:
            return x
        keep = 1.0 - self.dropout
        shape = (1,) + x.shape[1:] if self.dropout_mask == "locked" else x.shape
        mask = keep_mask(jax.random.fold_in(key, layer), keep, shape, batch_rows)
        return jnp.where(mask, x / keep, 0.0)


def _input_table(params):
    """embed W_xh + b of layer 0 [V, G*H]: row v is the input pre-activation of token v."""
    p = params["layer_0"]
    return params["embed"] @ p["W_xh"] + p["b"]


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


def _remat_chunks(run, params, carry, xs):
    """``run(params, carry, xs)`` over chunks of time under ``jax.checkpoint``.

    The backward pass keeps only each chunk's inputs and its starting carry
    and recomputes the chunk's forward pass: activation memory goes from
    O(T) per-step residuals to O(T/k + k) with chunks of k ≈ √T steps, for
    about one extra forward pass of compute.
    """
    T = xs.shape[0]
    k = _chunk_length(T)
    chunks = xs.reshape(T // k, k, *xs.shape[1:])
    body = jax.checkpoint(run)
    carry, hs = jax.lax.scan(lambda c, x: body(params, c, x), carry, chunks)
    return carry, hs.reshape(T, *hs.shape[2:])


def _chunk_length(T: int) -> int:
    """The divisor of T closest to √T (1 for a prime T: still exact, only slower)."""
    divisors = [k for k in range(1, T + 1) if T % k == 0]
    return min(divisors, key=lambda k: abs(k - math.sqrt(T)))


def recurrent_weights(params: dict) -> list:
    """The W_hh matrix [H, G*H] of every layer, in layer order."""
    layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    return [params[k]["W_hh"] for k in layers]
