"""Running a sweep's runs: one at a time, or many as one jitted program.

Two ways to run a grid (:mod:`charrnn.sweep.grid`), with the same numbers:

- :func:`run_single`: one run, the plain jitted :func:`step.train_step`
  (one process per run, e.g. one task of a cluster array job);
- :func:`run_group`: every run of one (cell, optimizer) — they share
  parameter shapes — in one program. The state, the batch and the runtime
  hyperparameters (the rule's index and strength τ, the learning rate) get a
  leading run axis [R, ...] and the step is :func:`step.train_step` under
  ``jax.vmap`` (in chunks, see :func:`make_group_step`), its runs split over the
  devices of a mesh if given (:func:`group_mesh`). One compiled step serves
  every rule, strength, learning rate and seed: the rule is a runtime index
  into the group's rules (:func:`clipping.switch`) and each run's state holds
  every one of those rules' states (:func:`group_optimizer`).

Both feed :func:`step.run_steps` and record, per run and step, the loss
(nats/char), the global gradient norm before and after clipping, the
threshold in force, whether the step clipped and whether it was non-finite,
plus the val loss every ``eval_every`` steps (step 0 included).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import clipping
from charrnn import config as config_lib
from charrnn import data, models, optim, parallel
from charrnn import step as step_lib
from charrnn.sweep.grid import Run, SweepError, parse_strength, run_config

STEP_METRICS = ("loss", "grad_norm", "grad_norm_clipped", "clip_threshold", "clipped",
                "nonfinite")
# Kept too where the placement logs them: the share of the units it clips that were
# clipped (rows at clip_at=example, (row, layer, time step) cotangents at bptt).
UNIT_METRICS = ("example_clip_fraction", "bptt_clip_fraction")


@dataclasses.dataclass
class Corpus:
    """Train ids, the (possibly truncated) val ids used for evaluation, and the vocabulary size."""
    train_ids: np.ndarray
    val_ids: np.ndarray
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "Corpus":
        text = data.load_corpus(config.data)
        vocab = data.Vocab.from_text(text)
        train_ids, val_ids, _ = data.split(vocab.encode(text), config.data.val_fraction,
                                           config.data.test_fraction)
        if config.sweep.eval_chars:
            val_ids = val_ids[:config.sweep.eval_chars]
        return cls(train_ids, val_ids, vocab.size)


# ---------------------------------------------------------------------------
# One run: the plain training step


def run_single(config, corpus: Corpus, num_steps: int | None = None) -> dict:
    """Train one run with :func:`step.make_train_step`; returns its history.

    ``config`` is a full run config (:func:`grid.run_config`). History: per-step
    arrays ``loss``, ``grad_norm``, ``grad_norm_clipped``, ``clip_threshold``,
    ``clipped``, ``nonfinite`` [num_steps] and ``val_steps``, ``val_loss`` (nats/char).
    """
    num_steps = config.train.num_steps if num_steps is None else num_steps
    model = models.CharRNN.from_config(config.model, corpus.vocab_size)
    optimizer = optim.Optimizer.from_config(config)
    state = step_lib.init_state(model, optimizer, config.train.batch_size, config.seed)
    step_fn = step_lib.make_train_step(model, optimizer,
                                       reset_prob=config_lib.upgrade(config).train.reset_prob)
    batcher = data.Batcher(corpus.train_ids, config.train.batch_size, config.train.seq_len,
                           config.seed)
    evaluate = _evaluator(model, config, corpus, num_runs=None)
    return _train(step_fn, state, batcher.next_batch, num_steps, evaluate, 1,
                  config.sweep.eval_every)[0]


def reference_norm(config, run: Run, corpus: Corpus) -> float:
    """Mean global gradient norm at the run's initial parameters over its first batches.

    The warm-up feeds the run's first ``sweep.warmup_steps`` training windows
    (same seed, same batcher, hidden state carried) through
    :func:`step.train_step` with clipping off and an optimizer that changes
    nothing (:meth:`optim.Optimizer.frozen`), so it measures the unclipped norm
    without moving: a warm-up that trained at a learning rate that explodes
    would measure the explosion. Every way of running the grid calls this, so
    all get the same τ.
    """
    c = run_config(config, dataclasses.replace(run, rule="none", strength="none"))
    model = models.CharRNN.from_config(c.model, corpus.vocab_size)
    state = step_lib.init_state(model, optim.Optimizer.frozen(), c.train.batch_size, c.seed)
    batcher = data.Batcher(corpus.train_ids, c.train.batch_size, c.train.seq_len, c.seed)
    steps = step_lib.run_steps(_frozen_step(model), state, batcher.next_batch, 0,
                               config.sweep.warmup_steps)
    norms = np.asarray(jax.device_get([m["grad_norm"] for _, _, m in steps]), np.float64)
    norms = norms[np.isfinite(norms)]
    if norms.size == 0:
        raise SweepError(f"no finite gradient norm in the warm-up of {run.name}")
    return float(norms.mean())


@functools.lru_cache(maxsize=8)
def _frozen_step(model: models.CharRNN):
    """train_step with clipping off and a zero update (compiled once per model)."""
    return jax.jit(functools.partial(step_lib.train_step, model=model,
                                     optimizer=optim.Optimizer.frozen()))


def strengths(config, runs: list[Run], corpus: Corpus) -> tuple[list[float], dict]:
    """(the strength of each run's rule as a number, the reference norm per (cell,
    optimizer, seed) that needed one: a relative label 'Nx' is N times it)."""
    refs = {}
    for run in runs:
        key = (run.cell, run.optimizer, run.seed)
        if parse_strength(run.rule, run.strength)[0] == "relative" and key not in refs:
            refs[key] = reference_norm(config, run, corpus)
    taus = []
    for run in runs:
        kind, value = parse_strength(run.rule, run.strength)
        taus.append(value * refs[(run.cell, run.optimizer, run.seed)] if kind == "relative"
                    else value)
    return taus, refs


# ---------------------------------------------------------------------------
# Many runs: one program


def group_rules(configs: list) -> tuple:
    """The clipping rules of a group's runs, each once, in the registry's order (a run's
    ``hypers["rule"]`` is its index here)."""
    used = {c.optim.clip_mode for c in configs}
    return tuple(name for name in clipping.RULES if name in used)


def group_optimizer(config, rules: tuple = (), rule=None, **runtime) -> optim.Optimizer:
    """The optimizer of one run of a group: ``config``'s, with the runtime hyperparameters
    (:data:`optim.RUNTIME`, traced scalars []) replacing its values. With two or more
    ``rules`` the clipping rule is ``rules[rule]`` (``rule``: int32 [], traced) and its
    state the union of theirs (:func:`clipping.switch`); with one, ``config``'s own rule."""
    optimizer = optim.Optimizer.from_config(config, **runtime)
    if len(rules) < 2:
        return optimizer
    clip = clipping.switch(rules, 0 if rule is None else rule, runtime.get("strength"),
                           config_lib.upgrade(config).optim)
    return dataclasses.replace(optimizer, clip=clip)


