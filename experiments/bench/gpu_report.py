"""Ratios, targets and the page (BENCHMARKS-gpu.md) of experiments/bench/gpu.py's JSON.

No measuring here: everything is read from the results, so the page renders
again from a saved JSON (``gpu.py --render_only``). Every sentence that states
a result is chosen by the numbers.
"""

from __future__ import annotations

from experiments.bench import bench_report
from experiments.bench.bench_report import _cell, _comparison, _fmt, _rate

TARGET = 1.0  # charrnn float32 / PyTorch cuDNN float32, LSTMs at the smaller batch
TARGET_MODELS = ("lstm_1x128", "lstm_2x512", "lstm_3x768")
# (a, b) pairs compared within each training group, when both ran.
TRAIN_PAIRS = [("charrnn", "pytorch"), ("charrnn_bf16", "pytorch_bf16"),
               ("charrnn", "jax_cudnn"), ("jax_cudnn", "pytorch"), ("charrnn_bf16", "charrnn")]
MEMORY_PAIRS = [("charrnn", "pytorch"), ("charrnn_bf16", "pytorch_bf16"),
                ("jax_cudnn", "pytorch")]


SECTIONS = ("train", "sweep", "sample")


def merge(outs: list) -> dict:
    """Several runs' results as one: each later run (e.g. ``--only`` after a change, or
    where an earlier run failed) replaces the groups and memory variants it measured.
    ``origin`` names the run (1, 2, ...) each group and memory variant comes from;
    ``runs`` each run's command, date and what it measured. Comparisons stay within a
    run: a sweep is compared with sequential runs only when both come from one run."""
    import copy
    out = copy.deepcopy(outs[0])
    origin = {f"{section}/{key}": 1 for section in SECTIONS for key in out[section]}
    origin.update({f"memory/{label}": 1 for label in out["memory"]})
    for number, later in enumerate(outs[1:], start=2):
        for section in SECTIONS:
            for key, group in later[section].items():
                if any(_measured(r) for r in group.values()):
                    out[section][key], origin[f"{section}/{key}"] = group, number
        for label, r in later["memory"].items():
            if _measured(r):
                out["memory"][label], origin[f"memory/{label}"] = r, number
        if later.get("equivalence"):
            out["equivalence"] = later["equivalence"]
    out["origin"] = origin
    out["runs"] = [{"command": o["settings"]["command"], "date": o["machine"]["date"],
                    "code": o["machine"].get("charrnn_commit") or "unknown",
                    "measured": sorted(k for k, n in origin.items() if n == i)}
                   for i, o in enumerate(outs, start=1)]
    out["comparisons"] = compare(out)
    return out


def _measured(result: dict) -> bool:
    return not ("skipped" in result or "error" in result)


def compare(out) -> list:
    """Every comparison as a dict (a, b, their rates, ratio; ``target``/``met`` on the
    issue's targets): training pairs, sweeps against sequential runs, sampling."""
    rows = []
    small = out["settings"]["batches"][0]
    for key, group in out["train"].items():
        for a, b in TRAIN_PAIRS:
            if a in group and b in group:
                target = TARGET if (a, b) == ("charrnn", "pytorch") and \
                    key in {f"{m}/B{small}" for m in TARGET_MODELS} else None
                rows.append(_comparison(f"train {key}", a, _rate(group, a), b, _rate(group, b),
                                        target))
    origin = out.get("origin", {})
    for key, group in out["sweep"].items():
        model, batch, runs = key.split("/")
        one_run = out["train"].get(f"{model}/{batch}", {})
        if origin.get(f"sweep/{key}") != origin.get(f"train/{model}/{batch}"):
            one_run = {}  # measured in another run: no ratio across runs
        for label, r in group.items():
            for ref in ("charrnn", "pytorch"):
                rows.append(_comparison(f"sweep {key}", label, _rate(group, label),
                                        f"{runs[4:]} sequential {ref}", _rate(one_run, ref)))
    for key, group in out["sample"].items():
        for b in ("charrnn_loop", "pytorch"):
            rows.append(_comparison(f"sample {key}", "charrnn_scan",
                                    _rate(group, "charrnn_scan"), b, _rate(group, b)))
    return rows


