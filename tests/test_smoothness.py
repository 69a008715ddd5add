"""Zhang et al.'s smoothness study: the estimator, the fit, the script and its report section."""

import csv
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from experiments.pages import report_smoothness
from experiments.science import smoothness


# ---------------------------------------------------------------------------
# The estimator L̂ = ‖∇f(x + cΔ) − ∇f(x)‖ / ‖cΔ‖


def _quadratic_grad(tree):
    """∇ of f = ½xᵀAx with A = blockdiag([[2, 1], [1, 3]], [5]) over the leaves a [2], b [1]."""
    a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    return {"a": a @ tree["a"], "b": 5.0 * tree["b"]}


@pytest.mark.parametrize("fraction", [0.5, 0.25, 1.0])
def test_estimator_is_the_curvature_along_the_step_on_a_quadratic(fraction):
    # x = (1, 1 | 1): ∇f = (3, 4 | 5), ‖∇f‖ = √50. Δ = (1, 0 | 1): AΔ = (2, 1 | 5), so
    # L̂ = ‖AΔ‖/‖Δ‖ = √30/√2 = √15 whatever the fraction c (the gradient is linear).
    x = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0])}
    delta = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0])}
    g, lhat = jax.jit(lambda p, d: smoothness.local_smoothness(_quadratic_grad, p, d, fraction))(
        x, delta)
    assert float(g) == pytest.approx(math.sqrt(50.0), rel=1e-6)
    assert float(lhat) == pytest.approx(math.sqrt(15.0), rel=1e-6)


def test_estimator_takes_the_second_gradient_at_half_the_step():
    # f = x⁴/4, ∇f = x³, x = 1, Δ = 2: at the half step ∇f(2) = 8, so L̂ = (8 - 1)/1 = 7
    # (at the full step it would be (27 - 1)/2 = 13, at a quarter (3.375 - 1)/0.5 = 4.75).
    g, lhat = smoothness.local_smoothness(lambda x: x ** 3, jnp.array(1.0), jnp.array(2.0))
    assert (float(g), float(lhat)) == pytest.approx((1.0, 7.0), rel=1e-6)


def test_first_measurement_matches_the_hessian_along_an_sgd_step():
    """The pipeline's Δ is the real update and f the step's own batch: with plain SGD at a
    small rate and no clipping Δ = -η∇f, so L̂ → ‖H∇f‖/‖∇f‖, the Hessian-vector product
    computed independently here by forward-over-reverse autodiff on the first window."""
    from charrnn import data, models, step as step_lib

    lr = 1e-2
    config = smoothness.make_config(True, 1, 16, 4, 16, lr, 1.0, 0, optimizer="sgd")
    config.optim.clip_mode = "none"
    config.train.num_steps = 1
    rows, clip_fraction = smoothness.train_and_measure(config, measure_every=1)
    assert len(rows) == 1 and rows[0]["step"] == 0 and clip_fraction == 0.0

    text = data.load_text("shakespeare")
    vocab = data.Vocab.from_text(text)
    train_ids, _, _ = data.split(vocab.encode(text), config.data.val_fraction,
                                 config.data.test_fraction)
    x, y, _ = data.Batcher(train_ids, 4, 16, 0).next()
    model = models.CharRNN.from_config(config.model, vocab.size)

    @jax.jit
    def reference(key):
        params = model.init(jax.random.split(key)[0])  # init_state's draw
        loss = lambda p: step_lib.loss_fn(p, model, model.initial_carry(4), x, y)[0]
        g = jax.grad(loss)(params)
        hg = jax.jvp(jax.grad(loss), (params,), (g,))[1]
        norm = lambda t: jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(t)))
        return loss(params), norm(g), norm(hg)

    f0, g, hg = (float(v) for v in reference(jax.random.key(0)))
    assert rows[0]["loss"] == pytest.approx(f0, rel=1e-5)
    assert rows[0]["grad_norm"] == pytest.approx(g, rel=1e-5)
    assert rows[0]["update_norm"] == pytest.approx(lr * g, rel=1e-4)
    # measured 7e-5 apart (the O(η) curvature change over half a step, and float32)
    assert rows[0]["smoothness"] == pytest.approx(hg / g, rel=2e-3)