def make_group_step(model: models.CharRNN, config, runs_per_chunk: int = 0, mesh=None,
                    rules: tuple = ()):
    """The jitted step of R runs: (states[R], batches[R], hypers) -> (states, metrics[R]).

    ``hypers``: runtime hyperparameters, name -> [R]: any of :data:`optim.RUNTIME`
    (``strength``, ``learning_rate``: float32) and, where the program packs two or
    more ``rules`` (:func:`group_rules`), ``rule`` (int32: an index into them). Each
    run's step is :func:`step.train_step` with :func:`group_optimizer` at run r's
    values (the rule none ignores a strength).
    ``runs_per_chunk`` C sets the layout:
    runs are vectorized C at a time by ``jax.vmap`` and the R / C chunks run one
    after another inside the same program (``jax.lax.map``). 0 (or ≥ R) vmaps
    all runs at once, the layout for a GPU or TPU that one small model leaves
    idle; 1 runs them one by one (no ``vmap``, so the rule's switch is a real
    branch), which measured fastest on a 2-core CPU, where
    batched matmuls are slower than plain ones (experiments/bench/bench_sweep.py).
    With a ``mesh`` (:func:`parallel.make_mesh`) of N devices the runs are split
    over them (``jax.shard_map``: each device steps its R/N runs, laid out as
    above, with no communication); inputs come placed by
    :func:`parallel.shard_runs`.
    ``config`` is any run config of the group (model, optimizer and the rules'
    other settings are shared). Each run's dropout key derives from its
    own state (:func:`step.step_key`), as in :func:`run_single`.
    """
    if runs_per_chunk < 0:
        raise SweepError(f"runs_per_chunk must be >= 0, got {runs_per_chunk}")

    reset_prob = config_lib.upgrade(config).train.reset_prob

    def one_run(state, batch, hypers):
        optimizer = group_optimizer(config, rules, **hypers)
        return step_lib.train_step(state, batch, model=model, optimizer=optimizer,
                                   reset_prob=reset_prob)

    def group(states, batches, hypers):
        num_runs = jax.tree.leaves(hypers)[0].shape[0]
        if runs_per_chunk == 0 or runs_per_chunk >= num_runs:
            return jax.vmap(one_run)(states, batches, hypers)
        return jax.lax.map(lambda args: one_run(*args), (states, batches, hypers),
                           batch_size=None if runs_per_chunk == 1 else runs_per_chunk)

    if mesh is not None:
        runs = parallel.run_axis_sharding(mesh).spec
        group = jax.shard_map(group, mesh=mesh, in_specs=runs, out_specs=runs)
    return jax.jit(group, donate_argnums=0)


