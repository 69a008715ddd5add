"""The REPORT.md section of the placement study, from experiments/science/placement.py's JSON.

One public function, :func:`section`. Its answer to "does it matter where clipping
sits?" is chosen by the numbers in ``results["placement"]``: every clipped setting is
compared with the same rule at the ``gradient`` placement, at the same cell, optimizer
and learning rate; a difference counts when the seeds that diverged differ, or when the
mean final val bpc differs by more than twice the larger std over seeds.
"""

import math

import numpy as np

from experiments.pages.report_format import cell_name, fmt

BASE = "gradient"  # the placement every other is compared with (today's default)
NOISE_FACTOR = 2.0  # a difference counts beyond this many stds over seeds


def compare(table) -> list:
    """One entry per clipped setting not at ``BASE``: its table entry, the entry of the same
    rule at ``BASE`` (same cell, optimizer, learning rate), ``kind`` ('survival' where the
    number of diverged seeds differs, 'loss' where the mean final val bpc differs beyond
    NOISE_FACTOR stds, else 'none', or 'n/a' where neither side has a seed that trained)
    and ``diff`` (bpc, this − base; NaN unless both trained)."""
    out = []
    for e in table:
        if e["rule"] == "none" or e["clip_at"] == BASE:
            continue
        base = next((b for b in table if b["clip_at"] == BASE and b["rule"] == e["rule"]
                     and (b["cell"], b["optimizer"], b["learning_rate"])
                     == (e["cell"], e["optimizer"], e["learning_rate"])), None)
        if base is None:
            continue
        both = math.isfinite(e["final_val_bpc"]) and math.isfinite(base["final_val_bpc"])
        diff = e["final_val_bpc"] - base["final_val_bpc"] if both else math.nan
        noise = max(e["final_val_bpc_std"], base["final_val_bpc_std"])
        if e["diverged"] != base["diverged"]:
            kind = "survival"
        elif not both:
            kind = "n/a"
        elif abs(diff) > NOISE_FACTOR * noise:
            kind = "loss"
        else:
            kind = "none"
        out.append({"entry": e, "base": base, "kind": kind, "diff": diff, "noise": noise})
    return out


def noise_floor(table) -> float:
    """The median std over seeds of the final val bpc, over entries where ≥ 2 seeds trained."""
    stds = [e["final_val_bpc_std"] for e in table if e["seeds"] - e["diverged"] >= 2]
    return float(np.median(stds)) if stds else math.nan


def _where(c) -> str:
    e = c["entry"]
    return f"{cell_name(e['cell'])} + {e['optimizer']} at lr {e['learning_rate']:g}"


def _difference(c) -> str:
    e, b = c["entry"], c["base"]
    if c["kind"] == "survival":
        return (f"{e['setting']} ({_where(c)}): {e['diverged']}/{e['seeds']} seeds diverged "
                f"against {b['diverged']}/{b['seeds']} at {BASE}")
    return (f"{e['setting']} ({_where(c)}): {e['final_val_bpc']:.3f} against "
            f"{b['final_val_bpc']:.3f} bpc at {BASE} ({c['diff']:+.3f}, std "
            f"{fmt(c['noise'], 2)})")


