"""The training workdir: one writer at a time, and setting a previous run aside.

One writer per workdir. Two training processes on one workdir would
interleave checkpoints and metrics. :class:`WorkdirLock` takes an exclusive
``fcntl.flock`` on ``<workdir>/.lock`` and writes ``<pid> <hostname>`` into
it, so a second process can say who holds the workdir. The kernel drops a
flock when its process dies, however it dies (SIGKILL, OOM killer, a crash),
so a lock left by a dead process never blocks: the file may remain, but
nobody holds its lock. Reading (``--mode=eval``/``sample``) takes no lock.

On NFS, Linux emulates flock with POSIX byte-range locks, which work across
clients; a filesystem with no locking at all gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time

from charrnn.errors import UserError

LOCK_NAME = ".lock"
# What a run writes into its workdir; --fresh moves these aside, together.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "launches.jsonl")
RUN_DIRS = ("checkpoints", "tensorboard")  # the others are files


class WorkdirError(UserError):
    """The workdir cannot be used: busy, not writable, not a directory."""


def ensure_writable(workdir: str) -> None:
    """Create ``workdir`` (and parents) or explain in one line why it cannot be used."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise WorkdirError(f"workdir {workdir} exists and is not a directory") from None
    except OSError as e:
        raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable")


def check_run_files(workdir: str) -> None:
    """Refuse in one line a run file of the wrong kind, before training writes anything.

    Each of :data:`RUN_FILES` that exists must be what a run writes there (a
    directory for :data:`RUN_DIRS`, else a regular file; a link to one is fine);
    in ``checkpoints/`` a name that is a step number must be a directory: a save
    at that step would otherwise delete what someone else put there.
    """
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if not os.path.lexists(path):
            continue
        if not os.path.exists(path):
            raise WorkdirError(f"{path} is a broken symbolic link (to {os.readlink(path)}); "
                               "restore its target, or --fresh to set the run aside")
        kind = "directory" if name in RUN_DIRS else "regular file"
        if os.path.isdir(path) != (name in RUN_DIRS) or not (
                os.path.isdir(path) or os.path.isfile(path)):
            raise WorkdirError(f"{path} is not a {kind}; move it away, or --fresh to set the "
                               "run aside")
    checkpoints = os.path.join(workdir, "checkpoints")
    for entry in sorted(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else []:
        path = os.path.join(checkpoints, entry)
        if entry.isdigit() and not os.path.isdir(path):
            raise WorkdirError(f"{path} is not a checkpoint (those are directories) and a save "
                               f"at step {int(entry)} would delete it; move it out of "
                               f"{checkpoints}")


class WorkdirLock:
    """Exclusive lock on a workdir for this process; use as a context manager."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        ensure_writable(os.path.dirname(self.path))
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WorkdirError(f"cannot create the lock file {self.path}: "
                                   f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirError(
                    f"workdir {os.path.dirname(self.path)} is in use by {holder} (lock "
                    f"{self.path}); wait for that run to finish, stop it, or use another "
                    "--workdir") from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"warning: the filesystem of {self.path} has no file locks; "
                      "nothing stops a second run on this workdir", flush=True)
                return
            # The previous holder unlinks the file on release: if it did so between our
            # open and our flock, we hold a lock on a deleted file. Start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Unlink the lock file, then drop the lock (in this order: see acquire)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


def _read_holder(fd: int) -> str:
    """'process <pid> on host <name>' from a lock file, as far as it can be read."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid, host = os.read(fd, 256).decode(errors="replace").split()[:2]
        return f"process {pid} on host {host}"
    except (OSError, ValueError):
        return "another process"


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` beside ``path`` and rename: a kill mid-write leaves the old file,
    a failed write (a full disk) leaves the old file and no temporary one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# How a full disk reads once orbax and tensorstore have wrapped it (a ValueError whose
# text ends "No space left on device [os_error_code='28']"), and as an OSError.
DISK_FULL = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT))


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_is_an_error(workdir: str):
    """Turn a full disk (or quota) met while writing ``workdir`` into one line saying the
    space at hand, the size of a checkpoint, and that running again resumes."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise WorkdirError(_disk_full_message(workdir)) from None


def _disk_full_message(workdir: str) -> str:
    checkpoints = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit()) if os.path.isdir(
        checkpoints) else []
    free = shutil.disk_usage(workdir).free
    message = f"no space left on the device of workdir {workdir} ({_mb(free)} free"
    if not steps:
        return message + "); free some space and run the same command again"
    size = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(os.path.join(checkpoints, str(steps[-1])))
               for f in files)
    return (message + f"; a checkpoint takes {_mb(size)}); free some space and run the same "
            f"command again: it resumes from step {steps[-1]}, the last complete checkpoint")


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def set_aside_previous_run(workdir: str) -> str | None:
    """Move the files of a previous run into ``<workdir>/previous-<time>/``; nothing is deleted.

    Returns the new directory, or None when there was nothing to move.
    Call it while holding the workdir's lock.
    """
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(workdir, name))]
    if not present:
        return None
    base = os.path.join(workdir, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    target, suffix = base, 1
    while os.path.lexists(target):  # two --fresh starts within one second
        target, suffix = f"{base}.{suffix}", suffix + 1
    os.makedirs(target)
    for name in present:
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target
