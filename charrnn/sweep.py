"""Clipping sweeps: many training runs as one jitted program.

A sweep is a grid, written as data: cells × optimizers × clipping rules ×
seeds × each rule's strengths. The rules are those of :mod:`charrnn.clipping`
(``sweep.rules``; ``sweep.strengths.<rule>`` lists a rule's strength labels).
The rule ``none`` has the one label ``none``. A label is an absolute strength
(``"2.5"``: τ, a bound, λ, a percentile or a z-score, whatever the rule's
strength is) or, for a rule whose strength is a global-norm threshold
(``global_norm``), a multiple of the run's reference norm (``"0.5x"``): the
mean unclipped global gradient norm over its first ``warmup_steps`` training
windows, measured at the initial parameters (Pascanu, Mikolov & Bengio 2013
set τ from the average norm).

Two ways to run a grid, with the same numbers:

- :func:`run_single`: one run, the plain jitted :func:`step.train_step`
  (one process per run, e.g. one task of a cluster array job);
- :func:`run_group`: every run of one (rule, cell, optimizer) — they share
  parameter and rule-state shapes — in one program. The state, the batch and
  the strength τ get a leading
  run axis [R, ...] and the step is :func:`step.train_step` under
  ``jax.vmap`` (in chunks, see :func:`make_group_step`), its runs split
  over the devices of a mesh if given (:func:`group_mesh`). τ is a runtime
  array, so one compiled step serves every strength of the rule.

Both record, per run and step, the loss (nats/char), the global gradient norm
before and after clipping, the threshold in force, whether the step clipped
and whether it was non-finite, plus the val loss every ``eval_every`` steps
(step 0 included).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from charrnn import clipping, data, models, optim, parallel
from charrnn import step as step_lib
from charrnn.errors import UserError

STEP_METRICS = ("loss", "grad_norm", "grad_norm_clipped", "clip_threshold", "clipped",
                "nonfinite")


class SweepError(UserError):
    """A malformed grid (rule, strength label, cell, optimizer) or run index."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid. ``threshold``: the rule's strength label: 'none' (rule
    none), '0.5x' (relative, norm-type rules) or '2.5' (absolute)."""
    cell: str
    optimizer: str
    seed: int
    threshold: str
    rule: str = "global_norm"

    @property
    def name(self) -> str:
        clip = "none" if self.rule == "none" else f"{self.rule}_{self.threshold}"
        return f"{self.cell}-{self.optimizer}-seed{self.seed}-{clip}"

    @property
    def group(self) -> tuple:
        """Runs of one group share one compiled program."""
        return (self.rule, self.cell, self.optimizer)


def parse_threshold(label: str) -> tuple[str, float]:
    """'none' -> ('none', inf); '0.5x' -> ('relative', 0.5); '2.5' -> ('absolute', 2.5)."""
    text = str(label).strip().lower()
    if text in ("none", "inf"):
        return "none", math.inf
    kind, number = ("relative", text[:-1]) if text.endswith("x") else ("absolute", text)
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise SweepError(f"bad threshold {label!r}: use 'none', a positive number, or a "
                         "positive multiple such as '0.5x'")
    return kind, value


def parse_strength(rule: str, label: str) -> tuple[str, float]:
    """A strength label of ``rule``: 'none' only for the rule none; 'Nx' only where the
    rule's strength is a global-norm threshold; else a positive number."""
    if clipping.RULES[rule].strength is None:
        if str(label).strip().lower() != "none":
            raise SweepError(f"the rule none takes no strength; its label is 'none', got {label!r}")
        return "none", math.inf
    kind, value = parse_threshold(label)
    if kind == "none":
        raise SweepError(f"strength 'none' of rule {rule}: put the rule none in sweep.rules")
    if kind == "relative" and not clipping.RULES[rule].norm_threshold:
        norm_rules = [n for n, r in clipping.RULES.items() if r.norm_threshold]
        raise SweepError(f"strength {label!r} of rule {rule}: multiples of the reference norm "
                         f"are for the norm thresholds of {', '.join(norm_rules)}")
    return kind, value


def _strength_labels(sweep_config, rule: str) -> tuple:
    if clipping.RULES[rule].strength is None:
        return ("none",)
    labels = sweep_config.strengths.get(rule) if "strengths" in sweep_config else None
    if not labels:
        raise SweepError(f"sweep.strengths has no labels for rule {rule!r}")
    return tuple(str(t) for t in labels)


