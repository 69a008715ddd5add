"""The placement study (experiments/science/placement.py): each placement's reference
against independent computations, the comparison that chooses the report's answer on
hand-made tables, bad input in one line, and its smoke run through report.py (once per
session, conftest.ReportSmoke)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import data, models, optim, scan, sweep
from charrnn import step as step_lib
from experiments.configs import placement as placement_config
from experiments.pages import report_placement
from experiments.science import placement
from conftest import sweep_on_small_corpus
from test_experiments import _run


@pytest.fixture
def study_config(text_file):
    """The study's smoke grid of one cell (lstm) on the small corpus, SGD and Adam."""
    config = sweep_on_small_corpus(placement_config.get_config("smoke"), text_file)
    config.sweep.optimizers = ("sgd", "adam")
    config.sweep.learning_rates_by_cell.lstm.adam = (0.01,)
    config.sweep.learning_rates_by_cell.lstm.sgd = (2.0,)
    return placement.cell_config(config, "lstm")


def _warmup(config, corpus):
    """(model, initial params, the warm-up windows (carry, x, y) with the state carried):
    what placement.references reads, rebuilt here from the training pieces."""
    c = sweep.run_config(config, sweep.Run("lstm", "sgd", 0, "none", "none"))
    model = models.CharRNN.from_config(c.model, corpus.vocab_size)
    state = step_lib.init_state(model, optim.Optimizer.frozen(), c.train.batch_size, 0)
    batcher = data.Batcher(corpus.train_ids, c.train.batch_size, c.train.seq_len, 0)
    windows, carry = [], state.carry
    for _ in range(config.sweep.warmup_steps):
        batch = batcher.next_batch()
        x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
        windows.append((carry, x, y))
        carry = step_lib.loss_fn(state.params, model, carry, x, y)[1]
    return model, state.params, windows


def test_each_placements_reference_is_the_median_of_its_units(study_config):
    """Against per-window gradients from jax.grad and per-row gradients one row at a time."""
    corpus = sweep.Corpus.from_config(study_config)
    refs = placement.references(study_config, "lstm", corpus)
    model, params, windows = _warmup(study_config, corpus)
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
    grads, rows = [], []
    for carry, x, y in windows:
        grads.append(flat(jax.grad(lambda p: step_lib.loss_fn(p, model, carry, x, y)[0])(params)))
        for r in range(x.shape[0]):
            one = jax.tree.map(lambda a: a[r:r + 1], carry)
            rows.append(flat(jax.grad(lambda p: step_lib.loss_fn(p, model, one, x[r:r + 1],
                                                                 y[r:r + 1])[0])(params)))
    assert refs["gradient"]["global_norm"] == pytest.approx(
        np.median([np.linalg.norm(g) for g in grads]), rel=1e-5)
    assert refs["gradient"]["value"] == pytest.approx(
        np.median([np.abs(g).max() for g in grads]), rel=1e-5)
    assert refs["example"]["global_norm"] == pytest.approx(
        np.median([np.linalg.norm(g) for g in rows]), rel=1e-4)
    assert refs["example"]["value"] == pytest.approx(
        np.median([np.abs(g).max() for g in rows]), rel=1e-4)
    # SGD's first update is −lr·g; Adam's first (bias-corrected) is −lr·g/(|g| + ε)
    sgd = refs["update"]["sgd@2"]
    assert sgd["global_norm"] == pytest.approx(2 * refs["gradient"]["global_norm"], rel=1e-5)
    adam = [0.01 * np.abs(g) / (np.abs(g) + 1e-8) for g in grads]
    assert refs["update"]["adam@0.01"]["global_norm"] == pytest.approx(
        np.median([np.linalg.norm(u) for u in adam]), rel=1e-4)


def test_the_bptt_reference_clips_half_the_cotangents(study_config):
    """At its reference a BPTT rule clips half the (row, layer, step) cotangents of the
    warm-up windows; a little above, fewer; a little below, more."""
    corpus = sweep.Corpus.from_config(study_config)
    refs = placement.references(study_config, "lstm", corpus)
    model, params, windows = _warmup(study_config, corpus)
    for rule in ("global_norm", "value"):
        def share(tau):
            clip = scan.CotangentClip(rule, jnp.float32(tau))
            return np.mean([float(step_lib.bptt_gradients(
                (params, model, cw, xw, yw, None, None, None), clip, None, 0, 0)[2]
                ["bptt_clip_fraction"]) for cw, xw, yw in windows])
        tau = refs["bptt"][rule]
        assert share(0.9 * tau) > 0.5 >= share(1.1 * tau), rule


