"""What every experiment script's ``main(argv)`` checks first."""

from absl import app, logging


def start(argv, outdir: str) -> None:
    """No positional arguments, ``--outdir`` given; absl logging down to warnings."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not outdir:
        raise app.UsageError("--outdir is required")
    logging.set_verbosity(logging.WARNING)