def make_grid(sweep_config) -> list[Run]:
    """All runs in a fixed order (cell, optimizer, rule, seed, strength); ``--run_index``
    indexes it."""
    for cell in sweep_config.cells:
        if cell not in models.CELLS:
            raise SweepError(f"unknown cell {cell!r}; choose from {models.CELLS}")
    for name in sweep_config.optimizers:
        if name not in optim.OPTIMIZERS:
            raise SweepError(f"unknown optimizer {name!r}; choose from {optim.OPTIMIZERS}")
        if name not in sweep_config.learning_rate:
            raise SweepError(f"sweep.learning_rate has no entry for optimizer {name!r}")
    for rule in sweep_config.rules:
        if rule not in clipping.RULES:
            raise SweepError(f"unknown clipping rule {rule!r} in sweep.rules; choose from "
                             f"{', '.join(clipping.RULES)}")
        for label in _strength_labels(sweep_config, rule):
            parse_strength(rule, label)
    runs = [Run(c, o, int(s), t, rule) for c in sweep_config.cells
            for o in sweep_config.optimizers for rule in sweep_config.rules
            for s in sweep_config.seeds for t in _strength_labels(sweep_config, rule)]
    if not runs:
        raise SweepError("the grid is empty: give at least one cell, optimizer, rule and seed")
    return runs


def run_config(config, run: Run, tau: float = math.inf) -> ml_collections.ConfigDict:
    """The full training config of one run: the base config with the run's choices.

    The learning rate comes from ``config.sweep.learning_rate[optimizer]``; the
    rule's strength field (``clipping.Rule.strength``) is set to τ.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = run.seed
    c.model.cell = run.cell
    c.optim.name = run.optimizer
    c.optim.learning_rate = float(config.sweep.learning_rate[run.optimizer])
    rule = clipping.RULES[run.rule]
    c.optim.clip_mode = run.rule
    if rule.strength is not None and not math.isinf(tau):
        c.optim[rule.strength.field] = float(tau)
    return c


@dataclasses.dataclass
class Corpus:
    """Train ids, the (possibly truncated) val ids used for evaluation, and the vocabulary size."""
    train_ids: np.ndarray
    val_ids: np.ndarray
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "Corpus":
        text = data.load_text(config.data.name, config.data.path or None, config.data.encoding)
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

    ``config`` is a full run config (:func:`run_config`). History: per-step
    arrays ``loss``, ``grad_norm``, ``grad_norm_clipped``, ``clipped``,
    ``nonfinite`` [num_steps] and ``val_steps``, ``val_loss`` (nats/char).
    """
    num_steps = config.train.num_steps if num_steps is None else num_steps
    model = models.CharRNN.from_config(config.model, corpus.vocab_size)
    state = step_lib.init_state(model, optim.make_optimizer(config), config.train.batch_size,
                             config.seed)
    step_fn = step_lib.make_train_step(model, config)
    eval_fn = step_lib.make_eval_step(model)
    batcher = data.Batcher(corpus.train_ids, config.train.batch_size, config.train.seq_len,
                           config.seed)
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))  # a copy: the state is donated
    evaluate = lambda params: step_lib.evaluate(eval_fn, model, params, corpus.val_ids,
                                             config.train.eval_batch_size,
                                             config.train.seq_len)["loss"]
    history = _History(1)
    history.add_val(0, [evaluate(state.params)])
    for step in range(num_steps):
        x, y, reset = batcher.next()
        batch = {"x": x, "y": y, "reset": np.bool_(reset)}
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
        history.add_step({k: metrics[k][None] for k in STEP_METRICS})
        if _eval_due(step + 1, num_steps, config.sweep.eval_every):
            history.add_val(step + 1, [evaluate(state.params)])
    return history.finish()[0]


