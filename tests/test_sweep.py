"""Threshold sweeps: the grid, the reference norm, and one program equal to separate runs."""

import math
import re

import jax
import numpy as np
import pytest

from charrnn import clipping, data, models, sweep
from charrnn import step as step_lib


@pytest.mark.parametrize("label,expected", [
    ("none", ("none", math.inf)), ("0.5x", ("relative", 0.5)), ("10X", ("relative", 10.0)),
    ("2.5", ("absolute", 2.5))])
def test_threshold_labels(label, expected):
    assert sweep.parse_threshold(label) == expected


@pytest.mark.parametrize("label", ["0", "-1x", "x", "abc", "inf x"])
def test_bad_threshold_labels_are_user_errors(label):
    with pytest.raises(sweep.SweepError, match="bad threshold"):
        sweep.parse_threshold(label)


def test_the_grid_is_a_fixed_order_product(ablation_config):
    s = ablation_config.sweep
    assert {"global_norm", "autoclip", "zclip"} <= set(s.rules)  # the smoke grid
    runs = sweep.make_grid(s)
    per_cell_opt = sum(1 if r == "none" else len(s.strengths[r]) for r in s.rules)
    assert len(runs) == len(s.cells) * len(s.optimizers) * len(s.seeds) * per_cell_opt
    assert runs[0] == sweep.Run(s.cells[0], s.optimizers[0], s.seeds[0], "none", "none",
                                s.learning_rate[s.optimizers[0]])
    assert [r.rule for r in runs[:per_cell_opt]] == [r for r in s.rules for _ in (
        ["none"] if r == "none" else s.strengths[r])]  # strengths vary fastest, then rules
    assert len({r.name for r in runs}) == len(runs)
    s.cells = ("rnn", "transformer")
    with pytest.raises(sweep.SweepError, match="unknown cell"):
        sweep.make_grid(s)
    s.cells, s.optimizers = ("rnn",), ("adam", "adamw")  # adamw has no learning rate there
    with pytest.raises(sweep.SweepError, match="no entry for optimizer 'adamw'"):
        sweep.make_grid(s)


def test_learning_rates_are_an_axis_of_the_grid(ablation_config):
    s = ablation_config.sweep
    s.cells, s.optimizers, s.rules, s.seeds = ("rnn",), ("sgd", "adam"), ("none",), (0,)
    s.learning_rates = {"sgd": (0.1, 1.0, 3.0), "adam": (1e-3,)}  # wins over learning_rate
    runs = sweep.make_grid(s)
    assert [(r.optimizer, r.learning_rate) for r in runs] == [
        ("sgd", 0.1), ("sgd", 1.0), ("sgd", 3.0), ("adam", 1e-3)]
    assert len({r.group for r in runs}) == 2  # the rates of an optimizer share a program
    assert sweep.run_config(ablation_config, runs[2]).optim.learning_rate == 3.0
    for bad in ((), (0.0,), (-1.0,), ("fast",), (float("inf"),)):
        s.learning_rates.sgd = bad
        with pytest.raises(sweep.SweepError, match="sweep.learning_rates.sgd must be positive"):
            sweep.make_grid(s)


@pytest.mark.parametrize("rules,strengths,message", [
    (("clip_by_magic",), {}, "unknown clipping rule 'clip_by_magic' in sweep.rules; choose "
                             "from none, global_norm, value, agc, block_rms, autoclip, zclip"),
    (("autoclip",), {"autoclip": ("2x",)}, "multiples of the reference norm are for the norm "
                                           "thresholds of global_norm"),
    (("global_norm",), {"global_norm": ("none",)}, "put the rule none in sweep.rules"),
    (("zclip",), {"zclip": ("-1",)}, "bad threshold '-1'"),
    (("value",), {"value": ()}, "sweep.strengths has no labels for rule 'value'"),
])
def test_bad_rules_and_strengths_are_user_errors(ablation_config, rules, strengths, message):
    s = ablation_config.sweep
    s.rules = rules
    for rule, labels in strengths.items():
        s.strengths[rule] = labels
    with pytest.raises(sweep.SweepError, match=re.escape(message)):
        sweep.make_grid(s)


