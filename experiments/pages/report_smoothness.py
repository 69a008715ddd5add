"""The report's section on Zhang et al.'s (2020) smoothness against the gradient norm.

Written from the JSON of experiments/science/smoothness.py; every number and every
sentence that states a finding comes from ``result``.
"""

import math
import os

from experiments.pages.report_format import fmt as _f

# r of the log-log Pearson correlation called clear: the gradient norm then accounts for at
# least a quarter of the spread of log L̂.
CLEAR_R = 0.5
# A gradient norm spanning less than this factor (max/min) gives the fit little leverage.
NARROW_SPAN = 3.0


def noise_r(n: int) -> float:
    """|r| that n independent pairs exceed with probability 5% (two-sided; from
    t = r√(n-2)/√(1-r²) with the normal 1.96 for t, close for the n ≥ 30 measured here)."""
    return 1.96 / math.sqrt(n - 2 + 1.96 ** 2) if n > 2 else math.nan


def verdict(fit: dict) -> str:
    """'grows' (slope > 0, r ≥ CLEAR_R), 'weak' (slope > 0, noise_r(n) < r < CLEAR_R) or
    'no' (anything else: a slope ≤ 0, or an r that noise alone gives)."""
    slope, r = fit["slope"], fit["pearson_r"]
    if not (math.isfinite(slope) and math.isfinite(r)) or slope <= 0 or not r > noise_r(fit["n"]):
        return "no"
    return "grows" if r >= CLEAR_R else "weak"


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def _name(optimizer: str) -> str:
    return OPTIMIZER_NAMES.get(optimizer, optimizer)


def _finding(optimizer: str, study: dict) -> str:
    """The finding of one optimizer's study, every clause chosen by its numbers."""
    fit, late = study["fit"], study["late_fit"]
    numbers = f"slope {_f(fit['slope'], 2)}, r = {_f(fit['pearson_r'], 2)}, {fit['n']} points"
    kind, who = verdict(fit), f"With {_name(optimizer)}"
    if kind == "grows":
        text = (f"**{who} the local smoothness grows with the gradient norm** ({numbers}), as "
                f"Zhang et al. report: L̂ ∝ ‖∇f‖^{_f(fit['slope'], 2)} along these runs.")
    elif kind == "weak":
        text = (f"**{who} the local smoothness rises only weakly with the gradient norm** "
                f"({numbers}): the correlation is beyond what noise gives (|r| > "
                f"{_f(noise_r(fit['n']), 2)} at 5%), but the gradient norm accounts for only "
                f"{fit['pearson_r'] ** 2:.0%} of the spread of log L̂.")
    else:
        text = (f"**{who} the local smoothness does not grow with the gradient norm** "
                f"({numbers}): these runs do not reproduce Zhang et al.'s correlation.")
    seeds = study["seed_fits"]
    if len(seeds) > 1:
        up = sum(math.isfinite(f["slope"]) and f["slope"] > 0 for f in seeds)
        clear = sum(verdict(f) == "grows" for f in seeds)
        text += (f" Seed by seed the slope is positive in {up} of {len(seeds)} runs and the "
                 f"correlation clear (r ≥ {CLEAR_R}) in {clear}.")
    late_kind = verdict(late)
    late_numbers = (f"slope {_f(late['slope'], 2)}, r = {_f(late['pearson_r'], 2)} from step "
                    f"{study['late_from_step']} on, {late['n']} points")
    if kind != "no" and late_kind != "no":
        text += f" It holds in the second half alone as well ({late_numbers})."
    elif kind != "no" and late["pearson_r"] >= 0.5 * fit["pearson_r"]:
        text += (f" In the second half alone it is about as strong ({late_numbers}), though "
                 "that half alone cannot tell it from noise.")
    elif kind != "no":
        text += (f" In the second half alone the link is gone ({late_numbers}): it comes from the "
                 "first half of the runs.")
    elif late_kind != "no":
        text += f" In the second half alone a positive link appears ({late_numbers})."
    g = study["grad_norm"]
    span = g["max"] / g["min"] if g and g["min"] > 0 else math.nan
    if math.isfinite(span) and span < NARROW_SPAN:
        text += (f" The gradient norm stayed within a factor of {_f(span, 2)} "
                 f"({_f(g['min'])}–{_f(g['max'])}), so the fit has little leverage.")
    return text


def correlations_differ(a: dict, b: dict) -> bool:
    """Whether two fits' Pearson r differ beyond noise at 5% (two-sided), by Fisher's
    z = atanh r, whose standard error is 1/√(n - 3)."""
    if min(a["n"], b["n"]) < 4 or not all(math.isfinite(f["pearson_r"]) for f in (a, b)):
        return False
    z = lambda r: math.atanh(max(-0.999999, min(0.999999, r)))
    se = math.sqrt(1.0 / (a["n"] - 3) + 1.0 / (b["n"] - 3))
    return abs(z(a["pearson_r"]) - z(b["pearson_r"])) > 1.96 * se


