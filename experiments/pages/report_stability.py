"""The REPORT.md section of the stability map, from experiments/science/stability.py's JSON.

One public function, :func:`section`. Its findings (how many times larger a learning
rate each clipping setting survives than no clipping; whether the best loss reachable
over all learning rates improves beyond the seeds' spread) are chosen by the numbers in
``results["stability"]``.
"""

import math

from experiments.pages.report_format import cell_name, fmt


_OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam"}


def _lr(x) -> str:
    """A learning rate as written in the config ('1000', '0.003'); '–' for None."""
    return "–" if x is None else f"{x:g}"


def _panels(table) -> list:
    """[(cell, optimizer, its entries)] in the table's order."""
    keys = list(dict.fromkeys((e["cell"], e["optimizer"]) for e in table))
    return [(c, o, [e for e in table if (e["cell"], e["optimizer"]) == (c, o)]) for c, o in keys]


def _multiple(e, none) -> tuple[float, str]:
    """Setting ``e``'s largest stable learning rate over no clipping's (both not None), as
    a number and as written ('10×'; '≥ 100×' where e was stable up to the grid's top and no
    clipping was not, so the true multiple may be larger)."""
    ratio = e["largest_stable_lr"] / none["largest_stable_lr"]
    bound = "≥ " if e["stable_at_top"] and not none["stable_at_top"] else ""
    return ratio, f"{bound}{fmt(ratio)}×"


def survival(entries) -> str:
    """How far each clipped setting's largest stable learning rate lies from no clipping's."""
    none = next((e for e in entries if e["setting"] == "none"), None)
    if none is None:
        return ""
    base = none["largest_stable_lr"]
    if base is None:
        head = "without clipping a seed diverged at every learning rate of the grid"
    else:
        head = f"without clipping the largest stable learning rate is {_lr(base)}"
        head += (" (the grid's largest: no clipping never diverged, so the grid shows no "
                 "rate that clipping rescues)" if none["stable_at_top"] else
                 f" (a seed diverged at {_lr(none['smallest_diverged_lr'])})")
    parts = []
    for e in entries:
        if e is none:
            continue
        lr = e["largest_stable_lr"]
        if lr is None:
            parts.append(f"{e['setting']} diverged at every rate")
        elif base is None:
            parts.append(f"{e['setting']} trains up to {_lr(lr)}")
        else:
            ratio, times = _multiple(e, none)
            word = ("no gain" if math.isclose(ratio, 1.0) else
                    "a smaller rate than no clipping" if ratio < 1 else f"{times} larger")
            parts.append(f"{e['setting']} {_lr(lr)} ({word})")
    return head + ("; " + ", ".join(parts) if parts else "")


def best_gain(entries) -> dict | None:
    """The best reachable loss without clipping against the best clipped setting's:
    ``gain`` (bpc no clipping − bpc clipped, positive: clipping reached lower), ``noise``
    (the larger of the two stds over seeds) and the two entries; None where either has
    no learning rate at which every seed trained."""
    none = next((e for e in entries if e["setting"] == "none" and e["best"]), None)
    clipped = [e for e in entries if e["setting"] != "none" and e["best"]]
    if none is None or not clipped:
        return None
    top = min(clipped, key=lambda e: e["best"]["mean"])
    return {"none": none, "clipped": top,
            "gain": none["best"]["mean"] - top["best"]["mean"],
            "noise": max(none["best"]["std"], top["best"]["std"]),
            "seeds": min(none["best"]["seeds"], top["best"]["seeds"])}


