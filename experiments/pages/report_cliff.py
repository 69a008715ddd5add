"""The REPORT.md section on Pascanu, Mikolov & Bengio's cliff, from cliff.py's JSON.

One public function, :func:`section`. Every sentence that states a finding is
chosen by the numbers in ``result`` (experiments/science/cliff.py writes it).
"""

from experiments.pages.report_format import fmt

# A step "jumps far" past the wall when it lands more than this many clipped-step
# bounds η·τ from the wall line; "stranded" runs end above this loss (the far plateau
# σ(x_T) → 1 has E → (1 − 0.7)² = 0.09, the minimum is 0).
FAR_FACTOR = 2.0
STRANDED_LOSS = 0.05


def verdicts(result: dict) -> dict:
    """The numbers the finding sentences are chosen by."""
    runs, bound = result["runs"], result["bound"]
    unc = [r for r in runs if r["variant"] == "unclipped"]
    clp = [r for r in runs if r["variant"] == "clipped"]
    wall = result["wall"]
    return {
        "bound": bound,
        "wall_orders": wall["orders_of_magnitude"],
        "line_orders": _log10_ratio(max(wall["grad_norm_on_line"].values(), default=0.0),
                                    wall["grad_norm_median"]),
        "max_on_line": wall["fraction_max_on_line"],
        "unc_max_step": max(r["max_step"] for r in unc),
        "clp_max_step": max(r["max_step"] for r in clp),
        "unc_max_past": max(r["max_past_wall"] for r in unc),
        "clp_max_past": max(r["max_past_wall"] for r in clp),
        "unc_far": sum(r["max_past_wall"] > FAR_FACTOR * bound for r in unc),
        "unc_stranded": sum(r["final_loss"] > STRANDED_LOSS for r in unc),
        "clp_stranded": sum(r["final_loss"] > STRANDED_LOSS for r in clp),
        "starts": len(unc),
    }


def _log10_ratio(a: float, b: float) -> float:
    import math
    return math.log10(a / b) if a > 0 and b > 0 else 0.0


def finding_wall(v: dict) -> str:
    if v["wall_orders"] >= 3 or v["line_orders"] >= 3:
        where = ("in every grid column past w_c its maximum lies within one cell of the wall line"
                 if v["max_on_line"] == 1.0 else
                 f"in {fmt(100 * v['max_on_line'], 3)}% of the grid columns past w_c its maximum "
                 "lies within one cell of the wall line")
        return (f"**There is a wall.** ‖∇E‖ spans {v['wall_orders']:.1f} orders of magnitude "
                f"over the grid (max / median) and at least {v['line_orders']:.1f} on the wall "
                f"line itself; {where}.")
    return (f"**No wall showed in this grid:** ‖∇E‖ spans only {v['wall_orders']:.1f} orders "
            f"of magnitude (max / median), {v['line_orders']:.1f} on the wall line.")


def finding_steps(v: dict) -> str:
    bound, n = v["bound"], v["starts"]
    clipped_ok = v["clp_max_step"] <= bound * (1 + 1e-9)
    if v["unc_far"] > 0 and clipped_ok:
        head = (f"**Unclipped SGD jumps far past the wall; clipped SGD stays within η·τ.** "
                f"In {v['unc_far']} of {n} runs without clipping a step landed more than "
                f"{FAR_FACTOR:g}·η·τ = {fmt(FAR_FACTOR * bound)} past the wall (farthest "
                f"{fmt(v['unc_max_past'])}; largest step {fmt(v['unc_max_step'])}, "
                f"{fmt(v['unc_max_step'] / bound)}× η·τ), while no clipped step was longer than "
                f"{fmt(v['clp_max_step'])} ≤ η·τ = {fmt(bound)}.")
    elif clipped_ok:
        head = (f"**Without clipping no step landed far past the wall here:** the farthest "
                f"landing was {fmt(v['unc_max_past'])} (≤ {FAR_FACTOR:g}·η·τ = "
                f"{fmt(FAR_FACTOR * bound)}; largest step {fmt(v['unc_max_step'])}); clipped "
                f"steps stayed within η·τ = {fmt(bound)} (largest {fmt(v['clp_max_step'])}).")
    else:
        head = (f"**A clipped step exceeded η·τ = {fmt(bound)}** (largest "
                f"{fmt(v['clp_max_step'])}): the clipping did not bound the steps.")
    if v["unc_stranded"] > v["clp_stranded"]:
        tail = (f" The jumps cost the fit: {v['unc_stranded']} of {n} unclipped runs end on the "
                f"far plateau (final E > {STRANDED_LOSS:g}), against {v['clp_stranded']} of {n} "
                "clipped ones.")
    elif v["unc_stranded"] == v["clp_stranded"]:
        tail = (f" The final losses do not separate the variants: {v['unc_stranded']} of {n} "
                f"runs end above E = {STRANDED_LOSS:g} with and without clipping.")
    else:
        tail = (f" Clipping did not help the fit here: {v['clp_stranded']} of {n} clipped runs "
                f"end above E = {STRANDED_LOSS:g}, against {v['unc_stranded']} unclipped.")
    return head + tail


