"""charrnn's LSTM parameters in cuDNN's layout, and a CharRNN whose layers run as one cuDNN call.

charrnn keeps per layer ``W_xh`` [E, 4H], ``W_hh`` [H, 4H], ``b`` [4H], gate
blocks in the order i, f, g, o (charrnn/cells/lstm.py), used as

    z = x W_xh + h W_hh + b.

cuDNN's LSTM (``jax.experimental.rnn.lstm``, PyTorch ``nn.LSTM`` on a GPU)
computes the same gates, in the same block order, as

    z = x W_ih^T + b_ih + h W_hh^T + b_hh,   W_ih [4H, E], W_hh [4H, H],

so the map is a transpose per matrix and the bias split as b_ih = b, b_hh = 0
(any split with b_ih + b_hh = b is the same model; this one is exact). The
carry maps too: charrnn's (c, h) per layer is cuDNN's h_0, c_0 [L, B, H].
``jax.experimental.rnn`` takes all weights as one flat float32 vector: every
layer's W_ih then W_hh (row-major), then every layer's b_ih then b_hh (its
module docstring; ``unpack_lstm_weights`` reads it back).

:class:`CudnnLSTM` is the same model as a plain LSTM ``CharRNN`` (same
parameters, same initial state, same logits) whose L layers are one
``jax.experimental.rnn.lstm`` call (float32; cuDNN's custom call lowers on
CUDA/ROCm only) or, off the GPU, its reference ``lstm_ref`` (a ``lax.scan`` of
the same equations). It has what ``charrnn.step.init_state`` and
``make_train_step`` read from a model, so the benchmark times charrnn's own
training step with the cuDNN layers in place of the scan. Dropout, weight drop
and bfloat16 products have no cuDNN counterpart here and are refused.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import rnn

from charrnn import models


def layer_weights(params: dict, num_layers: int) -> list:
    """[(W_ih [4H, in], W_hh [4H, H], b_ih [4H], b_hh [4H])] per layer, cuDNN's orientation."""
    out = []
    for layer in range(num_layers):
        p = params[f"layer_{layer}"]
        out.append((p["W_xh"].T, p["W_hh"].T, p["b"], jnp.zeros_like(p["b"])))
    return out


def pack_lstm_weights(params: dict, num_layers: int) -> jax.Array:
    """charrnn LSTM parameters -> ``jax.experimental.rnn``'s flat weight vector (float32).

    Differentiable: the gradient of the vector maps back onto W_xh, W_hh and b.
    """
    layers = layer_weights(params, num_layers)
    matrices = [w.reshape(-1) for w_ih, w_hh, _, _ in layers for w in (w_ih, w_hh)]
    biases = [b for _, _, b_ih, b_hh in layers for b in (b_ih, b_hh)]
    return jnp.concatenate(matrices + biases).astype(jnp.float32)