# ---------------------------------------------------------------------------
# The log-log fit


def test_loglog_fit_hand_computed():
    # logs x = (0, 1, 2), y = (0, 1, 3): Σdxdy = 3, Σdx² = 2, Σdy² = 42/9, so the slope is
    # 1.5, the intercept 4/3 - 1.5 = -1/6 and r = 3/√(2·42/9) = 9/√84.
    fit = smoothness.loglog_fit([1.0, 10.0, 100.0, -1.0, float("nan")],
                                [1.0, 10.0, 1000.0, 5.0, 2.0])
    assert fit["n"] == 3
    assert fit["slope"] == pytest.approx(1.5)
    assert fit["intercept"] == pytest.approx(-1.0 / 6.0)
    assert fit["pearson_r"] == pytest.approx(9.0 / math.sqrt(84.0))


@pytest.mark.parametrize("slope", [0.7, -0.4])
def test_loglog_fit_recovers_a_known_power_law(slope):
    rng = np.random.default_rng(0)
    x = np.exp(rng.uniform(-3.0, 3.0, 2000))
    exact = smoothness.loglog_fit(x, 3.0 * x ** slope)
    assert exact["slope"] == pytest.approx(slope, abs=1e-9)
    assert exact["intercept"] == pytest.approx(math.log10(3.0), abs=1e-9)
    assert exact["pearson_r"] == pytest.approx(math.copysign(1.0, slope), abs=1e-9)
    y = 3.0 * x ** slope * np.exp(rng.normal(0.0, 1.0, x.size))
    noisy = smoothness.loglog_fit(x, y)
    assert noisy["slope"] == pytest.approx(slope, abs=0.05)
    assert abs(noisy["pearson_r"]) < 0.9  # the noise shows in r, not in the slope
    assert noisy["pearson_r"] == pytest.approx(np.corrcoef(np.log(x), np.log(y))[0, 1], abs=1e-9)
    assert noisy["slope"] == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0], abs=1e-9)


def test_loglog_fit_with_too_few_points_is_nan():
    fit = smoothness.loglog_fit([1.0, 2.0], [1.0, 2.0])
    assert fit["n"] == 2 and math.isnan(fit["slope"]) and math.isnan(fit["pearson_r"])


# ---------------------------------------------------------------------------
# The script end to end, and a bad flag


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.science.smoothness", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=smoothness`` (once per session: conftest.ReportSmoke)."""
    check_smoke_outputs(report_smoke.step("smoothness"))


