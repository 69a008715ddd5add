"""The clip ablation's smoke run and its one-run-per-process mode, the smoke language
model's quality page, and the quality page on synthetic workdirs, in process. The report
page rendered from every experiment's smoke outputs: test_report_smoke.py."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from experiments.configs import default
from experiments.pages import provenance, quality


def _run(args, **kw):
    return subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True, **kw)


def test_ablation_one_run_per_process_then_aggregate(text_file, tmp_path):
    base = ["experiments/science/clip_ablation.py", f"--outdir={tmp_path}", "--smoke",
            f"--config.data.path={text_file}", "--config.sweep.cells=('rnn',)",
            "--config.sweep.optimizers=('sgd',)", "--config.sweep.rules=('none','global_norm')",
            "--config.sweep.strengths.global_norm=('1x',)"]
    listed = _run(base + ["--list_runs"])
    assert listed.stdout.split() == ["0", "rnn-sgd-lr1-seed0-none", "1",
                                     "rnn-sgd-lr1-seed0-global_norm_1x"]
    one = _run(base + ["--run_index=1"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == ["rnn-sgd-lr1-seed0-global_norm_1x.json"]
    collected = _run(base + ["--aggregate"])
    assert collected.returncode == 0, collected.stderr[-2000:]
    rows = (tmp_path / "clip_ablation.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("rnn,sgd,1.0,0,global_norm,1x,")
    # --resume trains only the run without a file; the finished run's file is left as it was
    kept = (tmp_path / "runs" / "rnn-sgd-lr1-seed0-global_norm_1x.json").read_bytes()
    resumed = _run(base + ["--resume", "--plateau_factor=1"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resume: 1 of 2 runs left to train" in resumed.stdout
    assert sorted(os.listdir(tmp_path / "runs")) == ["rnn-sgd-lr1-seed0-global_norm_1x.json",
                                                     "rnn-sgd-lr1-seed0-none.json"]
    assert (tmp_path / "runs" / "rnn-sgd-lr1-seed0-global_norm_1x.json").read_bytes() == kept
    assert len((tmp_path / "clip_ablation.csv").read_text().splitlines()) == 3
    bad = _run(base + ["--run_index=5"])
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    bad = _run(base + ["--devices=-1"])
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --devices must be >= 0, got -1"


def test_clip_ablation_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=ablation`` (clip_ablation.py --smoke; once per session)."""
    from experiments.configs import clip_ablation
    out = report_smoke.step("ablation")
    for name in ["clip_ablation.csv", "clip_ablation.md", "val_bpc_vs_threshold.png",
                 "loss_curves.png", "grad_norm_traces.png", "threshold_in_force.png",
                 "plateau.json", "clip_ablation.json"]:
        assert (out / name).is_file(), name
    s = clip_ablation.get_config("smoke").sweep
    runs = len(s.optimizers) * len(s.cells) * len(s.seeds) * sum(
        1 if r == "none" else len(s.strengths[r]) for r in s.rules)
    assert len((out / "clip_ablation.csv").read_text().splitlines()) == 1 + runs


