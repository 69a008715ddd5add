"""The per-run files of a sweep study: DIR/runs/<name>.json, each a run's row (charrnn.sweep.summarize),
its per-step history and the wall time of the program that trained it.

Written by clip_ablation.py (and stability.py through it) and placement.py; read back by
their ``--aggregate``.
"""

import glob
import json
import os


def write_run(outdir, run, row, history, program: str):
    """DIR/runs/<name>.json; ``program``: the name of the process or program that trained it
    (``seconds`` is that program's wall time, the same for all its runs)."""
    import numpy as np
    record = {"row": row, "seconds": float(history["seconds"]), "program": program,
              "history": {k: np.asarray(v).astype(float).tolist() for k, v in history.items()
                          if k != "seconds"}}
    path = os.path.join(outdir, "runs", run.name + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, allow_nan=True)
    os.replace(path + ".tmp", path)


def load_runs(outdir: str) -> list:
    paths = sorted(glob.glob(os.path.join(outdir, "runs", "*.json")))
    if not paths:
        raise FileNotFoundError(f"no run results in {outdir}/runs: run the grid first")
    out = []
    for p in paths:
        with open(p) as f:
            out.append(json.load(f))
    return out


def training_seconds(records: list) -> float:
    """Wall time of the training: each program's time once (records written before the
    program was recorded: one program per (rule, cell, optimizer), the layout then)."""
    programs = {}
    for r in records:
        row = r["row"]
        key = r.get("program", "-".join((row["rule"], row["cell"], row["optimizer"])))
        programs[key] = max(programs.get(key, 0.0), r["seconds"])
    return sum(programs.values())