def torch_lstm_weights(params: dict, num_layers: int) -> dict:
    """charrnn LSTM parameters -> ``nn.LSTM``'s ``state_dict`` entries (NumPy float32)."""
    out = {}
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(layer_weights(params, num_layers)):
        for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih),
                            ("bias_hh", b_hh)):
            out[f"{name}_l{layer}"] = np.asarray(value, np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class CudnnLSTM:
    """A plain LSTM :class:`charrnn.models.CharRNN` whose layers run as one cuDNN LSTM.

    ``impl``: ``cudnn`` (``jax.experimental.rnn.lstm``) or ``ref`` (``lstm_ref``,
    any backend); :meth:`for_backend` picks by the default backend.
    """
    base: models.CharRNN
    impl: str = "cudnn"

    def __post_init__(self):
        b = self.base
        if b.cell != "lstm":
            raise ValueError(f"cuDNN runs the lstm cell only, not {b.cell!r}")
        if b.dropout or b.weight_drop or b.matmul_dtype != "float32":
            raise ValueError("cuDNN path: no dropout, no weight drop, float32 products only")
        if self.impl not in ("cudnn", "ref"):
            raise ValueError(f"impl must be cudnn or ref, not {self.impl!r}")

    @classmethod
    def for_backend(cls, base: models.CharRNN) -> "CudnnLSTM":
        return cls(base, "cudnn" if jax.default_backend() == "gpu" else "ref")

    def init(self, key) -> dict:
        return self.base.init(key)

    def initial_carry(self, batch_size: int) -> tuple:
        return self.base.initial_carry(batch_size)

    def __getattr__(self, name):  # what else a step reads of a model: the base's fields
        if name == "base":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, params, carry, tokens, dropout_key=None, unroll: int = 1,
                 batch_rows=None, clip=None):
        """Teacher-forced forward pass, as ``CharRNN.__call__`` (no dropout to apply; cuDNN
        offers no clipping inside BPTT, so ``clip`` must be None).

        tokens int [B, T]; carry ((c, h) [B, H] per layer) -> (carry, logits [B, T, V]).
        """
        if clip is not None:
            raise ValueError("cuDNN's LSTM cannot clip inside BPTT (optim.clip_at=bptt)")
        del dropout_key, unroll, batch_rows
        L, H = self.base.num_layers, self.base.hidden_size
        x = params["embed"][tokens]  # [B, T, E]
        h0 = jnp.stack([h for _, h in carry])
        c0 = jnp.stack([c for c, _ in carry])
        weights = pack_lstm_weights(params, L)
        lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        size = dict(input_size=x.shape[-1], hidden_size=H, num_layers=L, dropout=0.0,
                    bidirectional=False)
        if self.impl == "cudnn":
            y, h_n, c_n = rnn.lstm(x, h0, c0, weights, lengths, **size)
        else:
            unpacked = rnn.unpack_lstm_weights(weights, x.shape[-1], H, L, False)
            y, h_n, c_n = rnn.lstm_ref(x, h0, c0, *unpacked, lengths, *size.values())
        head = params["head"]
        return tuple(zip(c_n, h_n)), y @ head["kernel"] + head["bias"]


def random_case(model: models.CharRNN, batch: int, seq_len: int, seed: int = 0):
    """(params, carry, tokens [B, T]) drawn at random, N(0, 0.25) for every parameter and
    for c and h (different draws: a swapped carry shows), not the model's initialisation."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)
    params = jax.tree.map(lambda x: normal(*x.shape),
                          jax.eval_shape(model.init, jax.random.key(0)))
    carry = tuple((normal(batch, model.hidden_size), normal(batch, model.hidden_size))
                  for _ in range(model.num_layers))
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (batch, seq_len)), jnp.int32)
    return params, carry, tokens


def max_differences(impl: str, hidden: int = 32, layers: int = 2, batch: int = 4,
                    seq_len: int = 16, vocab: int = 65, embed: int = 64) -> dict:
    """How far :class:`CudnnLSTM` (``impl``) is from charrnn's own scan, on random parameters
    and a random carry: max |Δ logits|, max |Δ final (c, h)|, and over every parameter
    max |Δ grad| / max |grad| of the mean cross-entropy. Products at the highest precision
    (no TF32), so what remains is float32 rounding: a wrong layout shows as O(1)."""
    import optax
    model = models.CharRNN(vocab, cell="lstm", hidden_size=hidden, num_layers=layers,
                           embed_dim=embed)
    params, carry, tokens = random_case(model, batch, seq_len)

    def loss(m, p):
        new_carry, logits = m(p, carry, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return ce.mean(), (new_carry, logits)

    with jax.default_matmul_precision("highest"):
        ours, theirs = (jax.grad(loss, argnums=1, has_aux=True)(m, params)
                        for m in (model, CudnnLSTM(model, impl)))
    (g1, (c1, l1)), (g2, (c2, l2)) = ours, theirs
    diff = lambda a, b: float(jnp.max(jnp.abs(a - b)))
    return {"impl": impl, "logits": diff(l1, l2),
            "carry": max(jax.tree.leaves(jax.tree.map(diff, c1, c2))),
            "grad_relative": max(jax.tree.leaves(jax.tree.map(
                lambda a, b: diff(a, b) / float(jnp.max(jnp.abs(a))), g1, g2)))}
