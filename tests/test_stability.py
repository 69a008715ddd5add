"""The stability map's pure pieces on a hand-made grid (largest stable learning rate, best
reachable loss, the sentences they choose), its grid checks, its bad input on the command
line, and its smoke run through report.py (once per session, conftest.ReportSmoke)."""

import math

import pytest

from charrnn import sweep
from experiments.configs import stability as stability_config
from experiments.pages import report_stability
from experiments.science import stability
from test_experiments import _run


def _row(setting, lr, seed, bpc, diverged=False):
    rule, _, label = setting.partition(" ")
    return {"cell": "rnn", "optimizer": "sgd", "rule": rule, "threshold": label or "none",
            "learning_rate": lr, "seed": seed, "final_val_bpc": bpc, "diverged": diverged,
            "clip_fraction": 0.0 if rule == "none" else 0.5}


# (setting, lr) -> final val bpc of seeds 0 and 1; None: that seed diverged (at 300 bpc)
GRID = {
    ("none", 0.1): (3.0, 3.2), ("none", 1.0): (2.5, 2.7), ("none", 10.0): (None, 2.6),
    ("none", 100.0): (None, None),
    ("global_norm 1x", 0.1): (3.1, 3.1), ("global_norm 1x", 1.0): (2.6, 2.6),
    ("global_norm 1x", 10.0): (2.4, 2.45), ("global_norm 1x", 100.0): (None, 2.9),
    ("global_norm 0.25x", 0.1): (3.3, 3.3), ("global_norm 0.25x", 1.0): (3.0, 3.0),
    ("global_norm 0.25x", 10.0): (2.7, 2.7), ("global_norm 0.25x", 100.0): (2.6, 2.8),
}


def _rows(grid=GRID):
    return [_row(s, lr, seed, 300.0 if v is None else v, diverged=v is None)
            for (s, lr), values in grid.items() for seed, v in enumerate(values)]


def test_largest_stable_rate_and_best_loss_of_a_hand_made_grid():
    entries = {e["setting"]: e for e in stability.table(_rows())}
    assert list(entries) == ["none", "global_norm 0.25x", "global_norm 1x"]
    none, tight, loose = entries["none"], entries["global_norm 0.25x"], entries["global_norm 1x"]
    # a rate counts as stable only when no seed diverged there
    assert (none["largest_stable_lr"], none["smallest_diverged_lr"]) == (1.0, 10.0)
    assert (loose["largest_stable_lr"], loose["smallest_diverged_lr"]) == (10.0, 100.0)
    assert (tight["largest_stable_lr"], tight["smallest_diverged_lr"]) == (100.0, None)
    assert tight["stable_at_top"] and not loose["stable_at_top"]
    assert (none["ratio"], loose["ratio"], tight["ratio"]) == (1.0, 10.0, 100.0)
    # a cell's mean leaves out its diverged seeds (300 bpc), and says how many there were
    at10 = next(c for c in none["cells"] if c["learning_rate"] == 10.0)
    assert (at10["mean"], at10["diverged"], at10["seeds"]) == (2.6, 1, 2)
    assert math.isnan(next(c for c in none["cells"] if c["learning_rate"] == 100.0)["mean"])
    # the best reachable loss: only rates where every seed trained (not none at 10: 2.6)
    assert none["best"]["learning_rate"] == 1.0
    assert none["best"]["mean"] == pytest.approx(2.6)
    assert none["best"]["std"] == pytest.approx(math.sqrt(0.02))  # ddof 1 of 2.5, 2.7
    assert loose["best"]["learning_rate"] == 10.0
    assert loose["best"]["mean"] == pytest.approx(2.425)


def test_the_finding_sentences_follow_the_numbers():
    entries = stability.table(_rows())
    text = report_stability.survival(entries)
    assert text.startswith("without clipping the largest stable learning rate is 1 "
                           "(a seed diverged at 10)")
    assert "global_norm 1x 10 (10× larger)" in text
    assert "global_norm 0.25x 100 (≥ 100× larger)" in text  # stable up to the grid's top
    gain = report_stability.best_gain(entries)
    assert gain["clipped"]["setting"] == "global_norm 1x"
    assert gain["gain"] == pytest.approx(0.175)  # 2.6 - 2.425 > std 0.141
    assert "beyond the seeds' spread" in report_stability._gain_text(gain)
    # the clipped best within the spread of no clipping's: no better loss is claimed
    closer = {**GRID, ("global_norm 1x", 10.0): (2.5, 2.6),
              ("global_norm 0.25x", 100.0): (2.7, 2.7)}
    gain = report_stability.best_gain(stability.table(_rows(closer)))
    assert gain["gain"] == pytest.approx(0.05)
    assert "within the seeds' spread" in report_stability._gain_text(gain)
    # no clipping never diverged: the grid shows no rescued rate
    calm = {k: v for k, v in GRID.items() if k[1] < 10.0}
    assert "never diverged" in report_stability.survival(stability.table(_rows(calm)))


