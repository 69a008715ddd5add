"""Where metrics go: ``metrics.jsonl`` (one JSON object per record) and TensorBoard."""

from __future__ import annotations

import json
import math
import os


class MetricWriter:
    """Append records to ``<workdir>/metrics.jsonl`` and TensorBoard event files.

    A record is a dict with ``step`` and ``split`` (train/val/test) and scalar
    fields; TensorBoard tags are ``<split>/<field>``.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled:
            import tensorboardX  # imported lazily: only the writing process needs it
            self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites them identically."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            steps = [(line, _step_of(line)) for line in f]
        kept = [line for line, s in steps if s is not None and s <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_value(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of a workdir's ``metrics.jsonl``, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _step_of(line: str) -> int | None:
    """The step of a record line; None for a blank or torn one (a process killed mid-write)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _json_value(v):
    """Python scalars for strict JSON; a non-finite float (NaN, ±inf) as null.

    So every field keeps one JSON type (a number field is a number or null; README, "What a
    run writes", says what null means for each): ``clip_threshold`` is null when no
    threshold was in force (rule none, zclip's warm-up), a loss or norm when a step of the
    record was not finite.
    """
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
