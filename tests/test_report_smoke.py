"""The report page rendered from the smoke outputs of every experiment.

Each step of ``report.py --smoke`` (exploding_gradients.py, launch.py twice, clip_ablation.py,
bench_sweep.py, cliff.py, smoothness.py, stability.py, placement.py) runs once per test session into a
workdir the workers share (conftest.ReportSmoke) and is checked in its own test module:
test_diagnostics.py (exploding), test_experiments.py (ablation; the language model and its
quality page), test_perf.py (bench), test_cliff.py, test_smoothness.py, test_stability.py,
test_placement_study.py. Here
``report.py --smoke --reuse`` renders the page from those outputs.
"""

import hashlib
import os
import re

from conftest import REPO, ReportSmoke
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


def test_report_smoke_renders_every_experiment(report_smoke: ReportSmoke, tmp_path):
    # The steps the other modules have not run yet, smoothness (the last module) first.
    for step in ("smoothness", "bench", "cliff", "exploding", "ablation", "lm", "lm_carried",
                 "stability", "placement"):
        report_smoke.step(step)
    out = tmp_path / "out"
    committed = [os.path.join(REPO, "REPORT.md"), os.path.join(REPO, "report")]
    before = _tree_digest(*committed)
    r = _run(["experiments/pages/report.py", "--smoke", "--reuse", f"--outdir={out}",
              f"--workdir={report_smoke.root}", f"--data_path={report_smoke.corpus}"])
    assert r.returncode == 0, r.stderr[-3000:]
    ran = [line for line in r.stdout.splitlines() if re.fullmatch(r".+: \d+ s", line)]
    assert ran == []  # --reuse: every step's output was there, none ran again
    # A smoke run writes its page beside its figures; the committed page stays as it was.
    assert _tree_digest(*committed) == before
    assert sorted(p.name for p in out.glob("*.md")) == ["REPORT.md"]

    report = (out / "REPORT.md").read_text()
    for heading in ["## 1. Exploding gradients", "### 1.2 The L2-norm clipping algorithm",
                    "## 2. The training loop", "### 2.1 Does the threshold matter",
                    "### 1.3 The cliff of a one-unit recurrent network",
                    "### 1.4 Smoothness against the gradient norm",
                    "### 2.2 Every clipping rule at a trained operating point",
                    "### 2.3 Many runs in one program",
                    "### 2.4 Where clipping pays: the stability map",
                    "### 2.5 Where clipping sits",
                    "## 3. Training versus inference",
                    "### 3.1 The hand-over: the first characters of a text"]:
        assert heading in report
    figures = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(figures) == 10 and all((out / f).is_file() for f in figures)
    assert "**Trained to the plateau?**" in report
    # Code is quoted from the source, the telemetry read back from TensorBoard's files.
    assert "optimizer.update(grads, state.opt_state, state.params, axis_name)" in report
    assert "clipped, clip_state = self.clip.transform.update(grads, clip_state, params)" in report
    assert "`train/clip_cosine`" in report and "`val/whh_spectral_radius/0`" in report
    assert "```text\n" in report  # the sample
    assert "**carried** (start_state zero, reset_prob 0: the old regime)" in report
    # corpus and workdirs by name, not by machine path
    assert str(report_smoke.root) not in report and str(tmp_path) not in report


def test_report_steps_refuses_an_unknown_step_in_one_line(tmp_path):
    r = _run(["experiments/pages/report.py", "--smoke", f"--workdir={tmp_path}",
              "--steps=cliff,nope"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --steps: unknown nope; choose from exploding, lm, lm_carried, ablation, bench, "
        "cliff, smoothness, stability, placement"]
    assert os.listdir(tmp_path) == []  # nothing ran
    r = _run(["experiments/pages/report.py", "--smoke", "--steps=cliff"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --steps needs --workdir (where a later --reuse run finds them)"]
