"""Local smoothness against the gradient norm along a real training run (Zhang et al. 2020).

Zhang, He, Sra & Jadbabaie, "Why gradient clipping accelerates training: a
theoretical justification for adaptivity" (ICLR 2020, arXiv 1905.11881), plot
along the training of an AWD-LSTM language model the local smoothness against
the gradient norm on log-log axes (their Fig. 1): the two are positively
correlated, so the curvature is not bounded by one constant L but grows with
‖∇f‖, which they model as (L0, L1)-smoothness, ‖∇²f(x)‖ ≤ L0 + L1·‖∇f(x)‖.
Under it a step of length η‖∇f‖ is safe only while η ≲ 1/(L0 + L1‖∇f‖):
clipping shortens exactly the steps taken where the landscape is sharpest.

This script trains charrnn's LSTM language model (Adam + global-norm clipping,
no dropout) with charrnn's own step (:func:`charrnn.step.make_train_step`) and
every ``measure_every`` steps t measures, on the step's own batch and with the
step's own initial hidden state (the function f the optimizer just stepped on):

    Δ_t = x_{t+1} − x_t                               (the real update, all leaves)
    L̂_t = ‖∇f(x_t + ½Δ_t) − ∇f(x_t)‖ / ‖½Δ_t‖       (global L2 norms over all leaves)

beside ‖∇f(x_t)‖ (the unclipped gradient norm) and the loss f(x_t). On a
quadratic f = ½xᵀAx it is ‖AΔ‖/‖Δ‖ exactly: the curvature along the step.
Zhang et al. take the largest of such quotients over a few fractions of Δ; the
half step is one of them. The fit is least squares of log L̂ on log ‖∇f‖
(slope = the exponent p of L̂ ∝ ‖∇f‖^p) with the Pearson correlation of the
logs, over all measurements and over the second half of the run alone (is the
link more than the early drop of both from their initial values?).

    python experiments/science/smoothness.py --outdir=DIR [--smoke]

Writes to DIR: smoothness.csv (one row per measurement: :data:`COLUMNS`),
smoothness.png (log-log scatter coloured by step with the fitted line, and both
quantities over training) and smoothness.json (every number the report needs).
"""

import csv
import math
import os
import sys
import time

from absl import app, flags

from experiments import cli

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for the CSV, the figure and the JSON.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 1500, "Training steps.")
_EVERY = flags.DEFINE_integer("measure_every", 15, "Steps between measurements (step 0 first).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 128, "H of the one LSTM layer.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "T per window.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Adam's learning rate (constant).")
_CLIP = flags.DEFINE_float("clip_norm", 0.25, "τ of global-norm clipping (0.25: about the median "
                           "gradient norm of this run, so that clipping is active).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights and the data offsets.")
_DATA_PATH = flags.DEFINE_string("data_path", "", "A text file; default: the built-in corpus "
                                 "'shakespeare'.")

COLUMNS = ("step", "grad_norm", "smoothness", "loss", "update_norm", "clipped")
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
                learning_rate: float, clip_norm: float, seed: int, data_path: str = ""):
    """The default run config with this study's choices: LSTM 1×H, no dropout, Adam at a
    constant rate, global-norm clipping at τ; ``smoke`` shrinks everything."""
    from experiments.configs import default

    c = default.get_config()
    c.seed = seed
    c.data.name, c.data.path = "shakespeare", data_path
    c.model.cell, c.model.num_layers, c.model.hidden_size = "lstm", 1, hidden
    c.model.dropout, c.model.weight_drop = 0.0, 0.0
    c.train.batch_size, c.train.seq_len, c.train.num_steps = batch, seq_len, num_steps
    c.optim.name, c.optim.schedule, c.optim.learning_rate = "adam", "constant", learning_rate
    c.optim.clip_mode, c.optim.clip_norm = "global_norm", clip_norm
    if smoke:
        c.model.hidden_size, c.model.embed_dim = 16, 8
        c.train.batch_size, c.train.seq_len, c.train.num_steps = 4, 16, 24
    return c


