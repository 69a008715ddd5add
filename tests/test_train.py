"""One real train step, non-finite steps, and an end-to-end run that resumes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import metrics, models, optim, train
from conftest import REPO


def _setup(config, vocab_size=12):
    model = models.CharRNN.from_config(config.model, vocab_size)
    state = train.init_state(model, optim.make_optimizer(config), config.train.batch_size, config.seed)
    return model, state, train.make_train_step(model, config)


def _batch(config, vocab_size=12, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    return {"x": rng.integers(0, vocab_size, shape, dtype=np.int32),
            "y": rng.integers(0, vocab_size, shape, dtype=np.int32), "reset": np.bool_(True)}


def test_one_train_step_starts_near_uniform_loss(smoke_config):
    _, state, step_fn = _setup(smoke_config)
    before = jax.tree.map(np.array, state.params)
    state, m = step_fn(state, _batch(smoke_config), jax.random.key(0))
    # A fresh model predicts nearly uniformly: cross-entropy ≈ ln V.
    assert float(m["loss"]) == pytest.approx(math.log(12), abs=0.1)
    assert np.isfinite(float(m["grad_norm"])) and int(state.step) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state.params)
    assert all(jax.tree.leaves(changed))


def test_reported_norms_are_before_and_after_the_clip(smoke_config):
    smoke_config.optim.clip_norm = 1e-3  # every step clips
    _, state, step_fn = _setup(smoke_config)
    _, m = step_fn(state, _batch(smoke_config), jax.random.key(0))
    assert float(m["grad_norm"]) > 1e-3
    assert float(m["grad_norm_clipped"]) == pytest.approx(1e-3, rel=1e-4)
    assert bool(m["clipped"])


def test_a_nonfinite_step_changes_nothing_and_is_counted(smoke_config):
    smoke_config.model.cell, smoke_config.optim.clip_mode = "rnn", "none"
    _, state, step_fn = _setup(smoke_config)
    # An infinite weight makes the loss non-finite.
    state = state.replace(params={**state.params, "head": {
        "kernel": state.params["head"]["kernel"].at[0, 0].set(jnp.inf),
        "bias": state.params["head"]["bias"]}})
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    state, m = step_fn(state, _batch(smoke_config), jax.random.key(0))
    assert int(m["nonfinite"]) == 1 and int(state.nonfinite_run) == 1
    after = jax.tree.map(np.array, (state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_train_resumes_from_its_checkpoint(smoke_config, tmp_path):
    workdir = str(tmp_path / "run")
    smoke_config.train.num_steps = 10
    first = train.train_and_evaluate(smoke_config, workdir)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "10"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 10
    assert math.isfinite(first["val"]["loss"]) and "test" in first

    smoke_config.train.num_steps = 20
    train.train_and_evaluate(smoke_config, workdir)
    records = metrics.read_metrics(workdir)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [5, 10, 15, 20]  # continued from 10, not from 0
    val = [r for r in records if r["split"] == "val"]
    assert {"whh_spectral_radius/0", "whh_top_singular/0"} <= set(val[-1])
    config, vocab, _, params, step = train.load_checkpoint(workdir)
    assert step == 20 and config.train.num_steps == 20 and vocab.size > 10


def test_launch_trains_and_evaluates(text_file, tmp_path):
    workdir = str(tmp_path / "run")
    base = [sys.executable, os.path.join(REPO, "launch.py"), f"--workdir={workdir}"]
    out = subprocess.run(base + [f"--config={REPO}/experiments/configs/default.py:smoke",
                                 f"--config.data.path={text_file}", "--config.train.num_steps=6"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "step 5/6 | loss" in out.stdout and "val bpc" in out.stdout
    out = subprocess.run(base + ["--mode=eval"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "step 6 | val loss" in out.stdout and "test bpc" in out.stdout
