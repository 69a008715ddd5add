"""The report's section on Zhang et al.'s (2020) smoothness against the gradient norm.

Written from the JSON of experiments/science/smoothness.py; every number and every
sentence that states a finding comes from ``result``.
"""

import math

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


def _finding(result: dict) -> str:
    fit, late = result["fit"], result["late_fit"]
    numbers = f"slope {_f(fit['slope'], 2)}, r = {_f(fit['pearson_r'], 2)}, {fit['n']} points"
    kind = verdict(fit)
    if kind == "grows":
        text = (f"**The local smoothness grows with the gradient norm** ({numbers}), as Zhang et "
                f"al. report: L̂ ∝ ‖∇f‖^{_f(fit['slope'], 2)} along this run.")
    elif kind == "weak":
        text = (f"**The local smoothness rises only weakly with the gradient norm** ({numbers}): "
                f"the correlation is beyond what noise gives (|r| > {_f(noise_r(fit['n']), 2)} at "
                f"5%), but the gradient norm accounts for only {fit['pearson_r'] ** 2:.0%} of the "
                "spread of log L̂.")
    else:
        text = (f"**Here the local smoothness does not grow with the gradient norm** ({numbers}): "
                "this run does not reproduce Zhang et al.'s correlation.")
    seeds = result["seed_fits"]
    up = [f for f in seeds if math.isfinite(f["slope"]) and f["slope"] > 0]
    if len(seeds) > 1:
        clear = sum(verdict(f) == "grows" for f in seeds)
        text += (f" Seed by seed the slope is positive in {len(up)} of {len(seeds)} runs and the "
                 f"correlation clear (r ≥ {CLEAR_R}) in {clear}.")
    late_kind = verdict(late)
    late_numbers = (f"slope {_f(late['slope'], 2)}, r = {_f(late['pearson_r'], 2)} from step "
                    f"{result['late_from_step']} on, {late['n']} points")
    if kind != "no" and late_kind != "no":
        text += f" It holds in the second half alone as well ({late_numbers})."
    elif kind != "no" and late["pearson_r"] >= 0.5 * fit["pearson_r"]:
        text += (f" In the second half alone it is about as strong ({late_numbers}), though "
                 "that half alone cannot tell it from noise.")
    elif kind != "no":
        text += (f" In the second half alone the link is gone ({late_numbers}): it comes from the "
                 "early phase, where both quantities fall from their initial values.")
    elif late_kind != "no":
        text += f" In the second half alone a positive link appears ({late_numbers})."
    g = result["grad_norm"]
    span = g["max"] / g["min"] if g and g["min"] > 0 else math.nan
    if math.isfinite(span) and span < NARROW_SPAN:
        text += (f" The gradient norm stayed within a factor of {_f(span, 2)} "
                 f"({_f(g['min'])}–{_f(g['max'])}) over the whole run, so the fit has little "
                 "leverage.")
    return text


def _table(result: dict) -> str:
    fit, late = result["fit"], result["late_fit"]
    g, s = result["grad_norm"] or {}, result["smoothness"] or {}
    rng = lambda d: f"{_f(d.get('min'))} – {_f(d.get('median'))} – {_f(d.get('max'))}"
    return "\n".join([
        f"| | all measurements | second half (step ≥ {result['late_from_step']}) |",
        "| --- | --- | --- |",
        f"| measurements | {fit['n']} | {late['n']} |",
        f"| slope of log L̂ on log ‖∇f‖ | {_f(fit['slope'], 3)} | {_f(late['slope'], 3)} |",
        f"| Pearson r of the logs | {_f(fit['pearson_r'], 3)} | {_f(late['pearson_r'], 3)} |",
        "",
        "| seed | " + " | ".join(str(f["seed"]) for f in result["seed_fits"]) + " |",
        "| --- |" + " --- |" * len(result["seed_fits"]),
        "| slope (r) | " + " | ".join(f"{_f(f['slope'], 2)} ({_f(f['pearson_r'], 2)})"
                                     for f in result["seed_fits"]) + " |",
        "",
        "| ‖∇f(x_t)‖ min – median – max | L̂_t min – median – max | steps clipped "
        "| train loss, first → last measurement |",
        "| --- | --- | --- | --- |",
        f"| {rng(g)} | {rng(s)} | {result['clip_fraction']:.0%} "
        f"| {_f(result['first_loss'])} → {_f(result['last_loss'])} nats/char (mean over seeds) |",
    ]) + "\n"


OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


def section(result: dict, figdir: str) -> str:
    """Markdown of the section: setting, figure, table of the fits, the finding."""
    st = result["settings"]
    opt = OPTIMIZER_NAMES.get(st["optimizer"], st["optimizer"])
    seeds = ", ".join(map(str, st["seeds"]))
    return f"""
## Smoothness against the gradient norm (Zhang et al. 2020)

Zhang, He, Sra & Jadbabaie ("Why gradient clipping accelerates training", ICLR 2020, arXiv
1905.11881, Fig. 1) plot the local smoothness against the gradient norm on log-log axes along the
training of an AWD-LSTM language model on Penn Treebank and find them positively correlated: the
curvature grows with ‖∇f‖ ((L0, L1)-smoothness, ‖∇²f‖ ≤ L0 + L1‖∇f‖), so a fixed step is too
long exactly where gradients are large, and clipping shortens those steps.
`experiments/science/smoothness.py` measures this on charrnn's own training:
{st['cell'].upper()} {st['num_layers']}×{st['hidden_size']} (embedding {st['embed_dim']}, no
dropout) on the `{st['corpus']}` corpus, B = {st['batch_size']}, T = {st['seq_len']}, {opt} lr
{st['learning_rate']} ({st['schedule']}) after `{st['clip_mode']}` clipping at τ =
{st['clip_norm']}, {st['num_steps']} steps, one run per seed ({seeds}; the fits pool them).
Every {st['measure_every']} steps, with Δ_t = x_{{t+1}} − x_t the step's real update and f the
loss on {st['batch']}, L̂_t = ‖∇f(x_t + ½Δ_t) − ∇f(x_t)‖ / ‖½Δ_t‖ is set against ‖∇f(x_t)‖
(global L2 norms over all parameters); the line is the least-squares fit of log L̂ on log ‖∇f‖
({result['wall_s']:.0f} s of training and measurement).

![local smoothness against the gradient norm]({figdir}/{result['figure']})

{_table(result)}
{_finding(result)}
"""