def test_a_run_config_sets_its_rule_and_strength(ablation_config):
    c = sweep.run_config(ablation_config, sweep.Run("lstm", "adam", 3, "90", "autoclip"), 90.0)
    assert (c.optim.clip_mode, c.optim.autoclip_percentile, c.seed) == ("autoclip", 90.0, 3)
    assert c.optim.name == "adam" and c.model.cell == "lstm"
    c = sweep.run_config(ablation_config, sweep.Run("rnn", "sgd", 0, "none", "none"))
    assert c.optim.clip_mode == "none"


# rnn: a norm (about 0.65) below the usual thresholds; irnn (W_hh = I): about 20, above
# them, so a norm measured after clipping would show.
@pytest.mark.parametrize("cell", ["rnn", "irnn"])
def test_reference_norm_is_the_mean_norm_at_the_initial_parameters(ablation_config, cell):
    ablation_config.sweep.warmup_steps = 2
    corpus = sweep.Corpus.from_config(ablation_config)
    run = sweep.Run(cell, "sgd", 0, "1x")
    config = sweep.run_config(ablation_config, run)
    model = models.CharRNN.from_config(config.model, corpus.vocab_size)
    params = model.init(jax.random.split(jax.random.key(0))[0])  # what init_state uses
    batcher = data.Batcher(corpus.train_ids, config.train.batch_size, config.train.seq_len, 0)
    carry, norms = model.initial_carry(config.train.batch_size), []
    for _ in range(2):  # the same windows, the state carried, the parameters never moved
        x, y, _ = batcher.next()
        (_, carry), g = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(params, model, carry, x, y)
        norms.append(float(np.sqrt(sum(np.sum(np.square(a)) for a in jax.tree.leaves(g)))))
    assert sweep.reference_norm(ablation_config, run, corpus) == pytest.approx(np.mean(norms),
                                                                               rel=1e-5)
    if cell == "irnn":
        assert np.mean(norms) > 10 * max(1.0, ablation_config.optim.clip_norm)


# Per rule: a strength label that clips within 5 steps of the tiny rnn, and which of the
# two learning rates its run takes, so that the runs trained alone with each optimizer
# (every other rule) have both (a rule registered later gets its default strength).
PACKED_RUNS = {"none": ("none", 0), "global_norm": ("0.3x", 0), "value": ("0.001", 1),
               "agc": ("0.01", 1), "block_rms": ("0.001", 0), "autoclip": ("10", 0),
               "zclip": ("0.5", 1)}


@pytest.mark.parametrize("optimizer,runs_per_chunk", [("sgd", 0), ("adam", 1)])
def test_a_packed_program_equals_separate_runs(ablation_config, optimizer, runs_per_chunk):
    """One run of every registered rule, at two learning rates and two seeds, in one
    program (the rule a runtime index, each run holding every rule's state): each run
    equals the same run trained alone with the plain train step. With SGD all runs are
    vmapped (the rule's switch computes every branch and selects), with Adam they are
    stepped one by one (a real branch). To keep to one compilation per run, the rules
    alternate between the two cases in which their run is trained alone too (every
    rule once, both optimizers, both rates); the other runs show that they clipped."""
    ablation_config.optim.zclip_warmup = 2  # z-scores from step 3 of 5
    corpus = sweep.Corpus.from_config(ablation_config)
    rates = {"sgd": (1.0, 0.25), "adam": (5e-3, 2e-2)}[optimizer]
    runs = []
    for i, (name, rule) in enumerate(clipping.RULES.items()):
        label, rate = (PACKED_RUNS[name] if name in PACKED_RUNS
                       else (f"{rule.strength.default:g}", 0))
        runs.append(sweep.Run("rnn", optimizer, i % 2, label, name, rates[rate]))
    taus, refs = sweep.strengths(ablation_config, runs, corpus)
    configs = [sweep.run_config(ablation_config, r, t) for r, t in zip(runs, taus)]
    assert len({r.group for r in runs}) == 1
    assert sweep.group_rules(configs) == tuple(clipping.RULES)
    steps = 5
    packed = sweep.run_group(configs, taus, corpus, runs_per_chunk=runs_per_chunk,
                             num_steps=steps)
    for i, (run, config, got) in enumerate(zip(runs, configs, packed)):
        # every rule but none acted, so a run stepped by another rule's branch would show
        assert got["clipped"].any() == (run.rule != "none"), run.name
        if i % 2 != ("sgd", "adam").index(optimizer):
            continue
        alone = sweep.run_single(config, corpus, num_steps=steps)
        for key in ("loss", "grad_norm", "grad_norm_clipped", "clip_threshold", "val_loss"):
            np.testing.assert_allclose(got[key], alone[key], rtol=2e-5, err_msg=f"{run.name} {key}")
        np.testing.assert_array_equal(got["clipped"], alone["clipped"], err_msg=run.name)
    assert list(packed[0]["val_steps"]) == [0, 5]  # eval_every 6 > 5 steps: start and end
    got = dict(zip((r.rule for r in runs), packed))
    assert np.isinf(got["none"]["clip_threshold"]).all()
    tau = taus[list(clipping.RULES).index("global_norm")]
    assert tau == pytest.approx(0.3 * refs[("rnn", optimizer, 1)])
    np.testing.assert_allclose(got["global_norm"]["grad_norm_clipped"], tau, rtol=1e-5)
    np.testing.assert_allclose(got["global_norm"]["clip_threshold"], tau, rtol=1e-6)
    # zclip: no threshold in the warm-up, then one from its EMA statistics
    assert np.isinf(got["zclip"]["clip_threshold"][:2]).all()
    assert np.isfinite(got["zclip"]["clip_threshold"][2:]).all()
    # autoclip: the first step never clips; its threshold follows the norms seen
    assert not got["autoclip"]["clipped"][0] and len(set(got["autoclip"]["clip_threshold"])) > 1


