"""Data parallelism over 4 CPU devices, 2 processes on 127.0.0.1, sweeps on a mesh.

Several CPU devices need XLA_FLAGS before JAX starts, so each check runs in
subprocesses (tests/parallel_child.py, or launch.py itself) and compares what
they report with a one-device run.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from charrnn import metrics, parallel, train
from conftest import REPO

CHILD = os.path.join(REPO, "tests", "parallel_child.py")


def _env(num_devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
    return env


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(workdir, overrides, cache_dir):
    """launch.py as 2 processes x 2 CPU devices (a 4-device mesh); (stdout, stderr) each.

    A persistent compilation cache lets a second launch skip recompiling.
    """
    address = f"127.0.0.1:{_free_port()}"
    env = dict(_env(2), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    procs = [subprocess.Popen(
        [sys.executable, "launch.py", f"--workdir={workdir}",
         "--config=experiments/configs/default.py:smoke", *overrides,
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=300))
            if proc.returncode != 0:
                break  # the other process would wait for it until JAX's timeout
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    return outs


def test_two_processes_match_one_process_and_resume(smoke_config, tmp_path):
    cfg = smoke_config.train
    cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 2, 4, 4
    overrides = [f"--config.data.path={smoke_config.data.path}",
                 "--config.data.val_fraction=0.1", "--config.data.test_fraction=0.1",
                 "--config.train.log_every=2", "--config.train.eval_every=4",
                 "--config.train.checkpoint_every=4"]
    workdir = str(tmp_path / "two")
    outs = _launch_two_processes(workdir, overrides + ["--config.train.num_steps=4"],
                                 tmp_path / "cache")
    # Only process 0 prints progress (gloo's own C++ lines may still reach stdout).
    assert "step 4/4" in outs[0][0] and "step" not in outs[1][0]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
    outs = _launch_two_processes(workdir, overrides + ["--config.train.num_steps=6"],
                                 tmp_path / "cache")
    assert "resuming from step 4" in outs[0][0]

    cfg.num_steps = 6
    train.train_and_evaluate(smoke_config, str(tmp_path / "one"))
    ours = {(r["step"], r["split"]): r for r in metrics.read_metrics(workdir)}
    ref = {(r["step"], r["split"]): r for r in metrics.read_metrics(str(tmp_path / "one"))}
    # Each record once (process 1 wrote none); the 2-process run also has the
    # test record of its first, 4-step, run.
    assert len(ours) == len(metrics.read_metrics(workdir))
    assert set(ref) == set(ours) - {(4, "test")}
    for key, record in ref.items():
        for field in ("loss", "grad_norm", "grad_norm_clipped"):
            if field in record:
                assert ours[key][field] == pytest.approx(record[field], rel=1e-5), (key, field)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 6


@pytest.mark.parametrize("explicit", [
    dict(coordinator_address="127.0.0.1:1234"),
    dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
    dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0, auto=True),
])
def test_bad_multi_process_flags_are_user_errors(explicit):
    with pytest.raises(parallel.ParallelError):
        parallel.initialize(**explicit)


def test_no_flags_is_a_single_process():
    assert parallel.initialize() is False
