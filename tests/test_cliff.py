"""experiments/science/cliff.py (Pascanu et al.'s one-unit cliff) and its report section.

The references are independent of the script: a hand-written BPTT in numpy, central
finite differences, the closed form of σ'(0.5), and the geometry of ‖Δθ‖ = η·min(‖g‖, τ).
"""

import copy
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from experiments.pages import report_cliff
from experiments.science import cliff


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _hand_loss_and_grad(w, b, x0=0.5, target=0.7, steps=50):
    """E and (∂E/∂w, ∂E/∂b) by BPTT written out: x_t = w σ(x_{t-1}) + b,
    ∂x_t/∂x_{t-1} = w σ'(x_{t-1}), ∂x_t/∂w = σ(x_{t-1}), ∂x_t/∂b = 1."""
    xs = [x0]
    for _ in range(steps):
        xs.append(w * _sig(xs[-1]) + b)
    s = _sig(xs[-1])
    delta = 2.0 * (s - target) * s * (1.0 - s)  # ∂E/∂x_T
    gw = gb = 0.0
    for t in range(steps, 0, -1):
        sp = _sig(xs[t - 1])
        gw += delta * sp
        gb += delta
        delta *= w * sp * (1.0 - sp)
    return (s - target) ** 2, np.array([gw, gb])


def _x_T(w, b, x0=0.5, steps=50):
    x = x0
    for _ in range(steps):
        x = w * _sig(x) + b
    return x


def _jax_loss_and_grad(theta):
    import jax
    import jax.numpy as jnp
    with jax.enable_x64(True):
        e, g = jax.value_and_grad(cliff.loss)(jnp.asarray(theta, jnp.float64))
        return float(e), np.asarray(g)


# Smooth points, one on each side close to the wall (w = 6 > w_c), one below w_c.
POINTS = [(2.0, -1.0), (6.0, cliff.wall_b(6.0) - 0.05), (6.0, cliff.wall_b(6.0) + 0.05),
          (3.0, 0.5), (8.0, -3.0)]


@pytest.mark.parametrize("w,b", POINTS)
def test_the_gradient_is_bptt_by_hand_and_a_finite_difference(w, b):
    e, g = _jax_loss_and_grad([w, b])
    e_hand, g_hand = _hand_loss_and_grad(w, b)
    assert e == pytest.approx(e_hand, rel=1e-12, abs=1e-300)
    np.testing.assert_allclose(g, g_hand, rtol=1e-9, atol=1e-300)
    h = 1e-6
    fd = [(_hand_loss_and_grad(w + h, b)[0] - _hand_loss_and_grad(w - h, b)[0]) / (2 * h),
          (_hand_loss_and_grad(w, b + h)[0] - _hand_loss_and_grad(w, b - h)[0]) / (2 * h)]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-9)


def test_the_wall_line_is_where_x_T_changes_attractor():
    s = 1.0 / (1.0 + math.exp(-0.5))
    assert cliff.w_critical() == pytest.approx(1.0 / (s * (1.0 - s)))
    assert cliff.w_critical() == pytest.approx(4.2553, abs=1e-4)
    # Above w_c a hair either side of the line sends x_50 to different attractors, far
    # from x_0 = 0.5 on either side, and E jumps ...
    for w in (5.0, 6.0, 8.0):
        below, above = (_x_T(w, cliff.wall_b(w) + d) for d in (-1e-3, 1e-3))
        assert below < -1.0 and above > 1.0, (w, below, above)
        assert (_hand_loss_and_grad(w, cliff.wall_b(w) - 1e-3)[0]
                - _hand_loss_and_grad(w, cliff.wall_b(w) + 1e-3)[0]) > 0.25
    # ... below w_c the same hair changes nothing much (one attractor).
    below, above = (_x_T(3.0, cliff.wall_b(3.0) + d) for d in (-1e-3, 1e-3))
    assert below < 0.5 < above and above - below < 1e-2


def test_a_clipped_step_is_never_longer_than_lr_tau():
    lr, tau, start = 0.5, 1.0, (5.0, -4.0)  # SGD from here meets the wall within 100 steps
    run = cliff.sgd(start, lr, "global_norm", tau, 120)
    norms, steps = run["grad_norm"][:-1], run["step"]
    assert (norms > tau).sum() >= 2 and norms.max() > 10 * tau  # clipping did act
    assert steps.max() <= lr * tau * (1 + 1e-12)
    # ‖Δθ‖ = η·min(‖g‖, τ), along −g: exact, from independently recomputed gradients.
    np.testing.assert_allclose(steps, lr * np.minimum(norms, tau), rtol=1e-10)
    for k in np.flatnonzero(norms > tau):
        g = _hand_loss_and_grad(*run["theta"][k])[1]
        d = run["theta"][k + 1] - run["theta"][k]
        assert -d @ g / (np.linalg.norm(d) * np.linalg.norm(g)) == pytest.approx(1.0, abs=1e-9)
    # The same start unclipped takes the full step η·‖g‖, here far longer than η·τ.
    free = cliff.sgd(start, lr, "none", tau, 120)
    np.testing.assert_allclose(free["step"], lr * free["grad_norm"][:-1], rtol=1e-10)
    assert free["step"].max() > 10 * lr * tau


