"""Where clipping sits: the same rules at each placement, at learning rates where it acts.

    python experiments/science/placement.py --outdir=DIR [--smoke]
    python experiments/science/placement.py --outdir=DIR --aggregate  # tables and figure only
    # (again) one cell, keeping the other cells' runs in DIR:
    python experiments/science/placement.py --outdir=DIR --config.sweep.cells="('lstm',)"

The grid is data (experiments/configs/placement.py): cells × optimizers × two learning
rates per (cell, optimizer) × {no clipping, global_norm, value} × placements
(``optim.clip_at``: gradient, update, bptt, example) × seeds. ``device`` is left out:
on one device it is ``gradient``.

**Thresholds.** Each placement clips a different quantity, so one τ means a different
thing at each: the batch's mean gradient (gradient), the update the optimizer computed
from it (update), one row's gradient (example), one (row, layer, time step) cotangent
of a row's summed loss (bptt, charrnn.step.bptt_gradients). Here a strength label is a
multiple of the placement's *reference*: the threshold at which the rule changes half
the units it acts on, at the initial parameters of seed 0 over the first
``sweep.warmup_steps`` windows (state carried). For ``global_norm`` that is the median
over the units of their L2 norm; for ``value`` the median of their largest |component|
(a unit is changed when one component is). The units: one per window (gradient;
update: the base optimizer's first step from that gradient, at the run's learning
rate), one per row (example), and for bptt the threshold is found by bisection on the
count the backward pass itself reports. So at strength 1 every placement clips about
half its units at the start; how much each clips over training is in the results
(``unit_clip_fraction``).

The runs train with charrnn.sweep (one program per (cell, optimizer, placement), and
per rule at bptt; the learning rate, seed and strength are runtime values) into
DIR/runs/ (clip_ablation.py's per-run files). Writes DIR/placement.csv (one row per
run), DIR/placement.json (the runs, the table of means over seeds, the references)
and DIR/placement.png (final val bpc per setting and learning rate, per (cell,
optimizer); diverged runs marked).
"""

import csv
import json
import math
import os
import sys

import numpy as np
from absl import app, flags

from experiments import cli

REFERENCES = "references.json"
# Columns of placement.csv, in order (a run's row from charrnn.sweep.summarize).
COLUMNS = ("cell", "optimizer", "learning_rate", "clip_at", "rule", "threshold", "tau",
           "seed", "final_val_bpc", "best_val_bpc", "initial_val_bpc", "diverged",
           "unit_clip_fraction", "clip_fraction", "max_grad_norm", "nonfinite_steps")


def cell_config(config, cell: str):
    """``config`` with the grid of one cell: its learning rates per optimizer."""
    import ml_collections
    from charrnn import sweep
    c = ml_collections.ConfigDict(config.to_dict())
    by_cell = c.sweep.learning_rates_by_cell
    if cell not in by_cell:
        raise sweep.SweepError(f"sweep.learning_rates_by_cell has no entry for cell {cell!r}")
    c.sweep.cells = (cell,)
    c.sweep.learning_rates = ml_collections.ConfigDict(by_cell[cell].to_dict())
    return c


# ---------------------------------------------------------------------------
# References: the threshold at which a rule changes half the units of a placement


def _unit_norm(tree, axis=None):
    """L2 norm and largest |component| of a tree (``axis`` 0: per row of every leaf)."""
    import jax
    import jax.numpy as jnp
    leaves = [a.reshape(a.shape[0], -1) if axis == 0 else a.reshape(1, -1)
              for a in jax.tree.leaves(tree)]
    flat = jnp.concatenate(leaves, axis=1)
    return jnp.sqrt(jnp.sum(flat * flat, axis=1)), jnp.max(jnp.abs(flat), axis=1)


