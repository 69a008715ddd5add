"""Clipping ablation: rules × their strengths × seeds × optimizer {sgd, adam} × cell.

The grid and the base run are the config (experiments/configs/clip_ablation.py);
the rules are charrnn/clipping.py's (sweep.rules, strengths in sweep.strengths).
Three ways to run it, with the same numbers:

    # the whole grid, one jitted program per (cell, optimizer) that trains every rule,
    # its runs split over the devices (on a CPU: one device per core; --devices=1 for one):
    python experiments/science/clip_ablation.py --outdir=DIR
    # one run per process (a cluster array job), then collect:
    python experiments/science/clip_ablation.py --outdir=DIR --list_runs
    python experiments/science/clip_ablation.py --outdir=DIR --run_index=$TASK_ID
    python experiments/science/clip_ablation.py --outdir=DIR --plateau_only  # then collect
    python experiments/science/clip_ablation.py --outdir=DIR --aggregate     # or only collect
    python experiments/science/clip_ablation.py --outdir=DIR --resume  # finish a stopped grid

Each run writes DIR/runs/<name>.json (its per-step history and its row).
Collecting writes DIR/clip_ablation.csv (one row per run, its rule named),
DIR/clip_ablation.md (mean over seeds per cell, optimizer, rule and strength),
DIR/clip_ablation.json and the figures val_bpc_vs_threshold.png, loss_curves.png
and grad_norm_traces.png (those three: the runs without clipping or with a
global-norm threshold τ, the Pascanu et al. experiment) and threshold_in_force.png
(the adaptive rules). After the whole grid, DIR/plateau.json: the best clipped
LSTM/Adam setting trained --plateau_factor times as long.
"""

import csv
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from charrnn import cpu_devices
from experiments import cli
from experiments.configs import clip_ablation as ablation_config
from experiments.science import runfiles

_CONFIG = config_flags.DEFINE_config_file(
    "config", ablation_config.__file__,
    "Ablation config (base run + grid).")
_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for runs/, tables and figures.")
_SMOKE = flags.DEFINE_bool("smoke", False, "The config's smoke variant on top: tiny and fast.")
_RUN_INDEX = flags.DEFINE_integer("run_index", -1, "Run only this grid index (see --list_runs); "
                                  "-1 runs the whole grid, one program per (cell, optimizer).")
_PACK = flags.DEFINE_bool("pack_rules", True, "One program trains every rule of a (cell, "
                          "optimizer), the rule a runtime index; false: one program per (rule, "
                          "cell, optimizer), as before the packing (for A/B timings).")
_RESUME = flags.DEFINE_bool("resume", False, "Train only the runs without a DIR/runs/<name>.json "
                             "(finish a grid that was stopped), then collect as usual.")
_LIST = flags.DEFINE_bool("list_runs", False, "Print the grid with run indices and exit.")
_AGGREGATE = flags.DEFINE_bool("aggregate", False, "Only collect DIR/runs/*.json into tables.")
_PLATEAU = flags.DEFINE_integer(
    "plateau_factor", 2, "After the whole grid: train the best clipped LSTM/Adam setting this "
    "many times as long, to show how far the grid's runs are from their plateau (<= 1: skip).")
_PLATEAU_ONLY = flags.DEFINE_bool("plateau_only", False, "Only the plateau check (after "
                                  "--run_index jobs), then collect.")
_CHUNK = flags.DEFINE_integer("runs_per_chunk", -1, "Runs vmapped together on each device in "
                              "the one-program sweep (0 = all; -1 = 1 on CPU, all on GPU/TPU).")
_DEVICES = flags.DEFINE_integer(
    "devices", 0, "Devices each one-program group's runs are split over, at most one per run "
    "(0 = every device; on a CPU the host is first split into one device per core); "
    "1 = one device.")


