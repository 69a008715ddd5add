"""The experiment scripts end to end, tiny settings, as separate processes.

One combined smoke test: ``report.py --smoke`` runs exploding_gradients.py,
launch.py, clip_ablation.py and bench_sweep.py with ``--smoke`` and writes the
report, so every script's outputs are checked in one run (about a minute).
"""

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def _run(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True, **kw)


def test_report_smoke_runs_every_experiment_and_writes_the_report(text_file, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _run(["experiments/report.py", "--smoke", f"--outdir={out}", f"--report={out}/REPORT.md",
              f"--workdir={work}", f"--data_path={text_file}"])
    assert r.returncode == 0, r.stderr[-3000:]
    for path in ["exploding/jacobian_slopes.md", "exploding/jacobian_norms.csv",
                 "exploding/jacobian_norms.png", "ablation/clip_ablation.csv",
                 "ablation/clip_ablation.md", "ablation/val_bpc_vs_threshold.png",
                 "ablation/loss_curves.png", "ablation/grad_norm_traces.png",
                 "bench/bench_sweep.json", "lm/metrics.jsonl"]:
        assert (work / path).is_file(), path
    bench = json.loads((work / "bench" / "bench_sweep.json").read_text())
    assert set(bench["ratio"]) == {"1", "2", "0"} and all(v > 0 for v in bench["ratio"].values())

    report = (out / "REPORT.md").read_text()
    for heading in ["## 1. Exploding gradients", "### 1.2 The L2-norm clipping algorithm",
                    "## 2. The training loop", "### 2.1 Does the threshold matter",
                    "### 2.2 Many runs in one program", "## 3. Training versus inference"]:
        assert heading in report
    figures = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(figures) == 5 and all((out / f).is_file() for f in figures)
    # Code is quoted from the source, the telemetry read back from TensorBoard's files.
    assert "clipped, clip_state = clip.update(grads" in report
    assert "`train/clip_cosine`" in report and "`val/whh_spectral_radius/0`" in report
    assert "```text\n" in report  # the sample

    # The quality page of the smoke training run, from its workdir alone.
    lm = work / "lm"
    val = [json.loads(l) for l in (lm / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "val"]
    r = _run(["experiments/quality.py", f"--workdirs={lm}", "--threshold=100",
              f"--markdown={out}/QUALITY.md", "--hardware=the test machine"])
    assert r.returncode == 0, r.stderr[-3000:]
    quality = (out / "QUALITY.md").read_text()
    assert f"{val[0]['loss']:.4f} at step {val[0]['step']}" in quality  # first val <= 100
    assert f"| {val[-1]['step']} | {val[-1]['loss']:.4f} |" in quality  # the curve
    assert "Hardware: the test machine." in quality


def test_ablation_one_run_per_process_then_aggregate(text_file, tmp_path):
    base = ["experiments/clip_ablation.py", f"--outdir={tmp_path}", "--smoke",
            f"--config.data.path={text_file}", "--config.sweep.cells=('rnn',)",
            "--config.sweep.optimizers=('sgd',)", "--config.sweep.rules=('none','global_norm')",
            "--config.sweep.strengths.global_norm=('1x',)"]
    listed = _run(base + ["--list_runs"])
    assert listed.stdout.split() == ["0", "rnn-sgd-seed0-none", "1",
                                     "rnn-sgd-seed0-global_norm_1x"]
    one = _run(base + ["--run_index=1"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == ["rnn-sgd-seed0-global_norm_1x.json"]
    collected = _run(base + ["--aggregate"])
    assert collected.returncode == 0, collected.stderr[-2000:]
    rows = (tmp_path / "clip_ablation.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("rnn,sgd,0,global_norm,1x,")
    bad = _run(base + ["--run_index=5"])
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    bad = _run(base + ["--devices=-1"])
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --devices must be >= 0, got -1"


def test_quality_page_finds_the_first_crossing_and_the_best(tmp_path):
    config = {"data": {"name": "tinyshakespeare", "path": "", "val_fraction": 0.1},
              "model": {"cell": "lstm", "num_layers": 2, "hidden_size": 512, "embed_dim": 64,
                        "dropout": 0.25},  # no matmul_dtype: a run from before the field
              "train": {"batch_size": 32, "seq_len": 128, "num_steps": 4},
              "optim": {"name": "adam", "learning_rate": 2e-3, "schedule": "cosine",
                        "clip_mode": "global_norm", "clip_norm": 1.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "split": "val", "loss": loss, "bpc": loss / 0.693, "wall_s": 60.0 * s}
               for s, loss in [(1, 1.7), (2, 1.49), (3, 1.45), (4, 1.46)]]
    records.insert(2, {"step": 2, "split": "train", "loss": 1.3, "bpc": 1.9})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _run(["experiments/quality.py", f"--workdirs={tmp_path}", "--threshold=1.5",
              "--hardware=here"])
    assert r.returncode == 0, r.stderr[-2000:]
    # first val <= 1.5 at step 2 (not the best, at step 3); the last train record
    assert "| 1.4900 at step 2, 2.0 min | 1.4500 at step 3, 3.0 min | 1.3000 (step 2) |" \
        in r.stdout
    assert "float32 products" in r.stdout
    bad = _run(["experiments/quality.py", f"--workdirs={tmp_path / 'nope'}"])
    assert bad.returncode == 1 and "is not a training workdir" in bad.stderr


def test_quality_page_sums_wall_time_over_launches(tmp_path):
    # A run extended after it finished: the second process's clock starts again at 0.
    config = {"data": {"name": "x", "path": "", "val_fraction": 0.1},
              "model": {"cell": "lstm", "num_layers": 1, "hidden_size": 8, "embed_dim": 4,
                        "dropout": 0.0},
              "train": {"batch_size": 2, "seq_len": 4, "num_steps": 4},
              "optim": {"name": "adam", "learning_rate": 1e-3, "schedule": "constant",
                        "clip_mode": "global_norm", "clip_norm": 1.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "split": "val", "loss": loss, "bpc": 1.0, "wall_s": wall}
               for s, loss, wall in [(1, 1.7, 60.0), (2, 1.6, 120.0), (3, 1.4, 30.0),
                                     (4, 1.3, 90.0)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _run(["experiments/quality.py", f"--workdirs={tmp_path}", "--threshold=1.5"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(2 launches, wall times summed)" in r.stdout
    # 120 s before the restart + 30 s and 90 s after it
    assert "| 1.4000 at step 3, 2.5 min | 1.3000 at step 4, 3.5 min |" in r.stdout
    assert "| 2 | 1.6000 | 1.000 | 2.0 min |" in r.stdout
