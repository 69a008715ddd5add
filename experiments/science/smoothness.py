"""Local smoothness against the gradient norm along a real training run (Zhang et al. 2020).

Zhang, He, Sra & Jadbabaie, "Why gradient clipping accelerates training: a
theoretical justification for adaptivity" (ICLR 2020, arXiv 1905.11881), plot
along the training of an AWD-LSTM language model the local smoothness against
the gradient norm on log-log axes (their Fig. 1): the two are positively
correlated, so the curvature is not bounded by one constant L but grows with
‖∇f‖, which they model as (L0, L1)-smoothness, ‖∇²f(x)‖ ≤ L0 + L1·‖∇f(x)‖.
Under it a step of length η‖∇f‖ is safe only while η ≲ 1/(L0 + L1‖∇f‖):
clipping shortens exactly the steps taken where the landscape is sharpest.

This script trains charrnn's LSTM language model (global-norm clipping, no
dropout) with charrnn's own step (:func:`charrnn.step.make_train_step`), one run
per seed and update rule: Adam (the project's default) and plain SGD (the kind of
update AWD-LSTM is trained with, and the clipped gradient descent Zhang et al.
analyse; with SGD the update follows the clipped gradient, with Adam it is
rescaled coordinate by coordinate, so L̂ probes different directions). Every
``measure_every`` steps t it measures, on the step's own batch and with the
step's own initial hidden state (the function f the optimizer just stepped on):

    Δ_t = x_{t+1} − x_t                               (the real update, all leaves)
    L̂_t = ‖∇f(x_t + ½Δ_t) − ∇f(x_t)‖ / ‖½Δ_t‖       (global L2 norms over all leaves)

beside ‖∇f(x_t)‖ (the unclipped gradient norm) and the loss f(x_t). On a
quadratic f = ½xᵀAx it is ‖AΔ‖/‖Δ‖ exactly: the curvature along the step.
Zhang et al. estimate it from gradient differences over fractions of the update
d = x_{t+1} − x_t; this study takes the half step. The fit is least squares of
log L̂ on log ‖∇f‖ (slope = the exponent p of L̂ ∝ ‖∇f‖^p) with the Pearson
correlation of the logs, per update rule: over the measurements of all seeds pooled, over the
second half of the runs alone (does the link outlast the first phase of
training?) and per seed.

    python experiments/science/smoothness.py --outdir=DIR [--smoke] [--seeds=0,1,2]
        [--optimizers=adam,sgd] [--adam_lr=2e-3] [--sgd_lr=1.0] [--clip_norm=0.25]

The default run (LSTM 1×128, B = 32, T = 64, 1200 steps, every 12th measured, 3 seeds,
Adam and SGD: 6 runs, 600 measurements) takes about 100 s on 2 CPU cores; --smoke
(2 seeds of 24 tiny steps each) about 15 s.

Writes to DIR: smoothness.csv (one row per measurement: :data:`COLUMNS`),
smoothness.png (per update rule, the log-log scatter coloured by step with the
fitted line) and smoothness.json (every number the report needs:
``settings``, and per update rule in ``studies`` the fits, ranges and losses).
"""

import csv
import math
import os
import sys
import time

from absl import app, flags

from experiments import cli

COLUMNS = ("optimizer", "seed", "step", "grad_norm", "smoothness", "loss", "update_norm", "clipped")
HALF = 0.5  # the fraction c of the update at which the second gradient is taken


def local_smoothness(grad, params, delta, fraction: float = HALF):
    """(‖∇f(x)‖, L̂) with L̂ = ‖∇f(x + cΔ) − ∇f(x)‖ / ‖cΔ‖, c = ``fraction``.

    ``grad``: pytree -> pytree of the same structure, ∇f; ``params`` x and ``delta`` Δ
    are pytrees; all norms are global L2 norms over every leaf. Jittable. Δ = 0 gives
    a non-finite L̂ (a skipped step); callers drop those from fits.
    """
    import jax
    from charrnn import optim

    g0 = grad(params)
    g1 = grad(jax.tree.map(lambda p, d: p + fraction * d, params, delta))
    diff = jax.tree.map(lambda a, b: a - b, g1, g0)
    return optim.global_norm(g0), optim.global_norm(diff) / (fraction * optim.global_norm(delta))