def run_grid(config, outdir: str, run_index: int, runs_per_chunk: int | None,
             devices: int = 1, pack_rules: bool = True, resume: bool = False) -> None:
    """Train the grid (or one run of it) and write DIR/runs/<name>.json per run.

    ``devices``: see --devices (0 = every device); ``pack_rules``: see --pack_rules;
    ``resume``: leave out the runs whose file exists."""
    from charrnn import sweep

    runs = sweep.make_grid(config.sweep)
    if run_index >= len(runs):
        raise sweep.SweepError(f"--run_index={run_index} but the grid has {len(runs)} runs")
    selected = runs if run_index < 0 else [runs[run_index]]
    if resume:
        selected = [r for r in selected
                    if not os.path.exists(os.path.join(outdir, "runs", r.name + ".json"))]
        print(f"resume: {len(selected)} of {len(runs)} runs left to train", flush=True)
        if not selected:
            return
    corpus = sweep.Corpus.from_config(config)
    taus, refs = sweep.strengths(config, selected, corpus)
    os.makedirs(os.path.join(outdir, "runs"), exist_ok=True)
    groups = {}
    for run, tau in zip(selected, taus):
        groups.setdefault(run.program(pack_rules), []).append((run, tau))
    for members in groups.values():
        configs = [sweep.run_config(config, run, tau) for run, tau in members]
        if run_index >= 0:
            histories = [sweep.run_single(configs[0], corpus)]
        else:
            mesh = sweep.group_mesh(len(configs), devices)
            histories = sweep.run_group(configs, [t for _, t in members], corpus, runs_per_chunk,
                                        mesh=mesh)
        for (run, tau), history in zip(members, histories):
            ref = refs.get((run.cell, run.optimizer, run.seed))
            row = sweep.summarize(run, tau, history, ref)
            # the runs of one program share its clock: their time counts once
            runfiles.write_run(outdir, run, row, history,
                       run.name if run_index >= 0 else "-".join(run.program(pack_rules)))
            print(f"{run.name}: strength {tau:.4g} final val bpc {row['final_val_bpc']:.3f} "
                  f"(best {row['best_val_bpc']:.3f}) clipped {100 * row['clip_fraction']:.0f}% "
                  f"max grad norm {row['max_grad_norm']:.3g}"
                  + (" DIVERGED" if row["diverged"] else ""), flush=True)


PLATEAU = "plateau.json"


def best_clipped(rows: list, cell: str = "lstm", optimizer: str = "adam"):
    """(rule, strength label) of the clipped setting of ``cell``/``optimizer`` with the
    lowest mean final val bpc over seeds (:func:`grouped`; settings with a non-finite
    mean left out); None if the grid has no such run."""
    table = [r for r in grouped(rows) if r["cell"] == cell and r["optimizer"] == optimizer
             and r["rule"] != "none" and math.isfinite(r["final_val_bpc"])]
    best = min(table, key=lambda r: r["final_val_bpc"], default=None)
    return None if best is None else (best["rule"], best["threshold"])


def plateau_check(config, outdir: str, factor: int) -> dict | None:
    """Train the best clipped LSTM/Adam setting of the grid (its first seed) ``factor``
    times as long and write DIR/plateau.json: its val bpc at the grid's length and at
    the end. With a constant learning rate (the grid's schedule) the longer run is the
    grid's run continued, up to floating-point differences between the two compiled
    programs (one run here, a vmapped group there), which grow over training: both values
    at the grid's length are kept. The difference is what more training still buys."""
    from charrnn import sweep
    from charrnn.step import LN2
    rows = [r["row"] for r in runfiles.load_runs(outdir)]
    best = best_clipped(rows)
    if best is None or factor <= 1:
        return None
    rule, label = best
    row = min((r for r in rows if r["cell"] == "lstm" and r["optimizer"] == "adam"
               and (r["rule"], r["threshold"]) == best), key=lambda r: r["seed"])
    run = sweep.Run("lstm", "adam", row["seed"], label, rule)
    steps = int(config.train.num_steps)
    history = sweep.run_single(sweep.run_config(config, run, row["tau"]),
                               sweep.Corpus.from_config(config), num_steps=factor * steps)
    val_steps = [int(s) for s in history["val_steps"]]
    val_bpc = [float(v) / LN2 for v in history["val_loss"]]
    at = val_steps.index(steps) if steps in val_steps else None
    result = {"cell": "lstm", "optimizer": "adam", "rule": rule, "threshold": label,
              "tau": row["tau"], "seed": row["seed"], "steps": steps,
              "long_steps": factor * steps, "val_steps": val_steps, "val_bpc": val_bpc,
              "bpc_at_steps": val_bpc[at] if at is not None else float("nan"),
              "grid_bpc_at_steps": row["final_val_bpc"], "bpc_at_long": val_bpc[-1],
              "best_bpc_long": min(val_bpc)}
    result["gain"] = result["bpc_at_steps"] - result["best_bpc_long"]
    with open(os.path.join(outdir, PLATEAU), "w") as f:
        json.dump(result, f, indent=1)
    print(f"plateau check: {run.name} at {steps} steps {result['bpc_at_steps']:.3f} bpc, best "
          f"over {factor * steps} steps {result['best_bpc_long']:.3f} (gain {result['gain']:.3f})",
          flush=True)
    return result


