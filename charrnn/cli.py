"""The command line behind ``launch.py``: its modes, process joining, and errors as one line.

``launch.py`` defines the flags and hands their values here:

    train   (default) train_and_evaluate, resuming from the workdir's latest checkpoint
    eval    val and test loss of a checkpoint
    sample  text from a checkpoint

A :class:`~charrnn.errors.UserError` anywhere (a bad flag, config field, data
file, checkpoint) becomes one line ``error: ...`` on stderr and exit status 1;
absl's and ml_collections' own parse errors are rewritten into the same form
(:func:`run`). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from charrnn import memory
from charrnn import workdir as workdir_lib
from charrnn.errors import UserError

MODES = ("train", "eval", "sample")


@dataclasses.dataclass(frozen=True)
class Options:
    """The values of launch.py's flags (one field per flag, same name; see launch.py)."""
    mode: str = "train"
    workdir: str | None = None
    fresh: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: bool = False
    prompt: str = ""
    length: int = 500
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    output: str | None = None
    init_from: str | None = None
    init_step: int | None = None
    step: int | None = None
    weights: str = "auto"
    changed_text: bool = False

    @classmethod
    def from_flags(cls, flag_values=flags.FLAGS) -> "Options":
        return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})


def define_config(default_path: str, help_string: str):
    """``--config`` (a ``get_config(arg)`` file, ``--config.FIELD=V`` overrides).

    Returns (the flag holder, or None; the error of an unknown ``--config.FIELD``,
    or None): ml_collections applies the overrides while the flag is defined, so
    a misspelt field raises here, before absl has parsed anything; :func:`run`
    reports it.
    """
    try:
        return config_flags.DEFINE_config_file("config", default_path, help_string,
                                               lock_config=True), None
    except (AttributeError, KeyError) as error:
        return None, error


def run(main, config_error=None) -> None:
    """``app.run(main)`` with user errors turned into one line on stderr and exit status 1."""
    try:
        if config_error is not None:
            raise _unknown_field(config_error, sys.argv)
        app.run(main, flags_parser=_parse_flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training began (then it saves and exits 0)
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str], options: Options, config_flag, launcher: str) -> None:
    """One launch: check the flags, join the processes, run the mode.

    ``config_flag``: the ``--config`` holder (read only for training, so that eval
    and sample never load a config file); ``launcher``: the path of launch.py, for
    the commands printed at the end of a training run.
    """
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if options.mode not in MODES:
        raise UserError(f"unknown --mode={options.mode!r}; choose from {', '.join(MODES)}")
    if not options.workdir:
        raise UserError("--workdir is required")
    if options.fresh and options.mode != "train":
        raise UserError("--fresh starts a training run again; it means nothing with "
                        f"--mode={options.mode}")
    if options.init_from is not None and options.mode != "train":
        raise UserError(f"--init_from starts a training run; it means nothing with "
                        f"--mode={options.mode} (--step=N picks a checkpoint)")
    if options.init_step is not None and options.init_from is None:
        raise UserError("--init_step=N picks the checkpoint of --init_from=WORKDIR; pass both")
    if options.step is not None and options.mode == "train":
        raise UserError("--step=N picks the checkpoint to evaluate or sample; training resumes "
                        "from the latest (--init_from=WORKDIR --init_step=N starts from another)")
    if options.weights != "auto" and options.mode == "train":
        raise UserError(f"--weights={options.weights} picks the weights to evaluate or sample; "
                        "training keeps both (optim.ema_decay > 0 adds the averaged ones)")
    if options.changed_text and options.mode != "eval":
        raise UserError("--changed_text lets --mode=eval read a changed text; it means nothing "
                        f"with --mode={options.mode}")
    config = _checked_config(config_flag) if options.mode == "train" else None
    if config is not None and not (options.distributed or options.coordinator_address):
        _split_cpu(config)

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _join_processes(options)
    if options.mode == "train":
        from charrnn import runinfo, train  # imported after flag parsing: a bad flag fails fast
        flag = flags.FLAGS[config_flag.name]
        launch = {"config_arg": flag.config_filename if flag.present else None,
                  "argv": list(sys.argv)}
        with workdir_lib.disk_full_is_an_error(options.workdir), \
                memory.out_of_memory_is_an_error(memory.train_sizes(config)):
            train.train_and_evaluate(config, options.workdir, fresh=options.fresh,
                                     launch=launch, init_from=options.init_from,
                                     init_step=options.init_step)
        print(runinfo.next_commands(options.workdir, launcher), flush=True)
    elif options.mode == "eval":
        from charrnn import restore
        restore.evaluate_workdir(options.workdir, options.step, options.weights,
                                 changed_text=options.changed_text)
    else:
        _sample(options)


