"""charrnn's command line: train, evaluate or sample a character-level RNN.

    python launch.py --workdir=DIR [--config=experiments/configs/default.py[:ARG]] [--config.FIELD=V]
    python launch.py --mode=eval --workdir=DIR
    python launch.py --mode=sample --workdir=DIR --prompt="The cat " --length=500 \
        [--temperature=0.8 --top_k=0 --top_p=1.0 --num_samples=1 --seed=0 --output=FILE]

Errors in the input are printed as one line on stderr with a non-zero exit.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train", "eval", "sample")

try:  # ml_collections applies the --config.FIELD overrides to the default config right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", "experiments/configs/default.py",
        "Training configuration file (get_config(arg)).", lock_config=True)
    _CONFIG_ERROR = None
except (AttributeError, KeyError) as _error:  # an unknown field: reported by run()
    _CONFIG, _CONFIG_ERROR = None, _error
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
_MODE = flags.DEFINE_string("mode", "train", f"One of {MODES}.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "--mode=train: move the workdir's previous run (checkpoints, metrics, "
    "config.json, tensorboard) into <workdir>/previous-<time>/ and start again from step 0.")

# Several processes (JAX's multi-controller runtime); README "Many devices and hosts".
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0 … num_processes-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process run described by the environment (TPU VM / pod slice, "
    "Slurm, Open MPI): jax.distributed.initialize() with no arguments.")

# --mode=sample only.
_PROMPT = flags.DEFINE_string("prompt", "", "Text that primes the hidden state; empty: see README.")
_LENGTH = flags.DEFINE_integer("length", 500, "Characters to generate after the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy argmax.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest characters; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples, generated as one batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling key; same seed, same text.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the samples to this file.")


def main(argv):
    if len(argv) > 1:
        raise _usage(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MODE.value not in MODES:
        raise _usage(f"unknown --mode={_MODE.value!r}; choose from {', '.join(MODES)}")
    if not _WORKDIR.value:
        raise _usage("--workdir is required")
    if _FRESH.value and _MODE.value != "train":
        raise _usage("--fresh starts a training run again; it means nothing with "
                     f"--mode={_MODE.value}")
    config = _checked_config() if _MODE.value == "train" else None

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _join_processes()
    from charrnn import train  # imported after flag parsing: a bad flag fails fast
    if _MODE.value == "train":
        train.train_and_evaluate(config, _WORKDIR.value, fresh=_FRESH.value)
    elif _MODE.value == "eval":
        train.evaluate_workdir(_WORKDIR.value)
    elif _MODE.value == "sample":
        _sample()


def _sample():
    """Print the samples (each begins with its prompt); --output also writes them."""
    from charrnn import sampling
    texts = sampling.sample(
        _WORKDIR.value, prompt=_PROMPT.value, length=_LENGTH.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
    text = sampling.format_samples(texts)
    if _OUTPUT.value:
        try:
            with open(_OUTPUT.value, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise _usage(f"cannot write --output={_OUTPUT.value}: {e.strerror or e}") from None
    sys.stdout.write(text)


def _join_processes():
    """jax.distributed.initialize when asked to; then only process 0 prints progress."""
    from charrnn import parallel
    if parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_DISTRIBUTED.value):
        import jax
        if jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")  # errors still reach stderr


def _usage(message):
    from charrnn.errors import UserError
    return UserError(message)


def _checked_config():
    """The --config value, validated (charrnn.config) before JAX is even imported."""
    from charrnn import config as config_lib
    try:
        config = _CONFIG.value
        config_lib.validate(config)
    except OSError as e:  # ml_collections raises a load failure of the file on first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        raise _usage(f"cannot load --config={path}: {lines[-1]}") from None
    return config


def _parse_flags(argv):
    """absl's flag parsing; its errors, and ml_collections', as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A --config file that raised embeds its traceback: keep the first and last lines.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise _usage(" ".join(lines[:1] + lines[1:][-1:])) from None
    except (AttributeError, KeyError) as e:  # --config.FIELD names no field of the config
        raise _unknown_field(e, argv) from None


def _unknown_field(error, argv):
    """One line naming the --config.FIELD override whose field does not exist."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError)
        error = error.args[0]
    message = str(error.args[0]) if error.args else ""
    name = message.splitlines()[0].strip("'\"") if message else "?"
    overrides = [arg.split("=", 1)[0][len("--config."):] for arg in argv
                 if arg.startswith("--config.")]
    path = next((p for p in overrides if name in p.split(".")), name)
    hint = re.search(r'Did you mean "([^"]+)"', message)
    suggestion = "see the config file for its fields"
    if hint:
        parts = path.split(".")
        parts[parts.index(name) if name in parts else -1] = hint.group(1)
        suggestion = f"did you mean {'.'.join(parts)}?"
    return _usage(f"unknown config field '{path}' (--config.{path}); {suggestion}")


def run():
    """app.run with user errors turned into one line on stderr and exit status 1."""
    from charrnn.errors import UserError
    try:
        if _CONFIG_ERROR is not None:
            raise _unknown_field(_CONFIG_ERROR, sys.argv)
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training began (then it saves and exits 0)
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
