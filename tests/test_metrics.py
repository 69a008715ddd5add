"""metrics.jsonl: strict JSON, one type per field in every record of every clipping rule."""

import json
import math
import os
import re

import numpy as np
import pytest

from charrnn import clipping, metrics, train
from conftest import REPO


def _strict(line: str) -> dict:
    """json.loads that refuses NaN, Infinity and -Infinity (not JSON)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def records_by_rule(tmp_path_factory):
    """{rule: records} of a tiny run per registered rule (zclip's warm-up ends mid-run)."""
    from conftest import _SPEECH
    from experiments.configs import default
    root = tmp_path_factory.mktemp("rules")
    (root / "corpus.txt").write_text(_SPEECH * 15)
    out = {}
    for rule in clipping.RULES:
        config = default.get_config("smoke")
        config.data.path = str(root / "corpus.txt")
        config.model.cell, config.model.hidden_size = "rnn", 8
        config.train.num_steps, config.train.log_every = 4, 2
        config.train.eval_every = config.train.checkpoint_every = 4
        config.train.eval_batch_size = 8
        config.optim.clip_mode, config.optim.zclip_warmup = rule, 2
        config.optim.ema_decay = 0.9 if rule == "global_norm" else 0.0  # ema_loss fields too
        workdir = str(root / rule)
        train.train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            out[rule] = [_strict(line) for line in f]
    return out


def test_every_field_has_one_json_type_in_every_record_of_every_rule(records_by_rule):
    types = {}
    for records in records_by_rule.values():
        for record in records:
            for key, value in record.items():
                types.setdefault(key, set()).add(type(value))
    mixed = {k: t for k, t in types.items() if len(t - {type(None)}) != 1}
    assert not mixed, mixed  # a number field is a number (int or float, not both) or null
    assert types["step"] == {int} and types["split"] == {str} and types["loss"] == {float}
    # null only where README says: no threshold in force (rule none, zclip's warm-up).
    nulls = {(rule, k) for rule, records in records_by_rule.items() for r in records
             for k, v in r.items() if v is None}
    assert nulls == {("none", "clip_threshold"), ("zclip", "clip_threshold")}
    zclip = [r["clip_threshold"] for r in records_by_rule["zclip"] if r["split"] == "train"]
    assert zclip[0] is None and isinstance(zclip[-1], float)  # warm-up (2 steps), then a level


def test_every_field_is_in_the_readme_table(records_by_rule):
    """The README's row for metrics.jsonl names every field a run writes."""
    with open(os.path.join(REPO, "README.md")) as f:
        (row,) = [line for line in f if line.startswith("| `metrics.jsonl` |")]
    documented = set(re.findall(r"`([a-z_]+(?:/<layer>)?)`", row))
    fields = {re.sub(r"/\d+$", "/<layer>", k) for records in records_by_rule.values()
              for r in records for k in r}
    assert fields <= documented, fields - documented


def test_nonfinite_values_are_written_as_null(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write({"step": 1, "split": "train", "loss": np.float32("nan"), "bpc": math.inf,
                  "grad_norm": np.float32(2.5), "nonfinite_steps": np.int64(1)})
    writer.close()
    with open(tmp_path / "metrics.jsonl") as f:
        (record,) = [_strict(line) for line in f]
    assert record == {"step": 1, "split": "train", "loss": None, "bpc": None,
                      "grad_norm": 2.5, "nonfinite_steps": 1}
