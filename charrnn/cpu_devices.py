"""How many CPU devices a training run splits the host into: ``train.cpu_devices``.

XLA presents a CPU as one device, which steps the whole batch with XLA's
intra-op threads. When the per-step products are small those threads sit
mostly idle, and the data-parallel path over one device per core is faster:
each core steps its share of the batch rows, and only the gradient crosses
between them (averaged before the clip, so the numbers are one device's up
to float rounding). When one layer's recurrent product is large, one device
already keeps every core busy and the split only adds the all-reduce.

``auto`` decides from one layer's W_hh size (H × G·H elements) and the batch,
before JAX creates its CPU client (``XLA_FLAGS`` is read then): one device per
core where W_hh has at most :data:`AUTO_MAX_WHH_ELEMENTS` elements and each
device keeps at least :data:`AUTO_MIN_ROWS` batch rows; one device otherwise.
The threshold sits between the sizes measured faster split and those measured
no faster (docs/design-notes.md, "Two CPU devices for one training run"); the
row floor is a guard for tiny batches, not a measurement. On a GPU or TPU the
flag changes nothing: JAX's default devices are then the accelerators.

Imports no JAX: :mod:`charrnn.cli` calls it before anything touches a device.
"""

from __future__ import annotations

import os

FLAG = "--xla_force_host_platform_device_count"
AUTO_MAX_WHH_ELEMENTS = 512 * 1024
AUTO_MIN_ROWS = 8


def parse(setting) -> int | None:
    """``train.cpu_devices`` as a count; None for ``auto``; ValueError otherwise."""
    if setting == "auto":
        return None
    if isinstance(setting, bool):
        raise ValueError(setting)
    count = int(setting)  # an int, or a string of digits given on the command line
    if count < 1 or str(count) != str(setting).strip():
        raise ValueError(setting)
    return count


def choose(setting, *, hidden_size: int, num_gates: int, batch_size: int,
           cores: int | None = None) -> int:
    """The CPU device count for ``train.cpu_devices`` = ``setting`` ("auto" or n >= 1)."""
    count = parse(setting)
    if count is not None:
        return count
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    if hidden_size * num_gates * hidden_size > AUTO_MAX_WHH_ELEMENTS:
        return 1
    fits = [n for n in range(1, max(cores, 1) + 1)
            if batch_size % n == 0 and batch_size // n >= AUTO_MIN_ROWS]
    return max(fits, default=1)


def apply(count: int, environ=None) -> int:
    """Present the host as ``count`` CPU devices (XLA_FLAGS), unless the user's
    XLA_FLAGS already sets a count: that one wins. Returns the count in force."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    for part in flags.split():
        if part.startswith(FLAG + "="):
            return int(part.split("=", 1)[1])
    if count > 1:
        environ["XLA_FLAGS"] = f"{flags} {FLAG}={count}".strip()
    return count