def failures(out) -> list:
    """Labels of contenders that errored (skipped ones are not failures)."""
    bad = [f"{section} {key}/{label}" for section in ("train", "sweep", "sample")
           for key, group in out[section].items() for label, r in group.items()
           if "error" in r]
    return bad + [f"memory/{k}" for k, r in out["memory"].items() if "error" in r]


def fastest(out) -> list:
    """Per training group: the fastest float32 contender and the fastest of all."""
    rows = []
    for key, group in out["train"].items():
        rates = {label: _rate(group, label) for label in group if _rate(group, label)}
        f32 = {k: v for k, v in rates.items() if "bf16" not in k}
        if rates:
            best32, best = max(f32, key=f32.get, default=None), max(rates, key=rates.get)
            rows.append([key, best32 or "—", _fmt(f32.get(best32)), best, _fmt(rates[best])])
    return rows


def _ratio_text(r):
    return _fmt(r, 2) + "x" if r is not None else "—"


def tables(out) -> list:
    """[(title, header, rows)] of the page and the text output."""
    s = out["settings"]
    tiny = " TINY CPU RUN: sizes shrunk, names are the full run's;" if s["tiny"] else ""
    origin = out.get("origin")
    run = (lambda key: [str(origin.get(key, ""))]) if origin else (lambda key: [])
    run_head = ["run"] if origin else []

    def timed(section):
        return [[key, label, _cell(r), _fmt(r.get("first_step_s"), 2)] + run(f"{section}/{key}")
                for key, group in out[section].items() for label, r in group.items()]
    result = [(f"training chars/s (T={s['seq_len']}, Adam, clip 1.0;{tiny} first step: "
               "compilation included)", ["config/batch", "contender", "chars/s",
                                          "first step s"] + run_head, timed("train"))]
    result.append(("one-program sweeps (chars/s of all runs together)",
                   ["model/batch/runs", "contender", "chars/s", "first step s"] + run_head,
                   timed("sweep")))
    result.append((f"sampling chars/s ({s['sample_length']} characters, all rows counted)",
                   ["model/batch", "contender", "chars/s", "first call s"] + run_head,
                   timed("sample")))
    spec, mem = out["memory_spec"], out["memory"]
    rows = [[label, _fmt(r.get("device_peak_mb"), 0), _fmt(r.get("xla_temp_mb"), 0),
             r.get("error", r.get("skipped", ""))] + run(f"memory/{label}")
            for label, r in mem.items()]
    rows += [[f"{a} / {b}", _ratio_text(_memory_ratio(mem, a, b)), "", ""] + [""] * len(run_head)
             for a, b in MEMORY_PAIRS]
    result.append((f"peak device memory, training LSTM {spec['layers']}x{spec['hidden']}, "
                   f"B={spec['batch']}, T={spec['seq_len']} (MB, a fresh process each)",
                   ["variant", "device peak", "XLA temp", ""] + run_head, rows))
    rows = [[r["comparison"], f"{r['a']} / {r['b']}", _fmt(r["a_per_sec"]), _fmt(r["b_per_sec"]),
             _ratio_text(r["ratio"])] for r in out["comparisons"]]
    result.append(("ratios (a and b measured in one run)", ["what", "a / b", "a", "b", "ratio"],
                   rows))
    rows = [[r["comparison"], _ratio_text(r["ratio"]), f">= {r['target']}x",
             "met" if r["met"] else "NOT MET"] for r in out["comparisons"] if "target" in r]
    result.append((f"targets: charrnn float32 / {_pytorch(out)} float32",
                   ["what", "got", "target", ""], rows))
    result.append(("fastest path per model (chars/s)",
                   ["config/batch", "fastest float32", "chars/s", "fastest", "chars/s"],
                   fastest(out)))
    return result


def _memory_ratio(mem, a, b):
    x, y = mem.get(a, {}).get("device_peak_mb"), mem.get(b, {}).get("device_peak_mb")
    return x / y if x and y else None


def _pytorch(out) -> str:
    return "PyTorch on cuDNN" if out["settings"]["torch_device"] == "cuda" else \
        "PyTorch on the CPU"


