"""Nothing lost, nothing silently wrong: records around a resume, reading while training
runs, a full disk, and SIGKILL anywhere.

launch.py in subprocesses where the real thing matters (kills, a real tmpfs), the
library in-process elsewhere; helpers and the 20-step reference run are
tests/test_robustness.py's.
"""

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import time

import numpy as np
import pytest

from charrnn import checkpoint, metrics, restore, train
from charrnn import workdir as workdir_lib
from conftest import REPO
from test_robustness import (_assert_equal_trees, _command, _config, _params, _records,
                             _snapshot, _start, _steps)
from test_robustness import corpus, reference  # noqa: F401  (module fixtures)


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


def _saving(workdir) -> bool:
    """Whether orbax is writing a checkpoint now (its temporary directory exists)."""
    try:
        return any("tmp" in name for name in os.listdir(os.path.join(workdir, "checkpoints")))
    except FileNotFoundError:
        return False


def test_killed_anywhere_and_resumed_ends_as_an_uninterrupted_run(reference, corpus, tmp_path):
    """SIGKILL at 5 moments (during compilation, after random output and delays, and
    twice as soon as a save is seen under way), each followed by the same command:
    metrics.jsonl, the TensorBoard scalars and the parameters end as those of a run
    never stopped."""
    workdir = str(tmp_path / "run")
    command = _command(workdir, corpus, {"train.checkpoint_every": 1})  # a save every step
    rng, kills, during_saves = random.Random(0), 0, 0
    while kills < 5:
        proc = _start(command)
        if kills in (1, 3):
            while proc.poll() is None and not _saving(workdir):
                time.sleep(0.001)
        else:
            for _ in range(5 if kills == 0 else rng.randrange(10)):  # header: 5 lines
                if not proc.stdout.readline():
                    break
            time.sleep(rng.uniform(0, 0.3))
        saving = _saving(workdir)
        proc.kill()
        err = proc.communicate()[1]
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
        if proc.returncode == 0:  # it finished first: nothing to resume
            shutil.rmtree(workdir)
            continue
        kills, during_saves = kills + 1, during_saves + saving
    assert during_saves >= 2
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _records(workdir) == _records(reference)
    _assert_equal_trees(_params(workdir), _params(reference))
    _assert_tensorboard_matches_metrics(workdir)


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


def test_a_failed_write_task_nobody_awaited_is_not_logged(tmp_path):
    """asyncio logs an orbax write task that met a full disk when its loop is collected,
    with the traceback, sometimes after the error line; the launcher says it once."""
    checkpoint.Checkpointer(str(tmp_path / "run"))  # installs the filters
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        full = ValueError("RESOURCE_EXHAUSTED: Failed to write 43415 bytes to file 8: "
                          "No space left on device [os_error_code='28']")
        log = logging.getLogger("asyncio")
        log.error("Task exception was never retrieved\nfuture: <Task exception=%r>", full,
                  exc_info=(ValueError, full, None))
        log.error("Task exception was never retrieved\nfuture: <Task exception=%r>",
                  KeyError("other"))
    finally:
        root.removeHandler(handler)
    assert [r.getMessage().split("exception=")[-1] for r in seen] == ["KeyError('other')>"]
