"""What a benchmark worker hosts: a :class:`Task` timed in windows, and the shared sizes.

Used by bench_workers.py (the JAX and PyTorch contenders) and numpy_rnn.py
(the NumPy contender); it imports neither, so they do not import each other.
"""

from __future__ import annotations

import time

VOCAB, EMBED = 65, 64  # the benchmark's vocabulary and embedding sizes


class Task:
    """Something timed in windows: ``run_units(n)`` does n units of work, finished."""
    unit_size = 1  # characters (or FLOPs) per unit
    units_per_call = 1  # units per run_units call in a window (a GPU: fewer host syncs)

    def run_units(self, n: int):
        raise NotImplementedError

    def window(self, seconds: float) -> dict:
        """Repeat units until ``seconds`` have passed; counts what finished."""
        n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < seconds or n == 0:
            self.run_units(self.units_per_call)
            n += self.units_per_call
        return {"units": n * self.unit_size, "wall": time.perf_counter() - wall0,
                "cpu": time.process_time() - cpu0}


def random_tokens(shape, seed=0):
    """int32 ids in [0, VOCAB) of ``shape``: the benchmark's text (speed ignores content)."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, VOCAB, shape, dtype=np.int32)
