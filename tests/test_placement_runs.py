"""Where clipping sits, in child processes: device (4 CPU devices, a child process)
against the hand average of 4 clipped shard gradients; the launcher's bptt run,
resumed. Apart from test_placement.py (each placement against its equation, in
process) so that pytest-xdist's workers (``--dist loadfile``) can run the two
slow files side by side.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from charrnn import metrics, restore
from conftest import REPO
from launch_forks import launch_many
from test_parallel import _env


def test_device_placement_on_four_devices_averages_four_clipped_shards(text_file):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "placement_child.py"),
                           text_file], env=_env(4), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["device_count"] == 4 and 0 < r["shards_clipped"] < 4
    assert r["device_clip_fraction"] == r["shards_clipped"] / 4
    assert r["max_error"] < 1e-6  # the step's update against the hand average
    assert r["clipped_average_differs"] > 1e-4  # clipping the average is another update
    # Inside BPTT each device clips the whole batch's cotangents: the same step as on one.
    assert r["bptt_error"] < 1e-6


def test_launch_with_bptt_value_clipping_trains_resumes_and_samples(text_file, tmp_path):
    """The issue's command (there τ = 1, where a fresh LSTM clips nothing yet; here τ = 0.1,
    which clips from the first step): an LSTM clipped inside BPTT, from the launcher."""
    smoke = os.path.join(REPO, "experiments", "configs", "default.py") + ":smoke"
    run = lambda workdir, steps: [
        f"--workdir={workdir}", f"--config={smoke}", f"--config.data.path={text_file}",
        "--config.optim.clip_at=bptt", "--config.optim.clip_mode=value",
        "--config.optim.clip_norm=0.1", f"--config.train.num_steps={steps}",
        "--config.train.log_every=2", "--config.train.checkpoint_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cases = [run(straight, 4), run(resumed, 2), run(resumed, 4),
             [f"--workdir={resumed}", "--mode=sample", "--length=20", "--prompt=First"]]
    results = launch_many(cases)
    for result in results:
        assert result["returncode"] == 0, result["stderr"][-2000:]
    assert "clipping value, clip_norm=0.1, clip_at=bptt" in results[0]["stdout"]
    assert "resuming from step 2" in results[2]["stdout"]
    assert results[3]["stdout"].startswith("First")
    records = [[r for r in metrics.read_metrics(str(w)) if r["split"] == "train"]
               for w in (straight, resumed)]
    fields = ("step", "loss", "grad_norm", "bptt_clip_fraction", "grad_norm_unclipped",
              "bptt_norm_ratio", "clip_fraction")
    assert [[r[f] for f in fields] for r in records[0]] == \
        [[r[f] for f in fields] for r in records[1]]  # bit-exact after resuming
    assert all(0 < r["bptt_clip_fraction"] < 1 for r in records[0])  # τ clips some
    assert all(0 < r["bptt_norm_ratio"] < 1 for r in records[0])
    runs = [restore.load_checkpoint(str(w))[3] for w in (straight, resumed)]
    for a, b in zip(*(jax.tree.leaves(p) for p in runs)):
        np.testing.assert_array_equal(a, b)