def check_smoke_outputs(outdir):
    """What ``smoothness.py --smoke --outdir=DIR`` wrote."""
    result = json.loads((outdir / "smoothness.json").read_text())
    assert (outdir / "smoothness.png").stat().st_size > 1000
    with open(outdir / "smoothness.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == smoothness.COLUMNS
        rows = list(reader)
    st = result["settings"]
    assert st["optimizers"] == ["adam", "sgd"] == list(result["studies"])
    assert st["cell"] == "lstm" and st["dropout"] == 0.0 and len(st["seeds"]) == 2
    steps = list(range(0, st["num_steps"], st["measure_every"]))
    assert [(r["optimizer"], int(r["seed"]), int(r["step"])) for r in rows] == [
        (o, seed, t) for o in st["optimizers"] for seed in st["seeds"] for t in steps]
    assert result["measurements"] == len(rows)
    assert all(float(r["smoothness"]) > 0 and float(r["grad_norm"]) > 0 for r in rows)
    for name, study in result["studies"].items():
        mine = [r for r in rows if r["optimizer"] == name]
        assert study["fit"]["n"] == len(mine) == 2 * len(steps)
        assert [f["n"] for f in study["seed_fits"]] == [len(steps)] * 2
        refit = smoothness.loglog_fit([float(r["grad_norm"]) for r in mine],
                                      [float(r["smoothness"]) for r in mine])
        assert refit["slope"] == pytest.approx(study["fit"]["slope"], rel=1e-6)
        assert 0.0 <= study["clip_fraction"] <= 1.0
        assert study["learning_rate"] == st["learning_rates"][name]
    # the seeds are different runs: different initial weights, so different losses at step 0
    assert rows[0]["loss"] != rows[len(steps)]["loss"]
    # the same seed starts from the same weights and batch whatever the update rule
    assert rows[0]["loss"] == rows[2 * len(steps)]["loss"]
    assert "## " in report_smoothness.section(result, "figs")


@pytest.mark.parametrize("flag,message", [
    ("--measure_every=0", "--measure_every must be a positive integer, got 0"),
    ("--optimizers=adam,rmsprop", "--optimizers must list adam and/or sgd, each once, "
                                  "got adam,rmsprop"),
])
def test_bad_flag_is_one_error_line_and_writes_nothing(tmp_path, flag, message):
    r = _run(flag, f"--outdir={tmp_path}")
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# The report section: its findings follow the numbers


def _fit(slope, r, n):
    return {"slope": slope, "intercept": 0.0, "pearson_r": r, "n": n}


def _study(slope, r, late_slope, late_r, gmin=0.1, gmax=2.0, seed_fits=((0.5, 0.6),), n=100,
           lr=0.002):
    return {"learning_rate": lr, "measurements": n, "fit": _fit(slope, r, n),
            "late_fit": _fit(late_slope, late_r, n // 2), "late_from_step": 600,
            "seed_fits": [dict(seed=i, **_fit(a, b, n)) for i, (a, b) in enumerate(seed_fits)],
            "grad_norm": {"min": gmin, "median": 0.5, "max": gmax},
            "smoothness": {"min": 0.2, "median": 0.4, "max": 3.0}, "clip_fraction": 0.4,
            "first_loss": 4.3, "last_loss": 1.7}


def _result(**studies):
    seeds = len(next(iter(studies.values()))["seed_fits"])
    return {
        "settings": {"corpus": "shakespeare", "cell": "lstm", "num_layers": 1, "hidden_size": 128,
                     "embed_dim": 64, "dropout": 0.0, "batch_size": 32, "seq_len": 64,
                     "num_steps": 1200, "measure_every": 12, "optimizers": list(studies),
                     "learning_rates": {n: st["learning_rate"] for n, st in studies.items()},
                     "schedule": "constant", "clip_mode": "global_norm", "clip_norm": 0.25,
                     "seeds": list(range(seeds)), "fraction": 0.5,
                     "batch": "the step's own batch and initial hidden state", "smoke": False},
        "studies": studies, "measurements": 100 * len(studies), "wall_s": 99.0,
        "csv": "smoothness.csv", "figure": "smoothness.png"}


def _findings(markdown):
    return [line for line in markdown.splitlines() if line.startswith("- **")]


def _one(*args, **kw):
    return _findings(report_smoothness.section(_result(adam=_study(*args, **kw)), "f"))[0]


def test_section_finding_flips_with_the_numbers():
    grows = report_smoothness.section(_result(adam=_study(0.83, 0.71, 0.64, 0.55)), "figs")
    assert "![" in grows and "(figs/smoothness.png)" in grows and grows.lstrip().startswith("## ")
    assert "| Pearson r of the logs | 0.71 |" in grows and "| r, second half | 0.55 |" in grows
    g, n = _one(0.83, 0.71, 0.64, 0.55), _one(-0.12, -0.05, 0.02, 0.1)
    w = _one(0.4, 0.35, 0.1, 0.05)
    assert "With Adam the local smoothness grows with the gradient norm" in g
    assert "slope 0.83, r = 0.71" in g
    assert "second half alone as well" in g and "slope 0.64, r = 0.55" in g
    assert "does not grow" in n and "slope -0.12, r = -0.05" in n and "as well" not in n
    assert "only weakly" in w and "the link is gone" in w and "first half of the runs" in w
    assert "accounts for only 12% of the spread" in w  # r² = 0.35²


def test_section_weighs_r_against_noise_and_the_second_half_against_the_whole():
    assert report_smoothness.noise_r(100) == pytest.approx(0.194, abs=1e-3)
    # r = 0.15 over 100 points is what noise gives; over 300 it is not (|r| > 0.112)
    assert "does not grow" in _one(0.3, 0.15, 0.3, 0.15)
    assert report_smoothness.verdict(_fit(0.3, 0.15, 300)) == "weak"
    # a second half as strong as the whole but too short to be told from noise
    similar = _one(0.4, 0.25, 0.4, 0.2)
    assert "about as strong (slope 0.4, r = 0.2 from step 600 on, 50 points)" in similar
    assert "gone" not in similar


def test_section_counts_the_seeds_that_agree():
    three = ((0.8, 0.7), (-0.2, -0.1), (0.3, 0.2))
    assert "positive in 2 of 3 runs and the correlation clear (r ≥ 0.5) in 1." in _one(
        0.4, 0.6, 0.4, 0.6, seed_fits=three)
    md = report_smoothness.section(_result(adam=_study(0.4, 0.6, 0.4, 0.6, seed_fits=three)), "f")
    assert "| slope (r) per seed | 0.8 (0.7), -0.2 (-0.1), 0.3 (0.2) |" in md
    assert "Seed by seed" not in _one(0.4, 0.6, 0.4, 0.6)


def test_section_names_a_narrow_gradient_range_only_when_it_is_narrow():
    narrow, wide = _one(0.1, 0.1, 0.1, 0.1, 0.2, 0.5), _one(0.1, 0.1, 0.1, 0.1, 0.1, 2.0)
    assert "within a factor of 2.5 (0.2–0.5)" in narrow and "factor" not in wide
    assert "does not grow" in _one(float("nan"), float("nan"), 0.1, 0.1)


def test_section_compares_the_update_rules_by_the_numbers():
    # Fisher z: atanh 0.49 - atanh 0.19 = 0.344 > 1.96·√(2/297) = 0.161; 0.35 vs 0.30: 0.056
    assert report_smoothness.correlations_differ(_fit(1, 0.19, 300), _fit(1, 0.49, 300))
    assert not report_smoothness.correlations_differ(_fit(1, 0.30, 300), _fit(1, 0.35, 300))
    strong, weak = _study(0.73, 0.49, 0.78, 0.7, n=300), _study(0.54, 0.19, 0.3, 0.09, n=300)
    sgd_wins = report_smoothness.section(_result(adam=weak, sgd=dict(strong, learning_rate=1.0)),
                                         "f")
    adam_wins = report_smoothness.section(_result(adam=strong, sgd=dict(weak, learning_rate=1.0)),
                                          "f")
    same = report_smoothness.section(_result(
        adam=_study(0.5, 0.30, 0.5, 0.3, n=300), sgd=_study(0.5, 0.35, 0.5, 0.3, n=300, lr=1.0)),
        "f")
    assert "| | Adam | SGD |" in sgd_wins and "| learning rate (constant) | 0.002 | 1 |" in sgd_wins
    assert [f[:12] for f in _findings(sgd_wins)] == ["- **With Ada", "- **With SGD"]
    assert ("The link is stronger with SGD than with Adam (r = 0.19 with Adam and r = 0.49 with "
            "SGD;") in sgd_wins and "curvature along −∇f" in sgd_wins
    assert "The link is stronger with Adam than with SGD" in adam_wins
    assert "curvature along −∇f" not in adam_wins
    assert "do not differ beyond noise (r = 0.3 with Adam and r = 0.35 with SGD)" in same