def group_mesh(num_runs: int, max_devices: int | None = None):
    """A mesh for :func:`run_group` of ``num_runs`` runs: one device per run, at most
    ``max_devices`` (None or 0: every device); None where that is one device."""
    n = min(num_runs, jax.device_count(), max_devices or jax.device_count())
    return parallel.make_mesh(n) if n > 1 else None


def default_runs_per_chunk() -> int:
    """1 (one run at a time) on a CPU, 0 (all runs vmapped) on a GPU or TPU."""
    return 1 if jax.default_backend() == "cpu" else 0


def init_group(model, configs: list) -> step_lib.TrainState:
    """The R runs' initial states stacked on a leading run axis (each holding the states
    of all of the group's rules where it has several: :func:`group_optimizer`)."""
    rules = group_rules(configs)
    states = [step_lib.init_state(model, group_optimizer(c, rules), c.train.batch_size, c.seed)
              for c in configs]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def group_hypers(configs: list, taus: list[float]) -> dict:
    """The runtime hyperparameters of a group's runs (:func:`make_group_step`): name -> [R]."""
    hypers = {"strength": jnp.asarray(taus, jnp.float32)}
    rates = [c.optim.learning_rate for c in configs]
    if len(set(rates)) > 1:  # else the one rate is a constant of the program, as in run_single
        hypers["learning_rate"] = jnp.asarray(rates, jnp.float32)
    rules = group_rules(configs)
    if len(rules) > 1:
        hypers["rule"] = jnp.asarray([rules.index(c.optim.clip_mode) for c in configs], jnp.int32)
    return hypers


