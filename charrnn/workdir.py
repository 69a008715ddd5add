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

import errno
import fcntl
import os
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
    """Write ``text`` beside ``path`` and rename: a kill mid-write leaves the old file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