def _sample(options: Options) -> None:
    """Print the samples (each begins with its prompt); --output also writes them."""
    from charrnn import restore, sampling
    sampling.check_options(length=options.length, temperature=options.temperature,
                           top_k=options.top_k, top_p=options.top_p,
                           num_samples=options.num_samples)
    _, vocab, model, params, _ = restore.load_checkpoint(options.workdir, options.step,
                                                         options.weights)
    sizes = f"--length={options.length} --num_samples={options.num_samples}"
    memory.check_fits(memory.sample_bytes(options.length, options.num_samples),
                      f"sampling {sizes}", "ask for fewer characters or samples")
    with memory.out_of_memory_is_an_error(sizes):
        texts = sampling.sample(
            params, vocab, model, prompt=options.prompt, length=options.length,
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
            num_samples=options.num_samples, seed=options.seed)
    text = sampling.format_samples(texts)
    if options.output:
        try:
            with open(options.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise UserError(f"cannot write --output={options.output}: {e.strerror or e}") from None
    sys.stdout.write(text)


def _split_cpu(config) -> None:
    """``train.cpu_devices``: present the host as that many CPU devices (charrnn.cpu_devices).

    Runs before JAX creates a device; a multi-process run keeps its own layout.
    """
    from charrnn import cells, cpu_devices
    from charrnn import config as config_lib
    count = cpu_devices.choose(
        config_lib.upgrade(config).train.cpu_devices, hidden_size=config.model.hidden_size,
        num_gates=cells.get(config.model.cell).num_gates, batch_size=config.train.batch_size)
    cpu_devices.apply(count)


def _join_processes(options: Options) -> None:
    """jax.distributed.initialize when asked to; then only process 0 prints progress."""
    from charrnn import parallel
    if parallel.initialize(options.coordinator_address, options.num_processes,
                           options.process_id, auto=options.distributed):
        import jax
        if jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")  # errors still reach stderr


def _checked_config(config_flag):
    """The --config value, validated (charrnn.config) before JAX is even imported."""
    from charrnn import config as config_lib
    try:
        config = config_flag.value
        config_lib.validate(config)
    except OSError as e:  # ml_collections raises a load failure of the file on first use
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        path = config_flags.get_config_filename(flags.FLAGS[config_flag.name])
        raise UserError(f"cannot load --config={path}: {lines[-1]}") from None
    return config


def _parse_flags(argv):
    """absl's flag parsing; its errors, and ml_collections', as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A --config file that raised embeds its traceback: keep the first and last lines.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(" ".join(lines[:1] + lines[1:][-1:])) from None
    except Exception as e:
        file_error = _config_file_error(e, argv)
        if file_error is not None:
            raise file_error from None
        if isinstance(e, (AttributeError, KeyError)):  # --config.FIELD names no field
            raise _unknown_field(e, argv) from None
        raise


def _config_file_error(error, argv) -> UserError | None:
    """One line for a --config file that raised while it ran (or has no get_config):
    the exception and its line in the file; None when the error is not the file's."""
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if value is None:
        return None
    path = os.path.abspath(value.split(":", 1)[0])
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(f.filename) == path]
    if isinstance(error, SyntaxError) and error.filename and os.path.abspath(
            error.filename) == path:
        lines.append(error.lineno)
    elif not lines and "get_config" not in str(error):
        return None
    message = (str(error.msg if isinstance(error, SyntaxError) else error).strip().splitlines()
               or [""])[0]
    if not lines:  # ml_collections looked for get_config in the module and found none
        return UserError(f"cannot run --config={value}: it defines no get_config()")
    where = f" (line {lines[-1]})" if lines[-1] else ""
    hint = "" if path.endswith(".py") else "; a config file is Python that defines get_config()"
    return UserError(f"cannot run --config={value}: {type(error).__name__}: {message}{where}{hint}")


def _unknown_field(error, argv) -> UserError:
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
    return UserError(f"unknown config field '{path}' (--config.{path}); {suggestion}")
