"""The character-level language model: embedding -> stacked layers -> logits.

A cell is defined once in :mod:`charrnn.cells` (its parameters, carry and
update); :class:`CellModule` is the Flax module derived from it. Every cell
keeps its recurrent weights in one parameter named ``W_hh`` (shape
``[H, G*H]``, G gates) so that diagnostics can find it by name, its input
weights in ``W_xh`` (``[E, G*H]``) and its bias in ``b`` (``[G*H]``). One
matmul per weight per step computes all gates at once.

A :class:`Layer` is one cell over time behind its input projection (layer 0:
token ids through the embedding; above it: the outputs of the layer below
through W_xh). It runs a window one of two ways, chosen by one argument:
``fast`` (training, evaluation and priming: :func:`charrnn.scan.recurrence`,
a scan whose backward pass is derived from the cell) or the reference
(autodiff of :func:`reference_scan` over the Flax module, which diagnostics
differentiate step by step and tests compare against); and it takes one
step at a time for sampling (:meth:`Layer.step`). :class:`CharRNN` builds
the layers and composes them with dropout (:mod:`charrnn.dropout`) and the
output head.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from charrnn import cells as cell_registry
from charrnn import config as config_lib
from charrnn import dropout as dropout_lib
from charrnn import scan

CELLS = cell_registry.names()  # the built-in cell names (the registry's)
MATMUL_DTYPE = config_lib.CHOICES["model.matmul_dtype"][0]  # float32: the default operand type
START_STATES = config_lib.CHOICES["model.start_state"]  # the kinds of CharRNN.start_state

Carry = Any  # one carry per layer: [B, H] (rnn, irnn, gru, mgu) or a (c, h) pair (lstm)


class CellModule(nn.Module):
    """The Flax module of a cell definition: its parameters and one step.

    ``__call__(carry, x [B, E]) -> (carry, y [B, H])`` with zx = x W_xh + b and
    zh = recurrent_input(carry) W_hh; with ``clip`` (a :class:`scan.CotangentClip`)
    the backward pass clips the cotangents of zx and zh (:func:`scan.clip_pre_activations`). Parameters are made in the order W_xh,
    W_hh, b, extras (the order fixes which random draw each one gets).
    """
    cell: Any  # a charrnn.cells.base.Cell
    hidden_size: int
    matmul_dtype: str = MATMUL_DTYPE  # operand type of the products (see scan.matmul)

    @nn.compact
    def __call__(self, carry, x, clip=None):
        H, G, cell = self.hidden_size, self.cell.num_gates, self.cell
        w_xh = self.param("W_xh", cell.input_init, (x.shape[-1], G * H))
        w_hh = self.param("W_hh", cell.recurrent_init, (H, G * H))
        b = self.param("b", cell.bias_init, (G * H,))
        extras = {name: self.param(name, init, shape)
                  for name, (shape, init) in cell.extra_params(H).items()}
        dtype = jnp.dtype(self.matmul_dtype)
        zx = scan.matmul(x, w_xh, dtype) + b
        zh = scan.matmul(cell.recurrent_input(carry), w_hh, dtype)
        if clip is not None:
            zx, zh = scan.clip_pre_activations(clip.rule, clip.tau, zx, zh)
        return cell.update(extras, carry, zx, zh)

    def initial_carry(self, batch_size: int) -> Carry:
        return self.cell.init_carry(batch_size, self.hidden_size)


def cell_module(name: str, hidden_size: int, matmul_dtype: str = MATMUL_DTYPE) -> CellModule:
    """The Flax module of the cell registered as ``name`` (e.g. ``cell_module("rnn", 64)``)."""
    return CellModule(cell_registry.get(name), hidden_size=hidden_size, matmul_dtype=matmul_dtype)


def reference_scan(step: Callable, carry, xs, unroll: int = 1):
    """The reference time loop: ``jax.lax.scan`` of ``step(carry, x_t) -> (carry, y_t)``.

    xs is a pytree with time as its leading axis ([T, ...]); returns
    (final carry, ys [T, ...]).
    """
    return jax.lax.scan(step, carry, xs, unroll=unroll)


@dataclasses.dataclass(frozen=True)
class Layer:
    """Layer ``index`` of a model: its input projection, then the cell over time.

    Layer 0 reads token ids: its input pre-activation x_t W_xh + b is row
    ``token_t`` of the table P = embed W_xh + b [V, G*H] (:func:`input_table`).
    One V x E x G*H product replaces a T*B x E x G*H one, and the gradient of
    the lookup (a scatter-add into P) replaces two more such products; where a
    window has fewer tokens than the vocabulary, the embeddings are looked up
    and projected instead. The layers above read the outputs h [.., H] of the
    layer below through W_xh and b.
    """
    index: int
    cell: Any  # a charrnn.cells.base.Cell
    hidden_size: int
    vocab_size: int
    matmul_dtype: str = MATMUL_DTYPE

    @property
    def name(self) -> str:
        return f"layer_{self.index}"

    @property
    def reads_tokens(self) -> bool:
        return self.index == 0

    @property
    def module(self) -> CellModule:
        return CellModule(self.cell, hidden_size=self.hidden_size, matmul_dtype=self.matmul_dtype)

    def cell_step(self, params: dict, clip=None) -> Callable:
        """The reference step, ``(carry, x_t [B, in]) -> (carry, h_t [B, H])`` (x_t
        the embeddings for layer 0), from the model's ``params``; ``clip``: see
        :class:`CellModule`."""
        p = {"params": params[self.name]}
        return lambda carry, x: self.module.apply(p, carry, x, clip)

    def run(self, params: dict, carry, xs, *, fast: bool = True, unroll: int = 1,
            remat: bool = False, clip=None):
        """The layer over a window: xs token ids [T, B] (layer 0) or the layer below's
        outputs [T, B, in] -> (carry after step T, hs [T, B, H]).

        ``fast``: :func:`charrnn.scan.recurrence` (the derived backward); else the
        reference, autodiff of :func:`reference_scan`. ``remat``: the backward pass
        recomputes the forward pass in chunks of about √T steps (:func:`_remat_chunks`).
        ``clip``: a :class:`scan.CotangentClip`, clipping inside BPTT (both ways alike).
        """
        table = None
        if self.reads_tokens:
            if fast and self.vocab_size <= xs.size:
                table = input_table(params)
            else:
                xs = params["embed"][xs]
        p = params[self.name]

        def over_time(inputs, carry, xs):
            p, table, clip = inputs
            if not fast:
                return reference_scan(self.cell_step({self.name: p}, clip), carry, xs, unroll)
            return scan.recurrence(self.cell, p, carry, xs, table=table, unroll=unroll,
                                   matmul_dtype=self.matmul_dtype, clip=clip)
        if remat:
            return _remat_chunks(over_time, (p, table, clip), carry, xs)
        return over_time((p, table, clip), carry, xs)

    def step_weights(self, params: dict) -> tuple:
        """What every sampling step of this layer reads, prepared once per loop:
        (W_hh cast to the products' operand type, the cell's extras) and the input
        projection (layer 0: the table P; above: W_xh cast, and b)."""
        dtype = jnp.dtype(self.matmul_dtype)
        p = params[self.name]
        w_hh, extras, _ = scan.split_params(p)
        projection = ((input_table(params),) if self.reads_tokens
                      else (p["W_xh"].astype(dtype), p["b"]))
        return (w_hh.astype(dtype), extras), projection

    def step(self, weights: tuple, carry, x):
        """One step (sampling): x token ids [B] (layer 0) or the layer below's h [B, in]
        -> (carry, h [B, H]); ``weights`` from :meth:`step_weights`."""
        rec, projection = weights
        if self.reads_tokens:
            (table,) = projection
            zx = table[x]
        else:
            w_xh, b = projection
            zx = scan.matmul(x, w_xh, w_xh.dtype) + b
        return scan.cell_step(self.cell, rec, carry, zx)


@dataclasses.dataclass(frozen=True)
class CharRNN:
    """embedding -> num_layers stacked cells -> logits over the vocabulary.

    Parameters are a plain pytree: ``{'embed': [V, E], 'layer_0': {...}, ...,
    'head': {'kernel': [H, V], 'bias': [V]}}``. Dropout (rate ``dropout``) is
    applied to the output of every layer while training.

    ``cell``: a registered name (:func:`charrnn.cells.names`) or
    ``package.module:Class`` naming a user's :class:`charrnn.cells.Cell` subclass.
    ``fast_vjp``: run the layers with the derived scan VJP of
    :mod:`charrnn.scan` (default) instead of autodiff of :func:`reference_scan`.
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
    ``unroll``: time steps per iteration of each layer's scan loop (config
    ``model.unroll``, resolved by :func:`resolve_unroll`); it changes speed, not results.
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
    matmul_dtype: str = MATMUL_DTYPE
    embed_init_std: float = 1.0
    weight_drop: float = 0.0
    dropout_mask: str = "step"
    unroll: int = 1
    start_state: str = "zero"

    @classmethod
    def from_config(cls, model_config, vocab_size: int) -> "CharRNN":
        """The model of a ``model`` config block (one saved by an older version too)."""
        m = config_lib.upgrade(model_config, section="model")
        return cls(vocab_size=vocab_size, cell=m.cell, hidden_size=m.hidden_size,
                   num_layers=m.num_layers, embed_dim=m.embed_dim, dropout=m.dropout,
                   fast_vjp=m.fast_vjp, remat=m.remat, matmul_dtype=m.matmul_dtype,
                   embed_init_std=m.embed_init_std, weight_drop=m.weight_drop,
                   dropout_mask=m.dropout_mask, unroll=resolve_unroll(m.unroll),
                   start_state=m.start_state)

    @property
    def cell_def(self):
        """The cell definition (:class:`charrnn.cells.base.Cell`) named by ``cell``."""
        return cell_registry.get(self.cell)

    @property
    def layers(self) -> tuple[Layer, ...]:
        cell = self.cell_def
        return tuple(Layer(i, cell, self.hidden_size, self.vocab_size, self.matmul_dtype)
                     for i in range(self.num_layers))

    def init(self, key) -> dict:
        keys = jax.random.split(key, self.num_layers + 2)
        params = {"embed": jax.random.normal(keys[0], (self.vocab_size, self.embed_dim))
                  * self.embed_init_std}
        in_dim = self.embed_dim
        for layer in self.layers:
            x = jnp.zeros((1, in_dim))
            module = layer.module
            params[layer.name] = module.init(keys[layer.index + 1], module.initial_carry(1),
                                             x)["params"]
            in_dim = self.hidden_size
        head = nn.Dense(self.vocab_size)
        params["head"] = head.init(keys[-1], jnp.zeros((1, in_dim)))["params"]
        if self.start_state == "learned":  # no random draw: the other parameters stay as they were
            params["start"] = jax.tree.map(lambda a: a[0], self.initial_carry(1))
        return params

    def initial_carry(self, batch_size: int) -> tuple:
        """Zero hidden state: a tuple with one carry per layer."""
        return tuple(self.cell_def.init_carry(batch_size, self.hidden_size)
                     for _ in range(self.num_layers))

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
        """Layer ``layer``'s reference step (:meth:`Layer.cell_step`)."""
        return self.layers[layer].cell_step(params)

    def __call__(self, params, carry, tokens, dropout_key=None, unroll: int | None = None,
                 batch_rows=None, clip=None):
        """Teacher-forced forward pass.

        tokens: int [B, T]; carry: from :meth:`initial_carry` or a previous call.
        Returns (carry after the last step, logits [B, T, V]). Layers run one after
        another, each a full scan over time (:meth:`Layer.run`, fast unless
        ``fast_vjp`` is off); dropout only when ``dropout_key`` is given.
        ``batch_rows`` (start, total): these B rows are rows start..start+B-1 of a
        batch of ``total`` (one device's share under data parallelism); dropout then
        applies to them the whole batch's mask rows, as on one device.
        ``clip``: a :class:`scan.CotangentClip`: clipping inside BPTT in every layer.
        """
        xs = jnp.swapaxes(tokens, 0, 1)  # [T, B], time-major for scan
        params = dropout_lib.drop_recurrent_weights(params, dropout_key, self.weight_drop,
                                                    self.num_layers)
        new_carry = []
        for layer in self.layers:
            c, xs = layer.run(params, carry[layer.index], xs, fast=self.fast_vjp,
                              unroll=unroll or self.unroll, remat=self.remat, clip=clip)
            new_carry.append(c)
            xs = dropout_lib.dropout(xs, dropout_key, self.dropout, layer.index,
                                     self.dropout_mask == "locked", batch_rows)
        return tuple(new_carry), jnp.swapaxes(self._head(params, xs), 0, 1)

    def step_weights(self, params) -> dict:
        """What every inference step reads, prepared once before a sampling loop:
        each layer's :meth:`Layer.step_weights`, and the head's kernel (cast to the
        products' operand type) and bias. (Measured: docs/design-notes.md, "step_weights".)
        """
        dtype = jnp.dtype(self.matmul_dtype)
        head = (params["head"]["kernel"].astype(dtype), params["head"]["bias"])
        return {"layers": tuple(layer.step_weights(params) for layer in self.layers),
                "head": head}

    def step(self, weights, carry, token):
        """One character through all layers (inference): token int [B] -> (carry, logits [B, V]).

        weights: :meth:`step_weights` of the parameters, made once per loop.
        """
        x, new_carry = token, []
        for layer, layer_weights in zip(self.layers, weights["layers"]):
            c, x = layer.step(layer_weights, carry[layer.index], x)
            new_carry.append(c)
        kernel, bias = weights["head"]
        return tuple(new_carry), scan.matmul(x, kernel, kernel.dtype) + bias

    def _head(self, params, h):
        """Logits [..., V] from the top layer's output h [..., H]."""
        return scan.matmul(h, params["head"]["kernel"], jnp.dtype(self.matmul_dtype)) \
            + params["head"]["bias"]