def answer(comparisons) -> str:
    """The finding: in how many comparisons the placement changed the outcome, and which."""
    counted = [c for c in comparisons if c["kind"] != "n/a"]
    moved = [c for c in counted if c["kind"] in ("survival", "loss")]
    if not counted:
        return "no comparison had a trained seed on both sides: the study answers nothing"
    unanswered = len(comparisons) - len(counted)
    head = (f"the placement changed the outcome in {len(moved)} of {len(counted)} comparisons "
            f"with the same rule at `{BASE}` (a different number of diverged seeds, or a mean "
            f"final val bpc more than {NOISE_FACTOR:g} stds over seeds apart)"
            + (f"; {unanswered} more had every seed diverged on both sides" if unanswered
               else ""))
    if not moved:
        return head + ": where clipping sits did not matter beyond the seeds' noise here"
    survival = [c for c in moved if c["kind"] == "survival"]
    loss = sorted((c for c in moved if c["kind"] == "loss"), key=lambda c: c["diff"])
    parts = []
    if survival:
        parts.append("survival: " + "; ".join(_difference(c) for c in survival))
    if loss:
        better = [c for c in loss if c["diff"] < 0]
        worse = [c for c in loss if c["diff"] > 0]
        if better:
            parts.append("lower loss than at `gradient`: "
                         + "; ".join(_difference(c) for c in better))
        if worse:
            parts.append("higher loss than at `gradient`: "
                         + "; ".join(_difference(c) for c in worse))
    return head + ". " + ". ".join(p[0].upper() + p[1:] for p in parts)


def glance(placement: dict) -> str:
    """Answers at a glance, question 2: the count of comparisons the placement changed
    ('' without a study)."""
    if not placement or not placement.get("table"):
        return ""
    counted = [c for c in compare(placement["table"]) if c["kind"] != "n/a"]
    moved = [c for c in counted if c["kind"] != "none"]
    survival = sum(c["kind"] == "survival" for c in moved)
    return (f"; moved onto the update, each sequence's gradient or into BPTT, at learning rates "
            f"where clipping acts, it changed the outcome in {len(moved)} of {len(counted)} "
            f"comparisons with the same rule on the gradient ({survival} of them in which seeds "
            "diverged) (§2.5)")


def sgd_identity(comparisons) -> str:
    """For SGD, clipping the update lr·g at lr·τ is clipping g at τ: the runs should agree
    up to the rounding of two different programs (which training can amplify)."""
    pairs = [c for c in comparisons if c["entry"]["clip_at"] == "update"
             and c["entry"]["optimizer"] == "sgd" and math.isfinite(c["diff"])]
    if not pairs:
        return ""
    worst = max(pairs, key=lambda c: abs(c["diff"]))
    exact = sum(c["diff"] == 0 for c in pairs)
    return (f" With SGD the update is −lr·g, and the update's reference is lr times the "
            f"gradient's, so update clipping is gradient clipping (clip(lr·g, lr·τ) = "
            f"lr·clip(g, τ)) up to rounding: {exact} of the {len(pairs)} SGD pairs agree to the "
            f"last digit, and the largest difference, {abs(worst['diff']):.3g} bpc "
            f"({_where(worst)}, {worst['entry']['rule']}), lies within "
            f"{abs(worst['diff']) / worst['noise']:.2g} stds over seeds: the two programs round "
            "differently, and at a rate where seeds scatter the difference grows."
            if worst["noise"] > 0 else
            f" With SGD update clipping is gradient clipping "
            f"(clip(lr·g, lr·τ) = lr·clip(g, τ)); "
            f"the largest difference of the {len(pairs)} SGD pairs is "
            f"{abs(worst['diff']):.3g} bpc.")


