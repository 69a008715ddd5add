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

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from charrnn.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the run."""


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


class Checkpointer:
    """Save and restore (state, meta) pairs in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, create: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not create and not os.path.isdir(self.directory):
            self._manager = None
            return
        options = ocp.CheckpointManagerOptions(
            create=create,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return None if self._manager is None else self._manager.latest_step()

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
        except Exception as e:  # a damaged file: orbax, tensorstore and json raise many kinds
            raise self._unreadable(step, e) from None
        return step, restored["meta"]

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
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return CheckpointError(
            f"cannot restore checkpoint {step} in {self.directory} ({first_line}); it is "
            f"damaged or does not fit this config: move {os.path.join(self.directory, str(step))} "
            "aside to resume from the checkpoint before it, or start over with --fresh")

    def _require_step(self, step):
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train one first "
                                  "(--mode=train with this --workdir)")
        return step

    def wait(self) -> None:
        """Block until every asynchronous save has been committed to disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
