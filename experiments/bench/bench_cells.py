"""A/B of the training step per cell: this checkout's scan vs an older fused.py, one process.

    mkdir -p /tmp/ab && git show a787547:charrnn/fused.py > /tmp/ab/fused_base.py
    PYTHONPATH=/tmp/ab python experiments/bench/bench_cells.py --old=fused_base [--rounds=5 --steps=5]

``--old`` names an importable module (the older file, put on the import path by
the caller), so the script loads no code by file path.

Times ``jax.value_and_grad`` of the mean cross-entropy of a CharRNN (forward +
backward, jitted; B=32, T=128, E=64, V=65) for each model and contender:
``new`` (this checkout: the derived backward, or a cell's hand-tuned one),
``derived`` (the derived backward forced), ``old`` (the given fused.py; only
the cells it knows). Rounds interleave the contenders so that a change in the
machine's load hits all of them; the table gives medians, bests and ratios to ``old``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import models, scan

MODELS = {"rnn_1x512": ("rnn", 512, 1), "irnn_1x512": ("irnn", 512, 1),
          "gru_1x512": ("gru", 512, 1), "mgu_1x512": ("mgu", 512, 1),
          "lstm_1x128": ("lstm", 128, 1), "lstm_2x512": ("lstm", 512, 2)}
B, T, E, V = 32, 128, 64, 65


@dataclasses.dataclass(frozen=True)
class _Layer(models.Layer):
    """A layer that runs through ``impl(cell, params, carry, xs, table)``."""
    impl: object = None

    def run(self, params, carry, xs, *, fast=True, unroll=1, remat=False):
        table = models.input_table(params) if self.reads_tokens else None
        return self.impl(self.cell, params[self.name], carry, xs, table)


@dataclasses.dataclass(frozen=True)
class _Model(models.CharRNN):
    """CharRNN whose layers run through ``impl(cell name, cell, params, carry, xs, table)``."""
    impl: object = None

    @property
    def layers(self):
        impl = functools.partial(self.impl, self.cell)
        return tuple(_Layer(layer.index, layer.cell, layer.hidden_size, layer.vocab_size,
                            layer.matmul_dtype, impl) for layer in super().layers)


def contenders(old_module):
    out = {"new": lambda name, cell, p, c, xs, table: scan.recurrence(cell, p, c, xs, table),
           "derived": lambda name, cell, p, c, xs, table: scan.recurrence(
               cell, p, c, xs, table, derived=True)}
    if old_module is not None:
        out["old"] = lambda name, cell, p, c, xs, table: old_module.recurrence(
            name, p, c, xs, table)
    return out


def step_fn(cell, hidden, layers, impl):
    model = _Model(V, cell=cell, hidden_size=hidden, num_layers=layers, embed_dim=E, impl=impl)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)

    def loss(p):
        _, logits = model(p, model.initial_carry(B), tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

    fn = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(fn(params))
    return lambda: jax.block_until_ready(fn(params))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="module name of an older charrnn/fused.py to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    old = None
    if args.old:
        old = importlib.import_module(args.old)
    print(f"| model | contender | chars/s (median of {args.rounds}) | ratio to old | best | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        cell, hidden, layers = MODELS[name]
        fns = {label: step_fn(cell, hidden, layers, impl) for label, impl in contenders(old).items()
               if not (label == "old" and cell not in getattr(old, "_CELLS", ()))}
        rates = {label: [] for label in fns}
        for _ in range(args.rounds):
            for label, fn in fns.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                rates[label].append(args.steps * B * T / (time.perf_counter() - start))
        med = {label: statistics.median(r) for label, r in rates.items()}
        best = {label: max(r) for label, r in rates.items()}  # least disturbed by other load
        for label in rates:
            ratio = lambda d: f"{d[label] / d['old']:.3f}" if "old" in d else ""
            print(f"| {name} | {label} | {med[label]:,.0f} | {ratio(med)} | {best[label]:,.0f} "
                  f"| {ratio(best)} |", flush=True)


if __name__ == "__main__":
    main()
