"""The stability map: up to which learning rate each clipping setting still trains.

    python experiments/science/stability.py --outdir=DIR [--smoke]
    python experiments/science/stability.py --outdir=DIR --config.sweep.seeds="(0,)"
    python experiments/science/stability.py --outdir=DIR --aggregate  # tables and figure only

The grid is data (experiments/configs/stability.py): cells × optimizers × learning
rates × {no clipping, global-norm thresholds, an adaptive rule} × seeds. It is
trained by clip_ablation.py into DIR/grid/runs/ (charrnn.sweep: one program per
(cell, optimizer), the rule, the learning rate and the strength runtime data; the
tables and figures clip_ablation.py leaves in DIR/grid pool the learning rates).
Then, per (cell, optimizer) and setting (rule and strength):

- the *largest stable learning rate*: the largest rate of the grid at which no
  seed diverged (a run diverged when a step was non-finite or its final val loss
  is above its initial one: :func:`charrnn.sweep.summarize`);
- the *best reachable loss*: the lowest mean final val bpc over the rates at which
  no seed diverged, with the std over seeds at that rate.

Writes DIR/stability.csv (one row per run), DIR/stability.json (the runs, the table
and the settings) and DIR/stability_map.png (a heatmap of the final val bpc over
learning rate × setting per (cell, optimizer), diverged runs marked).
"""

import csv
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from experiments import cli

GRID = "grid"  # DIR/grid: clip_ablation.py's outdir
# Columns of stability.csv, in order (a run's row from charrnn.sweep.summarize).
COLUMNS = ("cell", "optimizer", "rule", "threshold", "tau", "learning_rate", "seed",
           "final_val_bpc", "best_val_bpc", "initial_val_bpc", "diverged", "clip_fraction",
           "max_grad_norm", "nonfinite_steps")


def setting(row) -> str:
    """A row's clipping setting as the map labels it: 'none' or 'rule strength'."""
    return "none" if row["rule"] == "none" else f"{row['rule']} {row['threshold']}"


def _order(rows) -> list:
    """The settings of ``rows``: 'none' first, then by rule as registered and strength."""
    from charrnn import clipping, sweep
    rules = list(clipping.RULES)
    keys = {(r["rule"], r["threshold"]) for r in rows}
    keys = sorted(keys, key=lambda k: (rules.index(k[0]), sweep.parse_strength(*k)[1]))
    return [setting({"rule": rule, "threshold": label}) for rule, label in keys]


def cells_of(rows, cell: str, optimizer: str, name: str) -> list:
    """Per learning rate (increasing) of one setting: mean and std over seeds of the final
    val bpc of the seeds that did not diverge, the number diverged and of seeds."""
    out = []
    mine = [r for r in rows if r["cell"] == cell and r["optimizer"] == optimizer
            and setting(r) == name]
    for lr in sorted({r["learning_rate"] for r in mine}):
        runs = [r for r in mine if r["learning_rate"] == lr]
        ok = [r["final_val_bpc"] for r in runs
              if not r["diverged"] and math.isfinite(r["final_val_bpc"])]
        out.append({"learning_rate": lr, "seeds": len(runs),
                    "diverged": sum(bool(r["diverged"]) for r in runs),
                    "mean": float(np.mean(ok)) if ok else math.nan,
                    # spread over seeds: sample std (ddof 1), 0 for a single seed
                    "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0,
                    "clip_fraction": float(np.mean([r["clip_fraction"] for r in runs]))})
    return out


def summarize_setting(cells: list) -> dict:
    """The largest stable learning rate (None: every rate had a diverged seed), the
    smallest rate with a diverged seed (None: none had), whether the largest stable
    rate is the grid's top, and the best reachable loss: the rate whose seeds all
    trained with the lowest mean final val bpc (None if no rate qualifies)."""
    stable = [c for c in cells if c["diverged"] == 0]
    failed = [c for c in cells if c["diverged"] > 0]
    top = max(c["learning_rate"] for c in cells)
    best = min((c for c in stable if math.isfinite(c["mean"])), key=lambda c: c["mean"],
               default=None)
    largest = max((c["learning_rate"] for c in stable), default=None)
    return {"largest_stable_lr": largest,
            "smallest_diverged_lr": min((c["learning_rate"] for c in failed), default=None),
            "stable_at_top": largest == top, "best": best}