def loglog_fit(x, y) -> dict:
    """Least-squares fit log10 y = a + p·log10 x and the Pearson r of the logs.

    Pairs with a non-finite or non-positive entry are left out. Returns
    {"slope": p, "intercept": a, "pearson_r": r, "n": pairs used}; NaNs with fewer
    than 3 pairs or no spread in x.
    """
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log10(x[ok]), np.log10(y[ok])
    nan = float("nan")
    if lx.size < 3 or np.ptp(lx) == 0:
        return {"slope": nan, "intercept": nan, "pearson_r": nan, "n": int(lx.size)}
    dx, dy = lx - lx.mean(), ly - ly.mean()
    slope = float((dx * dy).sum() / (dx * dx).sum())
    r = float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum())) if dy.any() else nan
    return {"slope": slope, "intercept": float(ly.mean() - slope * lx.mean()), "pearson_r": r,
            "n": int(lx.size)}


def make_config(smoke: bool, num_steps: int, hidden: int, batch: int, seq_len: int,
                learning_rate: float, clip_norm: float, seed: int, data_path: str = "",
                optimizer: str = "adam"):
    """The default run config with this study's choices: LSTM 1×H, no dropout, ``optimizer``
    (adam or sgd) at a constant rate, global-norm clipping at τ; ``smoke`` shrinks everything."""
    from experiments.configs import default

    c = default.get_config()
    c.seed = seed
    c.data.name, c.data.path = "shakespeare", data_path
    c.model.cell, c.model.num_layers, c.model.hidden_size = "lstm", 1, hidden
    c.model.dropout, c.model.weight_drop = 0.0, 0.0
    c.train.batch_size, c.train.seq_len, c.train.num_steps = batch, seq_len, num_steps
    c.optim.name, c.optim.schedule, c.optim.learning_rate = optimizer, "constant", learning_rate
    c.optim.momentum = 0.0
    c.optim.clip_mode, c.optim.clip_norm = "global_norm", clip_norm
    if smoke:
        c.model.hidden_size, c.model.embed_dim = 16, 8
        c.train.batch_size, c.train.seq_len, c.train.num_steps = 4, 16, 24
    return c


def train_and_measure(config, measure_every: int, seeds=None) -> tuple[list, float]:
    """Train ``config`` once per seed (default: ``config.seed``) with
    :func:`charrnn.step.make_train_step`, measuring every ``measure_every`` steps (step 0
    first). Returns (rows with the :data:`COLUMNS` but ``optimizer``, fraction of all steps
    that clipped).

    The seed sets the initial weights and the data offsets, as in a charrnn run; the
    step and the measurement are compiled once for all seeds.
    """
    import jax
    import numpy as np
    from charrnn import data, models, optim
    from charrnn import step as step_lib

    text = data.load_corpus(config.data)
    vocab = data.Vocab.from_text(text)
    train_ids, _, _ = data.split(vocab.encode(text), config.data.val_fraction,
                                 config.data.test_fraction)
    model = models.CharRNN.from_config(config.model, vocab.size)
    tx, batch_size = optim.Optimizer.from_config(config), config.train.batch_size
    # one compiled program rather than op-by-op dispatch (seconds of compiling tiny ops)
    init = jax.jit(lambda seed: step_lib.init_state(model, tx, batch_size, seed))
    step_fn = step_lib.make_train_step(model, tx, reset_prob=config.train.reset_prob)

    @jax.jit
    def measure(params, delta, carry, x, y):
        grad = lambda p: jax.grad(lambda q: step_lib.loss_fn(q, model, carry, x, y)[0])(p)
        return local_smoothness(grad, params, delta)

    rows, clipped = [], []
    for seed in ([config.seed] if seeds is None else seeds):
        batcher = data.Batcher(train_ids, batch_size, config.train.seq_len, seed)
        rows += _one_run(init(seed), step_fn, measure, batcher, config.train.num_steps,
                         measure_every, seed, clipped)
    rows = [{k: (int(v) if k in ("seed", "step", "clipped") else float(v)) for k, v in r.items()}
            for r in jax.device_get(rows)]
    return rows, float(np.mean(jax.device_get(clipped)))


def _one_run(state, step_fn, measure, batcher, num_steps: int, measure_every: int, seed: int,
             clipped: list) -> list:
    """The training loop of one seed; appends every step's ``clipped`` to ``clipped`` and
    returns the measured rows (device values)."""
    import jax
    import jax.numpy as jnp
    from charrnn import optim
    from charrnn import step as step_lib

    def snapshot(state, due):  # copies: the step donates the state's buffers
        return jax.tree.map(jnp.copy, (state.params, state.carry)) if due else None

    last = {}

    def next_batch():  # kept: the measurement reads the batch of the step just taken
        last["batch"] = batcher.next_batch()
        return last["batch"]

    rows, before = [], snapshot(state, True)  # step 0 is measured
    for done, state, metrics in step_lib.run_steps(step_fn, state, next_batch, 0, num_steps):
        clipped.append(metrics["clipped"])
        if before is not None:
            (params, carry), batch = before, last["batch"]
            if batch["reset"]:
                carry = jax.tree.map(jnp.zeros_like, carry)
            delta = jax.tree.map(lambda a, b: a - b, state.params, params)
            grad_norm, smooth = measure(params, delta, carry, batch["x"], batch["y"])
            rows.append({"seed": seed, "step": done - 1, "grad_norm": grad_norm,
                         "smoothness": smooth, "loss": metrics["loss"],
                         "update_norm": optim.global_norm(delta), "clipped": metrics["clipped"]})
        before = snapshot(state, done % measure_every == 0 and done < num_steps)
    return rows