def train_and_measure(config, measure_every: int) -> tuple[list, float]:
    """Train ``config`` with :func:`charrnn.step.make_train_step`; measure every
    ``measure_every`` steps (step 0 first). Returns (rows with :data:`COLUMNS`,
    fraction of all steps that clipped)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from charrnn import data, models, optim
    from charrnn import step as step_lib

    text = data.load_text(config.data.name, config.data.path or None, config.data.encoding)
    vocab = data.Vocab.from_text(text)
    train_ids, _, _ = data.split(vocab.encode(text), config.data.val_fraction,
                                 config.data.test_fraction)
    model = models.CharRNN.from_config(config.model, vocab.size)
    # one compiled program rather than op-by-op dispatch (seconds of compiling tiny ops)
    state = jax.jit(functools.partial(step_lib.init_state, model, optim.make_optimizer(config),
                                      config.train.batch_size, config.seed))()
    step_fn = step_lib.make_train_step(model, config)
    batcher = data.Batcher(train_ids, config.train.batch_size, config.train.seq_len, config.seed)
    base_key = jax.random.wrap_key_data(np.asarray(state.rng))

    @jax.jit
    def measure(params, delta, carry, x, y):
        grad = lambda p: jax.grad(
            lambda q: step_lib.loss_fn(q, model, carry, x, y)[0])(p)
        return local_smoothness(grad, params, delta)

    rows, clipped = [], []
    for t in range(config.train.num_steps):
        x, y, reset = batcher.next()
        due = t % measure_every == 0
        if due:  # copies: the step donates the state's buffers
            before = jax.tree.map(jnp.copy, state.params)
            carry = jax.tree.map(lambda c: jnp.zeros_like(c) if reset else jnp.copy(c), state.carry)
        state, metrics = step_fn(state, {"x": x, "y": y, "reset": np.bool_(reset)},
                                 jax.random.fold_in(base_key, t))
        clipped.append(metrics["clipped"])
        if due:
            delta = jax.tree.map(lambda a, b: a - b, state.params, before)
            grad_norm, smooth = measure(before, delta, carry, x, y)
            rows.append({"step": t, "grad_norm": grad_norm, "smoothness": smooth,
                         "loss": metrics["loss"], "update_norm": optim.global_norm(delta),
                         "clipped": metrics["clipped"]})
    rows = [{k: (int(v) if k in ("step", "clipped") else float(v)) for k, v in r.items()}
            for r in jax.device_get(rows)]
    return rows, float(np.mean(jax.device_get(clipped)))


def summarize(rows: list, settings: dict, clip_fraction: float, wall_s: float) -> dict:
    """The JSON result: settings, fits (all and second half), ranges, losses."""
    import numpy as np

    def column(name, subset):
        return [r[name] for r in subset]

    late = [r for r in rows if r["step"] >= settings["num_steps"] / 2]
    finite = [r for r in rows if math.isfinite(r["smoothness"]) and r["smoothness"] > 0]
    ranges = {name: {"min": float(np.min(column(name, finite))),
                     "median": float(np.median(column(name, finite))),
                     "max": float(np.max(column(name, finite)))} if finite else None
              for name in ("grad_norm", "smoothness")}
    return {
        "settings": settings,
        "measurements": len(rows),
        "fit": loglog_fit(column("grad_norm", rows), column("smoothness", rows)),
        "late_fit": loglog_fit(column("grad_norm", late), column("smoothness", late)),
        "late_from_step": int(math.ceil(settings["num_steps"] / 2)),
        "grad_norm": ranges["grad_norm"],
        "smoothness": ranges["smoothness"],
        "clip_fraction": clip_fraction,
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "wall_s": wall_s,
        "csv": "smoothness.csv",
        "figure": "smoothness.png",
    }


def settings_of(config, measure_every: int, smoke: bool) -> dict:
    """The run's setting as the JSON (and the report) states it."""
    m, t, o = config.model, config.train, config.optim
    return {"corpus": config.data.path or config.data.name, "cell": m.cell,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "embed_dim": m.embed_dim,
            "dropout": m.dropout, "batch_size": t.batch_size, "seq_len": t.seq_len,
            "num_steps": t.num_steps, "measure_every": measure_every, "optimizer": o.name,
            "learning_rate": o.learning_rate, "schedule": o.schedule, "clip_mode": o.clip_mode,
            "clip_norm": o.clip_norm, "seed": config.seed, "fraction": HALF,
            "batch": "the step's own batch and initial hidden state", "smoke": smoke}


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: list, fit: dict) -> None:
    """Left: log-log L̂ against ‖∇f‖ coloured by step, with the fitted line. Right: both
    over the steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    steps = np.array([r["step"] for r in rows])
    g = np.array([r["grad_norm"] for r in rows])
    s = np.array([r["smoothness"] for r in rows])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.5, 3.4))
    points = ax.scatter(g, s, c=steps, cmap="viridis", s=14)
    if math.isfinite(fit["slope"]):
        xs = np.geomspace(np.nanmin(g), np.nanmax(g), 50)
        ax.plot(xs, 10 ** fit["intercept"] * xs ** fit["slope"], "r-", linewidth=1,
                label=f"fit: slope {fit['slope']:.2f}, r = {fit['pearson_r']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # a narrow range: label the decades' minor ticks sparsely
        axis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False,
                                                                minor_thresholds=(2, 0.5)))
    ax.set_xlabel("gradient norm ‖∇f(x_t)‖")
    ax.set_ylabel("local smoothness L̂_t")
    fig.colorbar(points, ax=ax, label="step")
    bx.semilogy(steps, g, label="‖∇f(x_t)‖")
    bx.semilogy(steps, s, label="L̂_t")
    bx.set_xlabel("step")
    bx.legend(fontsize=8)
    for a in (ax, bx):
        a.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def flag_problem() -> str | None:
    """The first bad flag value as a sentence, or None."""
    sizes = {"num_steps": _NUM_STEPS.value, "measure_every": _EVERY.value,
             "hidden_size": _HIDDEN.value, "batch_size": _BATCH.value, "seq_len": _SEQ_LEN.value}
    for name, value in sizes.items():
        if value < 1:
            return f"--{name} must be a positive integer, got {value}"
    for name, value in (("learning_rate", _LR.value), ("clip_norm", _CLIP.value)):
        if not (value > 0 and math.isfinite(value)):
            return f"--{name} must be positive and finite, got {value}"
    if _DATA_PATH.value and not os.path.isfile(_DATA_PATH.value):
        return f"--data_path {_DATA_PATH.value} is not a file"
    return None


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    problem = flag_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    config = make_config(_SMOKE.value, _NUM_STEPS.value, _HIDDEN.value, _BATCH.value,
                         _SEQ_LEN.value, _LR.value, _CLIP.value, _SEED.value, _DATA_PATH.value)
    every = min(_EVERY.value, 2) if _SMOKE.value else _EVERY.value
    from charrnn.errors import UserError
    start = time.perf_counter()
    try:
        rows, clip_fraction = train_and_measure(config, every)
    except UserError as e:  # e.g. a corpus too short for one window
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    wall_s = time.perf_counter() - start
    settings = settings_of(config, every, _SMOKE.value)
    os.makedirs(_OUTDIR.value, exist_ok=True)
    write_csv(os.path.join(_OUTDIR.value, "smoothness.csv"), rows)
    result = summarize(rows, settings, clip_fraction, wall_s)
    plot(os.path.join(_OUTDIR.value, "smoothness.png"), rows, result["fit"])
    cli.write_json(_OUTDIR.value, "smoothness.json", result)


if __name__ == "__main__":
    app.run(main)
