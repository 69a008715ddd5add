"""Sections 2.1 and 2.2 of REPORT.md: the clipping ablation and the sweep benchmark.

Written from the JSON of experiments/science/clip_ablation.py and experiments/bench/bench_sweep.py;
every number comes from ``results``. Used by report_sections.render.
"""

import os

from experiments.pages.report_format import (by as _by, cell_name as _cell_name, fmt as _f,
                                              multiple as _mult)


def _labels(rows):
    return ", ".join(r["threshold"] for r in rows) or "none of them"


def _pascanu(table, cell, opt, lr) -> str:
    rs = _by(table, cell, opt)
    none = [r for r in rs if r["threshold"] == "none"]
    clipped = [r for r in rs if r["threshold"] != "none"]
    if not rs or not none:
        return ""
    none = none[0]
    ok = [r for r in clipped if r["diverged"] == 0]
    bad = [r for r in clipped if r["diverged"] > 0]
    best = min(ok or clipped, key=lambda r: r["final_val_bpc"])
    verdict = (f"diverged in {none['diverged']}/{none['seeds']} seeds (final val bpc "
               f"{_f(none['final_val_bpc'])}, largest gradient norm {_f(none['max_grad_norm'])})"
               if none["diverged"] else
               f"did not diverge (final val bpc {_f(none['final_val_bpc'])}, largest gradient "
               f"norm {_f(none['max_grad_norm'])})")
    failed = (f"τ ∈ {{{_labels(bad)}}} diverged in at least one seed" if bad
              else "no clipped run diverged")
    return (f"- **{_cell_name(cell)} + {opt}** (lr {lr}): without clipping the runs {verdict}. "
            f"No seed diverged with τ ∈ {{{_labels(ok)}}}; {failed}. The best mean final val "
            f"bpc among clipped runs is {_f(best['final_val_bpc'])} at τ = "
            f"{best['threshold']}.\n")


def section_ablation(results, fig) -> str:
    a = results["ablation"]
    cfg = a["config"]
    table = a["table"]
    sw, m, t = cfg["sweep"], cfg["model"], cfg["train"]
    lrs = sw["learning_rate"]
    refs = {}
    for r in a["rows"]:
        refs.setdefault((r["cell"], r["optimizer"]), []).append(r)
    ref_rows = "\n".join(
        f"| {c} | {o} | {_f(sum(x['reference_norm'] or 0 for x in rs) / len(rs))} "
        f"| {_f(_mean_none(rs))} |" for (c, o), rs in sorted(refs.items()))
    pascanu = "".join(_pascanu(table, c, o, lrs[o]) for c, o in sorted(refs))
    contrast = {(c["cell"], c["optimizer"]): c for c in a["contrast"]}
    return f"""
### 2.1 Does the threshold matter? Pascanu et al. (2013) reproduced, and the Adam contrast

Pascanu, Mikolov & Bengio (2013) found that plain SGD on a tanh RNN without clipping hits
gradient spikes and fails, while thresholds between about 0.5× and 10× the average
gradient norm train well. `experiments/science/clip_ablation.py` runs that experiment here: cells
{', '.join(sw['cells'])} ({m['num_layers']}×{m['hidden_size']}, embedding {m['embed_dim']}),
optimizers {', '.join(sw['optimizers'])} (SGD lr {lrs['sgd']}, Adam lr {lrs['adam']},
constant), seeds {', '.join(str(s) for s in sw['seeds'])}, B = {t['batch_size']},
T = {t['seq_len']}, {t['num_steps']} steps each, on the
{os.path.basename(cfg['data']['path']) or 'built-in ' + cfg['data']['name']} corpus. A threshold `k x` is
k times the run's *reference norm*: the mean unclipped gradient norm over its first
{sw['warmup_steps']} training windows at the initial parameters (a warm-up that trained at an
exploding learning rate would measure the explosion). Reference norms, and for comparison the
mean gradient norm of the unclipped runs over all their steps:

| cell | optimizer | reference norm (mean over seeds) | mean ‖g‖ of the unclipped runs |
| --- | --- | --- | --- |
{ref_rows}

All runs of one (cell, optimizer) are trained as one jitted program (`charrnn.sweep`,
τ a runtime array); a run *diverged* when a step was non-finite or its final val loss is
above its initial one. Val bpc is measured on the first {sw['eval_chars']} validation
characters. Means over seeds:

{a['markdown']}
{pascanu}{_band(table, refs)}
**Adam contrast.** Adam divides each coordinate's update by the running RMS of its
gradient, so a constant rescaling of every gradient leaves its updates almost unchanged;
clipping then matters only on the steps whose norm is above τ relative to the recent ones.
{_contrast_text(contrast, table)}

![val bpc against threshold]({fig}/val_bpc_vs_threshold.png)

![loss curves]({fig}/loss_curves.png)

![gradient-norm traces]({fig}/grad_norm_traces.png)

Per-run numbers: [`clip_ablation.csv`]({fig}/clip_ablation.csv).
"""


