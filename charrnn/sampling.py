"""Text generation: prime the hidden state on a prompt, then sample with one scan.

Inference has no target and no loss. Two stages:

1. **Priming** runs the prompt through the training forward pass
   (:meth:`models.CharRNN.__call__`: the same teacher-forced scan, no
   sampling, no dropout) from the model's start state (zeros, or a learned one). That gives the hidden state
   after the prompt and the logits for the character that follows it.
2. **Generation** is one jitted function: the first character is drawn from
   the priming logits, then a ``jax.lax.scan`` over the remaining steps whose
   carry is (hidden state, last character) feeds the last character through
   :meth:`models.CharRNN.step` (its weights prepared once before the scan,
   :meth:`models.CharRNN.step_weights`) and draws the next one with that step's key.
   The ``num_samples`` samples are the rows of one batch.

**Empty prompt.** The model always needs an input before it can predict.
With an empty prompt it is primed on a single newline ``'\\n'`` (the state
at the start of a line, the closest thing a corpus has to "start of text");
the newline is not part of the returned text. A vocabulary without ``'\\n'``
is primed on one all-zero input vector instead of a character embedding.

**Drawing one character.** Logits are divided by the temperature, then top-k
keeps the k largest (0 = all), then top-p (nucleus sampling, Holtzman et al.
2020) keeps the smallest set of most likely characters whose probability
(after temperature and top-k) reaches p; one character is drawn from the
renormalised rest. Characters tied with the last kept one are kept too.
Temperature 0 means greedy: the argmax, and top-k/top-p change nothing.

**Randomness.** Everything derives from ``jax.random.key(seed)``, split into
one key per drawn character (``jax.random.split(key, length)``, key t for
character t), so the same seed gives the same text on the same backend, and
a sample's first n characters do not depend on ``length``. The keys are made
in one vectorised call before the scan and enter it as its xs rather than
being split inside it: that takes one of the two threefry hashes out of every
step (1.5x the characters/s for a 1x128 LSTM on CPU).

This module is ``charrnn.sampling``; the package exports its :func:`sample`
as ``charrnn.sample`` (the module is not named ``sample.py`` so that the
function and the module never shadow each other).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import data, models
from charrnn.errors import UserError

EMPTY_PROMPT_CHAR = "\n"


class SampleError(UserError, ValueError):
    """A bad sampling option or prompt; the message is one line."""


def check_options(*, length: int, temperature: float, top_k: int, top_p: float,
                  num_samples: int, vocab_size: int | None = None) -> None:
    """Raise a SampleError for the first option out of range.

    ``vocab_size`` bounds ``top_k``; None skips that check (vocabulary not known yet).
    """
    if length < 0:
        raise SampleError(f"length must be >= 0 characters, got {length}")
    if not temperature >= 0:  # also rejects NaN
        raise SampleError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise SampleError(f"top_k must be >= 0 (0 = no top-k), got {top_k}")
    if vocab_size is not None and top_k > vocab_size:
        raise SampleError(f"top_k must be <= the vocabulary size {vocab_size}, got {top_k}")
    if not 0 < top_p <= 1:
        raise SampleError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p}")
    if num_samples < 1:
        raise SampleError(f"num_samples must be >= 1, got {num_samples}")


def encode_prompt(vocab: data.Vocab, prompt: str) -> np.ndarray:
    """Prompt ids int32 [P]; characters outside the vocabulary are named in a SampleError."""
    unknown = sorted(set(prompt) - set(vocab.chars))
    if unknown:
        raise SampleError("prompt has characters not in the model's vocabulary: "
                          + ", ".join(repr(c) for c in unknown))
    return vocab.encode(prompt)


@functools.partial(jax.jit, static_argnames="model")
def prime(params, ids, *, model: models.CharRNN):
    """Teacher-forced pass over the prompt ids int [P] (P >= 1) from the start state
    (:meth:`models.CharRNN.start_carry`: zeros, or the learned one).

    Returns (carry after the last prompt character, logits [1, V] for the next
    character) — exactly the training scan's carry and last logits for the same text.
    """
    carry, logits = model(params, model.start_carry(params, 1), ids[None, :])
    return carry, logits[:, -1]


def prime_empty(params, vocab: data.Vocab, model: models.CharRNN):
    """Priming for an empty prompt: a newline, or one zero input vector (see module doc)."""
    if EMPTY_PROMPT_CHAR in vocab.chars:
        return prime(params, jnp.asarray(vocab.encode(EMPTY_PROMPT_CHAR)), model=model)
    # A one-row all-zero embedding table: the same forward pass with input x_1 = 0.
    zero_embed = jnp.zeros((1, params["embed"].shape[1]), params["embed"].dtype)
    return prime({**params, "embed": zero_embed}, jnp.zeros((1,), jnp.int32), model=model)


def filter_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Tempered logits [..., V] with the characters top-k/top-p drop set to -inf.

    temperature > 0 (greedy is handled by :func:`draw`); top_k 0 or top_p 1 disable them.
    """
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the strictly likelier characters
        # Keep a character while the likelier ones hold less than top_p; the first always.
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return logits


