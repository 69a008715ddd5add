"""How fast is charrnn on a GPU, against cuDNN (PyTorch and jax.experimental.rnn)?

    python experiments/bench/gpu.py --outdir=runs/bench_gpu --markdown=BENCHMARKS-gpu.md
    python experiments/bench/gpu.py --render_only=runs/bench_gpu/benchmark_gpu.json \
        --markdown=BENCHMARKS-gpu.md        # the page again from a saved JSON
    python experiments/bench/gpu.py --allow_cpu --outdir=DIR   # tiny sizes on the CPU (a test)
    ... --only=train/lstm_1x128/B32,memory/charrnn   # some groups; the rest marked skipped

It first checks the device (jax's first device is a GPU and
``torch.cuda.is_available()``) and otherwise stops with one ``error:`` line.
Measured in one run, as ratios within it (B x T = {32, 128} x 128,
vocabulary 65, embedding 64, Adam, global-norm clip 1.0):

- first, that the jax_cudnn contender computes charrnn's model on the device
  (``cudnn_lstm.max_differences``: logits, state and gradients against the scan);
- training chars/s and time to the first finished step (compilation
  included) of LSTM 1x128, 2x512, 3x768, tanh RNN 1x512 and GRU 1x512:
  charrnn's training step (``step.make_train_step``) in float32 and with
  ``model.matmul_dtype=bfloat16``; PyTorch nn.LSTM/nn.RNN/nn.GRU on cuDNN in
  float32 and under CUDA autocast (bfloat16); for the LSTMs also charrnn's
  same step with its layers as one ``jax.experimental.rnn.lstm`` call
  (cuDNN through a custom call, float32 only: experiments/bench/cudnn_lstm.py).
  "float32" is each library's default for float32 (TF32 tensor cores where
  that default allows them: the page prints the settings read at run time);
- a one-program sweep of 8 and of 64 LSTM 1x128 runs (``charrnn.sweep``)
  against that many runs one after another, whose throughput is one run's;
- sampling chars/s, 1000 characters, LSTM 1x128 and 3x768, batch 1 and 64:
  charrnn's scan sampler, a per-character jitted loop, a PyTorch loop;
- peak device memory of training LSTM 3x768 at B=128 (jax
  ``peak_bytes_in_use``, torch ``max_memory_allocated``), a fresh process each.

Contenders run in one worker process per framework
(experiments/bench/bench_workers.py, timing as experiments/bench/benchmark.py
does it). ``--budget_s`` bounds the run, compilation included: each section
has a share of it, and a group that would start past its share is recorded as
skipped. Writes ``<outdir>/benchmark_gpu.json`` (also printed as one line)
and, with --markdown, the page (experiments/bench/gpu_report.py).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments import cli
from experiments.bench import gpu_report, harness
from experiments.bench.gpu_plan import BATCHES, SWEEP_RUNS, memory_plan, plan, sizes

_OUTDIR = flags.DEFINE_string("outdir", "runs/bench_gpu", "Directory for benchmark_gpu.json.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the page here (BENCHMARKS-gpu.md).")
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False, "Without a GPU: the same code on the CPU "
                               "at tiny sizes (a test of the pipeline, not a benchmark).")
_RENDER_ONLY = flags.DEFINE_string("render_only", None, "Render --markdown from this saved "
                                   "JSON, or from several runs' (comma-separated; a later "
                                   "run's groups replace an earlier one's); measure nothing.")
_BUDGET = flags.DEFINE_float("budget_s", 420.0, "Seconds for the whole run, compiles included.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing windows per contender.")
_WINDOW = flags.DEFINE_float("window", 0.5, "Seconds per timing window.")
_ONLY = flags.DEFINE_list("only", None, "Time only the groups whose key starts with one of "
                          "these (e.g. train/lstm_1x128/B32, memory/jax_cudnn); the others "
                          "are recorded as skipped.")

# Each section's end, as a share of --budget_s from the start (compiles included).
SECTION_END = {"train": 0.62, "sweep": 0.72, "sample": 0.86, "memory": 1.0}
# Of the jax worker's GPU memory (XLA preallocates 75% by default): PyTorch's worker needs room.
JAX_MEMORY_FRACTION = "0.45"


def check_device(allow_cpu: bool) -> dict:
    """The accelerator's facts; raises SystemExit with one error line when there is none.

    jax is asked with preallocation off (this process only), so that the parent
    does not hold the memory its workers need.
    """
    saved = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    device = jax.devices()[0]
    if saved is None:
        del os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"]
    else:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = saved
    info = {"jax_platform": device.platform, "jax_device": device.device_kind,
            "jax_default_matmul_precision": _read(
                lambda: jax.config.jax_default_matmul_precision)}
    cuda = False
    if harness.has_torch():
        import torch
        cuda = torch.cuda.is_available()
        info.update(torch_cuda=cuda, torch_cuda_version=torch.version.cuda,
                    torch_cudnn=torch.backends.cudnn.version() if cuda else None,
                    torch_device=torch.cuda.get_device_name(0) if cuda else None,
                    torch_matmul_allow_tf32=_read(lambda: torch.backends.cuda.matmul.allow_tf32),
                    torch_cudnn_allow_tf32=_read(lambda: torch.backends.cudnn.allow_tf32))
    if (device.platform != "gpu" or not cuda) and not allow_cpu:
        torch_says = (f"torch.cuda.is_available() is {cuda}" if harness.has_torch()
                      else "torch is not installed")
        raise SystemExit(f"error: no GPU for this benchmark: jax's first device is "
                         f"{device.platform} ({device.device_kind}), {torch_says}; "
                         "--allow_cpu runs it on the CPU at tiny sizes")
    return info


def _read(setting):
    """A library setting's value for the page, or "unknown" where this version lacks it."""
    try:
        return setting()
    except (AttributeError, RuntimeError):
        return "unknown"