def _band(table, refs) -> str:
    rs = _by(table, "rnn", "sgd")
    ok = sorted((r for r in rs if r["threshold"].endswith("x") and not r["diverged"]),
                key=lambda r: _mult(r["threshold"]))
    if not ok:
        return ""
    text = (f"\nFor the tanh RNN with SGD, the thresholds at which no seed diverged span "
            f"{ok[0]['threshold']}–{ok[-1]['threshold']} of the reference norm (of those tried), "
            "against about 0.5×–10× of the average norm in Pascanu et al.")
    none = [r for r in refs.get(("rnn", "sgd"), []) if r["threshold"] == "none"]
    if none and any(r["diverged"] for r in none):
        mean = sum(r["mean_grad_norm"] for r in none) / len(none)
        ref = sum(r["reference_norm"] or 0 for r in none) / len(none)
        text += (f" Measured over training, the unclipped runs' own average norm is {_f(mean)}, "
                 f"{_f(mean / ref)}× the reference: once the run explodes, the average norm "
                 "is mostly the explosion, so where the band sits depends on which average "
                 "τ is measured against (and on the learning rate, since SGD's step is lr·τ).")
    return text + "\n"


def _mean_none(rows):
    none = [r["mean_grad_norm"] for r in rows if r["threshold"] == "none"]
    return sum(none) / len(none) if none else float("nan")


def _contrast_text(contrast, table) -> str:
    out = []
    for cell in sorted({c for c, _ in contrast}):
        sgd, adam = contrast.get((cell, "sgd")), contrast.get((cell, "adam"))
        if not sgd or not adam:
            continue
        rows = {opt: {r["threshold"]: r for r in _by(table, cell, opt)} for opt in ("sgd", "adam")}
        tight = min(adam["clip_fraction"], key=_mult)
        a_tight, a_none = rows["adam"][tight], rows["adam"].get("none")
        s_tight = rows["sgd"][tight]
        s_best = min((r for r in rows["sgd"].values() if not r["diverged"]),
                     key=lambda r: r["final_val_bpc"], default=None)
        text = (f"- **{_cell_name(cell)}**: over the thresholds whose runs did not diverge, the "
                f"mean final val bpc spans {_f(adam['spread'])} bpc with Adam against "
                f"{_f(sgd['spread'])} with SGD. At the tightest threshold ({tight}) clipping "
                f"rescaled {100 * a_tight['clip_fraction']:.0f}% of Adam's steps"
                + (" — nearly a rescaling of every gradient —" if a_tight["clip_fraction"] >= 0.9
                   else "") + f" and Adam ended at "
                f"{_f(a_tight['final_val_bpc'])} bpc")
        if a_none and not a_none["diverged"]:
            delta = a_tight["final_val_bpc"] - a_none["final_val_bpc"]
            text += f" ({delta:+.3f} against no clipping)"
        text += (f"; SGD at that threshold ({100 * s_tight['clip_fraction']:.0f}% of steps "
                 f"clipped) ended at {_f(s_tight['final_val_bpc'])} bpc")
        if s_best:
            text += (f", {s_tight['final_val_bpc'] - s_best['final_val_bpc']:+.3f} against its "
                     f"best threshold ({s_best['threshold']})")
        loose = [r for k, r in rows["adam"].items() if k != "none" and _mult(k) >= 1.0]
        if loose and a_none and not a_none["diverged"]:
            frac = max(r["clip_fraction"] for r in loose)
            moved = max(abs(r["final_val_bpc"] - a_none["final_val_bpc"]) for r in loose)
            text += (f". With τ ≥ 1× clipping touched at most {100 * frac:.1f}% of Adam's "
                     "steps "
                     f"(the spikes) and moved its final val bpc by at most {moved:.3f}")
        out.append(text + ".\n")
    return "".join(out)


def section_bench(results) -> str:
    b = results["bench"]
    ratios = ", ".join(f"{_layout(c)}: **{r:.2f}×**" for c, r in b["ratio"].items())
    best_c = max(b["ratio"], key=b["ratio"].get)
    verdict = ("at least as fast as" if b["best_ratio"] >= 1.0 else "slower than")
    return f"""
### 2.3 Many runs in one program

`experiments/bench/bench_sweep.py` times {b['num_runs']} runs of one model
({_cell_name(b['cell'])} {b['num_layers']}×{b['hidden_size']}, B = {b['batch_size']},
T = {b['seq_len']}) on
{b['backend']}: one after another with the plain jitted train step
({_f(b['chars_per_sec']['sequential'])} chars/s in all), against the one-program sweep
(throughput ratio sweep / sequential; best of {b['repeats']} alternating windows each):
{ratios}. The best layout here ({_layout(best_c)}) is {verdict} running the runs one
by one{_noise(b)}.
{_vmap_note(b)}
"""


def _noise(b) -> str:
    spread = b.get("window_spread", {}).get("sequential")
    if spread is None:
        return ""
    return (f" (for scale: the sequential runs' own timing windows differed by up to "
            f"{100 * (spread - 1):.0f}% on this machine)")


def _vmap_note(b) -> str:
    vmapped, single = b["ratio"].get("0"), b["ratio"].get("1")
    if vmapped is None or single is None:
        return ""
    if vmapped < single:
        return ("Vectorizing all runs (batched matmuls over a run axis) was slower here than "
                "stepping them one at a time inside the program: on a CPU one model of this "
                "size already keeps the cores busy. On a GPU or TPU, which one small model "
                "leaves mostly idle, vmapping all runs at once (`--runs_per_chunk=0`, the "
                "default there) is the layout that pays.")
    return ("Vectorizing all runs at once was the fastest layout here: one model of this size "
            "leaves the hardware partly idle, and the batched run axis fills it.")


def _layout(chunk):
    chunk = int(chunk)
    return "all runs vmapped" if chunk == 0 else \
        ("one run at a time" if chunk == 1 else f"{chunk} runs vmapped at a time")