def table(rows) -> list:
    """One entry per (cell, optimizer, setting): its cells (:func:`cells_of`) and
    :func:`summarize_setting`, plus ``ratio``: its largest stable learning rate over
    that of no clipping (None where either has none)."""
    out = []
    for cell, opt in sorted({(r["cell"], r["optimizer"]) for r in rows}):
        mine = [r for r in rows if r["cell"] == cell and r["optimizer"] == opt]
        entries = []
        for name in _order(mine):
            cells = cells_of(mine, cell, opt, name)
            entries.append({"cell": cell, "optimizer": opt, "setting": name, "cells": cells,
                            **summarize_setting(cells)})
        none = next((e for e in entries if e["setting"] == "none"), None)
        for e in entries:
            base = none and none["largest_stable_lr"]
            e["ratio"] = (e["largest_stable_lr"] / base
                          if base and e["largest_stable_lr"] else None)
        out += entries
    return out


def check_grid(sweep_config) -> None:
    """The map needs no clipping as its baseline and at least two learning rates per
    optimizer; a :class:`charrnn.sweep.SweepError` says what is missing."""
    from charrnn import sweep
    from charrnn.sweep.grid import learning_rates
    sweep.make_grid(sweep_config)  # every other check of the grid
    if "none" not in sweep_config.rules:
        raise sweep.SweepError("the stability map compares every setting with no clipping: "
                               "put 'none' in sweep.rules")
    for opt in sweep_config.optimizers:
        rates = learning_rates(sweep_config, opt)
        if len(set(rates)) < 2:
            raise sweep.SweepError(f"the stability map needs at least 2 learning rates per "
                                   f"optimizer: sweep.learning_rates.{opt} is {rates!r}")


def load_rows(outdir: str) -> list:
    """The runs' rows from DIR/grid/runs/*.json (clip_ablation.py's per-run files)."""
    paths = sorted(glob.glob(os.path.join(outdir, GRID, "runs", "*.json")))
    if not paths:
        raise FileNotFoundError(f"no run results in {os.path.join(outdir, GRID, 'runs')}: "
                                "train the grid first")
    rows = []
    for p in paths:
        with open(p) as f:
            rows.append(json.load(f)["row"])
    return rows


def aggregate(outdir: str) -> dict:
    """stability.csv, stability_map.png and stability.json from the grid's runs."""
    from experiments.science import stability_plots
    rows = load_rows(outdir)
    with open(os.path.join(outdir, "stability.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    entries = table(rows)
    stability_plots.plot_map(os.path.join(outdir, "stability_map.png"), entries)
    with open(os.path.join(outdir, GRID, "clip_ablation.json")) as f:
        seconds = json.load(f)["seconds"]
    result = {"rows": rows, "table": entries, "seconds": seconds, "csv": "stability.csv",
              "figure": "stability_map.png"}
    with open(os.path.join(outdir, "stability.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def train(outdir: str, config_arg: str, overrides: list) -> int:
    """clip_ablation.py trains the grid into DIR/grid (no plateau check; the runs of an
    earlier grid removed first, so that none mixes in); its exit code."""
    import shutil
    shutil.rmtree(os.path.join(outdir, GRID, "runs"), ignore_errors=True)
    args = [sys.executable, "-m", "experiments.science.clip_ablation",
            f"--outdir={os.path.join(outdir, GRID)}", "--plateau_factor=1",
            f"--config={config_arg}"] + overrides
    return subprocess.run(args, cwd=os.path.dirname(os.path.dirname(cli.__file__))).returncode


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    from charrnn.errors import UserError
    from experiments.configs import stability as stability_config
    config, config_arg = _CONFIG.value, flags.FLAGS["config"].config_filename
    if _SMOKE.value:
        cli.apply_variant(config, stability_config.apply_variant, "smoke", flags.FLAGS["config"])
        config_arg += ":smoke"
    # clip_ablation.py reads the same config: the file (and variant), the overrides on top
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    try:
        check_grid(config.sweep)
        if not _AGGREGATE.value:
            code = train(_OUTDIR.value, config_arg, overrides)
            if code:  # clip_ablation.py has said why on stderr
                sys.exit(code)
        result = aggregate(_OUTDIR.value)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for e in result["table"]:
        print(f"{e['cell']}/{e['optimizer']} {e['setting']}: largest stable lr "
              f"{e['largest_stable_lr']}, best {e['best'] and round(e['best']['mean'], 3)}")


# flags only when run as a script: tests import this module beside other scripts
if __name__ == "__main__":
    from ml_collections import config_flags
    from experiments.configs import stability as _stability_config
    _CONFIG = config_flags.DEFINE_config_file("config", _stability_config.__file__,
                                              "Stability map config (base run + grid).")
    _OUTDIR = flags.DEFINE_string("outdir", None, "Directory for grid/, the tables and figure.")
    _SMOKE = flags.DEFINE_bool("smoke", False, "The config's smoke variant: tiny and fast.")
    _AGGREGATE = flags.DEFINE_bool("aggregate", False, "Only the tables and figure from "
                                   "DIR/grid/runs.")
    app.run(main)
