"""Never lose a run: bit-exact resume, preemption, hard kills, non-finite steps, locks.

Everything here runs the real thing: launch.py in subprocesses, real SIGTERM,
SIGINT, SIGSTOP and SIGKILL, a real divergence, real file locks. The
bad-input catalogue is tests/test_bad_inputs.py.
"""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from charrnn import checkpoint, metrics, optim, restore, train
from charrnn import step as step_lib
from charrnn import workdir as workdir_lib
from conftest import REPO, _SPEECH

LAUNCH = os.path.join(REPO, "launch.py")
SMOKE = os.path.join(REPO, "experiments", "configs", "default.py") + ":smoke"
# On top of the smoke config (LSTM 1x32, B=4, T=16, 20 steps, log every 5, eval and
# checkpoint every 10): dropout, so that the RNG stream matters to exactness too.
BASE = {"data.val_fraction": 0.1, "data.test_fraction": 0.1, "model.dropout": 0.1}


def _config(corpus, fields=None):
    from experiments.configs import default
    config = default.get_config("smoke")
    config.data.path = corpus
    for field, value in {**BASE, **(fields or {})}.items():
        group, name = field.split(".")
        config[group][name] = value
    return config


def _command(workdir, corpus, fields=None):
    return ([sys.executable, LAUNCH, f"--workdir={workdir}", f"--config={SMOKE}",
             f"--config.data.path={corpus}"]
            + [f"--config.{k}={v}" for k, v in {**BASE, **(fields or {})}.items()])


def _records(workdir, splits=("train", "val", "test")):
    """metrics.jsonl without the fields that measure time."""
    return [{k: v for k, v in r.items() if k not in ("chars_per_sec", "wall_s")}
            for r in metrics.read_metrics(workdir) if r["split"] in splits]


def _params(workdir, step=None, weights="raw"):
    return jax.device_get(restore.load_checkpoint(workdir, step, weights)[3])


def _assert_equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _steps(workdir):
    """Complete checkpoints: orbax names a finished step directory by its number alone."""
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _wait_for_progress(proc) -> str:
    """The child's stdout up to its first progress line ("step 5/...")."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.match(r"step \d+/\d+ \|", line):
            return seen
    proc.wait()
    pytest.fail(f"the run ended before any progress (exit {proc.returncode}): "
                f"{proc.stderr.read()}")


def _start(command):
    # A child inherits an ignored SIGINT (pytest run as a shell script's background job),
    # and launch.py, like Python, then keeps ignoring it: start the child with it on.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(_SPEECH * 15)
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The workdir of an uninterrupted 20-step run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    train.train_and_evaluate(_config(corpus), workdir)
    return workdir


# ---------------------------------------------------------------------------
# Bit-exact resume


def test_resume_is_bit_exact(reference, corpus, tmp_path):
    # 10 steps with checkpoints at 7 and 10, then extended to 20 ...
    extended = str(tmp_path / "extended")
    train.train_and_evaluate(_config(corpus, {"train.num_steps": 10,
                                              "train.checkpoint_every": 7}), extended)
    # ... and the same run as if killed before its step-10 save completed: it resumes
    # from step 7, in the middle of a log interval (records at 10 are dropped).
    killed = str(tmp_path / "killed")
    shutil.copytree(extended, killed)
    shutil.rmtree(os.path.join(killed, "checkpoints", "10"))
    for workdir in (extended, killed):
        train.train_and_evaluate(_config(corpus, {"train.checkpoint_every": 7}), workdir)
        _assert_equal_trees(_params(workdir), _params(reference))
    # The shorter run's own end (its test record at step 10) is history; the rest matches.
    assert _records(extended, ("train", "val")) == _records(reference, ("train", "val"))
    # The step-10 train record averages steps 6-10: 6 and 7 came from the checkpoint.
    assert _records(killed) == _records(reference)


@pytest.mark.parametrize("rule", [
    {"optim.clip_mode": "autoclip", "optim.autoclip_percentile": 50.0,
     "optim.autoclip_history": 6},
    # ... with locked dropout masks (BASE has dropout on), drawn from the step's key too,
    # and averaged weights, part of the state
    {"optim.clip_mode": "zclip", "optim.zclip_z": 1.0, "optim.zclip_warmup": 3,
     "model.dropout_mask": "locked", "optim.ema_decay": 0.8}])
def test_resume_is_bit_exact_with_a_stateful_clipping_rule(rule, corpus, tmp_path):
    """N straight steps = N/2 + N/2: the rule's state (history, EMA) is checkpointed."""
    fields = {**rule, "train.log_every": 2}
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    train.train_and_evaluate(_config(corpus, fields), straight)
    train.train_and_evaluate(_config(corpus, {**fields, "train.num_steps": 10}), halves)
    shutil.copytree(halves, str(tmp_path / "stronger"))
    train.train_and_evaluate(_config(corpus, fields), halves)
    _assert_equal_trees(_params(halves), _params(straight))
    if "optim.ema_decay" in rule:
        averaged = _params(straight, weights="ema")
        _assert_equal_trees(_params(halves, weights="ema"), averaged)
        assert not np.array_equal(averaged["embed"], _params(straight)["embed"])
        # val records carry both losses; eval and sample pick the averaged weights
        val = _records(straight, ("val",))[-1]
        assert val["ema_loss"] != val["loss"]
        assert restore.evaluate_workdir(straight)["val"]["loss"] == pytest.approx(
            val["ema_loss"], rel=1e-6)
        assert restore.evaluate_workdir(straight, weights="raw")["val"]["loss"] == pytest.approx(
            val["loss"], rel=1e-6)
    records = _records(straight, ("train",))
    assert _records(halves, ("train",)) == records
    thresholds = [r["clip_threshold"] for r in records]
    assert len(set(thresholds)) > 3, thresholds  # the threshold moves during training
    assert any(r["clip_fraction"] > 0 for r in records)
    # Changing only the rule's strength on resume is allowed (README): same state shapes.
    strength = {"optim.autoclip_percentile": 90.0} if "autoclip" in str(rule) else {
        "optim.zclip_z": 3.0}
    stronger = str(tmp_path / "stronger")
    train.train_and_evaluate(_config(corpus, {**fields, **strength}), stronger)
    assert _steps(stronger)[-1] == 20
    assert _records(stronger, ("train",))[-1] != records[-1]


