"""One real train step, non-finite steps, and an end-to-end run that resumes."""

import json
import math
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import data, metrics, models, optim, restore, train
from charrnn import step as step_lib
from conftest import REPO


def _setup(config, vocab_size=12):
    model = models.CharRNN.from_config(config.model, vocab_size)
    optimizer = optim.Optimizer.from_config(config)
    state = step_lib.init_state(model, optimizer, config.train.batch_size, config.seed)
    return model, state, step_lib.make_train_step(model, optimizer)


def _batch(config, vocab_size=12, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    return {"x": rng.integers(0, vocab_size, shape, dtype=np.int32),
            "y": rng.integers(0, vocab_size, shape, dtype=np.int32), "reset": np.bool_(True)}


def test_one_train_step_starts_near_uniform_loss(smoke_config):
    _, state, step_fn = _setup(smoke_config)
    before = jax.tree.map(np.array, state.params)
    state, m = step_fn(state, _batch(smoke_config))
    # A fresh model predicts nearly uniformly: cross-entropy ≈ ln V.
    assert float(m["loss"]) == pytest.approx(math.log(12), abs=0.1)
    assert np.isfinite(float(m["grad_norm"])) and int(state.step) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, state.params)
    assert all(jax.tree.leaves(changed))


def test_reported_norms_are_before_and_after_the_clip(smoke_config):
    smoke_config.optim.clip_norm = 1e-3  # every step clips
    _, state, step_fn = _setup(smoke_config)
    _, m = step_fn(state, _batch(smoke_config))
    assert float(m["grad_norm"]) > 1e-3
    assert float(m["grad_norm_clipped"]) == pytest.approx(1e-3, rel=1e-4)
    assert bool(m["clipped"])


def test_an_epoch_start_resets_the_carried_state(smoke_config):
    """A window with ``reset`` (an epoch's first) starts from the zero state whatever the
    state carries; any other window starts from the carried state."""
    _, state, step_fn = _setup(smoke_config)
    copy = lambda s: jax.tree.map(jnp.array, s)  # the step donates its state
    carried = state.replace(carry=jax.tree.map(lambda c: jnp.full_like(c, 0.5), state.carry))
    batch = _batch(smoke_config)
    _, from_zero = step_fn(copy(state), batch)
    _, reset = step_fn(copy(carried), batch)
    _, kept = step_fn(copy(carried), dict(batch, reset=np.bool_(False)))
    assert float(reset["loss"]) == float(from_zero["loss"])
    assert abs(float(kept["loss"]) - float(from_zero["loss"])) > 1e-4


