"""Never lose a run: bit-exact resume, preemption, hard kills, non-finite steps, locks.

Everything here runs the real thing: launch.py in subprocesses, real SIGTERM,
SIGINT, SIGSTOP and SIGKILL, a real divergence, real file locks. The
bad-input catalogue is tests/test_bad_inputs.py.
"""

import errno
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import struct
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


def test_lines_that_are_no_record_are_dropped_with_one_warning(reference, corpus, tmp_path,
                                                               capfd):
    """Not JSON, not UTF-8, no step: said in one line. A last line cut by a kill: silently."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))  # resumes from step 10
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    bad = [b"{not json\n", b'{"step": "\xff\xfe"}\n', b'["step", 3]\n']
    with open(path, "wb") as f:
        f.writelines(lines[:1] + bad + lines[1:] + [b'{"step": 25, "split": "tr'])
    capfd.readouterr()
    train.train_and_evaluate(_config(corpus), workdir)
    err = capfd.readouterr().err
    assert err == (f"warning: {path}: lines 2, 3, 4 are not a JSON record with a step; "
                   "dropped\n")
    assert _records(workdir) == _records(reference)
    with open(path, "rb") as f:
        kept = [line for line in f if json.loads(line)["step"] <= 10]
    assert kept == [line for line in lines if json.loads(line)["step"] <= 10]


@pytest.mark.parametrize("read", ["restore_meta", "restore_state"])
def test_a_checkpoint_rotated_away_while_read_is_not_called_damaged(read, reference, tmp_path,
                                                                   monkeypatch):
    """Training rotates its checkpoints while eval or sample reads the latest: the read
    that loses its checkpoint (its directory removed under it, as rotation does) takes
    the newest one left; a checkpoint named with --step says it was removed."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    original, removed = getattr(checkpoint.Checkpointer, read), []

    def rotated_away(self, step, *args):
        if (step or self.latest_step()) == 20 and not removed:  # the first read of 20 loses it
            shutil.rmtree(os.path.join(self.directory, "20"))
            removed.append(20)
        return original(self, step, *args)

    monkeypatch.setattr(checkpoint.Checkpointer, read, rotated_away)
    assert restore.load_checkpoint(workdir)[4] == 10 and removed == [20]
    _assert_equal_trees(_params(workdir), _params(reference, 10))
    shutil.copytree(os.path.join(reference, "checkpoints", "20"),
                    os.path.join(workdir, "checkpoints", "20"))
    removed.clear()
    with pytest.raises(checkpoint.CheckpointGone) as raised:
        restore.load_checkpoint(workdir, 20)
    assert str(raised.value) == (
        f"checkpoint 20 in {workdir}/checkpoints was removed while it was read (a training run "
        "writing this workdir keeps only its latest train.keep_checkpoints); read a newer one "
        "(omit --step, or pass one of 10)")


# ---------------------------------------------------------------------------
# TensorBoard after a resume


def _events(path):
    """The Event protos of one event file: TFRecord framing (u64 length, u32 crc of it,
    the bytes, u32 crc of them), read up to a record cut short by a kill."""
    from tensorboardX.proto import event_pb2
    with open(path, "rb") as f:
        data = f.read()
    offset, events = 0, []
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        if offset + 12 + length + 4 > len(data):
            break
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 12 + length + 4
    return events


def _tensorboard_scalars(workdir):
    """{(tag, step): [values]} as TensorBoard shows them: event files in name order (their
    names begin with the time), and a SessionLog START at step s (tensorboardX's
    purge_step) drops every scalar read before it whose step is >= s."""
    from tensorboardX.proto import event_pb2
    directory = os.path.join(workdir, "tensorboard")
    scalars = {}
    for name in sorted(os.listdir(directory)):
        for event in _events(os.path.join(directory, name)):
            if event.session_log.status == event_pb2.SessionLog.START:
                scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
            for value in event.summary.value:
                scalars.setdefault((value.tag, event.step), []).append(value.simple_value)
    return scalars


def _assert_tensorboard_matches_metrics(workdir):
    """One value per (tag, step), and it is metrics.jsonl's (float32, as TensorBoard keeps it)."""
    scalars = _tensorboard_scalars(workdir)
    expected = {(f"{r['split']}/{k}", r["step"]): [float(np.float32(v))]
                for r in metrics.read_metrics(workdir) for k, v in r.items()
                if k not in ("step", "split") and isinstance(v, (int, float))}
    assert scalars == expected