def references(config, cell: str, corpus) -> dict:
    """{placement: {rule: reference}} for the gradient, example and bptt placements and
    {"update": {"<optimizer>@<lr>": {rule: reference}}} (module docstring)."""
    import jax
    import jax.numpy as jnp
    from charrnn import data, models, optim
    from charrnn import step as step_lib
    from charrnn import sweep
    from charrnn.sweep.grid import learning_rates

    c = sweep.run_config(config, sweep.Run(cell, config.sweep.optimizers[0], 0, "none", "none"))
    model = models.CharRNN.from_config(c.model, corpus.vocab_size)
    B, T = c.train.batch_size, c.train.seq_len
    state = step_lib.init_state(model, optim.Optimizer.frozen(), B, 0)
    batcher = data.Batcher(corpus.train_ids, B, T, 0)
    rows = jax.jit(lambda p, carry, x, y: step_lib.row_gradients(p, model, carry, x, y, None,
                                                                 None, None))
    windows, grads, row_units = [], [], []
    carry = state.carry
    for _ in range(int(config.sweep.warmup_steps)):
        batch = batcher.next_batch()
        x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
        windows.append((carry, x, y))
        (_, carry), row_g = rows(state.params, carry, x, y)
        grads.append(jax.tree.map(lambda a: a.mean(axis=0), row_g))
        row_units.append(_unit_norm(row_g, axis=0))
    median = lambda values: float(np.median(np.concatenate([np.ravel(v) for v in values])))
    out = {"gradient": {"global_norm": median([_unit_norm(g)[0] for g in grads]),
                        "value": median([_unit_norm(g)[1] for g in grads])},
           "example": {"global_norm": median([u[0] for u in row_units]),
                       "value": median([u[1] for u in row_units])},
           "bptt": {rule: _bptt_reference(model, state.params, windows, rule)
                    for rule in optim.BPTT_RULES},
           "update": {}}
    for opt in config.sweep.optimizers:
        for lr in learning_rates(config.sweep, opt):
            run = sweep.Run(cell, opt, 0, "none", "none", lr)
            base = optim.Optimizer.from_config(sweep.run_config(config, run)).base
            first = [base.update(g, base.init(state.params), state.params)[0] for g in grads]
            out["update"][f"{opt}@{lr:g}"] = {"global_norm": median([_unit_norm(u)[0]
                                                                     for u in first]),
                                              "value": median([_unit_norm(u)[1] for u in first])}
    return out


def _bptt_reference(model, params, windows, rule: str, iterations: int = 40) -> float:
    """The τ at which clip_at=bptt with ``rule`` clips half the cotangents of ``windows``:
    bisection in log τ on the share the backward pass counts (it falls as τ grows)."""
    import jax
    import jax.numpy as jnp
    from charrnn import scan
    from charrnn import step as step_lib

    @jax.jit
    def share(log_tau):
        clip = scan.CotangentClip(rule, jnp.exp(log_tau).astype(jnp.float32))
        fractions = [step_lib.bptt_gradients((params, model, carry, x, y, None, None, None),
                                             clip, None, 0, 0)[2]["bptt_clip_fraction"]
                     for carry, x, y in windows]
        return jnp.mean(jnp.stack(fractions))

    lo, hi = math.log(1e-9), math.log(1e9)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(share(mid)) > 0.5 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def reference_of(refs: dict, run) -> float:
    """The reference of a run's placement and rule (None for the rule none)."""
    if run.rule == "none":
        return None
    at = refs[run.clip_at] if run.clip_at != "update" else \
        refs["update"][f"{run.optimizer}@{run.learning_rate:g}"]
    return at[run.rule]


# ---------------------------------------------------------------------------
# Training


def train(config, outdir: str, devices: int) -> dict:
    """Train every cell's grid into DIR/runs, first removing the runs an earlier grid left
    there for these cells (other cells' runs stay); {cell: references}, also added to
    DIR/references.json."""
    import glob
    from charrnn import sweep
    from experiments.science import runfiles
    corpus = sweep.Corpus.from_config(config)
    os.makedirs(os.path.join(outdir, "runs"), exist_ok=True)
    all_refs = {}
    path = os.path.join(outdir, REFERENCES)
    if os.path.exists(path):
        with open(path) as f:
            all_refs = json.load(f)
    for cell in config.sweep.cells:
        for stale in glob.glob(os.path.join(outdir, "runs", f"{cell}-*.json")):
            os.remove(stale)
        all_refs.pop(cell, None)
    for cell in config.sweep.cells:
        c = cell_config(config, cell)
        runs = sweep.make_grid(c.sweep)
        refs = all_refs[cell] = references(c, cell, corpus)
        with open(path, "w") as f:
            json.dump(all_refs, f, indent=1)
        groups = {}
        for run in runs:
            ref = reference_of(refs, run)
            tau = math.inf if ref is None else float(run.strength) * ref
            groups.setdefault(run.program(), []).append((run, tau, ref))
        for key, members in groups.items():
            configs = [sweep.run_config(c, run, tau) for run, tau, _ in members]
            histories = sweep.run_group(configs, [t for _, t, _ in members], corpus,
                                        mesh=sweep.group_mesh(len(configs), devices))
            for (run, tau, ref), history in zip(members, histories):
                row = sweep.summarize(run, tau, history, ref)
                runfiles.write_run(outdir, run, row, history, "-".join(key))
                print(f"{run.name}: τ {tau:.3g} final val bpc {row['final_val_bpc']:.3f} "
                      f"clipped {100 * row['unit_clip_fraction']:.0f}% of units"
                      + (" DIVERGED" if row["diverged"] else ""), flush=True)
    return all_refs