def test_the_glance_names_the_largest_survival_ratio_and_counts_the_better_losses():
    """The hand-made grid above: global_norm 0.25x trains every seed up to 100 (the grid's
    top), no clipping up to 1; global_norm 1x's best loss lies beyond the seeds' spread."""
    text = report_stability.glance({"table": stability.table(_rows())})
    assert ("was ≥ 100× for the tanh RNN with SGD (global_norm 0.25x); the best loss over "
            "all learning rates was lower with clipping beyond the seeds' spread in 1 of 1 "
            "(cell, optimizer) pairs") in text
    closer = {**GRID, ("global_norm 1x", 10.0): (2.5, 2.6),
              ("global_norm 0.25x", 100.0): (2.7, 2.7)}
    assert text.replace("in 1 of 1", "in 0 of 1") == report_stability.glance(
        {"table": stability.table(_rows(closer))})
    calm = {k: v for k, v in GRID.items() if k[1] < 10.0}  # every setting trains up to 1
    assert "was the same for the tanh RNN with SGD;" in report_stability.glance(
        {"table": stability.table(_rows(calm))})
    # every clipped setting diverged below no clipping's largest rate
    lower = {k: (v if k[0] == "none" or k[1] < 1.0 else (None, None)) for k, v in GRID.items()}
    assert "was 0.1× for the tanh RNN with SGD (global_norm 0.25x, lower than without " \
        "clipping);" in report_stability.glance({"table": stability.table(_rows(lower))})
    assert report_stability.glance(None) == ""


def test_the_grid_needs_no_clipping_and_two_learning_rates():
    config = stability_config.get_config("smoke")
    stability.check_grid(config.sweep)
    config.sweep.rules = ("global_norm",)
    with pytest.raises(sweep.SweepError, match="put 'none' in sweep.rules"):
        stability.check_grid(config.sweep)
    config = stability_config.get_config("smoke")
    config.sweep.learning_rates.sgd = (0.1, 0.1)
    with pytest.raises(sweep.SweepError, match="at least 2 learning rates per optimizer: "
                       r"sweep.learning_rates.sgd is \(0.1, 0.1\)"):
        stability.check_grid(config.sweep)


def test_a_bad_grid_gets_one_line(tmp_path):
    """On the command line (the other grid check's message: the test above)."""
    r = _run(["-m", "experiments.science.stability", f"--outdir={tmp_path}", "--smoke",
              "--config.sweep.learning_rates.sgd=(1.0,)"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: the stability map needs at least 2 learning rates per optimizer: "
        "sweep.learning_rates.sgd is (1.0,)"]
    assert list(tmp_path.iterdir()) == []  # nothing trained


def test_the_adaptive_setting_is_checked_against_the_ablation_on_the_page():
    def rows(zclip_bpc):
        return [{"cell": c, "optimizer": o, "rule": rule, "threshold": label, "diverged": 0,
                 "final_val_bpc": bpc}
                for c in ("rnn", "lstm") for o in ("sgd", "adam")
                for rule, label, bpc in (("autoclip", "10", 2.56), ("zclip", "1.5", zclip_bpc),
                                         ("global_norm", "1x", 2.0))]  # not adaptive
    cells, opts = ("rnn", "lstm"), ("sgd", "adam")
    text = report_stability.adaptive_choice(rows(2.55), ("zclip", "1.5"), cells, opts)
    assert text.startswith("zclip 1.5 is also the best adaptive setting") and "2.550" in text
    text = report_stability.adaptive_choice(rows(2.57), ("zclip", "1.5"), cells, opts)
    assert text.startswith("the ablation on this page ranks autoclip 10 first instead "
                           "(2.560 bpc against 2.570")


def test_stability_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=stability`` (stability.py --smoke; once per session)."""
    out = report_smoke.step("stability")
    for name in ["stability.csv", "stability.json", "stability_map.png"]:
        assert (out / name).is_file(), name
    s = stability_config.get_config("smoke").sweep
    runs = len(s.cells) * len(s.seeds) * sum(len(s.learning_rates[o]) for o in s.optimizers) * (
        sum(1 if r == "none" else len(s.strengths[r]) for r in s.rules))
    lines = (out / "stability.csv").read_text().splitlines()
    assert lines[0].split(",") == list(stability.COLUMNS) and len(lines) == 1 + runs
