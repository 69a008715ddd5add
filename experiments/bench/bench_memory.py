"""Memory of one training step, and time to the first step, each in a fresh process.

Used by experiments/bench/benchmark.py; also runnable alone:

    python experiments/bench/bench_memory.py --first_step_config=:smoke   # JSON line
    python experiments/bench/bench_memory.py --measure='{"cell": "lstm", "hidden": 512, "layers": 2,
        "batch": 32, "seq_len": 1024, "remat": true}'                 # JSON line

:func:`measure` (called in a fresh process per variant) builds the model and
state (charrnn: compiles the step), then trains two steps and reports how far
the resident set grows above where it stood before them (Linux: the
high-water mark ``VmHWM`` is reset by writing 5 to /proc/self/clear_refs),
i.e. the steps' working memory, activations included; for charrnn also XLA's
own count of the step's temporary buffers; on a GPU also the process's peak of
device memory (``device_peak_mb``: parameters, optimizer state, the steps' buffers).
"""

from __future__ import annotations

import json
import time

_START = time.perf_counter()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the high-water mark VmHWM to the current RSS; False where /proc cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM"), _status_kb("VmRSS")
        return True
    except (OSError, StopIteration):
        return False


def measure(spec: dict) -> dict:
    """Peak growth of the resident set (MB) during one training step of ``spec``."""
    result = {}
    if spec.get("torch"):
        from experiments.bench.bench_workers import TorchTrain
        task = TorchTrain({**spec, "kind": "train"})
    else:
        from experiments.bench.bench_workers import JaxCudnnTrain, JaxTrain
        task = (JaxCudnnTrain if spec.get("cudnn") else JaxTrain)({**spec, "kind": "train"})
        compiled = task.step.lower(task.state, task.batch).compile()
        stats = compiled.memory_analysis()
        if stats is not None:
            result["xla_temp_mb"] = stats.temp_size_in_bytes / 2 ** 20
        task.step = compiled
    # From here on only training steps run: the peak above this point is their
    # working memory (plus, for PyTorch, Adam's state, created by the first step;
    # charrnn's exists already). Freed memory may stay in the process (glibc,
    # PyTorch's allocator): the high-water mark still counts each byte once.
    reset = _reset_peak()
    before = _status_kb("VmRSS") if reset else None
    task.run_units(2)
    device = _device_peak(spec)  # a GPU's count needs no reset: kept where RSS fails
    if not reset:
        return {**result, **device} if device else \
            {**result, "error": "cannot reset the peak RSS (/proc/self/clear_refs)"}
    result["step_peak_mb"] = (_status_kb("VmHWM") - before) / 1024
    result["rss_mb"] = _status_kb("VmHWM") / 1024
    return {**result, **device}


def _device_peak(spec: dict) -> dict:
    """On a GPU, the process's peak of device memory its framework allocated (MB): jax's
    ``peak_bytes_in_use``, torch's ``max_memory_allocated``; elsewhere nothing."""
    if spec.get("torch"):
        import torch
        if spec.get("device") != "cuda":
            return {}
        return {"device_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20}
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    if jax.default_backend() != "gpu" or "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_mb": stats["peak_bytes_in_use"] / 2 ** 20}


def first_step(config_arg: str) -> dict:
    """Import, build the default config's model and state, and run one step (timed)."""
    from experiments.configs import default
    import jax
    import numpy as np
    from charrnn import models, optim
    from charrnn import step as step_lib
    imported = time.perf_counter()
    config = default.get_config(config_arg or None)
    model = models.CharRNN.from_config(config.model, 65)
    optimizer = optim.Optimizer.from_config(config)
    state = step_lib.init_state(model, optimizer, config.train.batch_size, config.seed)
    step = step_lib.make_train_step(model, optimizer)
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {"x": rng.integers(0, 65, shape, dtype=np.int32),
             "y": rng.integers(0, 65, shape, dtype=np.int32), "reset": np.bool_(True)}
    begin = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    done = time.perf_counter()
    return {"config": f"default.py{':' + config_arg if config_arg else ''}",
            "import_s": imported - _START, "first_step_s": done - begin,
            "process_start_to_first_step_s": done - _START}


if __name__ == "__main__":
    from absl import app, flags
    _ARG = flags.DEFINE_string("first_step_config", None, "Variant of experiments/configs/default.py to "
                               "time the first step of ('' or ':smoke').")
    _MEASURE = flags.DEFINE_string("measure", None, "JSON spec of a training step to measure "
                                   "the memory of (see measure()).")

    def _main(argv):
        del argv
        if _MEASURE.value:
            print(json.dumps(measure(json.loads(_MEASURE.value))), flush=True)
        else:
            print(json.dumps(first_step((_ARG.value or "").lstrip(":"))), flush=True)
    app.run(_main)