# ---------------------------------------------------------------------------
# Tables and figure


def setting(row) -> str:
    """'none', or 'rule @ placement'."""
    return "none" if row["rule"] == "none" else f"{row['rule']} @ {row['clip_at']}"


def _settings(rows) -> list:
    """'none' first, then by rule (as in the config) and placement (as in optim.PLACEMENTS)."""
    from charrnn import clipping, optim
    keys = sorted({(r["rule"], r["clip_at"]) for r in rows},
                  key=lambda k: (list(clipping.RULES).index(k[0]), optim.PLACEMENTS.index(k[1])))
    return [setting({"rule": rule, "clip_at": at}) for rule, at in keys]


def table(rows) -> list:
    """Per (cell, optimizer, learning rate, setting): seeds, diverged, mean ± std of the final
    and best val bpc of the seeds that trained, the mean share of units clipped, the mean τ."""
    out = []
    for cell, opt, lr in sorted({(r["cell"], r["optimizer"], r["learning_rate"]) for r in rows}):
        mine = [r for r in rows
                if (r["cell"], r["optimizer"], r["learning_rate"]) == (cell, opt, lr)]
        for name in _settings(mine):
            runs = [r for r in mine if setting(r) == name]
            ok = [r for r in runs if not r["diverged"] and math.isfinite(r["final_val_bpc"])]
            stat = lambda k, f: float(f([r[k] for r in ok])) if ok else math.nan
            std = lambda k: float(np.std([r[k] for r in ok], ddof=1)) if len(ok) > 1 else 0.0
            out.append({"cell": cell, "optimizer": opt, "learning_rate": lr, "setting": name,
                        "rule": runs[0]["rule"], "clip_at": runs[0]["clip_at"],
                        "seeds": len(runs), "diverged": len(runs) - len(ok),
                        "final_val_bpc": stat("final_val_bpc", np.mean),
                        "final_val_bpc_std": std("final_val_bpc"),
                        "best_val_bpc": stat("best_val_bpc", np.mean),
                        "best_val_bpc_std": std("best_val_bpc"),
                        "unit_clip_fraction": float(np.mean([r["unit_clip_fraction"]
                                                             for r in runs])),
                        "tau": float(np.mean([r["tau"] for r in runs]))})
    return out