def test_the_report_grid_compiles_as_one_program_per_cell_and_optimizer():
    """The report's ablation grid (every rule × strengths × 3 seeds × 3 cells × 2
    optimizers) falls into at most 6 programs; one per rule before the packing."""
    from experiments.configs import clip_ablation
    runs = sweep.make_grid(clip_ablation.get_config().sweep)
    assert len(runs) == 270
    programs = {r.group for r in runs}
    assert programs == {(c, o) for c in ("rnn", "irnn", "lstm") for o in ("sgd", "adam")}
    assert len({r.program(pack_rules=False) for r in runs}) == 42


def test_each_run_of_a_group_draws_its_own_dropout(ablation_config):
    """With dropout on, two runs (seeds 0 and 1) in one program each equal their run alone:
    every run's dropout key comes from its own seed, not one key shared by the group."""
    ablation_config.model.dropout = 0.3
    corpus = sweep.Corpus.from_config(ablation_config)
    runs = [sweep.Run("rnn", "sgd", seed, "100") for seed in (0, 1)]
    configs = [sweep.run_config(ablation_config, r, 100.0) for r in runs]
    group = sweep.run_group(configs, [100.0, 100.0], corpus, runs_per_chunk=1, num_steps=3)
    for config, got in zip(configs, group):
        alone = sweep.run_single(config, corpus, num_steps=3)
        for key in ("loss", "grad_norm", "val_loss"):
            np.testing.assert_allclose(got[key], alone[key], rtol=2e-5, err_msg=key)


def _history(val_loss, nonfinite=0):
    steps = 4
    return {"loss": np.ones(steps), "grad_norm": np.array([1.0, 2.0, 3.0, np.nan]),
            "clip_threshold": np.array([np.inf, 2.0, 4.0, 3.0]),
            "grad_norm_clipped": np.ones(steps), "clipped": np.array([0, 1, 1, 0]),
            "nonfinite": np.array([0, 0, 0, nonfinite]), "val_steps": np.arange(len(val_loss)),
            "val_loss": np.array(val_loss, float)}


@pytest.mark.parametrize("val_loss,nonfinite,diverged", [
    ([4.0, 3.0, 2.5], 0, False), ([4.0, 3.0, 4.5], 0, True), ([4.0, 2.0, np.nan], 0, True),
    ([4.0, 3.0, 2.0], 1, True)])
def test_summary_row(val_loss, nonfinite, diverged):
    row = sweep.summarize(sweep.Run("rnn", "sgd", 0, "1x"), 0.7, _history(val_loss, nonfinite))
    assert row["diverged"] is diverged and row["rule"] == "global_norm"
    assert row["mean_clip_threshold"] == 3.0  # over the finite thresholds
    assert row["clip_fraction"] == 0.5 and row["max_grad_norm"] == 3.0
    assert row["final_val_bpc"] == pytest.approx(val_loss[-1] / math.log(2), nan_ok=True)