def summarize(rows: list, num_steps: int, clip_fraction: float, learning_rate: float) -> dict:
    """One optimizer's study: the pooled fits (all seeds; all steps and the second half),
    one fit per seed, the ranges, and the mean loss over seeds at the first and the last
    measured step (nats/char)."""
    import numpy as np

    def fit(subset):
        return loglog_fit([r["grad_norm"] for r in subset], [r["smoothness"] for r in subset])

    late_from = int(math.ceil(num_steps / 2))
    finite = [r for r in rows if math.isfinite(r["smoothness"]) and r["smoothness"] > 0]
    ranges = {name: {"min": float(np.min([r[name] for r in finite])),
                     "median": float(np.median([r[name] for r in finite])),
                     "max": float(np.max([r[name] for r in finite]))} if finite else None
              for name in ("grad_norm", "smoothness")}
    seeds = sorted({r["seed"] for r in rows})
    first, last = min(r["step"] for r in rows), max(r["step"] for r in rows)
    return {
        "learning_rate": learning_rate,
        "measurements": len(rows),
        "fit": fit(rows),
        "late_fit": fit([r for r in rows if r["step"] >= late_from]),
        "late_from_step": late_from,
        "seed_fits": [dict(seed=s, **fit([r for r in rows if r["seed"] == s])) for s in seeds],
        "grad_norm": ranges["grad_norm"],
        "smoothness": ranges["smoothness"],
        "clip_fraction": clip_fraction,
        "first_loss": float(np.mean([r["loss"] for r in rows if r["step"] == first])),
        "last_loss": float(np.mean([r["loss"] for r in rows if r["step"] == last])),
    }