def _order(cell, opt, rule, label) -> tuple:
    """Table order: cell, optimizer, rule as registered ('none' first), increasing strength."""
    from charrnn import clipping, sweep
    return (cell, opt, list(clipping.RULES).index(rule), sweep.parse_strength(rule, label)[1])


def is_threshold_row(row) -> bool:
    """A run of the τ experiment: no clipping, or a global-norm threshold (a norm-type rule)."""
    from charrnn import clipping
    rule = clipping.RULES[row.get("rule", "global_norm")]
    return rule.strength is None or rule.norm_threshold


def grouped(rows: list) -> list:
    """Mean over seeds per (cell, optimizer, rule, strength): 'none' first, then by rule
    and increasing strength."""
    import numpy as np
    out = {}
    for r in rows:
        out.setdefault((r["cell"], r["optimizer"], r.get("rule", "global_norm"),
                        r["threshold"]), []).append(r)
    table = []
    for (cell, opt, rule, label), rs in sorted(out.items(), key=lambda kv: _order(*kv[0])):
        mean = lambda k: float(np.mean([r[k] for r in rs]))
        # spread over seeds: sample std (ddof 1), 0 for a single seed
        std = lambda k: float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0
        table.append({"cell": cell, "optimizer": opt, "rule": rule, "threshold": label,
                      "seeds": len(rs),
                      "tau": mean("tau"), "final_val_bpc": mean("final_val_bpc"),
                      "final_val_bpc_std": std("final_val_bpc"),
                      "best_val_bpc": mean("best_val_bpc"),
                      "best_val_bpc_std": std("best_val_bpc"),
                      "mean_clip_threshold": mean("mean_clip_threshold"),
                      "diverged": sum(r["diverged"] for r in rs),
                      "clip_fraction": mean("clip_fraction"),
                      "max_grad_norm": float(max(r["max_grad_norm"] for r in rs)),
                      "mean_grad_norm": mean("mean_grad_norm")})
    return table


def optimizer_contrast(table: list) -> list:
    """Per (cell, optimizer): how far each threshold moves the final val bpc from 'none'.

    ``spread``: max − min of the mean final val bpc over the thresholds whose
    runs did not diverge; ``delta``: threshold -> bpc(τ) − bpc(none).
    """
    out = []
    for cell, opt in sorted({(r["cell"], r["optimizer"]) for r in table}):
        rs = [r for r in table if r["cell"] == cell and r["optimizer"] == opt]
        none = [r for r in rs if r["threshold"] == "none"]
        ok = [r["final_val_bpc"] for r in rs if not r["diverged"]
              and math.isfinite(r["final_val_bpc"])]
        out.append({"cell": cell, "optimizer": opt,
                    "spread": (max(ok) - min(ok)) if ok else float("nan"),
                    "none_bpc": none[0]["final_val_bpc"] if none else float("nan"),
                    "delta": {r["threshold"]: r["final_val_bpc"] - none[0]["final_val_bpc"]
                              for r in rs if none},
                    "clip_fraction": {r["threshold"]: r["clip_fraction"] for r in rs}})
    return out


