"""Ratios, targets and tables of experiments/bench/benchmark.py's results (no measuring here)."""

from __future__ import annotations

SAMPLE_TARGETS = {"lstm_1x128": 10.0, "lstm_2x512": 3.0}  # scan / per-character loop, batch 1
TORCH_SAMPLE_TARGET = 1.5  # scan / PyTorch loop at its faster setting, batch 1
TRAIN_TARGET, TRAIN_STRETCH = 1.0, 1.3
FIRST_STEP_TARGET_S = 5.0


def _rate(result, label):
    r = result.get(label, {})
    return r.get("per_sec")


def _comparison(name, a_label, a, b_label, b, target=None, stretch=None):
    row = {"comparison": name, "a": a_label, "a_per_sec": a, "b": b_label, "b_per_sec": b,
           "ratio": a / b if a and b else None}
    if target is not None:
        row["target"] = target
        row["met"] = row["ratio"] is not None and row["ratio"] >= target
        if stretch is not None:
            row["stretch"] = stretch
            row["stretch_met"] = row["ratio"] is not None and row["ratio"] >= stretch
    return row


def _fastest(group, labels):
    """(label, rate) of the fastest of ``labels`` that ran; (labels[0], None) if none did."""
    rates = {k: _rate(group, k) for k in labels if _rate(group, k)}
    if not rates:
        return labels[0], None
    best = max(rates, key=rates.get)
    return best, rates[best]


def _train_rows(name, c, sweep_runs, rows, targets):
    """Append the training comparisons of one model (contenders ``c``) to rows and targets.

    A model timed with charrnn alone (the other built-in cells) has no comparison: its
    rows in the training table (fraction of peak) are what it is read for.
    """
    if set(c) == {"charrnn"}:
        return
    torch_label, torch_rate = _fastest(c, ["pytorch", "pytorch_1thread"])
    ours_label, ours_rate = _fastest(c, ["charrnn", "charrnn_1thread", "charrnn_2dev"])
    row = _comparison(f"train {name}", ours_label, ours_rate, torch_label,
                      torch_rate, TRAIN_TARGET, TRAIN_STRETCH)
    rows.append(row)
    targets.append(row)
    rows.append(_comparison(f"train {name}", "charrnn", _rate(c, "charrnn"),
                            "charrnn_autodiff", _rate(c, "charrnn_autodiff")))
    if _rate(c, "charrnn_bf16"):  # bfloat16 matmuls on both sides, and against float32
        rows.append(_comparison(f"train {name} bfloat16", "charrnn_bf16",
                                _rate(c, "charrnn_bf16"), "pytorch_bf16",
                                _rate(c, "pytorch_bf16")))
        rows.append(_comparison(f"train {name}", "charrnn_bf16", _rate(c, "charrnn_bf16"),
                                ours_label, ours_rate))
    rows.append(_comparison(f"train {name}", "charrnn_autodiff", _rate(c, "charrnn_autodiff"),
                            torch_label, torch_rate))
    if _rate(c, "charrnn_2dev"):  # two CPU devices against one, at its faster setting
        rows.append(_comparison(f"train {name}", "charrnn_2dev", _rate(c, "charrnn_2dev"),
                                *_fastest(c, ["charrnn", "charrnn_1thread"])))
    if "numpy" in c:
        rows.append(_comparison(f"train {name}", ours_label, ours_rate,
                                *_fastest(c, ["numpy", "numpy_1thread"])))
    sweep_label, sweep_rate = _fastest(c, [f"charrnn_sweep{sweep_runs}",
                                           f"charrnn_sweep{sweep_runs}_1thread",
                                           f"charrnn_sweep{sweep_runs}_2dev"])
    if sweep_rate:
        label = f"{sweep_runs}-run sweep {name}"
        rows.append(_comparison(label, sweep_label, sweep_rate,
                                f"{sweep_runs} sequential {ours_label}", ours_rate))
        row = _comparison(label, sweep_label, sweep_rate,
                          f"{sweep_runs} sequential {torch_label}", torch_rate, 1.0)
        rows.append(row)
        targets.append(row)


