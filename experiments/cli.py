"""What the experiment scripts share: ``main(argv)``'s first checks, CPU devices and names."""

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


def split_host_into_devices(n: int) -> None:
    """Have XLA present this host's CPU as ``n`` devices (one per core, for n = cores).

    Call it before jax first touches a device. A device count the user's
    XLA_FLAGS already sets wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