def table(result: dict) -> str:
    lines = ["| start (w, b) | SGD | largest step ‖Δθ‖ | steps clipped | steps landing past "
             "the wall | farthest landing past the wall | max ‖∇E‖ | final E |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        clipped = "–" if r["variant"] == "unclipped" else str(r["clipped_steps"])
        lines.append(f"| ({r['start'][0]:g}, {r['start'][1]:g}) | {r['variant']} "
                     f"| {fmt(r['max_step'])} | {clipped} | {r['steps_past_wall']} "
                     f"| {fmt(r['max_past_wall'])} | {fmt(r['max_grad_norm'])} "
                     f"| {fmt(r['final_loss'])} |")
    return "\n".join(lines) + "\n"


def section(result: dict, figdir: str) -> str:
    """The Markdown of the cliff section (heading, setting and source, figure, table, findings)."""
    s, wall = result["settings"], result["wall"]
    v = verdicts(result)
    starts = ", ".join(f"({w:g}, {b:g})" for w, b in s["starts"])
    smoke = " (smoke settings: the numbers only check the pipeline)" if s.get("smoke") else ""
    return f"""
## The cliff of a one-unit recurrent network (Pascanu, Mikolov & Bengio 2013)

The network of their Fig. 6 ({s['source']}): $x_t = w\\,\\sigma(x_{{t-1}}) + b$,
$\\sigma$ the logistic sigmoid, no input, $x_0 = {s['x0']:g}$, loss
$E(w, b) = (\\sigma(x_{{{s['T']}}}) - {s['target']:g})^2$ — $x_0$, the target and the loss are the
paper's. Our choices (the paper gives none): the grid $w \\in [{s['w_range'][0]:g}, {s['w_range'][1]:g}]$,
$b \\in [{s['b_range'][0]:g}, {s['b_range'][1]:g}]$ at {s['grid']}×{s['grid']} points; SGD with
η = {s['lr']:g} for {s['steps']} steps from {starts}, once unclipped and once with global-norm
clipping at τ = {s['tau']:g} (`charrnn.clipping` rule `global_norm`), so a clipped step is at most
η·τ = {fmt(v['bound'])}; float64 gradients by `jax.grad`{smoke}.

The wall is the line $b = x_0 - w\\,\\sigma(x_0)$ for $w > w_c = 1/\\sigma'(x_0) = {wall['w_critical']:.4f}$:
there $x_0$ is an unstable fixed point of $x \\mapsto w\\sigma(x) + b$, and $x_{{{s['T']}}}$ falls to the
lower attractor below it (where every start lies, E ≈ 0.49) and climbs to the upper one above it.
A step *lands past the wall* when it ends above the line at $w > w_c$; "how far" is the distance of
its end point from the line.

![The loss surface of the one-unit RNN with the SGD trajectories]({figdir}/cliff.png)

{table(result)}
{finding_wall(v)}

{finding_steps(v)}
"""