def test_step_metrics_survive_json_exactly():
    steps = [{"loss": np.float32(np.nan), "nonfinite": np.int32(1), "clipped": np.bool_(True),
              "lr": np.float32(2e-3)},
             {"loss": np.float32(1 / 3), "nonfinite": np.int32(0), "clipped": np.bool_(False),
              "lr": np.float32(2e-3)}]
    back = checkpoint.decode_step_metrics(json.loads(json.dumps(
        checkpoint.encode_step_metrics(steps))))
    for a, b in zip(steps, back):
        for k in a:
            assert b[k].dtype == a[k].dtype
            np.testing.assert_array_equal(b[k], a[k])
    assert checkpoint.decode_step_metrics(None) == []  # a checkpoint from before this field


# ---------------------------------------------------------------------------
# Preemption, hard kills, one writer per workdir


def test_sigterm_and_sigint_save_wait_and_resume(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    command = _command(workdir, corpus, {"train.num_steps": 100_000,
                                         "train.checkpoint_every": 1000})
    stopped = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = _start(command)
        out = _wait_for_progress(proc)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
        out += rest
        assert proc.returncode == 0, err
        match = re.search(rf"received {sig.name}: saved a checkpoint at step (\d+) in (\S+); "
                          "run the same command again to resume", out)
        assert match, out[-2000:]
        step = int(match.group(1))
        assert match.group(2) == os.path.join(workdir, "checkpoints")
        assert step in _steps(workdir)  # complete on disk: the async save was waited for
        if stopped:
            assert f"resuming from step {stopped[-1]} " in out and step > stopped[-1]
        stopped.append(step)
    # A stop writes no records of its own (its steps' metrics travel in the checkpoint):
    # train records only at log steps, as in a run that was never stopped.
    train_steps = [r["step"] for r in metrics.read_metrics(workdir) if r["split"] == "train"]
    assert train_steps == list(range(5, stopped[-1] + 1, 5))


def test_sigkill_lock_and_partial_checkpoints(corpus, tmp_path):
    workdir = str(tmp_path / "run")
    # Saves back to back (each waits for the previous): a kill most likely lands in one.
    fields = {"train.num_steps": 100_000, "train.checkpoint_every": 5}
    proc = _start(_command(workdir, corpus, fields))
    try:
        _wait_for_progress(proc)
        deadline = time.monotonic() + 120
        while not _steps(workdir) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Frozen mid-run (alive, lock held, most likely inside a save), so that it does
        # not compete for the CPU with what follows.
        proc.send_signal(signal.SIGSTOP)
        # One writer: a second run on the same workdir is refused, nothing touched.
        second = subprocess.run(_command(workdir, corpus, fields), capture_output=True,
                                text=True, cwd=REPO, timeout=120)
        assert second.returncode == 1
        assert second.stderr == (
            f"error: workdir {workdir} is in use by process {proc.pid} on host "
            f"{socket.gethostname()} (lock {workdir}/.lock); wait for that run to finish, "
            "stop it, or use another --workdir\n")
        # Reading takes no lock: evaluate the latest checkpoint while the run holds it.
        assert np.isfinite(restore.evaluate_workdir(workdir)["val"]["loss"])
    finally:
        proc.kill()  # SIGKILL: no handler runs, a save in flight is cut short
        proc.communicate()
    # The dead process's lock file stays behind (stale), as may an unfinished save.
    with open(os.path.join(workdir, ".lock")) as f:
        assert f.read().split()[0] == str(proc.pid)
    complete = _steps(workdir)[-1]
    # The next save, as the kill left it (or, if it had not begun, a fake one), cut short.
    partial = os.path.join(workdir, "checkpoints", f"{complete + 5}.orbax-checkpoint-tmp")
    os.makedirs(partial, exist_ok=True)
    with open(os.path.join(partial, "_CHECKPOINT_METADATA"), "w") as f:
        f.write("{half a fi")
    resumed = subprocess.run(
        _command(workdir, corpus, {**fields, "train.num_steps": complete + 5}),
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {complete} " in resumed.stdout
    assert _steps(workdir)[-1] == complete + 5  # saved over the partial one
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end


def test_lock_refuses_a_live_holder_and_takes_a_dead_ones(tmp_path):
    workdir = str(tmp_path / "run")
    with workdir_lib.WorkdirLock(workdir):
        with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by process {os.getpid()} "):
            workdir_lib.WorkdirLock(workdir).acquire()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer a live process
    with open(os.path.join(workdir, ".lock"), "w") as f:  # as a killed run leaves it
        f.write(f"{dead.pid} {socket.gethostname()}\n")
    with workdir_lib.WorkdirLock(workdir) as lock:
        with open(lock.path) as f:
            assert f.read().split()[0] == str(os.getpid())
    assert not os.path.exists(os.path.join(workdir, ".lock"))


# ---------------------------------------------------------------------------
# Non-finite steps


def test_divergence_is_skipped_counted_and_stops_with_good_checkpoints(reference, corpus,
                                                                         tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)  # a healthy run, saved at steps 10 and 20
    good = _params(workdir)
    # Clipping that never acts (τ = 1e30; the rule itself may not change on resume) and
    # Adam at lr=1e20: its first update is about lr * sign(g), whose norm overflows
    # float32. (Even a tanh RNN stays finite up to lr ~ 1e16 with Adam or SGD: tanh
    # bounds every activation, so the loss grows huge but finite.)
    diverging = {"optim.clip_norm": 1e30, "optim.learning_rate": 1e20,
                 "train.num_steps": 40, "train.max_consecutive_nonfinite": 3,
                 "train.checkpoint_every": 2, "train.keep_checkpoints": 10}
    out = subprocess.run(_command(workdir, corpus, diverging), capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 1
    # Checked at log steps (every 5): the 3rd skipped step in a row is noticed at step 25.
    assert out.stderr == (
        "error: stopped at step 25: the last 5 steps had a non-finite loss, gradient or update "
        "(train.max_consecutive_nonfinite=3); the last good checkpoint (step 24) is in "
        f"{workdir}/checkpoints; lower optim.learning_rate or enable clipping "
        "(optim.clip_mode)\n")
    record = [r for r in metrics.read_metrics(workdir) if r["split"] == "train"][-1]
    assert record["step"] == 25 and record["nonfinite_steps"] == 5
    # Skipped steps change no weight: every checkpoint holds the last finite step's, and
    # the good ones are still there.
    assert _steps(workdir) == [10, 20, 22, 24]
    for step in _steps(workdir)[1:]:
        _assert_equal_trees(_params(workdir, step), good)


# ---------------------------------------------------------------------------
# A damaged checkpoint


def _files(path):
    return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)


def _snapshot(path):
    return {f: open(f, "rb").read() for f in _files(path)}


@pytest.mark.parametrize("part", ["meta", "state"])
def test_a_damaged_checkpoint_is_one_error_and_an_earlier_one_resumes(reference, corpus,
                                                                       tmp_path, part):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    damaged = os.path.join(workdir, "checkpoints", "20")
    for path in _files(os.path.join(damaged, part)):  # every file of the item overwritten
        with open(path, "r+b") as f:
            size = max(os.path.getsize(path), 16)
            f.write(b"\x00garbage\xff" * (size // 11 + 1))
    before = _snapshot(workdir)
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"checkpoint 20 in {workdir}/checkpoints is damaged .*earlier steps "
                             f"present: 10; move {damaged} aside to resume from step 10"):
        train.train_and_evaluate(_config(corpus, {"train.num_steps": 30}), workdir)
    assert _snapshot(workdir) == before  # nothing written, nothing lost
    # Doing what the message says resumes from step 10, bit-exactly.
    shutil.move(damaged, str(tmp_path / "damaged-20"))
    train.train_and_evaluate(_config(corpus), workdir)
    _assert_equal_trees(_params(workdir), _params(reference))


# ---------------------------------------------------------------------------
# No pickle


def test_restoring_a_checkpoint_executes_no_pickle(reference, monkeypatch):
    events = []
    sys.addaudithook(lambda event, args: events.append(event)
                     if event == "pickle.find_class" else None)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while restoring a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    config, vocab, model, params, step = restore.load_checkpoint(reference)
    ckpt = checkpoint.Checkpointer(reference, create=False)
    try:
        _, meta = ckpt.restore_meta(step)  # what a resumed run reads: meta, then the full state
        like = jax.eval_shape(lambda: step_lib.init_state(
            model, optim.make_optimizer(config), config.train.batch_size, config.seed))
        state = ckpt.restore_state(step, like)
    finally:
        ckpt.close()
    assert step == 20 and int(state.step) == 20 and meta["vocab"] == vocab.to_json()
    assert events == []