def reference_norm(config, run: Run, corpus: Corpus) -> float:
    """Mean global gradient norm at the run's initial parameters over its first batches.

    The warm-up feeds the run's first ``sweep.warmup_steps`` training windows
    (same seed, same batcher, hidden state carried) through
    :func:`step.train_step` with clipping off and an optimizer that changes
    nothing, so it measures the unclipped norm without moving: a warm-up that
    trained at a learning rate that explodes would measure the explosion. Every
    way of running the grid calls this, so all get the same τ.
    """
    c = run_config(config, dataclasses.replace(run, rule="none", threshold="none"))
    model = models.CharRNN.from_config(c.model, corpus.vocab_size)
    state = step_lib.init_state(model, optax.chain(optax.identity(), optax.set_to_zero()),
                             c.train.batch_size, c.seed)
    step_fn = _frozen_step(model)
    batcher = data.Batcher(corpus.train_ids, c.train.batch_size, c.train.seq_len, c.seed)
    norms = []
    for step in range(config.sweep.warmup_steps):
        x, y, reset = batcher.next()
        state, metrics = step_fn(state, {"x": x, "y": y, "reset": np.bool_(reset)},
                                 jax.random.key(step))
        norms.append(metrics["grad_norm"])
    norms = np.asarray(jax.device_get(norms), np.float64)
    norms = norms[np.isfinite(norms)]
    if norms.size == 0:
        raise SweepError(f"no finite gradient norm in the warm-up of {run.name}")
    return float(norms.mean())


@functools.lru_cache(maxsize=8)
def _frozen_step(model: models.CharRNN):
    """train_step with clipping off and a zero update (compiled once per model)."""
    return jax.jit(functools.partial(step_lib.train_step, model=model, clip=optax.identity(),
                                     optimizer=optax.set_to_zero(),
                                     schedule=optax.constant_schedule(0.0)))


def thresholds(config, runs: list[Run], corpus: Corpus) -> tuple[list[float], dict]:
    """(τ per run, reference norm per (cell, optimizer, seed) that needed one)."""
    refs = {}
    for run in runs:
        key = (run.cell, run.optimizer, run.seed)
        if parse_strength(run.rule, run.threshold)[0] == "relative" and key not in refs:
            refs[key] = reference_norm(config, run, corpus)
    taus = []
    for run in runs:
        kind, value = parse_strength(run.rule, run.threshold)
        taus.append(value * refs[(run.cell, run.optimizer, run.seed)] if kind == "relative"
                    else value)
    return taus, refs


# ---------------------------------------------------------------------------
# Many runs: one program


def make_group_step(model: models.CharRNN, config, runs_per_chunk: int = 0, mesh=None):
    """The jitted step of R runs: (states[R], batches[R], taus[R]) -> (states, metrics[R]).

    Each run's step is :func:`step.train_step` with the rule ``optim.clip_mode``
    of ``config`` at strength τ_r, a traced scalar (:func:`clipping.from_config`;
    ignored by the rule none). ``runs_per_chunk`` C sets the layout:
    runs are vectorized C at a time by ``jax.vmap`` and the R / C chunks run one
    after another inside the same program (``jax.lax.map``). 0 (or ≥ R) vmaps
    all runs at once, the layout for a GPU or TPU that one small model leaves
    idle; 1 runs them one by one, which measured fastest on a 2-core CPU, where
    batched matmuls are slower than plain ones (experiments/bench/bench_sweep.py).
    With a ``mesh`` (:func:`parallel.make_mesh`) of N devices the runs are split
    over them (``jax.shard_map``: each device steps its R/N runs, laid out as
    above, with no communication); inputs come placed by
    :func:`parallel.shard_runs`.
    ``config`` is any run config of the group (optimizer, learning rate, rule and
    its secondary settings are shared). The dropout key of run r at step s is ``fold_in(key(rng_r), s)``,
    as in :func:`run_single`.
    """
    num_steps = config.train.num_steps
    optimizer = optim.make_base_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    if runs_per_chunk < 0:
        raise SweepError(f"runs_per_chunk must be >= 0, got {runs_per_chunk}")

    def one_run(state, batch, tau):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        clip = clipping.from_config(config.optim, strength=tau)
        return step_lib.train_step(state, batch, key, model=model, clip=clip.transform,
                                clip_threshold=clip.threshold, optimizer=optimizer,
                                schedule=schedule, reset_prob=step_lib.reset_prob(config))

    def group(states, batches, taus):
        num_runs = taus.shape[0]
        if runs_per_chunk == 0 or runs_per_chunk >= num_runs:
            return jax.vmap(one_run)(states, batches, taus)
        return jax.lax.map(lambda args: one_run(*args), (states, batches, taus),
                           batch_size=runs_per_chunk)

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


def make_group_eval(model: models.CharRNN):
    """Val nats of one window per run and row [R, B]: params[R], carry[R], shared x, y, mask."""
    step = functools.partial(step_lib.eval_step, model=model)
    return jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, None)))


