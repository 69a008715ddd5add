"""How fast is charrnn on this machine, against PyTorch eager and NumPy?

    python experiments/bench/benchmark.py --outdir=runs/bench [--quick | --smoke]
        [--json=PATH] [--markdown=BENCHMARKS.md]

Measured in one run, as ratios within the run (a shared machine is noisy):

- training chars/s and time to the first finished step (compilation
  included), B=32, T=128, vocabulary 65, embedding 64, Adam, global-norm clip
  1.0: tanh RNN 1x512, LSTM 2x512, LSTM 1x128 — charrnn's training step
  (``step.make_train_step``; also with ``model.fast_vjp=False``, plain
  autodiff) vs PyTorch eager (nn.RNN/nn.LSTM, clip_grad_norm_, Adam) vs a
  hand-written NumPy tanh RNN (experiments/bench/numpy_rnn.py, first config). Each
  runs with its library's default threads and on one thread (``_1thread``;
  on a shared machine one thread can be much faster), charrnn also on two
  CPU devices (``_2dev``: its data-parallel path, one device per core): a
  comparison takes each side at its fastest setting and names it. Both also
  run with bfloat16 matmuls (``_bf16``: charrnn's ``model.matmul_dtype``,
  PyTorch's CPU autocast), compared with each other and charrnn's with its
  own float32 step; the targets compare float32 with float32;
- an 8-threshold sweep of LSTM 1x128 as one program (``charrnn.sweep``; on
  one device, one thread, and two CPU devices with the runs split over them)
  against 8 runs one after another (whose throughput is one run's);
- sampling chars/s, 1000 characters, LSTM 1x128 and 2x512, batch 1 and 64:
  charrnn's scan sampler vs a per-character jitted loop vs a PyTorch loop
  (oneDNN on and off; the faster one is the reference);
- the float32 GEMM peak (NumPy and jax.numpy matmul), so that each training
  result also reads as a fraction of peak from the model's FLOPs per char;
- peak memory of one training step at T=1024 (LSTM 2x512), with and without
  rematerialisation (``model.remat``), each in a fresh process;
- time to the first step of the default config in a fresh process.

Contenders run in one worker process per framework (experiments/bench/bench_workers.py);
timing windows rotate over the contenders of a group, repetition after
repetition, and the median window counts. Prints a table; --json writes the
results (each comparison with both throughputs and their ratio), --markdown a
page with the same tables. Exits 1 when a contender fails.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments.bench import bench_report, harness

_OUTDIR = flags.DEFINE_string("outdir", "runs/benchmark", "Directory for benchmark.json.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes, same pipeline: about a minute.")
_QUICK = flags.DEFINE_bool("quick", False, "Full sizes, fewer and shorter windows.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON here.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the tables as a Markdown page here.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Windows per contender (default 5; quick 3).")
_WINDOW = flags.DEFINE_float("window", None, "Seconds per timing window (default 2; quick 1).")


TRAIN_CONFIGS = {"rnn_1x512": ("rnn", 512, 1), "lstm_2x512": ("lstm", 512, 2),
                 "lstm_1x128": ("lstm", 128, 1)}
# The other built-in cells, charrnn alone: their "of peak" column against rnn's and lstm's
# is the per-step efficiency of each cell's scan (irnn beside rnn, mgu beside gru).
CELL_CONFIGS = {"irnn_1x512": ("irnn", 512, 1), "gru_1x512": ("gru", 512, 1),
                "mgu_1x512": ("mgu", 512, 1)}
SAMPLE_MODELS = {"lstm_1x128": (128, 1), "lstm_2x512": (512, 2)}
SWEEP_RUNS = 8


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"batch": 4, "seq_len": 16, "hidden": lambda h: 32, "length": 50, "gemm": 256,
                "memory_seq_len": 64}
    return {"batch": 32, "seq_len": 128, "hidden": lambda h: h, "length": 1000, "gemm": 2048,
            "memory_seq_len": 1024}


def _add_fraction_of_peak(table, name, res, cell, spec, layers, peak):
    """table[name] = the contenders' results, each float32 one with its fraction of the
    GEMM peak (training FLOPs per character × chars/s / peak FLOP/s)."""
    flops = train_flops_per_char(cell, spec["hidden"], layers)
    for label, r in res.items():
        if "per_sec" in r and "bf16" not in label:  # peak is float32's
            r["fraction_of_peak"] = r["per_sec"] * flops / peak
    table[name] = {"flops_per_char": flops, "contenders": res}


def train_flops_per_char(cell, hidden, layers, embed=64, vocab=65):
    """Model FLOPs of one training character: 3x the forward matmuls (forward + backward)."""
    from charrnn import cells  # the registry: G of any cell, built-in or a user's
    gates = cells.get(cell).num_gates
    forward = sum(2 * ((embed if l == 0 else hidden) + hidden) * gates * hidden
                  for l in range(layers)) + 2 * hidden * vocab
    return 3 * forward


def run_benchmark(smoke, repeats, window, log):
    size = sizes(smoke)
    frameworks = ["jax", "jax_1thread", "jax_2dev", "numpy", "numpy_1thread"] + (
        ["torch"] if harness.has_torch() else [])
    workers = harness.Workers(frameworks)
    out = {"machine": harness.machine_info(), "settings": {
        "smoke": smoke, "repeats": repeats, "window_s": window, "batch": size["batch"],
        "seq_len": size["seq_len"], "vocab": 65, "embed": 64, "sample_length": size["length"],
        "sweep_runs": SWEEP_RUNS}}
    try:
        log("GEMM peak")
        gemm = {"numpy": ("numpy", {"kind": "gemm", "n": size["gemm"]}),
                "jax": ("jax", {"kind": "gemm", "n": size["gemm"]}),
                "jax_1thread": ("jax_1thread", {"kind": "gemm", "n": size["gemm"]})}
        out["gemm"] = harness.measure_group(workers, gemm, repeats, min(window, 1.0), log)
        peak = max(r.get("per_sec_max", 0.0) for r in out["gemm"].values())
        out["gemm"]["peak_flops"] = peak

        out["train"] = {}
        for name, (cell, hidden, layers) in {**TRAIN_CONFIGS, **CELL_CONFIGS}.items():
            log(f"training {name}")
            spec = {"kind": "train", "cell": cell, "hidden": size["hidden"](hidden),
                    "layers": layers, "batch": size["batch"], "seq_len": size["seq_len"]}
            if name in CELL_CONFIGS:
                res = harness.measure_group(workers, {"charrnn": ("jax", spec)}, repeats, window,
                                            log)
                _add_fraction_of_peak(out["train"], name, res, cell, spec, layers, peak)
                continue
            group = {"charrnn": ("jax", spec), "charrnn_1thread": ("jax_1thread", spec),
                     "charrnn_2dev": ("jax_2dev", spec),
                     "charrnn_autodiff": ("jax", {**spec, "fast_vjp": False}),
                     "pytorch": ("torch", spec),
                     "pytorch_1thread": ("torch", {**spec, "threads": 1}),
                     "charrnn_bf16": ("jax", {**spec, "matmul_dtype": "bfloat16"}),
                     "pytorch_bf16": ("torch", {**spec, "matmul_dtype": "bfloat16"})}
            if cell == "rnn":
                group["numpy"] = ("numpy", spec)
                group["numpy_1thread"] = ("numpy_1thread", spec)
            if name == "lstm_1x128":
                sweep = {**spec, "kind": "sweep", "runs": SWEEP_RUNS}
                group[f"charrnn_sweep{SWEEP_RUNS}"] = ("jax", sweep)
                group[f"charrnn_sweep{SWEEP_RUNS}_1thread"] = ("jax_1thread", sweep)
                group[f"charrnn_sweep{SWEEP_RUNS}_2dev"] = ("jax_2dev", sweep)
            res = harness.measure_group(workers, group, repeats, window, log)
            _add_fraction_of_peak(out["train"], name, res, cell, spec, layers, peak)

        out["sample"] = {}
        for name, (hidden, layers) in SAMPLE_MODELS.items():
            for batch in (1, 64):
                if smoke and name != "lstm_1x128":
                    continue  # the same pipeline, one model
                log(f"sampling {name} batch {batch}")
                spec = {"hidden": size["hidden"](hidden), "layers": layers, "batch": batch,
                        "length": size["length"]}
                group = {"charrnn_scan": ("jax", {**spec, "kind": "sample_scan"}),
                         "charrnn_loop": ("jax", {**spec, "kind": "sample_loop"}),
                         "pytorch_onednn": ("torch", {**spec, "kind": "sample", "mkldnn": True}),
                         "pytorch_no_onednn": ("torch", {**spec, "kind": "sample",
                                                         "mkldnn": False})}
                out["sample"][f"{name}/batch{batch}"] = harness.measure_group(
                    workers, group, repeats, min(window, 1.0), log)
    finally:
        workers.close()

    log("memory at long T (fresh processes)")
    out["memory"] = measure_memory(size["memory_seq_len"], size, smoke, log)
    log("first step of the default config (fresh process)")
    out["first_step_default"] = first_step_default(smoke)
    out["comparisons"], out["targets"] = bench_report.compare(out, SWEEP_RUNS)
    return out


def measure_memory(seq_len, size, smoke, log):
    """Peak memory of training steps of LSTM 2x512 at seq_len, one fresh process per variant."""
    spec = {"cell": "lstm", "hidden": size["hidden"](512), "layers": 2, "batch": size["batch"],
            "seq_len": seq_len}
    variants = {"charrnn": {**spec}, "charrnn_remat": {**spec, "remat": True}}
    if not smoke:
        variants.update(charrnn_autodiff={**spec, "fast_vjp": False},
                        charrnn_autodiff_remat={**spec, "fast_vjp": False, "remat": True})
    if harness.has_torch():
        variants["pytorch"] = {**spec, "torch": True}
    results = {}
    for label, v in variants.items():
        results[label] = harness.fresh_process("--measure=" + json.dumps(v))
        log(f"  {label}: {results[label]}")
    return {"spec": spec, "results": results}


def first_step_default(smoke):
    """Seconds from a fresh interpreter to the default config's first finished step."""
    return harness.fresh_process("--first_step_config=" + (":smoke" if smoke else ""))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    smoke, quick = _SMOKE.value, _QUICK.value
    repeats = _REPEATS.value or (2 if smoke else 3 if quick else 5)
    window = _WINDOW.value or (0.2 if smoke else 1.0 if quick else 2.0)
    log = lambda msg: print(msg, flush=True)
    start = time.perf_counter()
    out = run_benchmark(smoke, repeats, window, log)
    out["settings"]["total_s"] = time.perf_counter() - start
    out["settings"]["command"] = " ".join(["python", "experiments/bench/benchmark.py"] + sys.argv[1:])
    print(bench_report.text_tables(out))
    os.makedirs(_OUTDIR.value, exist_ok=True)
    paths = [os.path.join(_OUTDIR.value, "benchmark.json")] + ([_JSON.value] if _JSON.value else [])
    for path in paths:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    if _MARKDOWN.value:
        with open(_MARKDOWN.value, "w") as f:
            f.write(bench_report.markdown(out))
    failed = bench_report.failures(out)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