def _table(entries) -> str:
    rates = sorted({e["learning_rate"] for e in entries})
    head = " | ".join(f"lr {lr:g}: final val bpc | diverged | units clipped" for lr in rates)
    lines = [f"| setting | {head} |", "| --- |" + " --- | --- | --- |" * len(rates)]
    for name in dict.fromkeys(e["setting"] for e in entries):
        cells = []
        for lr in rates:
            e = next((e for e in entries if e["setting"] == name and e["learning_rate"] == lr),
                     None)
            if e is None:
                cells.append("– | – | –")
                continue
            bpc = ("–" if not math.isfinite(e["final_val_bpc"]) else
                   f"{e['final_val_bpc']:.3f} ± {e['final_val_bpc_std']:.3f}")
            units = "–" if e["rule"] == "none" else f"{e['unit_clip_fraction']:.2f}"
            cells.append(f"{bpc} | {e['diverged']}/{e['seeds']} | {units}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _references(refs) -> str:
    """One line per cell: each placement's reference (global_norm τ; value bound)."""
    lines = []
    for cell, r in refs.items():
        parts = [f"{at} {fmt(r[at]['global_norm'])} / {fmt(r[at]['value'])}"
                 for at in ("gradient", "example", "bptt") if at in r]
        parts += [f"update ({key.replace('@', ', lr ')}) {fmt(v['global_norm'])} / "
                  f"{fmt(v['value'])}" for key, v in r.get("update", {}).items()]
        lines.append(f"- {cell_name(cell)}: " + "; ".join(parts))
    return "\n".join(lines)


def section(results: dict, fig: str) -> str:
    p = results["placement"]
    cfg = p["config"]
    sw, m, t = cfg["sweep"], cfg["model"], cfg["train"]
    comparisons = compare(p["table"])
    panels = list(dict.fromkeys((e["cell"], e["optimizer"]) for e in p["table"]))
    tables = "".join(
        f"\n**{cell_name(c)} + {o}**\n\n"
        + _table([e for e in p["table"] if (e["cell"], e["optimizer"]) == (c, o)])
        for c, o in panels)
    multiples = ", ".join(f"{r} {'/'.join(sw['strengths'][r])}×" for r in sw["rules"]
                          if r != "none")
    by_cell = sw["learning_rates_by_cell"]
    rates = "; ".join(f"{cell_name(c)} {o} {', '.join(f'{x:g}' for x in by_cell[c][o])}"
                      for c in sw["cells"] for o in sw["optimizers"])
    return f"""
### 2.5 Where clipping sits

§2.1–2.4 clip the raw gradient, between the backward pass and the optimizer. Clipping can
sit elsewhere (`optim.clip_at`, README "Where clipping sits"): on the update the optimizer
computed (`update`), on each sequence's gradient before the batch mean (`example`, the
per-example clipping of DP-SGD: Abadi et al. 2016), or inside backpropagation through time
on each step's pre-activation cotangent (`bptt`, Graves 2013 §2.1, and Mikolov's clipping
as Pascanu et al. 2013 §3.1 describe it). `experiments/science/placement.py` trains the
rules {', '.join(r for r in sw['rules'] if r != 'none')} at the placements
{', '.join(sw['placements'])} (`device` is `gradient` on one device), and no clipping,
for cells {', '.join(cell_name(c) for c in sw['cells'])} ({m['num_layers']}×{m['hidden_size']},
the model of §2.1), SGD and Adam, seeds {', '.join(str(x) for x in sw['seeds'])}:
{len(p['rows'])} runs of {t['num_steps']} steps (B = {t['batch_size']}, T = {t['seq_len']};
{p['seconds'] / 60:.1f} minutes of training on this machine). The learning rates are where clipping
has work to do: per cell and optimizer the largest at which no unclipped seed diverged, and
twice it (the stability map of §2.4 for the tanh RNN and the LSTM; probes for the IRNN,
which the map does not cover: `experiments/configs/placement.py` says how each was
chosen): {rates}.

Each placement clips a different quantity, so one τ would mean a different thing at each.
Here a rule's threshold is a multiple of its placement's *reference* ({multiples}): the
threshold at which the rule changes half the units it acts on at the initial parameters (a unit: the batch's gradient, the optimizer's first update, one row's
gradient, one (row, layer, time step) cotangent; the norm for global_norm, the largest
|component| for value; the first {sw['warmup_steps']} windows of seed 0). The references
(global_norm τ / value bound):

{_references(p['references'])}

"Units clipped" below is the share of those units clipped over training.

**Does it matter where clipping sits?** At these learning rates {answer(comparisons)}.
The noise floor: the median std over seeds of a setting's final val bpc is {fmt(noise_floor(p['table']), 2)} bpc.{sgd_identity(comparisons)}

![placement]({fig}/placement.png)
{tables}
Per-run numbers: [`placement.csv`]({fig}/placement.csv).
"""