# Time steps per loop iteration on an accelerator with model.unroll = "auto". Measured
# on an H200 (docs/design-notes.md, "Unrolling the scan on a GPU"): LSTM 1x128 training
# 1.56M chars/s at 1, 2.77M at 8; on 2 CPU cores unrolling slowed LSTMs by 10-19%.
ACCELERATOR_UNROLL = 8


def resolve_unroll(value) -> int:
    """``model.unroll``: an integer as given; "auto": :data:`ACCELERATOR_UNROLL` time
    steps per scan iteration on a GPU or TPU, 1 on a CPU (chosen where the model runs,
    so a checkpoint moves between them)."""
    if value != "auto":
        return int(value)
    return 1 if jax.default_backend() == "cpu" else ACCELERATOR_UNROLL


def input_table(params):
    """embed W_xh + b of layer 0 [V, G*H]: row v is the input pre-activation of token v."""
    p = params["layer_0"]
    return params["embed"] @ p["W_xh"] + p["b"]


def _remat_chunks(run, inputs, carry, xs):
    """``run(inputs, carry, xs)`` over chunks of time under ``jax.checkpoint``.

    The backward pass keeps only each chunk's inputs and its starting carry
    and recomputes the chunk's forward pass: activation memory goes from
    O(T) per-step residuals to O(T/k + k) with chunks of k ≈ √T steps, for
    about one extra forward pass of compute.
    """
    T = xs.shape[0]
    k = _chunk_length(T)
    chunks = xs.reshape(T // k, k, *xs.shape[1:])
    body = jax.checkpoint(run)
    carry, hs = jax.lax.scan(lambda c, x: body(inputs, c, x), carry, chunks)
    return carry, hs.reshape(T, *hs.shape[2:])


def _chunk_length(T: int) -> int:
    """The divisor of T closest to √T (1 for a prime T: still exact, only slower)."""
    divisors = [k for k in range(1, T + 1) if T % k == 0]
    return min(divisors, key=lambda k: abs(k - math.sqrt(T)))


def recurrent_weights(params: dict) -> list:
    """The W_hh matrix [H, G*H] of every layer, in layer order."""
    layers = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k[6:]))
    return [params[k]["W_hh"] for k in layers]