def settings_of(config, measure_every: int, seeds: list, learning_rates: dict,
                smoke: bool) -> dict:
    """The setting shared by the studies, as the JSON (and the report) states it."""
    m, t, o = config.model, config.train, config.optim
    return {"corpus": config.data.path or config.data.name, "cell": m.cell,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "embed_dim": m.embed_dim,
            "dropout": m.dropout, "batch_size": t.batch_size, "seq_len": t.seq_len,
            "num_steps": t.num_steps, "measure_every": measure_every,
            "optimizers": list(learning_rates), "learning_rates": dict(learning_rates),
            "schedule": o.schedule, "clip_mode": o.clip_mode, "clip_norm": o.clip_norm,
            "seeds": list(seeds), "fraction": HALF,
            "batch": "the step's own batch and initial hidden state", "smoke": smoke}


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: list, studies: dict) -> None:
    """One log-log panel per optimizer: L̂ against ‖∇f‖, coloured by step (a marker per
    seed), with the pooled least-squares line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies), 3.6), squeeze=False,
                             layout="constrained")
    steps = [r["step"] for r in rows]
    for ax, (name, study) in zip(axes[0], studies.items()):
        mine = [r for r in rows if r["optimizer"] == name]
        for i, seed in enumerate(sorted({r["seed"] for r in mine})):
            runs = [r for r in mine if r["seed"] == seed]
            points = ax.scatter([r["grad_norm"] for r in runs], [r["smoothness"] for r in runs],
                                c=[r["step"] for r in runs], cmap="viridis", vmin=min(steps),
                                vmax=max(steps), s=10, marker="os^vDp"[i % 6], label=f"seed {seed}")
        fit = study["fit"]
        if math.isfinite(fit["slope"]):
            g = [r["grad_norm"] for r in mine]
            xs = np.geomspace(min(g), max(g), 50)
            ax.plot(xs, 10 ** fit["intercept"] * xs ** fit["slope"], "r-", linewidth=1,
                    label=f"fit: slope {fit['slope']:.2f}, r = {fit['pearson_r']:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # narrow ranges: label some minor ticks too
            axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False,
                                                                    minor_thresholds=(2, 0.5)))
        ax.set_title(f"{ {'adam': 'Adam', 'sgd': 'SGD'}[name]}, lr {study['learning_rate']:g}",
                     fontsize=9)
        ax.set_xlabel("gradient norm ‖∇f(x_t)‖")
        ax.set_ylabel("local smoothness L̂_t")
        ax.legend(fontsize=6, loc="lower right", framealpha=0.6)
        ax.grid(alpha=0.3, which="both")
    fig.colorbar(points, ax=axes[0].tolist(), label="step")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def flag_problem() -> str | None:
    """The first bad flag value as a sentence, or None."""
    sizes = {"num_steps": _NUM_STEPS.value, "measure_every": _EVERY.value,
             "hidden_size": _HIDDEN.value, "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value}
    for name, value in sizes.items():
        if value < 1:
            return f"--{name} must be a positive integer, got {value}"
    for name, value in (("adam_lr", _ADAM_LR.value), ("sgd_lr", _SGD_LR.value),
                        ("clip_norm", _CLIP.value)):
        if not (value > 0 and math.isfinite(value)):
            return f"--{name} must be positive and finite, got {value}"
    opts = _OPTIMIZERS.value
    if not opts or len(set(opts)) != len(opts) or not set(opts) <= {"adam", "sgd"}:
        return f"--optimizers must list adam and/or sgd, each once, got {','.join(opts)}"
    try:
        seeds = [int(v) for v in _SEEDS.value]
    except ValueError:
        return f"--seeds must be integers, got {','.join(_SEEDS.value)}"
    if not seeds or len(set(seeds)) != len(seeds):
        return f"--seeds must name at least one seed, each once, got {','.join(_SEEDS.value)}"
    if _DATA_PATH.value and not os.path.isfile(_DATA_PATH.value):
        return f"--data_path {_DATA_PATH.value} is not a file"
    return None


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    problem = flag_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    seeds = [int(v) for v in _SEEDS.value][:2 if _SMOKE.value else None]
    every = min(_EVERY.value, 2) if _SMOKE.value else _EVERY.value
    lrs = {name: {"adam": _ADAM_LR.value, "sgd": _SGD_LR.value}[name]
           for name in _OPTIMIZERS.value}
    configs = {name: make_config(_SMOKE.value, _NUM_STEPS.value, _HIDDEN.value, _BATCH.value,
                                 _SEQ_LEN.value, lr, _CLIP.value, seeds[0], _DATA_PATH.value,
                                 name) for name, lr in lrs.items()}
    from charrnn.errors import UserError
    start = time.perf_counter()
    rows, studies = [], {}
    try:
        for name, config in configs.items():
            mine, clip_fraction = train_and_measure(config, every, seeds)
            rows += [dict(optimizer=name, **r) for r in mine]
            studies[name] = summarize(mine, config.train.num_steps, clip_fraction, lrs[name])
    except UserError as e:  # e.g. a corpus too short for one window
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    config = next(iter(configs.values()))
    result = {"settings": settings_of(config, every, seeds, lrs, _SMOKE.value),
              "studies": studies, "measurements": len(rows),
              "wall_s": time.perf_counter() - start, "csv": "smoothness.csv",
              "figure": "smoothness.png"}
    os.makedirs(_OUTDIR.value, exist_ok=True)
    write_csv(os.path.join(_OUTDIR.value, "smoothness.csv"), rows)
    plot(os.path.join(_OUTDIR.value, "smoothness.png"), rows, studies)
    cli.write_json(_OUTDIR.value, "smoothness.json", result)


# flags only when run as a script: tests import this module beside other scripts
if __name__ == "__main__":
    _OUTDIR = flags.DEFINE_string("outdir", None, "Directory for the CSV, the figure and the JSON.")
    _SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
    _NUM_STEPS = flags.DEFINE_integer("num_steps", 1200, "Training steps of each run.")
    _EVERY = flags.DEFINE_integer("measure_every", 12, "Steps between measurements (step 0 first).")
    _HIDDEN = flags.DEFINE_integer("hidden_size", 128, "H of the one LSTM layer.")
    _BATCH = flags.DEFINE_integer("batch_size", 32, "B.")
    _SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "T per window.")
    _OPTIMIZERS = flags.DEFINE_list("optimizers", ["adam", "sgd"], "Update rules after clipping, "
                                    "one study each: adam, sgd (plain, no momentum).")
    _ADAM_LR = flags.DEFINE_float("adam_lr", 2e-3, "Adam's learning rate (constant).")
    _SGD_LR = flags.DEFINE_float("sgd_lr", 1.0, "SGD's learning rate (constant; with τ = 0.25 "
                                 "every clipped step is 0.25 long).")
    _CLIP = flags.DEFINE_float("clip_norm", 0.25, "τ of global-norm clipping (0.25: about the median "
                               "gradient norm of the Adam runs, so that clipping is active).")
    _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initial weights and data offsets), "
                              "one run each; the fit pools them.")
    _DATA_PATH = flags.DEFINE_string("data_path", "", "A text file; default: the built-in corpus "
                                     "'shakespeare'.")
    app.run(main)
