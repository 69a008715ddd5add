"""Where a run came from, read from its workdir: its launches and the config variant it is.

``<workdir>/launches.jsonl`` holds one JSON object per launch of the training
loop (written by charrnn when the launch starts)::

    {"start_step": int, "started": ISO-8601 UTC, "config_arg": "experiments/configs/default.py:V" | null,
     "argv": [...], "hardware": {"host", "cpu", "cpu_count", "platform", "device_count", "device_kind"},
     "software": {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "charrnn_commit"}}

Every key may be missing (a record from an older writer); a line that is not a
JSON object is skipped.

A run *is* a variant V of experiments/configs/default.py when its config.json
equals ``default.get_config(V)`` in every field the launches did not set on
the command line (``--config.FIELD=VALUE``); the fields they set are the run's
overrides, shown with the values config.json holds. A run that matches no
current variant is refused (:class:`ProvenanceError`), naming the closest
variant and the fields that differ: the page lists only runs that today's
configs (plus the recorded overrides) reproduce.
"""

from __future__ import annotations

import json
import os

from experiments.configs import default

DEFAULT_CONFIG = "experiments/configs/default.py"


class ProvenanceError(Exception):
    """A workdir's records do not say which current config produced it."""


def read_launches(workdir: str) -> list[dict]:
    """The launch records of ``workdir`` in order ([] when it has none)."""
    path = os.path.join(workdir, "launches.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(record, dict):
                out.append(record)
    return out


def overridden_fields(argv) -> set[str]:
    """Dotted config fields set on a command line: ``--config.a.b=v``, ``--config.a.b v``,
    ``--noconfig.a.b`` (absl's boolean false)."""
    fields = set()
    for arg in argv or ():
        if not isinstance(arg, str):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("noconfig."):
            name = name[2:]
        if arg.startswith("-") and name.startswith("config."):
            fields.add(name[len("config."):])
    return fields


def flatten(tree, prefix: str = "") -> dict:
    """{"a.b": leaf} of nested dicts; tuples become lists, as in JSON."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.loads(json.dumps(tree))}


def _named_variants(launches) -> list:
    """Variants of default.py to try: those the launches named (latest first), then all."""
    named = []
    for launch in reversed(launches):
        arg = launch.get("config_arg")
        if isinstance(arg, str) and arg.split(":", 1)[0].endswith("configs/default.py"):
            named.append(arg.split(":", 1)[1] if ":" in arg else None)
    order = named + [None] + list(default.variant_names())
    return list(dict.fromkeys(v for v in order if v is None or v in default.variant_names()))


def match_variant(config: dict, launches: list[dict]) -> dict:
    """{"variant": name or None, "overrides": {field: value}} of the run config ``config``.

    Raises :class:`ProvenanceError` when every variant differs in a field no launch set.
    """
    run = flatten(config)
    set_fields = set().union(*(overridden_fields(l.get("argv")) for l in launches))
    closest = None
    for variant in _named_variants(launches):
        want = flatten(default.get_config(variant).to_dict())
        differ = sorted(k for k in set(run) | set(want)
                        if k not in set_fields and run.get(k, "<missing>") != want.get(k, "<missing>"))
        if not differ:
            return {"variant": variant,
                    "overrides": {k: run[k] for k in sorted(set_fields) if k in run}}
        if closest is None or len(differ) < len(closest[1]):
            closest = (variant, differ, want)
    variant, differ, want = closest
    shown = "; ".join(f"{k}: {run.get(k, '<missing>')!r} in the run, "
                      f"{want.get(k, '<missing>')!r} in the variant" for k in differ[:4])
    more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
    recorded = "" if launches else " (no launches.jsonl: command-line overrides unknown)"
    raise ProvenanceError(
        f"its config.json matches no current variant of {DEFAULT_CONFIG}{recorded}; closest "
        f"{variant_label(variant)}, which differs in {shown}{more}")


def variant_label(variant) -> str:
    """The ``--config`` value that selects ``variant`` (None: the default itself)."""
    return f"{DEFAULT_CONFIG}:{variant}" if variant else DEFAULT_CONFIG


def launch_line(launch: dict) -> str:
    """One launch as text: start step and time, hardware, software (``?``: not recorded)."""
    hw, sw = launch.get("hardware") or {}, launch.get("software") or {}
    devices = (f"{hw.get('device_count', '?')} × {hw.get('device_kind', '?')} "
               f"({hw.get('platform', '?')})")
    versions = ", ".join(f"{k} {sw[k]}" for k in ("python", "jax", "jaxlib", "flax", "optax",
                                                  "orbax-checkpoint") if sw.get(k))
    commit = sw.get("charrnn_commit") or "unknown"
    return (f"from step {launch.get('start_step', '?')} ({launch.get('started', '?')}): "
            f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPUs, {devices}; "
            f"{versions or 'versions not recorded'}; charrnn commit {commit}")