def plot(path: str, entries: list) -> None:
    """Per (cell, optimizer) a panel: final val bpc (mean over the seeds that trained, bars
    the std) of each setting at each learning rate; a setting with a diverged seed gets a
    cross at the panel's top, with the count. The y-range is the trained runs' only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((e["cell"], e["optimizer"]) for e in entries))
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.4 * nrows), squeeze=False)
    for ax, (cell, opt) in zip(axes.ravel(), panels):
        mine = [e for e in entries if (e["cell"], e["optimizer"]) == (cell, opt)]
        names = list(dict.fromkeys(e["setting"] for e in mine))
        rates = sorted({e["learning_rate"] for e in mine})
        ok = [e["final_val_bpc"] for e in mine if math.isfinite(e["final_val_bpc"])]
        if not ok:
            ax.text(0.5, 0.5, "every run diverged", ha="center", va="center",
                    transform=ax.transAxes)
        lo, hi = (min(ok), max(ok)) if ok else (0.0, 1.0)
        pad = max(0.05 * (hi - lo), 0.01)
        top = hi + 3 * pad
        width = 0.8 / len(rates)
        for i, lr in enumerate(rates):
            xs, ys, es, marks = [], [], [], []
            for j, name in enumerate(names):
                e = next((e for e in mine if e["setting"] == name and e["learning_rate"] == lr),
                         None)
                if e is None:
                    continue
                x = j - 0.4 + width * (i + 0.5)
                if math.isfinite(e["final_val_bpc"]):
                    xs.append(x)
                    ys.append(e["final_val_bpc"])
                    es.append(e["final_val_bpc_std"])
                if e["diverged"]:
                    marks.append((x, e["diverged"], e["seeds"]))
            line = ax.errorbar(xs, ys, yerr=es, fmt="o", ms=4, capsize=2, label=f"lr {lr:g}")
            for x, n, s in marks:
                ax.plot([x], [top - pad], marker="x", color=line[0].get_color(), ms=7)
                ax.annotate(f"{n}/{s}", (x, top - pad), textcoords="offset points",
                            xytext=(0, 5), ha="center", fontsize=6)
        ax.set_ylim(lo - pad, top)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(" @ ", "\n@") for n in names], fontsize=6.5)
        ax.set_ylabel("final val bpc")
        ax.set_title(f"{cell} / {opt} (× = seeds diverged)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def aggregate(outdir: str) -> dict:
    """placement.csv, placement.png and placement.json from DIR/runs/*.json."""
    from experiments.science import runfiles
    records = runfiles.load_runs(outdir)
    rows = [r["row"] for r in records]
    with open(os.path.join(outdir, "placement.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    entries = table(rows)
    plot(os.path.join(outdir, "placement.png"), entries)
    refs = {}
    if os.path.exists(os.path.join(outdir, REFERENCES)):
        with open(os.path.join(outdir, REFERENCES)) as f:
            refs = json.load(f)
    result = {"rows": rows, "table": entries, "references": refs,
              "seconds": runfiles.training_seconds(records), "csv": "placement.csv",
              "figure": "placement.png"}
    with open(os.path.join(outdir, "placement.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    from charrnn import cpu_devices
    if not _AGGREGATE.value:
        cpu_devices.apply(cli.usable_cores())  # each device a core's share of a group's runs
    from charrnn.errors import UserError
    from experiments.configs import placement as placement_config
    config = _CONFIG.value
    if _SMOKE.value:
        cli.apply_variant(config, placement_config.apply_variant, "smoke", flags.FLAGS["config"])
    try:
        if not _AGGREGATE.value:
            check_grid(config)
            train(config, _OUTDIR.value, 0)
        result = aggregate(_OUTDIR.value)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for e in result["table"]:
        print(f"{e['cell']}/{e['optimizer']} lr {e['learning_rate']:g} {e['setting']}: final "
              f"{e['final_val_bpc']:.3f} ± {e['final_val_bpc_std']:.3f}, diverged "
              f"{e['diverged']}/{e['seeds']}, units clipped {e['unit_clip_fraction']:.2f}")


def check_grid(config) -> None:
    """Every cell's grid is well formed and each strength is a plain multiple ('1', '0.5');
    a :class:`charrnn.sweep.SweepError` says what is wrong."""
    from charrnn import sweep
    for cell in config.sweep.cells:
        for run in sweep.make_grid(cell_config(config, cell).sweep):
            if run.rule != "none" and sweep.parse_strength(run.rule, run.strength)[0] != "absolute":
                raise sweep.SweepError(f"strength {run.strength!r} of {run.rule}: this study's "
                                       "strengths are multiples of each placement's reference, "
                                       "written as plain numbers ('1', '0.5')")


# flags only when run as a script: tests import this module beside other scripts
if __name__ == "__main__":
    from ml_collections import config_flags
    from experiments.configs import placement as _placement_config
    _CONFIG = config_flags.DEFINE_config_file("config", _placement_config.__file__,
                                              "Placement study config (base run + grid).")
    _OUTDIR = flags.DEFINE_string("outdir", None, "Directory for runs/, the tables and figure.")
    _SMOKE = flags.DEFINE_bool("smoke", False, "The config's smoke variant: tiny and fast.")
    _AGGREGATE = flags.DEFINE_bool("aggregate", False, "Only the tables and figure from "
                                   "DIR/runs.")
    app.run(main)