def _selected(only, key) -> bool:
    return only is None or any(key.startswith(prefix) for prefix in only)


def _measure_section(workers, section, groups, deadline, settings, log):
    """measure_group for each selected group until ``deadline`` (perf_counter); later
    groups are recorded as skipped, a group whose timing failed as failed."""
    out = {}
    for key, group in groups.items():
        if not _selected(settings["only"], f"{section}/{key}"):
            out[key] = {label: {"skipped": "not selected (--only)"} for label in group}
            continue
        if time.perf_counter() > deadline:
            out[key] = {label: {"skipped": "time budget"} for label in group}
            log(f"{key}: skipped (time budget)")
            continue
        log(key)
        try:
            out[key] = harness.measure_group(workers, group, settings["repeats"],
                                             settings["window_s"], log)
        except RuntimeError as e:  # a contender failed between windows: the group is lost
            out[key] = {label: {"error": str(e).splitlines()[0]} for label in group}
            log(f"{key}: FAILED {e}")
    return out


def run(tiny, budget_s, repeats, window, only, log, save):
    """Every section of :func:`gpu_plan.plan` and the memory section, within ``budget_s``.

    ``save(out)`` is called after each section with the results so far (comparisons
    and total_s brought up to date), so a run stopped from outside keeps its sections.
    """
    start = time.perf_counter()
    device_info = check_device(tiny)
    device = "cuda" if device_info.get("torch_cuda") else "cpu"
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEMORY_FRACTION)
    groups, memory = plan(tiny, device), memory_plan(tiny, device)
    out = {"machine": {**harness.machine_info(), **device_info}, "settings": {
        "tiny": tiny, "repeats": repeats, "window_s": window, "budget_s": budget_s,
        "seq_len": sizes(tiny)["seq_len"], "batches": list(BATCHES), "vocab": 65, "embed": 64,
        "sample_length": sizes(tiny)["length"], "sweep_runs": list(SWEEP_RUNS),
        "torch_device": device, "only": only}, "memory_spec": memory["charrnn"],
        **{section: {} for section in [*groups, "memory"]}}

    def checkpoint():
        out["settings"]["total_s"] = time.perf_counter() - start
        out["comparisons"] = gpu_report.compare(out)
        save(out)

    out["equivalence"] = _equivalence(device_info["jax_platform"], tiny, log)
    deadline = lambda section: start + SECTION_END[section] * budget_s
    workers = harness.Workers(["jax"] + (["torch"] if harness.has_torch() else []))
    try:
        for section, section_groups in groups.items():
            out[section] = _measure_section(workers, section, section_groups, deadline(section),
                                            out["settings"], log)
            checkpoint()
    finally:
        workers.close()
    for label, spec in memory.items():
        if not _selected(only, f"memory/{label}"):
            out["memory"][label] = {"skipped": "not selected (--only)"}
        elif spec.get("torch") and not harness.has_torch():
            out["memory"][label] = {"skipped": "torch is not installed"}
        elif time.perf_counter() > deadline("memory"):
            out["memory"][label] = {"skipped": "time budget"}
        else:
            out["memory"][label] = harness.fresh_process("--measure=" + json.dumps(spec))
            log(f"memory {label}: {out['memory'][label]}")
    checkpoint()
    return out