def compare(out, sweep_runs):
    """(all comparisons, the issue's targets) as lists of dicts with a and b rates and ratio.

    PyTorch is compared at its faster setting: default threads or one thread
    (training), oneDNN on or off (sampling); the label says which.
    """
    rows, targets = [], []
    for name, entry in out["train"].items():
        _train_rows(name, entry["contenders"], sweep_runs, rows, targets)
    for key, c in out["sample"].items():
        name, batch = key.split("/")
        scan = _rate(c, "charrnn_scan")
        want = SAMPLE_TARGETS.get(name) if batch == "batch1" else None
        row = _comparison(f"sample {key}", "scan", scan, "per-char loop",
                          _rate(c, "charrnn_loop"), want)
        rows.append(row)
        best, best_rate = _fastest(c, ["pytorch_onednn", "pytorch_no_onednn"])
        row2 = _comparison(f"sample {key}", "scan", scan, best, best_rate,
                           TORCH_SAMPLE_TARGET if batch == "batch1" else None)
        rows.append(row2)
        if batch == "batch1":
            targets += [row, row2]
    mem = out["memory"]["results"]
    for base in ("charrnn", "charrnn_autodiff"):
        a, b = mem.get(f"{base}_remat", {}), mem.get(base, {})
        if "step_peak_mb" in a and "step_peak_mb" in b:
            row = {"comparison": f"memory T={out['memory']['spec']['seq_len']}",
                   "a": f"{base}_remat", "a_mb": a["step_peak_mb"], "b": base,
                   "b_mb": b["step_peak_mb"],
                   "ratio": a["step_peak_mb"] / max(b["step_peak_mb"], 1e-9)}
            row["target"], row["met"] = "< 1 (bounded)", row["ratio"] < 1.0
            rows.append(row)
            if base == "charrnn":
                targets.append(row)
    first = out["first_step_default"]
    if "first_step_s" in first:
        targets.append({"comparison": f"first step {first['config']}", "a": "charrnn",
                        "seconds": first["first_step_s"], "target": f"<= {FIRST_STEP_TARGET_S} s",
                        "met": first["first_step_s"] <= FIRST_STEP_TARGET_S})
    return rows, targets


def failures(out):
    """Labels of contenders that errored (skipped ones, e.g. no torch, are not failures)."""
    bad = []
    groups = [("gemm", out["gemm"])] + [(f"train {k}", v["contenders"]) for k, v in
                                        out["train"].items()]
    groups += [(f"sample {k}", v) for k, v in out["sample"].items()]
    for name, group in groups:
        bad += [f"{name}/{label}" for label, r in group.items()
                if isinstance(r, dict) and "error" in r]
    bad += [f"memory/{k}" for k, r in out["memory"]["results"].items() if "error" in r]
    if "error" in out["first_step_default"]:
        bad.append("first_step_default")
    return bad


def _fmt(x, digits=0):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def _cell(r, key="per_sec"):
    if "skipped" in r:
        return "skipped"
    if "error" in r:
        return "FAILED"
    return _fmt(r.get(key))


