"""What the experiment scripts share: ``main(argv)``'s first checks, cores, model flags, JSON output."""

import os

from absl import app, logging


def start(argv, **required) -> None:
    """No positional arguments and every flag in ``required`` (name=value) given;
    absl logging down to warnings."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name, value in required.items():
        if not value:
            raise app.UsageError(f"--{name} is required")
    logging.set_verbosity(logging.WARNING)


def write_json(outdir: str, name: str, result: dict) -> None:
    """Write ``result`` to OUTDIR/NAME (indented JSON) and print it on one line."""
    import json
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, name), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


def chunk_sizes(values: list) -> list:
    """A ``--runs_per_chunk`` list of the sweep benchmarks as integers >= 0 (0 = all runs
    vmapped); else a usage error."""
    try:
        chunks = [int(c) for c in values]
    except ValueError:
        raise app.UsageError("--runs_per_chunk must be integers") from None
    if min(chunks, default=0) < 0:
        raise app.UsageError("--runs_per_chunk must be >= 0")
    return chunks


def apply_variant(config, apply, name: str, config_flag) -> None:
    """Apply the config file's variant ``name`` (``apply(config, name)``) to ``config``, then
    the command line's ``--config.*`` overrides again: a script's ``--smoke`` is the
    variant, and what the command line sets still wins."""
    from ml_collections import config_flags
    apply(config, name)
    for path, value in config_flags.get_override_values(config_flag).items():
        *parents, field = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[field] = value


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def define_model_flags(batch_help: str = "B.") -> dict:
    """The model-size flags the benchmark scripts share: cell (a registered name),
    hidden_size, num_layers, batch_size, seq_len. Returns name -> flag holder."""
    from absl import flags
    from charrnn import cells
    return {
        "cell": flags.DEFINE_enum("cell", "lstm", list(cells.names()), "Recurrent cell."),
        "hidden_size": flags.DEFINE_integer("hidden_size", 128, "H."),
        "num_layers": flags.DEFINE_integer("num_layers", 1, "Stacked layers."),
        "batch_size": flags.DEFINE_integer("batch_size", 32, batch_help),
        "seq_len": flags.DEFINE_integer("seq_len", 128, "T per window."),
    }
