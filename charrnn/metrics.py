"""Where metrics go: ``metrics.jsonl`` (one JSON object per record) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys


class MetricWriter:
    """Append records to ``<workdir>/metrics.jsonl`` and TensorBoard event files.

    A record is a dict with ``step`` and ``split`` (train/val/test) and scalar
    fields; TensorBoard tags are ``<split>/<field>``. Each process writes its own
    event file (the pid in its name: two launches within one second never share one).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.events = os.path.join(workdir, "tensorboard")
        self.enabled = enabled
        self._tb = None
        self._purge_step = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run rewrites them identically.

        metrics.jsonl is cut in place when the records dropped are its tail (the
        usual case: no disk space needed, no temporary file), else rewritten
        through a temporary file that a failure removes. A line that is no record
        (not JSON, no integer step) is dropped with one warning on stderr, except a
        last line without its newline: a write cut short by a kill.
        TensorBoard's events past ``step`` stay in their files; this process's
        event file begins with a purge marker at ``step + 1`` (tensorboardX
        ``purge_step``), which makes TensorBoard drop every earlier event at or past
        it: one value per step, the resumed run's.
        """
        if not self.enabled:
            return
        self._purge_step = step + 1
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            lines = f.readlines()
        steps = [step_of(line) for line in lines]
        keep = [i for i, s in enumerate(steps) if s is not None and s <= step]
        invalid = [i + 1 for i, (line, s) in enumerate(zip(lines, steps))
                   if s is None and line.strip() and line.endswith(b"\n")]
        if invalid:
            print(f"warning: {self.path}: line{'s' * (len(invalid) > 1)} "
                  f"{', '.join(map(str, invalid[:10]))}{' …' * (len(invalid) > 10)} "
                  f"{'are' if len(invalid) > 1 else 'is'} not a JSON record with a step; dropped",
                  file=sys.stderr, flush=True)
        if keep == list(range(len(keep))):  # a prefix: cut the file there
            if len(keep) < len(lines):
                os.truncate(self.path, sum(len(line) for line in lines[:len(keep)]))
            return
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.writelines(lines[i] for i in keep)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _json_value(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON
        if self._tb is None:  # created here, after truncate_after has set the purge step
            import tensorboardX  # imported lazily: only the writing process needs it
            self._tb = tensorboardX.SummaryWriter(self.events, purge_step=self._purge_step,
                                                  filename_suffix=f".{os.getpid()}")
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


def step_of(line: str | bytes) -> int | None:
    """The step of a record line; None for a blank, torn or foreign one."""
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


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