def _contrast(studies: dict) -> str:
    """A closing sentence comparing the update rules' correlations, chosen by their numbers."""
    if len(studies) < 2:
        return ""
    fits = {name: study["fit"] for name, study in studies.items()}
    listed = " and ".join(f"r = {_f(f['pearson_r'], 2)} with {_name(n)}" for n, f in fits.items())
    ranked = sorted((n for n in fits if math.isfinite(fits[n]["pearson_r"])),
                    key=lambda n: fits[n]["pearson_r"])
    if len(ranked) < 2 or not correlations_differ(fits[ranked[0]], fits[ranked[-1]]):
        return f"The update rules do not differ beyond noise ({listed}).\n"
    strong, weak = ranked[-1], ranked[0]
    text = (f"The link is stronger with {_name(strong)} than with {_name(weak)} ({listed}; the "
            "difference is beyond noise at 5%, Fisher's z).")
    if strong == "sgd" and verdict(fits[strong]) != "no":
        text += (" An SGD step follows the (clipped) gradient, so its L̂ is the curvature along "
                 "−∇f, the direction in which the clipped gradient descent that Zhang et al. "
                 "analyse moves; Adam rescales the step "
                 "coordinate by coordinate, so its L̂ is the curvature along another direction.")
    return text + "\n"


def _table(studies: dict) -> str:
    """One column per optimizer: the fits, the per-seed fits, the ranges, clipping, loss."""
    names = list(studies)
    row = lambda label, cell: f"| {label} | " + " | ".join(cell(studies[n]) for n in names) + " |"
    fit = lambda key, part: lambda st: _f(st[part][key], 3)
    rng = lambda key: lambda st: ("n/a" if not st[key] else
                                  f"{_f(st[key]['min'])} – {_f(st[key]['median'])} – "
                                  f"{_f(st[key]['max'])}")
    late_from = studies[names[0]]["late_from_step"]
    return "\n".join([
        "| | " + " | ".join(_name(n) for n in names) + " |",
        "| --- |" + " --- |" * len(names),
        row("learning rate (constant)", lambda st: f"{st['learning_rate']:g}"),
        row("steps clipped", lambda st: f"{st['clip_fraction']:.0%}"),
        row("measurements (all seeds)", lambda st: str(st["fit"]["n"])),
        row("slope of log L̂ on log ‖∇f‖", fit("slope", "fit")),
        row("Pearson r of the logs", fit("pearson_r", "fit")),
        row(f"slope, second half (step ≥ {late_from})", fit("slope", "late_fit")),
        row("r, second half", fit("pearson_r", "late_fit")),
        row("slope (r) per seed", lambda st: ", ".join(
            f"{_f(f['slope'], 2)} ({_f(f['pearson_r'], 2)})" for f in st["seed_fits"])),
        row("‖∇f(x_t)‖ min – median – max", rng("grad_norm")),
        row("L̂_t min – median – max", rng("smoothness")),
        row("train loss, first → last measurement (nats/char, mean over seeds)",
            lambda st: f"{_f(st['first_loss'])} → {_f(st['last_loss'])}"),
    ]) + "\n"


def section(result: dict, figdir: str) -> str:
    """Markdown of the section: setting, figure, table of the fits, the findings."""
    st, studies = result["settings"], result["studies"]
    seeds = ", ".join(map(str, st["seeds"]))
    rules = " and ".join(f"{_name(n)} (lr {lr:g})" for n, lr in st["learning_rates"].items())
    findings = "\n".join(f"- {_finding(n, study)}" for n, study in studies.items())
    return f"""
## Smoothness against the gradient norm (Zhang et al. 2020)

Zhang, He, Sra & Jadbabaie ("Why gradient clipping accelerates training", ICLR 2020, arXiv
1905.11881, Fig. 1) plot the local smoothness against the gradient norm on log-log axes along the
training of an AWD-LSTM language model on Penn Treebank and find them positively correlated: the
curvature grows with ‖∇f‖ ((L0, L1)-smoothness, ‖∇²f‖ ≤ L0 + L1‖∇f‖), so a fixed step is too
long exactly where gradients are large, and clipping shortens those steps.
`experiments/science/smoothness.py` measures this on charrnn's own training:
{st['cell'].upper()} {st['num_layers']}×{st['hidden_size']} (embedding {st['embed_dim']}, no
dropout) on the `{os.path.basename(st['corpus'])}` corpus, B = {st['batch_size']}, T = {st['seq_len']},
`{st['clip_mode']}` clipping at τ = {st['clip_norm']} followed by {rules}, {st['num_steps']}
steps, one run per seed ({seeds}; the fits pool them). Every {st['measure_every']} steps, with
Δ_t = x_{{t+1}} − x_t the step's real update and f the loss on {st['batch']},
L̂_t = ‖∇f(x_t + ½Δ_t) − ∇f(x_t)‖ / ‖½Δ_t‖ is set against ‖∇f(x_t)‖ (global L2 norms over all
parameters); the lines are least-squares fits of log L̂ on log ‖∇f‖
({result['wall_s']:.0f} s of training and measurement).

![local smoothness against the gradient norm]({figdir}/{result['figure']})

{_table(studies)}
{findings}

{_contrast(studies)}"""