def tables(out):
    """[(title, header, rows)] shared by the text and Markdown renderings."""
    peak = out["gemm"]["peak_flops"]
    result = [("float32 GEMM (GFLOP/s)", ["library", "median", "best"],
               [[k, _fmt(v.get("per_sec", 0) / 1e9, 1), _fmt(v.get("per_sec_max", 0) / 1e9, 1)]
                for k, v in out["gemm"].items() if isinstance(v, dict)])]
    rows = []
    for name, entry in out["train"].items():
        for label, r in entry["contenders"].items():
            frac = r.get("fraction_of_peak")
            rows.append([name, label, _cell(r), _fmt(r.get("per_cpu_sec")),
                         _fmt(r.get("first_step_s"), 2),
                         f"{100 * frac:.0f}%" if frac is not None else "—"])
    smoke = " SMOKE RUN: every hidden size is 32, names are the full run's;" \
        if out["settings"].get("smoke") else ""
    result.append((f"training chars/s (B={out['settings']['batch']}, "
                   f"T={out['settings']['seq_len']}, Adam, clip 1.0;{smoke} peak "
                   f"{peak / 1e9:,.0f} GFLOP/s)",
                   ["config", "contender", "chars/s", "chars/CPU-s", "first step s",
                    "of peak"], rows))
    rows = [[key, label, _cell(r), _fmt(r.get("first_step_s"), 2)]
            for key, group in out["sample"].items() for label, r in group.items()]
    result.append((f"sampling chars/s ({out['settings']['sample_length']} characters, all rows "
                   "counted)", ["model/batch", "contender", "chars/s", "first call s"], rows))
    mem = out["memory"]
    rows = [[label, _fmt(r.get("step_peak_mb"), 1), _fmt(r.get("xla_temp_mb"), 1),
             r.get("error", "")] for label, r in mem["results"].items()]
    spec = mem["spec"]
    result.append((f"memory of one training step, LSTM {spec['layers']}x{spec['hidden']}, "
                   f"B={spec['batch']}, T={spec['seq_len']} (MB)",
                   ["variant", "RSS growth", "XLA temp", ""], rows))
    rows = []
    for r in out["comparisons"]:
        if "a_per_sec" in r:
            rows.append([r["comparison"], f"{r['a']} / {r['b']}", _fmt(r["a_per_sec"]),
                         _fmt(r["b_per_sec"]), _fmt(r["ratio"], 2) + ("x" if r["ratio"] else "")])
    result.append(("ratios (within this run)", ["what", "a / b", "a", "b", "ratio"], rows))
    rows = []
    for t in out["targets"]:
        got = (f"{t['ratio']:.2f}x" if t.get("ratio") is not None else
               f"{t['seconds']:.2f} s" if "seconds" in t else "—")
        want = t["target"] if isinstance(t["target"], str) else f">= {t['target']}x"
        if "stretch" in t:
            want += f" (stretch {t['stretch']}x: {'met' if t['stretch_met'] else 'not met'})"
        rows.append([t["comparison"], f"{t['a']} / {t.get('b', '')}".rstrip(" /"), got, want,
                     "met" if t["met"] else "NOT MET"])
    result.append(("targets", ["what", "a / b", "got", "target", ""], rows))
    return result


def text_tables(out):
    return format_text(tables(out))


def format_text(table_list):
    """[(title, header, rows)] as aligned plain-text tables."""
    lines = []
    for title, header, rows in table_list:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else []
        lines += ["", title]
        for row in [header] + rows:
            lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    return "\n".join(lines)


def markdown(out):
    m, s = out["machine"], out["settings"]
    lines = ["# charrnn benchmark", "",
             "Generated by `experiments/bench/benchmark.py`; do not edit by hand. Regenerate with",
             "", "```", s["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs; {m['platform']}; Python {m['python']}, "
             f"jax {m['jax']}, numpy {m['numpy']}, torch {m['torch']}; {m['date']}; load "
             f"average at start {', '.join(f'{x:.1f}' for x in m['load_average'])} (the machine "
             "is shared: compare ratios within this run). Each number is the median of "
             f"{s['repeats']} timing windows of {s['window_s']} s (sampling and GEMM: up to 1 s), "
             "rotated over the contenders; total run "
             f"{s['total_s'] / 60:.1f} min.", ""]
    lines += format_markdown(tables(out))
    first = out["first_step_default"]
    if "first_step_s" in first:
        lines += [f"Default config ({first['config']}) in a fresh process: imports "
                  f"{first['import_s']:.2f} s, first step (compilation included) "
                  f"{first['first_step_s']:.2f} s.", ""]
    return "\n".join(lines)


def format_markdown(table_list):
    """[(title, header, rows)] as Markdown sections, one table each (a list of lines)."""
    lines = []
    for title, header, rows in table_list:
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
        lines.append("")
    return lines
