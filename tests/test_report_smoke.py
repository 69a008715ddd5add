"""The report pipeline end to end, tiny settings, as separate processes.

``report.py --smoke`` runs exploding_gradients.py, launch.py, clip_ablation.py,
bench_sweep.py, cliff.py and smoothness.py with ``--smoke`` and writes the report, so
every script's outputs are checked in one run; then quality.py on the smoke language
model's workdir. The slowest test of the suite: alone in its file, so that pytest-xdist
(``--dist loadfile``) gives the other worker the other slow files.
"""

import hashlib
import json
import os
import re

from conftest import REPO
from test_experiments import _run


def _tree_digest(*paths) -> str:
    """sha256 over the bytes (and names) of the files at ``paths``, directories walked."""
    h = hashlib.sha256()
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        for f in files:
            h.update(os.path.relpath(f, REPO).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_report_smoke_runs_every_experiment_and_writes_the_report(text_file, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    committed = [os.path.join(REPO, "REPORT.md"), os.path.join(REPO, "report")]
    before = _tree_digest(*committed)
    r = _run(["experiments/pages/report.py", "--smoke", f"--outdir={out}",
              f"--workdir={work}", f"--data_path={text_file}"])
    assert r.returncode == 0, r.stderr[-3000:]
    # A smoke run writes its page beside its figures; the committed page stays as it was.
    assert _tree_digest(*committed) == before
    assert sorted(p.name for p in out.glob("*.md")) == ["REPORT.md"]
    for path in ["exploding/jacobian_slopes.md", "exploding/jacobian_norms.csv",
                 "exploding/jacobian_norms.png", "ablation/clip_ablation.csv",
                 "ablation/clip_ablation.md", "ablation/val_bpc_vs_threshold.png",
                 "ablation/loss_curves.png", "ablation/grad_norm_traces.png",
                 "ablation/threshold_in_force.png", "ablation/plateau.json",
                 "bench/bench_sweep.json", "lm/metrics.jsonl", "cliff/cliff.json",
                 "cliff/cliff.png", "smoothness/smoothness.json", "smoothness/smoothness.png"]:
        assert (work / path).is_file(), path
    # the studies' outputs, checked where they are made once (their own test modules)
    import test_cliff
    import test_smoothness
    test_cliff.check_smoke_outputs(work / "cliff")
    test_smoothness.check_smoke_outputs(work / "smoothness")
    bench = json.loads((work / "bench" / "bench_sweep.json").read_text())
    assert set(bench["ratio"]) == {"1", "2", "0"} and all(v > 0 for v in bench["ratio"].values())

    report = (out / "REPORT.md").read_text()
    for heading in ["## 1. Exploding gradients", "### 1.2 The L2-norm clipping algorithm",
                    "## 2. The training loop", "### 2.1 Does the threshold matter",
                    "### 1.3 The cliff of a one-unit recurrent network",
                    "### 1.4 Smoothness against the gradient norm",
                    "### 2.2 Every clipping rule at a trained operating point",
                    "### 2.3 Many runs in one program", "## 3. Training versus inference"]:
        assert heading in report
    figures = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(figures) == 8 and all((out / f).is_file() for f in figures)
    assert "**Trained to the plateau?**" in report
    # Code is quoted from the source, the telemetry read back from TensorBoard's files.
    assert "clipped, clip_state = clip.update(grads" in report
    assert "`train/clip_cosine`" in report and "`val/whh_spectral_radius/0`" in report
    assert "```text\n" in report  # the sample
    assert str(tmp_path) not in report  # corpus and workdirs by name, not by machine path

    # The quality page of the smoke training run, from its workdir alone.
    lm = work / "lm"
    assert (lm / "launches.jsonl").is_file()  # written by the launch itself
    val = [json.loads(l) for l in (lm / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "val"]
    r = _run(["experiments/pages/quality.py", f"--workdirs={lm}", "--threshold=100",
              f"--markdown={out}/QUALITY.md"])
    assert r.returncode == 0, r.stderr[-3000:]
    page = (out / "QUALITY.md").read_text()
    assert "`experiments/configs/default.py:smoke` with `data.path=corpus.txt`" in page
    assert str(tmp_path) not in page and text_file not in page  # no machine path
    assert f"{val[0]['loss']:.4f} at step {val[0]['step']}" in page  # first val <= 100
    assert f"| {val[-1]['step']} | {val[-1]['loss']:.4f} |" in page  # the curve