def test_a_nonfinite_step_changes_nothing_and_is_counted(smoke_config):
    smoke_config.model.cell, smoke_config.optim.clip_mode = "rnn", "none"
    smoke_config.optim.ema_decay = 0.5  # the averaged weights must not move either
    _, state, step_fn = _setup(smoke_config)
    # An infinite weight makes the loss non-finite.
    state = state.replace(params={**state.params, "head": {
        "kernel": state.params["head"]["kernel"].at[0, 0].set(jnp.inf),
        "bias": state.params["head"]["bias"]}})
    before = jax.tree.map(np.array, (state.params, state.opt_state, state.ema))
    state, m = step_fn(state, _batch(smoke_config))
    assert int(m["nonfinite"]) == 1 and int(state.nonfinite_run) == 1
    after = jax.tree.map(np.array, (state.params, state.opt_state, state.ema))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_averaged_weights_are_the_closed_form_of_the_steps_taken(smoke_config):
    """After k steps ema = d^k·θ_0 + Σ_{i=1..k} (1-d)·d^(k-i)·θ_i, θ_i the params after step i."""
    d, k = 0.75, 4
    smoke_config.optim.ema_decay = d
    _, state, step_fn = _setup(smoke_config)
    thetas = [jax.tree.map(np.array, state.params)]
    for i in range(k):
        state, _ = step_fn(state, _batch(smoke_config, seed=i))
        thetas.append(jax.tree.map(np.array, state.params))
    weights = [d ** k] + [(1 - d) * d ** (k - i) for i in range(1, k + 1)]
    closed = jax.tree.map(lambda *ts: sum(w * t.astype(np.float64) for w, t in zip(weights, ts)),
                          *thetas)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.tree.map(np.array, state.ema), closed)
    # not the raw weights, nor the average of the weights before each step
    assert not np.allclose(state.ema["embed"], state.params["embed"], rtol=1e-4)
    shifted = sum(w * t for w, t in zip(weights, [thetas[0]["embed"]] + [
        t["embed"] for t in thetas[:-1]]))
    assert not np.allclose(state.ema["embed"], shifted, rtol=1e-4)


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
    # checkpoint_every 10: steps 10 and 20, no other (an off-by-one would add 9 or 11, 19)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["10", "20"]
    val = [r for r in records if r["split"] == "val"]
    assert {"whh_spectral_radius/0", "whh_top_singular/0"} <= set(val[-1])
    config, vocab, _, params, step = restore.load_checkpoint(workdir)
    assert step == 20 and config.train.num_steps == 20 and vocab.size > 10

    # Fine-tuning: a new run from those weights on another text (a subset of the
    # vocabulary), with a fresh optimizer. After 2 steps a fresh model is still near
    # ln V; this one starts from what 20 steps learnt.
    new_text = tmp_path / "new.txt"
    new_text.write_text("All:\nSpeak, speak. Resolved, resolved.\n\n" * 60)
    tuned = str(tmp_path / "tuned")
    smoke_config.data.path, smoke_config.train.num_steps = str(new_text), 2
    smoke_config.train.log_every = smoke_config.train.eval_every = 2
    result = train.train_and_evaluate(smoke_config, tuned, init_from=workdir, init_step=20)
    model = models.CharRNN.from_config(smoke_config.model, vocab.size)
    val_ids = data.split(vocab.encode(new_text.read_text()), 0.1, 0.1)[1]
    fresh = step_lib.evaluate(step_lib.make_eval_step(model), model,
                              model.init(jax.random.key(0)), val_ids, 8, 16)["loss"]
    assert result["val"]["loss"] < fresh - 0.2
    with open(os.path.join(tuned, "config.json")) as f:
        assert json.load(f)["init_from"] == {"workdir": workdir, "step": 20}
    first = metrics.read_metrics(tuned)[0]
    assert (first["step"], first["init_from_workdir"], first["init_from_step"]) == (2, workdir, 20)
    tuned_config, tuned_vocab, _, _, _ = restore.load_checkpoint(tuned)
    assert tuned_vocab == vocab and tuned_config.data.path == str(new_text)
    # The same command again, with more steps, resumes the fine-tuning run.
    smoke_config.train.num_steps = 4
    train.train_and_evaluate(smoke_config, tuned, init_from=workdir, init_step=20)
    records = [r for r in metrics.read_metrics(tuned) if r["split"] == "train"]
    assert [r["step"] for r in records] == [2, 4] and "init_from_step" not in records[1]


