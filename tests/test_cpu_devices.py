"""train.cpu_devices: how the launcher splits a CPU host (charrnn/cpu_devices.py)."""

import numpy as np
import pytest

from charrnn import cpu_devices

FLAG = "--xla_force_host_platform_device_count"


@pytest.mark.parametrize("hidden, gates, batch, cores, expected", [
    (128, 4, 32, 2, 2),    # LSTM 1x128: W_hh 128 x 512 = 65k elements -> one device per core
    (512, 1, 32, 2, 2),    # tanh RNN 1x512: 262k
    (256, 4, 32, 2, 2),    # LSTM 2x256 (the default config): 262k
    (512, 4, 32, 2, 1),    # LSTM 2x512: 1M elements -> one device
    (128, 4, 8, 2, 1),     # 4 rows per device would be under the floor
    (128, 4, 24, 4, 3),    # the most cores that divide the batch, 8 rows each
    (128, 4, 32, 1, 1),    # one core
])
def test_auto_splits_small_models_over_the_cores_that_divide_the_batch(hidden, gates, batch,
                                                                       cores, expected):
    assert cpu_devices.choose("auto", hidden_size=hidden, num_gates=gates, batch_size=batch,
                              cores=cores) == expected


def test_a_count_is_taken_as_given():
    for setting in (3, "3", "1"):
        assert cpu_devices.choose(setting, hidden_size=4096, num_gates=4, batch_size=5,
                                  cores=2) == int(setting)
    for bad in (0, "0", -1, "two", "2.5", True, None):
        with pytest.raises((TypeError, ValueError)):
            cpu_devices.parse(bad)


def test_apply_sets_xla_flags_and_the_users_count_wins():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert cpu_devices.apply(2, env) == 2
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {FLAG}=2"
    env = {"XLA_FLAGS": f"{FLAG}=4"}
    assert cpu_devices.apply(2, env) == 4 and env["XLA_FLAGS"] == f"{FLAG}=4"
    env = {}
    assert cpu_devices.apply(1, env) == 1 and "XLA_FLAGS" not in env


def test_the_launcher_splits_the_host_and_matches_one_device(smoke_config, text_file, tmp_path):
    """train.cpu_devices=auto through launch.py: the header names the devices it chose, and
    the run's val loss is the one-device run's (in this process: one CPU device)."""
    import json
    import os
    import subprocess
    import sys

    from charrnn import cells, metrics, train
    from conftest import REPO

    smoke_config.train.batch_size = 16
    smoke_config.train.num_steps = 6
    expected = cpu_devices.choose("auto", hidden_size=smoke_config.model.hidden_size,
                                  num_gates=cells.get(smoke_config.model.cell).num_gates,
                                  batch_size=16)
    workdir = str(tmp_path / "auto")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch.py"), f"--workdir={workdir}",
         f"--config={REPO}/experiments/configs/default.py:smoke", f"--config.data.path={text_file}",
         "--config.data.val_fraction=0.1", "--config.data.test_fraction=0.1",
         "--config.train.batch_size=16", "--config.train.num_steps=6"],
        capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"  devices  {expected} x cpu (cpu)" in out.stdout.splitlines()
    with open(os.path.join(workdir, "launches.jsonl")) as f:
        assert json.loads(f.readline())["hardware"]["device_count"] == expected

    one = str(tmp_path / "one")
    train.train_and_evaluate(smoke_config, one)
    val = lambda w: [r["loss"] for r in metrics.read_metrics(w) if r["split"] == "val"]
    np.testing.assert_allclose(val(workdir), val(one), rtol=1e-5)