def finding(out) -> str:
    """The targets' outcome in one sentence, chosen by the numbers."""
    targets = [r for r in out["comparisons"] if "target" in r]
    met = [r["comparison"].split()[1] for r in targets if r["met"]]
    missed = [f"{r['comparison'].split()[1]} ({_ratio_text(r['ratio'])})" for r in targets
              if not r["met"]]
    if not targets:
        return "No target comparison ran."
    if not missed:
        return (f"charrnn's default float32 step is at least as fast as {_pytorch(out)} for "
                f"every target model ({', '.join(met)}).")
    return (f"charrnn's default float32 step is slower than {_pytorch(out)} for "
            f"{', '.join(missed)}" + (f"; at least as fast for {', '.join(met)}." if met
                                      else "."))


SAME_MODEL_TOL = 1e-3  # float32 rounding at the highest precision is ~1e-6; a wrong layout O(1)


def equivalence(out) -> str:
    """Whether the cuDNN contender computed charrnn's model, in one sentence (or none)."""
    e = out.get("equivalence")
    if not e:
        return ""
    if "error" in e:
        return f"`jax_cudnn` could not be checked against charrnn's scan: {e['error']}."
    same = max(e["logits"], e["carry"], e["grad_relative"]) < SAME_MODEL_TOL
    return (f"`jax_cudnn` ({e['impl']}) {'computes the same model as' if same else 'DIFFERS from'}"
            f" charrnn's scan on random parameters (highest matmul precision): logits within "
            f"{e['logits']:.1e}, final state within {e['carry']:.1e}, every gradient within "
            f"{e['grad_relative']:.1e} of its largest entry.")


def text(out) -> str:
    return bench_report.format_text(tables(out))


def markdown(out) -> str:
    m, s = out["machine"], out["settings"]
    device = m.get("torch_device") or m["jax_device"]
    lines = ["# charrnn on a GPU, against cuDNN", "",
             "Generated by `experiments/bench/gpu.py`; do not edit by hand. Regenerate with", "",
             "```", out.get("render_command", s["command"]), "```", ""]
    if "runs" in out:
        lines += ["Measured in these runs; a later run's groups replace the earlier ones' "
                  "(the `run` column), ratios are taken within one run:", ""]
        lines += [f"{i}. `{r['command']}` ({r['date']}, charrnn {r['code']}): "
                  + ("the rest" if i == 1 else ", ".join(r["measured"]))
                  for i, r in enumerate(out["runs"], start=1)] + [""]
    if s["tiny"]:
        lines += ["**A tiny run on the CPU (`--allow_cpu`): a test of the pipeline, not a "
                  "benchmark.**", ""]
    lines += [f"Device: {device} (jax: {m['jax_platform']}, {m['jax_device']}); CUDA "
              f"{m.get('torch_cuda_version')}, cuDNN {m.get('torch_cudnn')} (torch's); host "
              f"{m['cpu']}, {m['cpus']} CPUs; Python {m['python']}, jax {m['jax']}, jaxlib "
              f"{m['jaxlib']}, torch {m['torch']}; {m['date']}.", "",
              "float32 means each library's default for float32 arithmetic: jax "
              f"`jax_default_matmul_precision` = {m['jax_default_matmul_precision']}, torch "
              f"`backends.cuda.matmul.allow_tf32` = {m.get('torch_matmul_allow_tf32')}, "
              f"`backends.cudnn.allow_tf32` = {m.get('torch_cudnn_allow_tf32')}; bfloat16 is "
              "charrnn's `model.matmul_dtype=bfloat16` and PyTorch's autocast. `jax_cudnn` is "
              "charrnn's own training step with its LSTM layers as one "
              "`jax.experimental.rnn.lstm` call (experiments/bench/cudnn_lstm.py). Each number "
              f"is the median of {s['repeats']} timing windows of {s['window_s']} s, rotated "
              f"over the contenders of a group; {'the first ' if 'runs' in out else ''}run "
              f"took {s['total_s'] / 60:.1f} min (budget {s['budget_s']:.0f} s, compilation "
              "included).", "",
              finding(out), "", equivalence(out), ""]
    lines += bench_report.format_markdown(tables(out))
    return "\n".join(lines)