def _gain_text(g) -> str:
    if g is None:
        return ("no learning rate trained every seed both without clipping and with a "
                "clipping setting, so no best loss compares")
    n, c = g["none"]["best"], g["clipped"]["best"]
    text = (f"the best reachable loss is {c['mean']:.3f} ± {c['std']:.3f} bpc with "
            f"{g['clipped']['setting']} (lr {_lr(c['learning_rate'])}) against "
            f"{n['mean']:.3f} ± {n['std']:.3f} without clipping (lr "
            f"{_lr(n['learning_rate'])}): ")
    if g["seeds"] < 2:
        return text + f"{g['gain']:+.3f} bpc, one seed: no spread to weigh it against"
    if g["gain"] > g["noise"]:
        return text + (f"clipping reaches {g['gain']:.3f} bpc lower, beyond the seeds' "
                       f"spread (std {fmt(g['noise'], 2)})")
    if g["gain"] < -g["noise"]:
        return text + (f"even the best clipped setting ends {-g['gain']:.3f} bpc higher, beyond "
                       f"the seeds' spread (std {fmt(g['noise'], 2)})")
    return text + (f"a difference of {g['gain']:+.3f} bpc, within the seeds' spread (std "
                   f"{fmt(g['noise'], 2)}): a better loss is not shown")


def glance(stability: dict | None) -> str:
    """Answers at a glance, question 1: per (cell, optimizer) the largest stable learning
    rate of the clipped setting that survives the largest, as a multiple of no clipping's,
    and in how many pairs clipping reached a lower loss beyond the seeds' spread ('' without
    a map)."""
    if not stability or not stability.get("table"):
        return ""
    parts, beyond, compared = [], 0, 0
    for c, o, entries in _panels(stability["table"]):
        none = next((e for e in entries if e["setting"] == "none"), None)
        clipped = [e for e in entries if e is not none and e["largest_stable_lr"] is not None]
        name = f"the {cell_name(c)} with {_OPTIMIZER_NAMES.get(o, o)}"
        if none is None or none["largest_stable_lr"] is None or not clipped:
            parts.append(f"no ratio for {name} (a setting diverged at every rate)")
        else:
            top = max(clipped, key=lambda e: e["largest_stable_lr"])
            ratio, times = _multiple(top, none)
            parts.append(f"the same for {name}" if math.isclose(ratio, 1.0) else
                         f"{times} for {name} ({top['setting']}"
                         + (", lower than without clipping)" if ratio < 1 else ")"))
        g = best_gain(entries)
        if g is not None and g["seeds"] >= 2:
            compared += 1
            beyond += g["gain"] > g["noise"]
    return (f"on the stability map (§2.4) the largest learning rate at which every seed "
            f"trained, the best clipping setting's against no clipping's, was "
            f"{', '.join(parts)}; the best loss over all learning rates was lower with "
            f"clipping beyond the seeds' spread in {beyond} of {compared} (cell, optimizer) "
            f"pairs")