TINY_CASE = {"hidden": 8, "layers": 2, "batch": 2, "seq_len": 4}  # tests/test_bench_gpu.py's


def _equivalence(platform, tiny, log) -> dict:
    """cuDNN's LSTM (off a GPU: its reference) against charrnn's scan on one random case
    (cudnn_lstm.max_differences): the timed contenders must compute the same model."""
    from experiments.bench import cudnn_lstm
    try:
        result = cudnn_lstm.max_differences("cudnn" if platform == "gpu" else "ref",
                                            **(TINY_CASE if tiny else {}))
    except Exception as e:  # recorded on the page; the timings still run
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    log(f"equivalence: {result}")
    return result


def _render_only(paths, markdown):
    """The page of one saved JSON, or of several runs' (comma-separated: a later run's
    groups replace an earlier one's, :func:`gpu_report.merge`)."""
    path = paths
    try:
        outs = []
        for path in paths.split(","):
            with open(path) as f:
                outs.append(json.load(f))
        out = outs[0] if len(outs) == 1 else gpu_report.merge(outs)
        if len(outs) > 1:
            out["render_command"] = " ".join(["python", "experiments/bench/gpu.py"] + sys.argv[1:])
        page = gpu_report.markdown(out)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot render {path}: {type(e).__name__}: {e}") from None
    if markdown:
        with open(markdown, "w") as f:
            f.write(page)
    else:
        print(page)


def main(argv):
    cli.start(argv)
    if _RENDER_ONLY.value:
        return _render_only(_RENDER_ONLY.value, _MARKDOWN.value)
    if _BUDGET.value <= 0 or _REPEATS.value < 1 or _WINDOW.value <= 0:
        raise app.UsageError("--budget_s and --window must be positive, --repeats >= 1")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    command = " ".join(["python", "experiments/bench/gpu.py"] + sys.argv[1:])

    def save(out):
        out["settings"]["command"] = command
        os.makedirs(_OUTDIR.value, exist_ok=True)
        with open(os.path.join(_OUTDIR.value, "benchmark_gpu.json"), "w") as f:
            json.dump(out, f, indent=1)
        if _MARKDOWN.value:
            with open(_MARKDOWN.value, "w") as f:
                f.write(gpu_report.markdown(out))

    out = run(_ALLOW_CPU.value, _BUDGET.value, _REPEATS.value, _WINDOW.value, _ONLY.value, log,
              save)
    print(gpu_report.text(out), file=sys.stderr)
    print(json.dumps(out))
    failed = gpu_report.failures(out)
    if failed:  # the JSON and the page are written: they show which ones
        sys.exit("error: contenders failed: " + ", ".join(failed))


if __name__ == "__main__":
    app.run(main)