def test_the_smoke_language_model_and_its_quality_page(report_smoke, tmp_path):
    """``report.py --smoke --steps=lm`` (launch.py with the smoke config; once per session),
    then the quality page from its workdir alone."""
    lm = report_smoke.step("lm")
    assert (lm / "launches.jsonl").is_file()  # written by the launch itself
    # the smoke config checkpoints every 10 of its 20 steps: 10 and 20, no other
    assert sorted(os.listdir(lm / "checkpoints"), key=int) == ["10", "20"]
    val = [json.loads(l) for l in (lm / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["split"] == "val"]
    r = _run(["experiments/pages/quality.py", f"--workdirs={lm}", "--threshold=100",
              f"--markdown={tmp_path}/QUALITY.md"])
    assert r.returncode == 0, r.stderr[-3000:]
    page = (tmp_path / "QUALITY.md").read_text()
    assert "`experiments/configs/default.py:smoke` with `data.path=corpus.txt`" in page
    assert str(report_smoke.root) not in page  # the corpus by name, not by machine path
    assert f"{val[0]['loss']:.4f} at step {val[0]['step']}" in page  # first val <= 100
    assert f"| {val[-1]['step']} | {val[-1]['loss']:.4f} |" in page  # the curve


def _workdir(path, config, records, launches=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if launches is not None:
        (path / "launches.jsonl").write_text("".join(json.dumps(l) + "\n" for l in launches))
    return str(path)


LAUNCH = {"start_step": 0, "started": "2026-11-29T10:00:00+00:00",
          "config_arg": "experiments/configs/default.py:tinyshakespeare_fast",
          "argv": ["launch.py", "--workdir=runs/f", "--config.train.num_steps=4"],
          "hardware": {"host": "h", "cpu": "Test CPU 9000", "cpu_count": 2, "platform": "cpu",
                       "device_count": 1, "device_kind": "cpu"},
          "software": {"python": "3.11.9", "jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.0",
                       "optax": "0.2.8", "orbax-checkpoint": "0.12.1", "charrnn_commit": "abc1234"}}


def _config(variant, **fields):
    config = default.get_config(variant).to_dict()
    for field, value in fields.items():
        group, name = field.split("__")
        config[group][name] = value
    return config


def test_quality_page_names_the_variant_the_launches_and_the_crossing(tmp_path):
    records = [{"step": s, "split": "val", "loss": loss, "bpc": loss / 0.693, "wall_s": 60.0 * s}
               for s, loss in [(1, 1.7), (2, 1.49), (3, 1.45), (4, 1.46)]]
    records.insert(2, {"step": 2, "split": "train", "loss": 1.3, "bpc": 1.9})
    # The second launch comes from an older writer: every key but one missing.
    work = _workdir(tmp_path / "fast", _config("tinyshakespeare_fast", train__num_steps=4),
                    records, [LAUNCH, {"start_step": 3}])
    run = quality.summarize(work, 1.5)
    text = quality.page([run], 1.5, "python experiments/pages/quality.py --workdirs=fast")
    assert "| `fast` | `experiments/configs/default.py:tinyshakespeare_fast` with " \
        "`train.num_steps=4` |" in text
    # first val <= 1.5 at step 2 (not the best, at step 3); the last train record
    assert "| 1.4900 at step 2, 2.0 min | 1.4500 at step 3, 3.0 min | — | 1.3000 (step 2) |" in text
    assert "bfloat16 products" in text
    assert ("  - from step 0 (2026-11-29T10:00:00+00:00): Test CPU 9000, 2 CPUs, 1 × cpu (cpu); "
            "python 3.11.9, jax 0.10.2, jaxlib 0.10.2, flax 0.12.0, optax 0.2.8, "
            "orbax-checkpoint 0.12.1; charrnn commit abc1234") in text
    assert "  - from step 3 (?): ?, ? CPUs, ? × ? (?); versions not recorded; " \
        "charrnn commit unknown" in text


def test_quality_prefers_the_variant_the_launch_named_and_reads_old_runs_without_launches(
        tmp_path):
    records = [{"step": 1, "split": "val", "loss": 2.0, "bpc": 2.9, "wall_s": 5.0}]
    # default.py and default.py:lstm are the same config: the launch's name wins.
    named = _workdir(tmp_path / "a", _config("lstm"), records,
                     [dict(LAUNCH, config_arg="experiments/configs/default.py:lstm", argv=[])])
    assert quality.summarize(named, 1.5)["origin"] == {"variant": "lstm", "overrides": {}}
    old = _workdir(tmp_path / "b", _config("gru"), records)  # no launches.jsonl
    run = quality.summarize(old, 1.5)
    assert run["origin"] == {"variant": "gru", "overrides": {}}
    assert "- `b`: hardware and software not recorded (no launches.jsonl)" in \
        quality.page([run], 1.5, "cmd")


def test_quality_refuses_a_run_no_current_variant_produces(tmp_path):
    records = [{"step": 1, "split": "val", "loss": 2.0, "bpc": 2.9, "wall_s": 5.0}]
    changed = _config("tinyshakespeare_wide", model__dropout=0.4)  # a field no launch set
    work = _workdir(tmp_path / "old", changed, records,
                    [dict(LAUNCH, config_arg="experiments/configs/default.py:tinyshakespeare_wide",
                          argv=["--config.train.num_steps=7500"])])
    r = _run(["experiments/pages/quality.py", f"--workdirs={work}"])
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {work}: its config.json matches no current variant of "
                               "experiments/configs/default.py; closest "
                               "experiments/configs/default.py:tinyshakespeare_wide, which differs "
                               "in model.dropout: 0.4 in the run, 0.45 in the variant")
    # The same field set on the command line: the run is the variant with that override.
    (tmp_path / "old" / "launches.jsonl").write_text(json.dumps(
        dict(LAUNCH, argv=["--config.model.dropout=0.4"])) + "\n")
    assert quality.summarize(work, 1.5)["origin"] == {
        "variant": "tinyshakespeare_wide", "overrides": {"model.dropout": 0.4}}
    bad = _run(["experiments/pages/quality.py", f"--workdirs={tmp_path / 'nope'}"])
    assert bad.returncode == 1 and "not a training workdir (no metrics.jsonl)" in bad.stderr
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "config.json").write_text("{")
    (torn / "metrics.jsonl").write_text("")
    with pytest.raises(provenance.ProvenanceError, match="config.json is not JSON"):
        quality.summarize(str(torn), 1.5)