def _table(entries) -> str:
    lines = ["| setting | largest stable lr | × no clipping | first lr with a diverged seed "
             "| best final val bpc (mean ± std) | at lr | clip fraction there |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        b = e["best"]
        ratio = "–" if e["ratio"] is None else f"{e['ratio']:.3g}"
        best = ("– | – | –" if b is None else f"{b['mean']:.3f} ± {b['std']:.3f} "
                f"| {_lr(b['learning_rate'])} | {b['clip_fraction']:.2f}")
        lines.append(f"| {e['setting']} | {_lr(e['largest_stable_lr'])} | {ratio} "
                     f"| {_lr(e['smallest_diverged_lr'])} | {best} |")
    return "\n".join(lines) + "\n"


def adaptive_choice(rules_table, setting: tuple, cells, optimizers) -> str:
    """Whether the adaptive setting the map uses is still the ablation's best: the stateful
    rules' setting with the lowest final val bpc averaged over the map's cells and
    optimizers (settings with a diverged seed left out)."""
    from charrnn import clipping
    scores = {}
    for r in rules_table:
        if (clipping.RULES[r["rule"]].stateful and r["cell"] in cells
                and r["optimizer"] in optimizers):
            scores.setdefault((r["rule"], r["threshold"]), []).append(
                math.inf if r["diverged"] else r["final_val_bpc"])
    full = {k: sum(v) / len(v) for k, v in scores.items()
            if len(v) == len(cells) * len(optimizers)}
    if not full:
        return ""
    best = min(full, key=full.get)
    if best == setting:
        return (f"{setting[0]} {setting[1]} is also the best adaptive setting of the ablation "
                f"on this page ({full[best]:.3f} bpc averaged over those panels)")
    return (f"the ablation on this page ranks {best[0]} {best[1]} first instead "
            f"({full[best]:.3f} bpc against {full.get(setting, math.nan):.3f} averaged over "
            "those panels): the map keeps the setting chosen from the earlier run")


def section(results: dict, fig: str) -> str:
    s = results["stability"]
    cfg = s["config"]
    sw, m, t = cfg["sweep"], cfg["model"], cfg["train"]
    from charrnn import clipping
    adaptive = [(rule, label) for rule in sw["rules"] if clipping.RULES[rule].stateful
                for label in sw["strengths"][rule]]
    rates = "; ".join(f"{opt} {', '.join(_lr(x) for x in sw['learning_rates'][opt])}"
                      for opt in sw["optimizers"])
    clipped = "; ".join(f"{rule} {', '.join(sw['strengths'][rule])}" for rule in sw["rules"]
                        if rule != "none")
    choice = ""
    if adaptive and "ablation" in results:
        why = adaptive_choice(results["ablation"]["rules_table"], adaptive[0], sw["cells"],
                              sw["optimizers"])
        choice = (f" The adaptive setting {adaptive[0][0]} {adaptive[0][1]} was chosen as the "
                  "one with the lowest mean final val bpc over these cells and optimizers in "
                  "the ablation of §2.2 when the map was designed" + (f"; {why}" if why else "")
                  + ".")
    panels = "".join(
        f"\n**{cell_name(c)} + {o}**: {survival(es)}. Over all learning rates, "
        f"{_gain_text(best_gain(es))}.\n\n{_table(es)}" for c, o, es in _panels(s["table"]))
    steps, ablation_steps = t["num_steps"], results["ablation"]["config"]["train"]["num_steps"]
    shorter = (f" (fewer than the {ablation_steps} of §2.1, so the losses are higher: the map "
               "asks where training survives, not where it plateaus)"
               if steps < ablation_steps else "")
    return f"""
### 2.4 Where clipping pays: the stability map

§2.1–2.2 train every setting at one learning rate per optimizer, where clipping barely
matters. What clipping is for is the step size: a clipped step is at most lr·τ long, so a
run can survive learning rates at which the unclipped run diverges (Pascanu, Mikolov &
Bengio 2013). Zhang, He, Sra & Jadbabaie (2020) prove it under their relaxed smoothness
condition: clipped gradient descent converges at a rate set by the curvature where the
gradient is small, while a fixed step must suit the largest curvature it meets.
`experiments/science/stability.py` makes the learning rate an axis: cells
{', '.join(cell_name(c) for c in sw['cells'])} ({m['num_layers']}×{m['hidden_size']}, the
model of §2.1), learning rates {rates} (constant); no clipping and {clipped} (`Nx`: N times
the reference norm of §2.1); seeds {', '.join(str(x) for x in sw['seeds'])}:
{len(s['rows'])} runs of {steps} steps{shorter}, B = {t['batch_size']}, T = {t['seq_len']};
each (cell, optimizer) is one jitted program, with the clipping rule, the learning
rate and the strength as runtime data ({s['seconds'] / 60:.1f} minutes of training on this
machine).{choice}
A setting's *largest stable learning rate* is the largest of the grid at which no seed
diverged (as in §2.1: a non-finite step, or a final val loss above the initial one); its
*best reachable loss* is the lowest mean final val bpc over the learning rates at which
every seed trained.

![stability map]({fig}/stability_map.png)
{panels}
Per-run numbers: [`stability.csv`]({fig}/stability.csv).
"""
