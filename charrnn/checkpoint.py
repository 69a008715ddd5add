"""Checkpoints: an orbax CheckpointManager holding the train state and its metadata.

Each step directory under ``<workdir>/checkpoints/`` has two items:

- ``state``: the TrainState pytree (params, optimizer state, step, RNG key
  data, carried hidden state, non-finite counters), saved with orbax's
  StandardSave (tensorstore arrays, no pickle);
- ``meta``: JSON with the vocabulary, the resolved config and the batcher
  position.

orbax writes into a temporary directory and renames it when the save is
complete, so a save interrupted by a crash is never listed as a step and never
loaded. Saves are asynchronous: :meth:`Checkpointer.wait` (or ``close``) must
run before the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from charrnn.errors import UserError
from charrnn.workdir import DISK_FULL, is_disk_full


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the run."""


class CheckpointGone(CheckpointError):
    """A checkpoint removed while it was read: a training run rotating its checkpoints."""


def encode_step_metrics(step_metrics: list[dict]) -> dict:
    """Per-step host metrics (dicts of 0-d arrays) as JSON, dtypes kept.

    The train step's metrics since the last train record go into the checkpoint,
    so a run resumed from it writes the same record an uninterrupted run would.
    float32 -> Python float -> JSON -> float32 is exact (NaN and inf included).
    """
    if not step_metrics:
        return {"dtypes": {}, "steps": []}
    dtypes = {k: str(np.asarray(v).dtype) for k, v in step_metrics[0].items()}
    return {"dtypes": dtypes,
            "steps": [{k: np.asarray(v).tolist() for k, v in m.items()} for m in step_metrics]}


def decode_step_metrics(encoded: dict | None) -> list[dict]:
    """Inverse of :func:`encode_step_metrics`; None (an older checkpoint) gives []."""
    if not encoded:
        return []
    dtypes = encoded["dtypes"]
    return [{k: np.asarray(v, dtype=dtypes[k]) for k, v in m.items()} for m in encoded["steps"]]


def _quiet_closed_loop_callbacks() -> None:
    """Drop the reports of tensorstore reads that finish after a failed restore.

    When one array of a checkpoint cannot be read, orbax's restore raises and
    closes its asyncio event loop while tensorstore still completes the other
    reads; each completion callback then raises RuntimeError('Event loop is
    closed'), which Python prints on stderr as an unraisable exception, dozens
    of tracebacks around the one-line error (even before it: they race it). The
    same goes for orbax's read coroutines left behind by a read that failed (a
    checkpoint removed under it). They say nothing that error does not, so this
    hook drops exactly those and passes anything else on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "charrnn_quiet", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                or code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
            previous(unraisable)
    hook.charrnn_quiet = True
    sys.unraisablehook = hook


class _DamagedMetadataFilter(logging.Filter):
    """Drops orbax's log records of a checkpoint metadata file it cannot read.

    orbax logs them (file content included: a damaged file prints its bytes; a
    missing one when a checkpoint is rotated away while read) and carries on
    without that optional file; when the checkpoint itself cannot be read,
    :meth:`Checkpointer._unreadable` says so in one line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith(("Failed to read Metadata file",
                                                "Failed to json parse Metadata file",
                                                "Metadata file does not exist"))
                    and "orbax" in record.pathname)


