"""charrnn's command line: train, evaluate or sample a character-level RNN.

    python launch.py --workdir=DIR [--config=experiments/configs/default.py[:ARG]] [--config.FIELD=V]
    python launch.py --mode=eval --workdir=DIR
    python launch.py --mode=sample --workdir=DIR --prompt="The cat " --length=500

Errors in the input are printed as one line on stderr with a non-zero exit.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "sample")

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/default.py", "Training configuration file (get_config(arg)).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
_MODE = flags.DEFINE_string("mode", "train", f"One of {MODES}.")


def main(argv):
    if len(argv) > 1:
        raise _usage(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MODE.value not in MODES:
        raise _usage(f"unknown --mode={_MODE.value!r}; choose from {', '.join(MODES)}")
    if not _WORKDIR.value:
        raise _usage("--workdir is required")

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from charrnn import train  # imported after flag parsing: a bad flag fails fast
    if _MODE.value == "train":
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == "eval":
        train.evaluate_workdir(_WORKDIR.value)


def _usage(message):
    from charrnn.errors import UserError
    return UserError(message)


def run():
    """app.run with user errors turned into one line on stderr and exit status 1."""
    from charrnn.errors import UserError
    try:
        app.run(main)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