def _entry(at, rule, bpc, std=0.01, diverged=0, lr=1.0, opt="sgd"):
    return {"cell": "rnn", "optimizer": opt, "learning_rate": lr, "clip_at": at, "rule": rule,
            "setting": "none" if rule == "none" else f"{rule} @ {at}", "seeds": 3,
            "diverged": diverged, "final_val_bpc": bpc, "final_val_bpc_std": std,
            "unit_clip_fraction": 0.5}


def test_the_answer_counts_only_differences_beyond_the_noise_or_in_survival():
    table = [_entry("gradient", "none", 3.0),
             _entry("gradient", "global_norm", 2.50),
             _entry("update", "global_norm", 2.51),  # 0.01 apart: within 2 stds
             _entry("bptt", "global_norm", 2.40),  # 0.10 lower: beyond
             _entry("example", "global_norm", math.nan, diverged=3),  # every seed diverged
             _entry("gradient", "value", math.nan, diverged=3),
             _entry("bptt", "value", math.nan, diverged=3)]  # neither side trained
    kinds = {c["entry"]["setting"]: c["kind"] for c in report_placement.compare(table)}
    assert kinds == {"global_norm @ update": "none", "global_norm @ bptt": "loss",
                     "global_norm @ example": "survival", "value @ bptt": "n/a"}
    text = report_placement.answer(report_placement.compare(table))
    assert text.startswith("the placement changed the outcome in 2 of 3 comparisons")
    assert "; 1 more had every seed diverged on both sides" in text
    assert "Survival: global_norm @ example" in text and "3/3 seeds diverged against 0/3" in text
    assert "Lower loss than at `gradient`: global_norm @ bptt" in text and "-0.100" in text
    calm = [e for e in table if e["clip_at"] in ("gradient", "update")]
    text = report_placement.answer(report_placement.compare(calm))
    assert text.endswith("did not matter beyond the seeds' noise here")


def test_sgd_update_clipping_is_gradient_clipping_in_the_sentence():
    table = [_entry("gradient", "global_norm", 2.5), _entry("update", "global_norm", 2.5001),
             _entry("gradient", "global_norm", 2.0, opt="adam"),
             _entry("update", "global_norm", 2.3, opt="adam")]
    text = report_placement.sgd_identity(report_placement.compare(table))
    assert "0 of the 1 SGD pairs agree to the last digit" in text
    assert "the largest difference, 0.0001 bpc (tanh RNN + sgd at lr 1, global_norm), lies " \
        "within 0.01 stds over seeds" in text


def test_a_relative_strength_is_one_error_line(tmp_path):
    r = _run(["-m", "experiments.science.placement", f"--outdir={tmp_path}", "--smoke",
              "--config.sweep.strengths.global_norm=('1x',)"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: strength '1x' of global_norm: this study's strengths are multiples of each "
        "placement's reference, written as plain numbers ('1', '0.5')"]
    assert list(tmp_path.iterdir()) == []  # nothing trained


def test_a_cell_without_learning_rates_is_one_error_line(tmp_path):
    r = _run(["-m", "experiments.science.placement", f"--outdir={tmp_path}", "--smoke",
              "--config.sweep.cells=('lstm','rnn')"])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: sweep.learning_rates_by_cell has no entry for cell 'rnn'"]


def test_placement_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=placement`` (placement.py --smoke; once per session)."""
    out = report_smoke.step("placement")
    for name in ["placement.csv", "placement.json", "placement.png", "references.json"]:
        assert (out / name).is_file(), name
    s = placement_config.get_config("smoke").sweep
    per_rate = 1 + sum(len(s.strengths[r]) * sum(at != "bptt" or r in scan.BPTT_RULES
                                                 for at in s.placements)
                       for r in s.rules if r != "none")
    runs = len(s.seeds) * sum(len(s.learning_rates_by_cell[c][o]) for c in s.cells
                              for o in s.optimizers) * per_rate
    lines = (out / "placement.csv").read_text().splitlines()
    assert lines[0].split(",") == list(placement.COLUMNS) and len(lines) == 1 + runs
    # every placement clipped something of its own units at the reference's strength
    rows = [dict(zip(placement.COLUMNS, line.split(","))) for line in lines[1:]]
    assert all(float(r["unit_clip_fraction"]) > 0 for r in rows if r["rule"] != "none")