def markdown(table: list) -> str:
    """Mean ± std over seeds per (cell, optimizer, rule, strength)."""
    lines = ["| cell | optimizer | rule | strength | value | final val bpc | best val bpc "
             "| diverged | clip fraction | mean threshold in force | max grad norm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        tau = "∞" if math.isinf(r["tau"]) else f"{r['tau']:.3g}"
        in_force = r.get("mean_clip_threshold", float("nan"))
        in_force = "∞" if math.isinf(in_force) else f"{in_force:.3g}"
        lines.append(f"| {r['cell']} | {r['optimizer']} | {r['rule']} | {r['threshold']} | {tau} "
                     f"| {r['final_val_bpc']:.3f} ± {r.get('final_val_bpc_std', 0):.3f} "
                     f"| {r['best_val_bpc']:.3f} ± {r.get('best_val_bpc_std', 0):.3f} "
                     f"| {r['diverged']}/{r['seeds']} | {r['clip_fraction']:.2f} | {in_force} "
                     f"| {r['max_grad_norm']:.3g} |")
    return "\n".join(lines) + "\n"


def aggregate(outdir: str) -> dict:
    """Tables, figures and clip_ablation.json from DIR/runs/*.json."""
    from experiments.science import ablation_plots
    records = runfiles.load_runs(outdir)
    rows = [r["row"] for r in records]
    with open(os.path.join(outdir, "clip_ablation.csv"), "w", newline="") as f:
        # every field of every row (runs written by older code lack the newer columns)
        w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)), restval="")
        w.writeheader()
        w.writerows(rows)
    rules_table = grouped(rows)
    md = markdown(rules_table)
    with open(os.path.join(outdir, "clip_ablation.md"), "w") as f:
        f.write(md)
    # The τ experiment (figures, table, Adam contrast): the runs of no clipping and of τ.
    table = [r for r in rules_table if is_threshold_row(r)]
    ablation_plots.plot_all(outdir, [r for r in records if is_threshold_row(r["row"])], table)
    threshold_figure = ablation_plots.plot_thresholds_in_force(
        os.path.join(outdir, "threshold_in_force.png"), records)
    plateau = None
    if os.path.exists(os.path.join(outdir, PLATEAU)):
        with open(os.path.join(outdir, PLATEAU)) as f:
            plateau = json.load(f)
    summary = {"rows": rows, "table": table, "rules_table": rules_table, "markdown": md,
               "contrast": optimizer_contrast(table), "plateau": plateau,
               "threshold_figure": threshold_figure,
               "seconds": runfiles.training_seconds(records)}
    with open(os.path.join(outdir, "clip_ablation.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    if _DEVICES.value < 0:
        print(f"error: --devices must be >= 0, got {_DEVICES.value}", file=sys.stderr)
        sys.exit(1)
    if _DEVICES.value != 1 and _RUN_INDEX.value < 0 and not (_LIST.value or _AGGREGATE.value):
        # One device per core: each steps its share of a group's runs on one core, with no
        # communication (measured faster than one device: docs/design-notes.md).
        cpu_devices.apply(_DEVICES.value or cli.usable_cores())
    from charrnn import sweep
    from charrnn.errors import UserError

    config = _CONFIG.value
    if _SMOKE.value:
        cli.apply_variant(config, ablation_config.apply_variant, "smoke", flags.FLAGS["config"])
    try:
        runs = sweep.make_grid(config.sweep)
        if _LIST.value:
            for i, run in enumerate(runs):
                print(i, run.name)
            return
        if not (_AGGREGATE.value or _PLATEAU_ONLY.value):
            chunk = None if _CHUNK.value < 0 else _CHUNK.value
            run_grid(config, _OUTDIR.value, _RUN_INDEX.value, chunk, _DEVICES.value,
                     _PACK.value, _RESUME.value)
        if (_RUN_INDEX.value < 0 and not _AGGREGATE.value) or _PLATEAU_ONLY.value:
            plateau_check(config, _OUTDIR.value, _PLATEAU.value)
        if _AGGREGATE.value or _RUN_INDEX.value < 0 or _PLATEAU_ONLY.value:
            summary = aggregate(_OUTDIR.value)
            print(summary["markdown"], end="")
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