def init_group(model, configs: list) -> step_lib.TrainState:
    """The R runs' initial states stacked on a leading run axis."""
    states = [step_lib.init_state(model, optim.make_optimizer(c), c.train.batch_size, c.seed)
              for c in configs]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def evaluate_group(eval_fn, model, params, ids, batch_size: int, seq_len: int,
                   num_runs: int) -> np.ndarray:
    """Val loss (nats/char) of every run [R], the hidden state carried over windows."""
    carry = jax.tree.map(lambda a: jnp.stack([a] * num_runs), model.initial_carry(batch_size))
    total, count = 0.0, 0
    for x, y, mask in data.eval_windows(ids, batch_size, seq_len):
        carry, nll = eval_fn(params, carry, x, y, mask)
        total = total + nll
        count += int(mask.sum())
    return np.asarray(total, np.float64).sum(axis=-1) / count


def run_group(configs: list, taus: list[float], corpus: Corpus, runs_per_chunk: int | None = None,
              num_steps: int | None = None, *, mesh=None) -> list[dict]:
    """Train R runs of one (rule, cell, optimizer) in one program; one history per run.

    configs: run configs differing only in seed and the rule's strength, which
    ``taus`` gives. ``runs_per_chunk``: see
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
    R, B, T = len(configs), first.train.batch_size, first.train.seq_len
    model = models.CharRNN.from_config(first.model, corpus.vocab_size)
    state = init_group(model, configs)
    if runs_per_chunk is None:
        runs_per_chunk = default_runs_per_chunk()
    step_fn = make_group_step(model, first, runs_per_chunk, mesh)
    eval_fn = make_group_eval(model)
    batchers = [data.Batcher(corpus.train_ids, B, T, c.seed) for c in configs]
    tau = jnp.asarray(taus, jnp.float32)
    # With a mesh each device holds R/N runs' states, batches and τ; without, a no-op.
    place = (lambda tree: tree) if mesh is None else (lambda tree: parallel.shard_runs(tree, mesh))
    state, tau = place((state, tau))
    evaluate = lambda params: evaluate_group(eval_fn, model, params, corpus.val_ids,
                                             first.train.eval_batch_size, T, R)
    history = _History(R)
    history.add_val(0, evaluate(state.params))
    for step in range(num_steps):
        batch = place(stack_batches([b.next() for b in batchers]))
        state, metrics = step_fn(state, batch, tau)
        history.add_step({k: metrics[k] for k in STEP_METRICS})
        if _eval_due(step + 1, num_steps, first.sweep.eval_every):
            history.add_val(step + 1, evaluate(state.params))
    return history.finish()[:num_runs]


def stack_batches(windows: list) -> dict:
    """[(x [B, T], y [B, T], reset)] of R runs -> {x, y: [R, B, T], reset: [R]}."""
    return {"x": np.stack([w[0] for w in windows]), "y": np.stack([w[1] for w in windows]),
            "reset": np.array([w[2] for w in windows])}


def _eval_due(done: int, num_steps: int, every: int) -> bool:
    return done == num_steps or (every > 0 and done % every == 0)


class _History:
    """Per-step metrics of R runs, kept on the device until :meth:`finish`."""

    def __init__(self, num_runs: int):
        self.num_runs = num_runs
        self.steps, self.val_steps, self.val_loss = [], [], []
        self.start = time.perf_counter()

    def add_step(self, metrics: dict) -> None:
        self.steps.append(metrics)  # device arrays [R]: no host sync per step

    def add_val(self, step: int, losses) -> None:
        self.val_steps.append(step)
        self.val_loss.append(np.asarray(losses, np.float64).reshape(self.num_runs))

    def finish(self) -> list[dict]:
        host = jax.device_get(self.steps)
        out = []
        for r in range(self.num_runs):
            h = {k: np.array([m[k][r] for m in host]) for k in STEP_METRICS}
            h["val_steps"] = np.array(self.val_steps)
            h["val_loss"] = np.array([v[r] for v in self.val_loss])
            h["seconds"] = time.perf_counter() - self.start
            out.append(h)
        return out


# ---------------------------------------------------------------------------
# Results


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
        "cell": run.cell, "optimizer": run.optimizer, "seed": run.seed, "rule": run.rule,
        "threshold": run.threshold, "tau": tau, "reference_norm": reference,
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
    }


def _finite_mean(values) -> float:
    """Mean of the finite values (a threshold is inf without clipping or in a warm-up)."""
    if values is None:
        return float("nan")
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("inf")
