"""Data parallelism over 4 CPU devices, and sweeps on a mesh (two processes on 127.0.0.1:
test_processes.py, a file of its own so that the test runner's two workers share them).

Several CPU devices need XLA_FLAGS before JAX starts, so each check runs in
subprocesses (tests/parallel_child.py, or launch.py itself) and compares what
they report with a one-device run.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

CHILD = os.path.join(REPO, "tests", "parallel_child.py")


def _env(num_devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags.strip()}{num_devices}")


def _child(*args, num_devices=4) -> dict:
    proc = subprocess.run([sys.executable, CHILD, *args], env=_env(num_devices), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices_match_one_device_including_a_clipped_step(text_file):
    r = _child("devices", text_file)
    one, four = r["one"], r["four"]
    assert r["device_count"] == 4
    # The premise: some steps are clipped and some are not (τ = 0.35).
    assert True in one["clipped"] and False in one["clipped"]
    assert four["clipped"] == one["clipped"]
    # Loss and pre-clip norm are of the GLOBAL batch: per-device clipping would
    # scale the update differently on the clipped step and the params would differ.
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-5)
    # Adam divides by √v: where a gradient entry is near 0, a ~1e-7 difference in the
    # order of the sums moves that parameter by up to ~1e-4 of 4 steps of lr 0.05.
    for a, b in zip(four["params"], one["params"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
    assert four["param_replicated"]
    assert four["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert four["eval_collectives"] == []
    assert four["carry_spec"] == ["P('data',)"] * 2  # LSTM (c, h), rows over the mesh
    assert "batch_size = 6 does not split over 4 devices" in r["error"]


def test_a_sweep_with_its_runs_over_four_devices_equals_the_sweep_on_one(text_file):
    r = _child("sweep", text_file)
    one, four = r["one"], r["four"]  # per run: [steps] metrics, val losses
    assert r["device_count"] == 4
    # τ = inf, 0.1, 0.4, 0.32: never, always, and on some steps only.
    assert four["clipped"] == one["clipped"]
    clipped = np.array(one["clipped"])
    assert not clipped[0].any() and clipped[1].all()
    assert all(row.any() and not row.all() for row in clipped[2:])
    assert r["four_one_by_one"]["clipped"] == one["clipped"]
    for key in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(r["four_one_by_one"][key], one[key], rtol=1e-5, err_msg=key)
    # Each device trains its own runs: the state stays split over the mesh and
    # the compiled step has no cross-device communication.
    assert r["layout"] == {"param_specs": ["P('data',)"], "collectives": []}
    assert "number of runs = 6 does not split over 4 devices" in r["error"]
    # clip_ablation's layout: one device per run, at most the limit (0: no limit) and the device count
    assert r["group_mesh"] == [3, 4, None, 2, None, 4]
    three = r["three_on_two"]
    assert three["clipped"] == one["clipped"][:3]
    for key in ("loss", "grad_norm", "val_loss"):
        np.testing.assert_allclose(three[key], one[key][:3], rtol=1e-5, err_msg=key)