def run_group(configs: list, taus: list[float], corpus: Corpus, runs_per_chunk: int | None = None,
              num_steps: int | None = None, *, mesh=None) -> list[dict]:
    """Train R runs of one (cell, optimizer) in one program; one history per run.

    configs: run configs differing only in seed, learning rate, clipping rule and
    its strength, which ``taus`` gives. ``runs_per_chunk``: see
    :func:`make_group_step` (None: :func:`default_runs_per_chunk`). Returns
    what :func:`run_single` returns, for each run, in order. ``mesh``
    (:func:`parallel.make_mesh`): the run axis split over its N devices, each
    training ⌈R/N⌉ runs laid out by ``runs_per_chunk``. Where N does not divide R
    the last run is repeated to fill the devices and its copies' results dropped.
    """
    num_runs = len(configs)
    if mesh is not None:
        fill = -num_runs % mesh.devices.size
        configs, taus = list(configs) + [configs[-1]] * fill, list(taus) + [taus[-1]] * fill
    first = configs[0]
    num_steps = first.train.num_steps if num_steps is None else num_steps
    B, T = first.train.batch_size, first.train.seq_len
    model = models.CharRNN.from_config(first.model, corpus.vocab_size)
    if runs_per_chunk is None:
        runs_per_chunk = default_runs_per_chunk()
    step_fn = make_group_step(model, first, runs_per_chunk, mesh, group_rules(configs))
    batchers = [data.Batcher(corpus.train_ids, B, T, c.seed) for c in configs]
    # With a mesh each device holds R/N runs' states, batches and hyperparameters.
    place = (lambda tree: tree) if mesh is None else (lambda tree: parallel.shard_runs(tree, mesh))
    state, hypers = place((init_group(model, configs), group_hypers(configs, taus)))
    next_batch = lambda: place(stack_batches([b.next_batch() for b in batchers]))
    evaluate = _evaluator(model, first, corpus, num_runs=len(configs))
    histories = _train(lambda s, b: step_fn(s, b, hypers), state, next_batch, num_steps, evaluate,
                       len(configs), first.sweep.eval_every)
    return histories[:num_runs]


def stack_batches(batches: list[dict]) -> dict:
    """R runs' batches {x, y: [B, T], reset: []} -> one {x, y: [R, B, T], reset: [R]}."""
    return {k: np.stack([b[k] for b in batches]) for k in ("x", "y", "reset")}


# ---------------------------------------------------------------------------
# Both


# One compiled evaluation per model (and layout), shared by every run and group.
_eval_step = functools.lru_cache(maxsize=8)(step_lib.make_eval_step)


def _evaluator(model, config, corpus: Corpus, num_runs: int | None):
    """params -> val loss (nats/char) of one run, or [R] of a group's stacked params."""
    eval_fn = _eval_step(model, num_runs is not None)
    return lambda params: step_lib.evaluate(
        eval_fn, model, params, corpus.val_ids, config.train.eval_batch_size,
        config.train.seq_len, num_runs=num_runs)["loss"]


def _train(step_fn, state, next_batch, num_steps: int, evaluate, num_runs: int,
           eval_every: int) -> list[dict]:
    """``num_steps`` steps of a run or a group, their metrics and val losses recorded."""
    history = _History(num_runs)
    history.add_val(0, evaluate(state.params))
    for done, state, metrics in step_lib.run_steps(step_fn, state, next_batch, 0, num_steps):
        history.add_step({k: metrics[k] for k in STEP_METRICS + UNIT_METRICS if k in metrics})
        if done == num_steps or (eval_every > 0 and done % eval_every == 0):
            history.add_val(done, evaluate(state.params))
    return history.finish()


class _History:
    """Per-step metrics of R runs, kept on the device until :meth:`finish`."""

    def __init__(self, num_runs: int):
        self.num_runs = num_runs
        self.steps, self.val_steps, self.val_loss = [], [], []
        self.start = time.perf_counter()

    def add_step(self, metrics: dict) -> None:
        self.steps.append(metrics)  # device arrays [R] (or [] for one run): no host sync

    def add_val(self, step: int, losses) -> None:
        self.val_steps.append(step)
        self.val_loss.append(np.asarray(losses, np.float64).reshape(self.num_runs))

    def finish(self) -> list[dict]:
        host = jax.device_get(self.steps)
        per_step = {k: np.array([m[k] for m in host]).reshape(len(host), self.num_runs)
                    for k in (host[0] if host else STEP_METRICS)}
        out = []
        for r in range(self.num_runs):
            h = {k: v[:, r] for k, v in per_step.items()}
            h["val_steps"] = np.array(self.val_steps)
            h["val_loss"] = np.array([v[r] for v in self.val_loss])
            h["seconds"] = time.perf_counter() - self.start
            out.append(h)
        return out