@pytest.mark.parametrize("kept", [[10], []])
def test_tensorboard_shows_one_value_per_step_after_a_resume(reference, corpus, tmp_path, kept):
    """A run killed after step 20 resumes from step 10 (or, with no checkpoint, as a run
    killed before its first save, from 0) with another learning rate: the events of the
    steps run again are the new ones, once each; records up to the restored step stay."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    for step in _steps(workdir):
        if step not in kept:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
        before = [line for line in f if json.loads(line)["step"] <= (kept or [0])[-1]]
    assert len(_tensorboard_scalars(workdir)[("train/loss", 20)]) == 1
    train.train_and_evaluate(_config(corpus, {"optim.learning_rate": 0.05}), workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
        after = f.readlines()
    assert after[:len(before)] == before  # byte-identical up to the restored step
    assert _records(workdir)[-1] != _records(reference)[-1]  # the new learning rate's
    _assert_tensorboard_matches_metrics(workdir)
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2


def test_a_launch_that_finds_the_run_trained_changes_nothing(reference, corpus, tmp_path,
                                                            capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = _snapshot(workdir)
    train.train_and_evaluate(_config(corpus, {"train.num_steps": 10}), workdir)
    assert "already trained for 20 steps (train.num_steps=10)" in capsys.readouterr().out
    assert _snapshot(workdir) == before  # config.json keeps num_steps=20; no new launch


def test_a_launch_that_failed_before_any_record_does_not_block_the_next(corpus, tmp_path):
    """Out of memory at the first compilation, say: config.json and launches.jsonl of
    another model, no record, no checkpoint. The corrected launch runs."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(_config(corpus, {
        "model.hidden_size": 100_000}).to_dict()))
    (workdir / "launches.jsonl").write_text('{"start_step": 0}\n')
    train.train_and_evaluate(_config(corpus, {"train.num_steps": 2}), str(workdir))
    assert _steps(str(workdir)) == [2]
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden_size"] == 32
    assert (workdir / "launches.jsonl").read_text().startswith('{"start_step": 0}\n{')


def test_killed_anywhere_and_resumed_ends_as_an_uninterrupted_run(reference, corpus, tmp_path):
    """SIGKILL at 5 random moments (compilation, steps; with a save at every step most
    land in one), each followed by the same command: metrics.jsonl, the TensorBoard
    scalars and the parameters end as those of a run never stopped."""
    workdir = str(tmp_path / "run")
    command = _command(workdir, corpus, {"train.checkpoint_every": 1})
    rng, kills, during_saves = random.Random(0), 0, 0
    while kills < 5:
        proc = _start(command)
        # After some output lines (the header's 5, the first step, records; the first kill
        # during compilation) and a random delay.
        for _ in range(5 if kills == 0 else rng.randrange(10)):
            if not proc.stdout.readline():
                break
        time.sleep(rng.uniform(0, 0.3))
        saving = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
            "tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))
        proc.kill()
        err = proc.communicate()[1]
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
        if proc.returncode == 0:  # it finished first: nothing to resume
            shutil.rmtree(workdir)
            continue
        kills, during_saves = kills + 1, during_saves + saving
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _records(workdir) == _records(reference)
    _assert_equal_trees(_params(workdir), _params(reference))
    _assert_tensorboard_matches_metrics(workdir)
    print(f"{kills} kills, {during_saves} seen during a save")


# ---------------------------------------------------------------------------
# A full disk

_DISK_FULL_LINE = (r"error: no space left on the device of workdir {w} \(\d+\.\d MB free; a "
                   r"checkpoint takes \d+\.\d MB\); free some space and run the same command "
                   r"again: it resumes from step {step}, the last complete checkpoint")


def _one_error_line(stderr, pattern):
    """stderr holds one error line, matching ``pattern``, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), stderr[-3000:]


def test_a_full_disk_is_one_line_and_running_again_resumes(corpus, tmp_path):
    """A 600 KB tmpfs as the workdir, checkpoints of ~0.15 MB every 5 steps (needs root)."""
    small = tmp_path / "small"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small)],
                           capture_output=True)
    if mount.returncode:
        pytest.skip("cannot mount a tmpfs here (root only); the patched test below runs")
    try:
        workdir = str(small / "run")
        command = _command(workdir, corpus, {"train.num_steps": 60,
                                             "train.checkpoint_every": 5})
        saved = None
        for attempt in range(2):  # the second while the disk is still full
            out = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                 timeout=300)
            assert out.returncode == 1
            step = _steps(workdir)[-1]
            _one_error_line(out.stderr, _DISK_FULL_LINE.format(w=workdir, step=step))
            assert not [name for name in os.listdir(workdir) if ".tmp" in name]
            kept = {s: _snapshot(os.path.join(workdir, "checkpoints", str(s)))
                    for s in _steps(workdir)}
            assert saved is None or kept == saved  # earlier saves byte-identical
            saved = kept
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"resuming from step {step} " in out.stdout and _steps(workdir)[-1] == 60
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


@pytest.mark.parametrize("writer", ["metrics", "checkpoint"])
def test_a_full_disk_met_by_a_writer_is_one_line(writer, reference, corpus, tmp_path,
                                                 monkeypatch):
    """What a full disk raises where it is met: OSError(ENOSPC) from a metrics write,
    tensorstore's ValueError (as orbax passes it on) from a checkpoint save."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))  # resumes from step 10
    before = _snapshot(os.path.join(workdir, "checkpoints"))

    def full(*args, **kwargs):
        if writer == "metrics":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"step/0\" ... Failed to write "
                         "710025 bytes to file 8: No space left on device [os_error_code='28']")

    target = metrics.MetricWriter if writer == "metrics" else checkpoint.Checkpointer
    monkeypatch.setattr(target, "write" if writer == "metrics" else "save", full)
    with pytest.raises(workdir_lib.WorkdirError) as raised:
        with workdir_lib.disk_full_is_an_error(workdir):
            train.train_and_evaluate(_config(corpus), workdir)
    assert re.fullmatch(_DISK_FULL_LINE.format(w=workdir, step=10), "error: " + str(raised.value))
    assert _snapshot(os.path.join(workdir, "checkpoints")) == before
    assert not [name for name in os.listdir(workdir) if ".tmp" in name]
    with pytest.raises(ValueError, match="not a disk"):  # any other error passes through
        with workdir_lib.disk_full_is_an_error(workdir):
            raise ValueError("not a disk")


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