def test_the_grid_shows_the_wall():
    w_axis, b_axis = np.linspace(0.0, 10.0, 81), np.linspace(-8.0, 2.0, 81)
    e, gnorm = cliff.surface(w_axis, b_axis)
    e_hand, g_hand = _hand_loss_and_grad(w_axis[7], b_axis[60])
    assert e[60, 7] == pytest.approx(e_hand) and gnorm[60, 7] == pytest.approx(np.hypot(*g_hand))
    wall = cliff.wall_numbers(w_axis, b_axis, e, gnorm)
    # Orders of magnitude between the wall and the plateaus, and the peaks on the line.
    assert wall["orders_of_magnitude"] > 2 and gnorm.max() / gnorm.min() > 1e5
    assert wall["columns_past_w_critical"] > 40 and wall["fraction_max_on_line"] == 1.0
    # On the line ‖∇E‖ grows like (w σ'(x_0))^T: far beyond anything on the grid's plateaus.
    on_line = wall["grad_norm_on_line"]
    assert min(on_line.values()) > 1e3 * wall["grad_norm_median"]
    # Below w_c there is no wall: a column's gradient stays within a decade or so of its median.
    col = gnorm[:, int(np.searchsorted(w_axis, 1.0))]
    assert col.max() / np.median(col) < 30


def test_the_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=cliff`` (once per session: conftest.ReportSmoke)."""
    check_smoke_outputs(report_smoke.step("cliff"))


def check_smoke_outputs(outdir):
    """What ``cliff.py --smoke --outdir=DIR`` wrote."""
    result = json.loads((outdir / "cliff.json").read_text())
    s = result["settings"]
    assert (s["x0"], s["target"], s["T"]) == (0.5, 0.7, 50) and s["smoke"]
    assert result["bound"] == pytest.approx(s["lr"] * s["tau"])
    assert len(result["runs"]) == 2 * len(s["starts"])
    for run in result["runs"]:
        if run["variant"] == "clipped":
            assert run["max_step"] <= result["bound"] * (1 + 1e-12)
    with open(outdir / "cliff_steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(s["starts"]) * (s["steps"] + 1)
    assert (outdir / "cliff.png").stat().st_size > 10_000
    assert "## " in report_cliff.section(result, "fig")


def test_a_bad_flag_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "experiments/science/cliff.py", f"--outdir={out}",
                        "--tau=-1"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: --tau must be a positive finite number, got -1.0"]
    assert not out.exists()


def _synthetic(unclipped_jump: float, clipped_step: float, stranded: int) -> dict:
    """A result shaped like cliff.json: 3 starts, bound η·τ = 0.5."""
    runs = []
    for i in range(3):
        jump = unclipped_jump if i == 0 else 0.3
        runs.append({"start": [5.0 + i, -4.0], "variant": "unclipped", "max_step": jump,
                     "steps_past_wall": 3, "max_past_wall": jump, "max_grad_norm": 2 * jump,
                     "clipped_steps": 0, "final_loss": 0.09 if i < stranded else 1e-6})
        runs.append({"start": [5.0 + i, -4.0], "variant": "clipped", "max_step": clipped_step,
                     "steps_past_wall": 2, "max_past_wall": clipped_step, "max_grad_norm": 9.0,
                     "clipped_steps": 2, "final_loss": 1e-6})
    return {"settings": {"x0": 0.5, "target": 0.7, "T": 50, "w_range": [0, 10],
                         "b_range": [-8, 2], "grid": 11, "lr": 0.5, "tau": 1.0, "steps": 10,
                         "starts": [[5.0, -4.0], [6.0, -4.0], [7.0, -4.0]], "source": "S"},
            "bound": 0.5, "runs": runs,
            "wall": {"w_critical": 4.2553, "orders_of_magnitude": 4.0,
                     "grad_norm_on_line": {"6.000": 1e6}, "grad_norm_median": 1e-2,
                     "fraction_max_on_line": 1.0}}


def test_the_findings_follow_the_numbers():
    jumps = _synthetic(unclipped_jump=40.0, clipped_step=0.5, stranded=2)
    tame = _synthetic(unclipped_jump=0.8, clipped_step=0.5, stranded=0)
    broken = _synthetic(unclipped_jump=40.0, clipped_step=0.9, stranded=0)
    texts = [report_cliff.section(r, "fig") for r in (jumps, tame, broken)]
    assert "Unclipped SGD jumps far past the wall" in texts[0]
    assert "1 of 3 runs without clipping" in texts[0] and "farthest 40" in texts[0]
    assert "2 of 3 unclipped runs end on the far plateau" in texts[0]
    assert "no step landed far past the wall" in texts[1] and "farthest landing was 0.8" in texts[1]
    assert "do not separate the variants" in texts[1]
    assert "A clipped step exceeded" in texts[2] and "jumps far" not in texts[2]
    assert "![" in texts[0] and "(fig/cliff.png)" in texts[0]
    flat = copy.deepcopy(tame)
    flat["wall"].update(orders_of_magnitude=1.0, grad_norm_on_line={"6.000": 0.05})
    assert "There is a wall" in texts[1]
    assert "No wall showed" in report_cliff.section(flat, "fig")