@pytest.mark.parametrize("argv, fields", [
    (["--config.a.b=1", "--config.c.d", "2", "--noconfig.model.fast_vjp"],
     {"a.b", "c.d", "model.fast_vjp"}),
    (["launch.py", "--config=experiments/configs/default.py:gru", "--workdir=w", "x=--config.y"],
     set()),
    (None, set())])
def test_overridden_fields_reads_absl_forms(argv, fields):
    assert provenance.overridden_fields(argv) == fields


def test_quality_page_sums_wall_time_over_launches(tmp_path):
    # A run extended after it finished: the second process's clock starts again at 0.
    records = [{"step": s, "split": "val", "loss": loss, "bpc": 1.0, "wall_s": wall}
               for s, loss, wall in [(1, 1.7, 60.0), (2, 1.6, 120.0), (3, 1.4, 30.0),
                                     (4, 1.3, 90.0)]]
    work = _workdir(tmp_path / "ext", _config("smoke"), records,
                    [dict(LAUNCH, config_arg=None, argv=[]), dict(LAUNCH, start_step=2)])
    text = quality.page([quality.summarize(work, 1.5)], 1.5, "cmd")
    assert "(2 launches, wall times summed)" in text
    # 120 s before the restart + 30 s and 90 s after it
    assert "| 1.4000 at step 3, 2.5 min | 1.3000 at step 4, 3.5 min |" in text
    assert "| 2 | 1.6000 | 1.000 | 2.0 min |" in text


def test_quality_page_shows_averaged_weights_milestones_and_archived_runs(tmp_path):
    val = [(1, 1.52, 1.60), (2, 1.47, 1.44), (3, 1.42, 1.39), (4, 1.41, 1.395)]
    records = [{"step": s, "split": "val", "loss": raw, "bpc": raw / 0.693, "ema_loss": avg,
                "ema_bpc": avg / 0.693, "wall_s": 60.0 * s} for s, raw, avg in val]
    work = _workdir(tmp_path / "avg", _config("tinyshakespeare_ema"), records,
                    [dict(LAUNCH, config_arg="experiments/configs/default.py:tinyshakespeare_ema")])
    run = quality.summarize(work, 1.5)
    assert run["best"]["step"] == 4 and run["best_ema"]["step"] == 3
    # levels reached by the lower of the two: 1.50 at step 2 (raw 1.47), 1.45 at step 2
    # (averaged 1.44), 1.40 at step 3 (averaged 1.39; the raw weights never get there)
    assert [r["step"] if r else None for r in run["milestones"].values()] == [2, 2, 3]
    archive = tmp_path / "archive.json"
    archive.write_text(json.dumps({"source": "an old page", "note": "Old evaluation.", "rows": [
        {"run": "ts_old", "config": "LSTM", "first": "1.49 at step 9", "best": "1.41 at step 12",
         "last_train": "1.2 (step 12)"}]}))
    text = quality.page([run], 1.5, "cmd", str(archive), {"avg": "ran beside a test."})
    assert "charrnn commit abc1234\n  - note: ran beside a test.\n" in text
    assert "| 1.4100 at step 4, 4.0 min | 1.3900 at step 3, 3.0 min |" in text
    assert "| `avg` | step 2, 2.0 min | step 2, 2.0 min | step 3, 3.0 min |" in text
    assert "| 3 | 1.4200 | 2.049 | 1.3900 | 3.0 min |" in text
    head, _, tail = text.partition("## Earlier runs, measured with the old evaluation")
    assert "ts_old" not in head
    assert "Old evaluation. Source: an old page." in tail
    assert "| `ts_old` | LSTM | 1.49 at step 9 | 1.41 at step 12 | 1.2 (step 12) |" in tail
    # a run without averaged weights has no such column in its curve
    raw_only = [{k: v for k, v in r.items() if not k.startswith("ema")} for r in records[:1]]
    plain = quality.summarize(_workdir(tmp_path / "plain", _config("smoke"), raw_only,
                                       [dict(LAUNCH, config_arg=None, argv=[])]), 1.5)
    assert plain["best_ema"] is None
    assert "| 1 | 1.5200 | 2.193 | 1.0 min |" in quality.page([plain], 1.5, "cmd")


