"""Memory: what a launch needs, checked before anything is compiled, and running out.

Asked for sizes far beyond the machine (``model.hidden_size=100000``,
``--length=10**12``), XLA fails deep in compilation or allocation with a long
traceback, or the kernel kills the process with no message at all. The
estimates here are lower bounds of the arrays a launch must hold at once; a
launch whose bound exceeds the memory available is refused in one line before
it starts, and an allocator failure that still happens is one line naming the
sizes (:func:`out_of_memory_is_an_error`).
"""

from __future__ import annotations

import contextlib
import os

from charrnn.errors import UserError

F32 = 4  # bytes
# Bytes per sampled character and sample: ids on the device (int32) and on the host,
# the decoded text and its printed copy; 28 bytes per character were measured for one
# sample of 10^7 characters (peak RSS), 8 of them the per-step keys of the scan.
SAMPLE_BYTES_PER_CHAR, KEY_BYTES = 20, 8


class OutOfMemoryError(UserError):
    """What was asked does not fit in memory."""


def train_bytes(config, vocab_size: int) -> int:
    """At least the bytes training holds: parameters, gradients, optimizer state and
    averaged weights, float32 (activations not counted, so this is a lower bound).

    Parameters: embedding V·E, output H·V + V, and per layer G·H·(in + H + 1) with
    in = E for the first layer and H above it (G: the cell's gates).
    """
    from charrnn import cells
    from charrnn import config as config_lib
    config = config_lib.upgrade(config)
    m = config.model
    hidden, layers, embed = int(m.hidden_size), int(m.num_layers), int(m.embed_dim)
    gates = cells.get(m.cell).num_gates
    params = (vocab_size * embed + hidden * vocab_size + vocab_size
              + gates * hidden * (embed + hidden + 1)
              + (layers - 1) * gates * hidden * (2 * hidden + 1))
    optim = config.optim
    slots = {"adam": 2, "adamw": 2}.get(optim.name, 1 if optim.momentum else 0)
    copies = 2 + slots + (1 if optim.ema_decay else 0)  # params, grads, slots, ema
    return F32 * params * copies


def train_sizes(config) -> str:
    """The config fields that size training, as ``field=value, ...``."""
    m, t = config.model, config.train
    return (f"model.cell={m.cell}, model.hidden_size={m.hidden_size}, model.num_layers="
            f"{m.num_layers}, model.embed_dim={m.embed_dim}, train.batch_size={t.batch_size}, "
            f"train.seq_len={t.seq_len}")


def check_training_fits(config, vocab_size: int) -> None:
    """Refuse a model whose parameters and optimizer state alone exceed the memory."""
    check_fits(train_bytes(config, vocab_size),
               f"training with {train_sizes(config)} (parameters, gradients and optimizer "
               "state)", "use a smaller model.hidden_size or model.num_layers")


def sample_bytes(length: int, num_samples: int) -> int:
    """About the bytes sampling ``num_samples`` texts of ``length`` characters holds."""
    return length * (KEY_BYTES + SAMPLE_BYTES_PER_CHAR * num_samples)


def available_bytes() -> int | None:
    """Memory for arrays: the accelerator's limit, or on CPU the host's available memory
    (Linux MemAvailable; None where neither can be read)."""
    import jax
    device = jax.devices()[0]
    if device.platform != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # a backend that keeps no statistics: nothing to check against
            return None
        return int(limit) if limit else None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_fits(needed: int, what: str, remedy: str) -> None:
    """Refuse ``what`` (e.g. "training model.hidden_size=...") when it needs more than is
    available."""
    available = available_bytes()
    if available is not None and needed > available:
        raise OutOfMemoryError(f"{what} needs at least {_gb(needed)} but {_gb(available)} "
                               f"{'is' if available < 2e9 else 'are'} available; {remedy}")


@contextlib.contextmanager
def out_of_memory_is_an_error(sizes: str):
    """An allocator failure (XLA's RESOURCE_EXHAUSTED, Python's MemoryError) as one line
    naming ``sizes``; a full disk (also RESOURCE_EXHAUSTED, from tensorstore) passes."""
    from charrnn.workdir import is_disk_full
    try:
        yield
    except Exception as e:
        text = str(e)
        if is_disk_full(e) or not (isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text):
            raise
        first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise OutOfMemoryError(f"out of memory with {sizes} ({first}); use smaller "
                               "sizes") from None


def _gb(size: int) -> str:
    return f"{size / 1e9:,.1f} GB"
