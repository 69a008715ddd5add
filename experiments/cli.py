"""What the experiment scripts share: ``main(argv)``'s first checks, loading a config file."""

import importlib.util
import os
import platform

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


def config_module(name: str):
    """experiments/configs/<name>.py as a module, loaded by path (a script of the same
    name, e.g. clip_ablation.py, would shadow it on sys.path)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"charrnn_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