class _DiskFullFilter(logging.Filter):
    """Drops the log records (tracebacks included) of a save that met a full disk.

    orbax's background threads log each failure, hundreds of lines, and asyncio
    logs the write tasks whose failure nobody awaited ("Task exception was never
    retrieved", when their loop is collected, sometimes after the error line);
    the error reaches the main thread at the next save or wait, where the
    launcher says it in one line (:func:`charrnn.workdir.disk_full_is_an_error`).
    Installed on the ``absl`` and the ``asyncio`` loggers: a filter sees only
    the records logged to its own logger, not those propagated to it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (("orbax" in record.pathname or record.name == "asyncio") and (
            is_disk_full(error) or any(text in record.getMessage() for text in DISK_FULL)))


def _steps_on_disk(directory: str) -> list[int]:
    """The complete checkpoints now in ``directory`` (orbax names them by the step alone)."""
    try:
        return sorted(int(d) for d in os.listdir(directory)
                      if d.isdigit() and os.path.isdir(os.path.join(directory, d)))
    except OSError:
        return []


def _removed(path: str, newer: bool, wait_s: float = 1.0) -> bool:
    """Whether ``path`` is gone, or (``newer``: a newer checkpoint exists) goes within ``wait_s``."""
    deadline = time.monotonic() + (wait_s if newer else 0.0)
    while os.path.isdir(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class Checkpointer:
    """Save and restore (state, meta) pairs in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, create: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        _quiet_closed_loop_callbacks()  # before any read that might fail
        for name, kind in (("absl", _DamagedMetadataFilter), ("absl", _DiskFullFilter),
                           ("asyncio", _DiskFullFilter)):
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())
        self.created = create and not os.path.lexists(self.directory)
        if not create and not os.path.isdir(self.directory):
            self._manager = None
            return
        options = ocp.CheckpointManagerOptions(
            create=create,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def remove_if_unused(self) -> None:
        """Remove the directory this Checkpointer created while it is still empty: a
        launch that fails before its first save leaves no empty ``checkpoints/``."""
        if self.created:
            with contextlib.suppress(OSError):  # not empty: something was saved
                os.rmdir(self.directory)

    def latest_step(self) -> int | None:
        return None if self._manager is None else self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return [] if self._manager is None else sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Start an asynchronous save of ``state`` and ``meta`` at ``step``."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of ``step`` (default: the latest complete checkpoint)."""
        step = self._require_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
            meta = restored["meta"]
        except Exception as e:  # a damaged file: orbax, tensorstore and json raise many kinds
            raise self._unreadable(step, e) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise self._unreadable(step, ValueError("its metadata is not a JSON object"))
        return step, meta

    def restore_state(self, step: int, like):
        """The state saved at ``step``, restored into the structure and shapes of ``like``.

        ``like`` is a state (or abstract state) built from the current config;
        arrays come back on the devices/shardings of ``like``.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
        except Exception as e:  # shape or tree-structure mismatch, or a damaged file
            raise self._unreadable(step, e) from None
        return restored["state"]

    def _unreadable(self, step, error) -> CheckpointError:
        """One line: which checkpoint, why, and the earlier ones that remain.

        A checkpoint that a newer one has replaced while it was read (a running
        training run keeps only the latest ``train.keep_checkpoints``) is not
        damaged: :class:`CheckpointGone`. Its directory may still be on its way out
        when the read fails: given up to a second to go.
        """
        where = os.path.join(self.directory, str(step))
        if _removed(where, newer=any(s > step for s in _steps_on_disk(self.directory))):
            return CheckpointGone(
                f"checkpoint {step} in {self.directory} was removed while it was read (a "
                "training run writing this workdir keeps only its latest "
                "train.keep_checkpoints); read a newer one (omit --step, or pass one of "
                f"{', '.join(map(str, _steps_on_disk(self.directory))) or 'none yet'})")
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        first_line = first_line.split(" See full TensorStore details")[0]  # a repr follows
        if len(first_line) > 200:
            first_line = first_line[:200] + "…"
        earlier = [s for s in self.all_steps() if s < step]
        if earlier:
            remedy = (f"earlier steps present: {', '.join(map(str, earlier))}; move {where} "
                      f"aside to resume from step {earlier[-1]}, or pass --step={earlier[-1]} "
                      "to --mode=eval or --mode=sample")
        else:
            remedy = "no earlier step is present; start over with --fresh"
        return CheckpointError(f"checkpoint {step} in {self.directory} is damaged or does not "
                               f"fit this config ({first_line}); {remedy}")

    def _require_step(self, step):
        if self._manager is None or not self.all_steps():
            raise CheckpointError(f"no checkpoint in {self.directory}; train one first "
                                  "(--mode=train with this --workdir)")
        if step is None:
            return self.latest_step()
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; steps present: "
                f"{', '.join(map(str, self.all_steps()))}")
        return step

    def wait(self) -> None:
        """Block until every asynchronous save has been committed to disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