def test_quality_page_names_the_corpus_not_its_path_and_shows_archived_runs(tmp_path):
    corpus = tmp_path / "machine" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_bytes(b"some text\n")
    sha = hashlib.sha256(b"some text\n").hexdigest()
    records = [{"step": 1, "split": "val", "loss": 1.45, "bpc": 2.1, "wall_s": 60.0}]
    config = _config("smoke", data__path=str(corpus))
    work = _workdir(tmp_path / "live", config, records,
                    [dict(LAUNCH, config_arg=None, argv=[f"--config.data.path={corpus}"])])
    run = quality.summarize(work, 1.5)
    assert run["corpus_sha256"] == sha
    # The same run's records kept in an archive (its workdir gone), shown like a live run.
    archive = tmp_path / "archive.json"
    gone = {k: run[k] for k in ("config", "origin", "launch_records", "val", "launches",
                                "last_train", "corpus_sha256")}
    archive.write_text(json.dumps({"runs": [dict(gone, workdir="gone", archived="copied.")]}))
    runs = [run] + quality.archived_runs(quality.read_archive(str(archive)), 1.5)
    text = quality.page(runs, 1.5, "cmd", str(archive))
    assert str(tmp_path) not in text
    for name in ("live", "gone"):
        assert (f"| `{name}` | `experiments/configs/default.py:smoke` with "
                f"`data.path=corpus.txt` | corpus.txt with sha256 {sha[:12]}… (val 5%)") in text
        assert f"## `{name}`: val curve" in text
    assert "  - archived: copied.\n" in text and "## Earlier runs" not in text


def test_aggregate_reads_runs_of_older_code_and_panels_whose_every_loss_is_nan(tmp_path):
    """A grid finished by --resume mixes rows written before a column existed with rows that
    have it (the CSV takes every column; an old row's is empty), and a panel whose runs all
    diverged with no finite loss at all is drawn (it once asked for a log axis over NaN)."""
    import json
    (tmp_path / "runs").mkdir()
    for i, (rule, label, tau) in enumerate([("none", "none", float("inf")),
                                            ("global_norm", "1x", 0.5)]):
        row = {"cell": "irnn", "optimizer": "sgd", "learning_rate": 1.0, "seed": 0,
               "rule": rule, "threshold": label, "tau": tau, "reference_norm": 0.5,
               "mean_clip_threshold": tau, "final_val_bpc": float("nan"),
               "best_val_bpc": 270.0, "initial_val_bpc": 6.3, "diverged": True,
               "clip_fraction": 0.0, "mean_grad_norm": float("nan"),
               "max_grad_norm": float("nan"), "nonfinite_steps": 10, "steps": 10}
        if i:  # written by the newer code
            row.update(clip_at="gradient", unit_clip_fraction=0.0)
        record = {"row": row, "seconds": 1.0, "program": "p",
                  "history": {"loss": [float("nan")] * 10, "grad_norm": [float("nan")] * 10,
                              "grad_norm_clipped": [float("nan")] * 10,
                              "clip_threshold": [tau] * 10, "clipped": [0.0] * 10,
                              "nonfinite": [1.0] * 10, "val_steps": [0, 10],
                              "val_loss": [4.4, float("nan")]}}
        (tmp_path / "runs" / f"run{i}.json").write_text(json.dumps(record))
    # a process of its own: clip_ablation.py defines absl flags when imported
    r = _run(["experiments/science/clip_ablation.py", f"--outdir={tmp_path}", "--aggregate"])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "clip_ablation.csv").read_text().splitlines()
    assert lines[0].endswith(",clip_at,unit_clip_fraction") and lines[1].endswith(",,")
    assert (tmp_path / "loss_curves.png").is_file()