def draw(key, logits, temperature: float, top_k: int = 0, top_p: float = 1.0, noise=None):
    """One character id per row of logits [B, V] -> int32 [B].

    The Gumbel-max trick: argmax(logits/temperature + g) with g_i standard
    Gumbel is distributed as softmax(logits/temperature). ``noise``: g drawn
    beforehand (``gumbel_noise(key, logits.shape)``: the same draw).
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits, temperature, top_k, top_p)
    if noise is None:
        noise = gumbel_noise(key, logits.shape)
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def gumbel_noise(key, shape):
    return jax.random.gumbel(key, shape, jnp.float32)


# Noise for all steps is drawn before the loop up to this many numbers (64 MB):
# one vectorised draw instead of one per step (LSTM 1x128, batch 1: 148k -> 182k chars/s).
_NOISE_AHEAD_MAX = 1 << 24


@functools.partial(jax.jit, static_argnames=(
    "model", "length", "temperature", "top_k", "top_p", "unroll"))
def generate(params, carry, logits, key, *, model: models.CharRNN, length: int,
             temperature: float, top_k: int = 0, top_p: float = 1.0, unroll: int = 1):
    """``length`` >= 1 characters per row after priming: ids int32 [B, length].

    carry: the primed hidden state (batch B); logits [B, V]: for the first
    character. One scan over length - 1 steps; the last drawn character is
    never fed back (its state would be unused). Key t of ``split(key, length)``
    draws character t, whether its noise is drawn before the loop or in it.
    """
    keys = jax.random.split(key, length)  # key t draws character t
    first = draw(keys[0], logits, temperature, top_k, top_p)
    ahead = temperature != 0 and (length - 1) * logits.size <= _NOISE_AHEAD_MAX
    xs = (jax.vmap(lambda k: gumbel_noise(k, logits.shape))(keys[1:]) if ahead else keys[1:])
    weights = model.step_weights(params)

    def step(state, x_t):
        carry, last = state
        carry, logits = model.step(weights, carry, last)
        nxt = (draw(None, logits, temperature, top_k, top_p, noise=x_t) if ahead
               else draw(x_t, logits, temperature, top_k, top_p))
        return (carry, nxt), nxt

    _, rest = jax.lax.scan(step, (carry, first), xs, unroll=unroll)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def sample(params_or_workdir, vocab=None, model: models.CharRNN | None = None, *,
           prompt: str = "", length: int = 500, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, num_samples: int = 1, seed: int = 0) -> list[str]:
    """Generate ``num_samples`` texts, each the prompt followed by ``length`` characters.

    params_or_workdir: a workdir (str or path; its latest checkpoint is loaded,
    vocabulary and model included) or a params pytree, in which case ``vocab``
    (a :class:`data.Vocab` or its characters as a str) and ``model`` are required.
    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
    Bad options, prompt characters outside the vocabulary or a workdir without
    a checkpoint raise a :class:`UserError`.
    """
    check_options(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                  num_samples=num_samples)
    if isinstance(params_or_workdir, (str, os.PathLike)):
        from charrnn import restore  # imports much more than sampling needs
        _, vocab, model, params, _ = restore.load_checkpoint(os.fspath(params_or_workdir),
                                                           weights="auto")
    else:
        params = params_or_workdir
        if vocab is None or model is None:
            raise SampleError("sampling from params needs vocab= and model= as well")
        vocab = data.Vocab(vocab) if isinstance(vocab, str) else vocab
    check_options(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                  num_samples=num_samples, vocab_size=vocab.size)
    ids = encode_prompt(vocab, prompt)
    if length == 0:
        return [prompt] * num_samples
    carry, logits = (prime(params, jnp.asarray(ids), model=model) if len(ids)
                     else prime_empty(params, vocab, model))
    # Every row starts from the same primed state: broadcast instead of priming B times.
    carry, logits = jax.tree.map(lambda a: jnp.repeat(a, num_samples, axis=0), (carry, logits))
    out = generate(params, carry, logits, jax.random.key(seed), model=model, length=length,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    return [prompt + vocab.decode(row) for row in np.asarray(out)]


def format_samples(texts: list[str]) -> str:
    """The command line's output: one sample as is; several, each under a header line."""
    if len(texts) == 1:
        return texts[0] + "\n"
    return "".join(f"=== sample {i + 1}/{len(texts)} ===\n{t}\n" for i, t in enumerate(texts))