def test_launch_says_what_it_trains_and_what_to_do_next(text_file, tmp_path):
    """From another directory: the header, the closing commands (run as printed), the record."""
    workdir = str(tmp_path / "run")
    # --config and --config.data.path relative to the current directory (tmp_path).
    config_arg = os.path.relpath(f"{REPO}/experiments/configs/default.py", tmp_path) + ":smoke"
    argv = [os.path.join(REPO, "launch.py"), f"--workdir={workdir}", f"--config={config_arg}",
            f"--config.data.path={os.path.basename(text_file)}", "--config.train.num_steps=6"]
    # A "python" on PATH that is the same file as this interpreter, as a venv's python
    # (a symlink) is for the base interpreter, which lacks the venv's packages.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable] + argv, capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "step 5/6 | loss" in out.stdout and "val bpc" in out.stdout
    lines = out.stdout.splitlines()
    # The smoke model: LSTM 1x32, embedding 16, V characters. Parameters: embedding V*16,
    # LSTM 4*(16*32 + 32*32 + 32), head 32*V + V.
    text = open(text_file).read()
    vocab, n = len(set(text)), len(text)
    params = vocab * 16 + 4 * (16 * 32 + 32 * 32 + 32) + 32 * vocab + vocab
    n_val = round(n * 0.05)  # the smoke config holds out 5% for val and 5% for test
    assert lines[:7] == [
        f"charrnn: lstm 1x32 (embedding 16), {params:,} parameters",
        f"  corpus   {text_file}: {n:,} characters, vocabulary {vocab}; "
        f"train/val/test {n - 2 * n_val:,}/{n_val:,}/{n_val:,}",
        "  batch    B x T = 4 x 16, 6 steps",
        "  optim    adam, learning rate 0.002, constant schedule",
        "  clipping global_norm, clip_norm=1, clip_at=gradient",
        "  devices  1 x cpu (cpu)",
        f"  workdir  {workdir}"]
    python = sys.executable  # the interpreter the run used, not whichever python PATH finds
    assert lines[-4:-1] == [
        f"trained model in {workdir}; next:",
        f"  sample:       {python} {REPO}/launch.py --mode=sample --workdir=run --length=500",
        f"  evaluate:     {python} {REPO}/launch.py --mode=eval --workdir=run"]
    assert lines[-1].startswith("  TensorBoard:  ")  # its command: the test below
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    (record,) = [json.loads(line) for line in open(os.path.join(workdir, "launches.jsonl"))]
    assert set(record) == {"start_step", "started", "config_arg", "argv", "hardware", "software"}
    assert record["start_step"] == 0 and record["config_arg"] == config_arg
    assert record["argv"] == argv and record["started"].endswith("+00:00")
    assert set(record["hardware"]) == {"host", "cpu", "cpu_count", "platform", "device_count",
                                       "device_kind"}
    assert record["hardware"]["platform"] == "cpu" and record["hardware"]["device_count"] == 1
    assert set(record["software"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                       "orbax-checkpoint", "charrnn_commit"}
    assert record["software"]["jax"] == jax.__version__

    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["path"] == text_file  # absolute: eval works from anywhere
    evaluate = shlex.split(lines[-2].split(":", 1)[1])
    assert evaluate[-1] == "--workdir=run"
    evaluate[-1] = f"--workdir={workdir}"  # from /, "run" would not name it
    # In a fresh shell: no venv on PATH (a bare "python" would find another interpreter).
    fresh = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"),
             **{k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_"))}}
    out = subprocess.run(["bash", "-c", shlex.join(evaluate)], capture_output=True, text=True,
                         cwd="/", env=fresh)
    assert out.returncode == 0, out.stderr
    assert "step 6 | val loss" in out.stdout and "test bpc" in out.stdout


def test_eval_loss_is_one_streams_whatever_the_batch(smoke_config):
    """val/test = one stream through the whole split, for any eval batch size B.

    Without burn-in, B streams that start cold differ from the single stream by more
    than the tolerance (so this model's state does carry information); with it, by
    less than 2e-4 nats/char.
    """
    from conftest import _SPEECH
    from charrnn import data
    smoke_config.model.cell = "rnn"
    text = _SPEECH * 15
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    model = models.CharRNN.from_config(smoke_config.model, vocab.size)
    params = model.init(jax.random.key(0))
    eval_fn = step_lib.make_eval_step(model)
    loss = lambda b, **kw: step_lib.evaluate(eval_fn, model, params, ids, b, 16, **kw)["loss"]
    one = loss(1)
    assert loss(1, burn_in=0) == one
    for b in (3, 64):
        assert abs(loss(b, burn_in=0) - one) > 2e-4
        assert loss(b) == pytest.approx(one, abs=2e-4)


def test_evaluation_uses_no_dropout(smoke_config):
    """A model with dropout and weight drop evaluates exactly as the same parameters with
    both off: dropout is for training only (eval_step passes no dropout key)."""
    from conftest import _SPEECH
    smoke_config.model.num_layers = 2
    vocab = data.Vocab.from_text(_SPEECH)
    ids = vocab.encode(_SPEECH)
    plain = models.CharRNN.from_config(smoke_config.model, vocab.size)
    smoke_config.model.dropout, smoke_config.model.weight_drop = 0.5, 0.5
    dropped = models.CharRNN.from_config(smoke_config.model, vocab.size)
    params = plain.init(jax.random.key(0))
    loss = lambda m: step_lib.evaluate(step_lib.make_eval_step(m), m, params, ids, 2, 16)["loss"]
    assert loss(dropped) == loss(plain)
    # The dropout model does drop when given a key: the equality above is not vacuous.
    x = ids[None, :16]
    _, with_key = dropped(params, dropped.initial_carry(1), x, dropout_key=jax.random.key(1))
    _, without = plain(params, plain.initial_carry(1), x)
    assert not np.allclose(with_key, without)


def test_the_launch_record_names_the_commit_and_says_when_the_code_differs(tmp_path):
    from charrnn import runinfo
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True,
                                    capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (repo / "f.py").write_text("x = 1\n")
    git("add", "f.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD")
    assert runinfo.git_commit(str(repo)) == head
    (repo / "new.py").write_text("")  # untracked files are not the code that ran
    assert runinfo.git_commit(str(repo)) == head
    (repo / "f.py").write_text("x = 2\n")
    assert runinfo.git_commit(str(repo)) == head + "+uncommitted"
    (repo / "sub").mkdir()
    assert runinfo.git_commit(str(repo / "sub")) is None  # not the root of the checkout
