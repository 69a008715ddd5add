"""Two training processes on 127.0.0.1 (jax.distributed over gloo) against one, and the
multi-process flags. Apart from test_parallel.py so that pytest-xdist's workers
(``--dist loadfile``) can run the two slow files side by side.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from charrnn import metrics, parallel, train
from conftest import REPO
from test_parallel import _env


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
