"""A/B of the training path between two checkouts of charrnn, in one run.

    python experiments/bench/ab.py --baseline=PATH_TO_OTHER_CHECKOUT [--text=FILE]
        [--rounds=3] [--outdir=runs/ab]

A refactor of the step, the model or the sweep must not slow them down. This
runs the same three measurements on this checkout ("new") and on another
("old", e.g. ``git worktree add ../old HEAD~1``), alternating old, new, old,
new, ... ``--rounds`` times so that both sides meet the same machine load, and
prints JSON with each side's median and the ratio new/old:

- ``train``: the launcher's own throughput (``chars_per_sec`` of its train
  records after the first, which excludes compilation), LSTM 2x256, B=32,
  T=128, one CPU device;
- ``sample``: ``charrnn.sample`` of that run's parameters, 20000 characters,
  batch 1, the best of 3 calls after a warm-up call in the same process;
- ``group``: ``charrnn.sweep.run_group`` of 4 runs (LSTM 1x128, global_norm at
  four strengths): chars/s from the difference of two lengths (20 and 300 steps)
  in one process, so that compilation cancels.

Only the public interface both checkouts share is used (the launcher,
``charrnn.sample``, ``charrnn.sweep.run_group``), so the two may differ in
everything else. Each measurement runs in a fresh process with the checkout
first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from experiments import cli

_BASELINE = flags.DEFINE_string("baseline", None, "The other checkout (the 'old' side).")
_TEXT = flags.DEFINE_string("text", None, "A UTF-8 text to train on (default: the built-in "
                            "corpus's first 1 M characters, written to the outdir).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternations of old and new.")
_STEPS = flags.DEFINE_integer("steps", 60, "Training steps per launch (records every 20).")
_OUTDIR = flags.DEFINE_string("outdir", "runs/ab", "Directory for the runs and ab.json.")

_SAMPLE = """
import sys, time, charrnn
from charrnn import restore
_, vocab, model, params, _ = restore.load_checkpoint(sys.argv[1])
charrnn.sample(params, vocab, model, length=20000)  # compile
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    charrnn.sample(params, vocab, model, length=20000)
    best = max(best, 20000 / (time.perf_counter() - start))
print(best)
"""

_GROUP = """
import sys, ml_collections
from charrnn import sweep
from experiments.configs import default
config = default.get_config("smoke")
config.data.path, config.data.name = sys.argv[1], ""
config.model.cell, config.model.hidden_size, config.model.num_layers = "lstm", 128, 1
config.train.batch_size, config.train.seq_len = 32, 64
config.sweep = ml_collections.ConfigDict({"eval_every": 0, "eval_chars": 2048})
corpus = sweep.Corpus.from_config(config)
configs = [ml_collections.ConfigDict(config.to_dict()) for _ in range(4)]
taus = [0.25, 0.5, 1.0, 2.0]
def seconds(n):
    return sweep.run_group(configs, taus, corpus, num_steps=n)[0]["seconds"]
short, long = seconds(20), seconds(300)
print(4 * 280 * 32 * 64 / (long - short))
"""


def _python(checkout: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=checkout, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, *args], cwd=checkout, env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout


def _train(checkout: str, workdir: str, text: str) -> float:
    _python(checkout, ["launch.py", f"--workdir={workdir}", "--fresh",
                       f"--config.data.path={text}", "--config.model.hidden_size=256",
                       "--config.model.num_layers=2", f"--config.train.num_steps={_STEPS.value}",
                       "--config.train.log_every=20", "--config.train.eval_every=100000",
                       "--config.train.cpu_devices=1"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["chars_per_sec"] for r in map(json.loads, f) if r["split"] == "train"]
    return statistics.median(rates[1:])  # the first record's window follows compilation


def measure(sides: dict, text: str, outdir: str, rounds: int) -> dict:
    results = {name: {"train": [], "sample": [], "group": []} for name in sides}
    for _ in range(rounds):
        for name, checkout in sides.items():
            workdir = os.path.join(outdir, name)
            results[name]["train"].append(_train(checkout, workdir, text))
            results[name]["sample"].append(float(_python(checkout, ["-c", _SAMPLE, workdir])))
            results[name]["group"].append(float(_python(checkout, ["-c", _GROUP, text])))
    out = {"rounds": rounds, "sides": {k: os.path.abspath(v) for k, v in sides.items()}}
    for task in ("train", "sample", "group"):
        old, new = (statistics.median(results[s][task]) for s in ("old", "new"))
        out[task] = {"old_chars_per_sec": old, "new_chars_per_sec": new, "ratio": new / old,
                     "old_all": results["old"][task], "new_all": results["new"][task]}
    return out


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    if not _BASELINE.value or not os.path.isdir(os.path.join(_BASELINE.value, "charrnn")):
        raise app.UsageError("--baseline must name another checkout of charrnn")
    os.makedirs(_OUTDIR.value, exist_ok=True)
    text = _TEXT.value
    if text is None:
        from charrnn import data
        text = os.path.join(os.path.abspath(_OUTDIR.value), "text.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write(data.load_text("shakespeare")[:1_000_000])
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(dir=os.path.abspath(_OUTDIR.value)) as work:
        result = measure({"old": _BASELINE.value, "new": here}, os.path.abspath(text), work,
                         _ROUNDS.value)
    print(json.dumps(result, indent=1))
    cli.write_json(_OUTDIR.value, "ab.json", result)


if __name__ == "__main__":
    app.run(main)
