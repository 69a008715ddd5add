"""What every experiment script's ``main(argv)`` checks first."""

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
