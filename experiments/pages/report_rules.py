"""The REPORT.md section comparing every clipping rule, from clip_ablation.py's JSON.

One public function, :func:`section`. The findings (which rule and strength wins with
each optimizer, by how much against the seeds' spread, which diverged, whether the
runs trained to their plateau) are chosen by the numbers in ``results["ablation"]``.
"""

import math

from experiments.pages.report_format import cell_name, fmt

# The grid's runs count as trained (a plateau) when twice the training improves the best
# clipped LSTM/Adam setting by at most this many bits/char.
PLATEAU_TOLERANCE = 0.05


def _setting(r) -> str:
    return "no clipping" if r["rule"] == "none" else f"{r['rule']} {r['threshold']}"


def _ok(r) -> bool:
    return r["diverged"] == 0 and math.isfinite(r["final_val_bpc"])


def winners(rules_table: list) -> list:
    """Per (cell, optimizer): the setting with the lowest mean final val bpc among those
    with no diverged seed, the best setting of any *other* rule (the runner-up), the
    spread over settings, the unclipped row and the diverged runs per rule."""
    out = []
    for cell, opt in sorted({(r["cell"], r["optimizer"]) for r in rules_table}):
        rows = [r for r in rules_table if r["cell"] == cell and r["optimizer"] == opt]
        ok = sorted((r for r in rows if _ok(r)), key=lambda r: r["final_val_bpc"])
        best = ok[0] if ok else None
        runner = next((r for r in ok if best and r["rule"] != best["rule"]), None)
        none = next((r for r in rows if r["rule"] == "none"), None)
        diverged = {}
        for r in rows:
            if r["diverged"]:
                diverged[r["rule"]] = diverged.get(r["rule"], 0) + r["diverged"]
        out.append({"cell": cell, "optimizer": opt, "best": best, "runner_up": runner,
                    "none": none, "diverged": diverged,
                    "spread": (ok[-1]["final_val_bpc"] - ok[0]["final_val_bpc"]) if ok
                    else float("nan")})
    return out


def _winner_line(w) -> str:
    best, runner, none = w["best"], w["runner_up"], w["none"]
    head = f"- **{cell_name(w['cell'])} + {w['optimizer']}**: "
    if best is None:
        return head + "every setting diverged in at least one seed.\n"
    text = (head + f"best {_setting(best)} at {fmt(best['final_val_bpc'], 4)} ± "
            f"{fmt(best['final_val_bpc_std'], 2)} bpc (mean ± std over {best['seeds']} seeds)")
    if runner is not None:
        lead = runner["final_val_bpc"] - best["final_val_bpc"]
        noise = max(best["final_val_bpc_std"], runner["final_val_bpc_std"])
        if min(best["seeds"], runner["seeds"]) < 2:
            verdict = "one seed: no spread to weigh it against"
        elif lead > noise:
            verdict = f"larger than the seeds' spread (std {fmt(noise, 2)})"
        else:
            verdict = f"within the seeds' spread (std {fmt(noise, 2)}): the two are not told apart"
        text += f"; the best other rule, {_setting(runner)}, is {lead:.3f} bpc behind, {verdict}"
    if none is not None:
        if none["diverged"]:
            text += f"; without clipping {none['diverged']}/{none['seeds']} seeds diverged"
        else:
            text += (f"; without clipping {fmt(none['final_val_bpc'], 4)} "
                     f"({none['final_val_bpc'] - best['final_val_bpc']:+.3f})")
    if w["diverged"]:
        text += ("; diverged runs: " + ", ".join(f"{rule} {n}" for rule, n in
                                                 sorted(w["diverged"].items())))
    else:
        text += "; no run diverged"
    return text + ".\n"


def _optimizer_finding(ws: list) -> str:
    """Per cell, how far apart the settings end with SGD and with Adam; which rules
    diverged anywhere."""
    spread = {(w["cell"], w["optimizer"]): w["spread"] for w in ws}
    cells = sorted({c for c, o in spread if (c, "sgd") in spread and (c, "adam") in spread})
    pairs = [(c, spread[(c, "sgd")], spread[(c, "adam")]) for c in cells
             if math.isfinite(spread[(c, "sgd")]) and math.isfinite(spread[(c, "adam")])]
    out = ""
    if pairs:
        less = sum(a < s for _, s, a in pairs)
        verdict = ("on every cell" if less == len(pairs) else
                   "on no cell" if less == 0 else f"on {less} of {len(pairs)} cells")
        out += ("Spread of the mean final val bpc over the settings with no diverged seed, "
                "SGD against Adam: " + ", ".join(f"{cell_name(c)} {s:.3f} / {a:.3f}"
                                                for c, s, a in pairs)
                + f"; the choice of rule and strength mattered less with Adam {verdict}. ")
    diverged = {}
    for w in ws:
        for rule, n in w["diverged"].items():
            diverged[rule] = diverged.get(rule, 0) + n
    if diverged:
        out += ("Diverged runs, by rule: " + ", ".join(f"{r} {n}" for r, n in
                                                      sorted(diverged.items()))
                + "; every other rule trained every run.")
    else:
        out += "No run diverged under any rule."
    return out + "\n"


def _rule_wins(ws: list) -> str:
    """Which rules win, per optimizer, counted over the cells."""
    lines = []
    for opt in sorted({w["optimizer"] for w in ws}):
        won = [w["best"]["rule"] for w in ws if w["optimizer"] == opt and w["best"]]
        if not won:
            continue
        won = ["no clipping" if rule == "none" else rule for rule in won]
        counts = {rule: won.count(rule) for rule in dict.fromkeys(won)}
        top = max(counts.values())
        leaders = [rule for rule, n in counts.items() if n == top]
        if len(leaders) == 1 and top == len(won):
            lines.append(f"with {opt} {leaders[0]} wins on every cell")
        else:
            lines.append(f"with {opt} the winning rule differs by cell ("
                         + ", ".join(f"{rule} {n}/{len(won)}" for rule, n in counts.items()) + ")")
    return ("Winners: " + "; ".join(lines) + ".\n") if lines else ""


def noise_floor(rules_table: list) -> dict | None:
    """The largest gap between no clipping and a clipping setting that never clipped a
    step (clip fraction exactly 0: the same updates in exact arithmetic), over the
    (cell, optimizer) pairs: how far two compiled programs of one computation drift apart."""
    gaps = []
    for r in rules_table:
        if r["rule"] == "none" or r["clip_fraction"] != 0.0 or not _ok(r):
            continue
        none = next((n for n in rules_table if n["rule"] == "none" and n["cell"] == r["cell"]
                     and n["optimizer"] == r["optimizer"] and _ok(n)), None)
        if none is not None:
            gaps.append((abs(r["final_val_bpc"] - none["final_val_bpc"]), r))
    if not gaps:
        return None
    gap, row = max(gaps, key=lambda g: g[0])
    return {"gap": gap, "row": row, "count": len(gaps)}


def _noise(floor) -> str:
    if floor is None:
        return ""
    r = floor["row"]
    return (f"**Noise beyond the seeds.** {floor['count']} settings never clipped a step, so in "
            f"exact arithmetic they are the unclipped run; their mean final val bpc still "
            f"differs from no clipping by up to {floor['gap']:.3f} bpc ({cell_name(r['cell'])} + "
            f"{r['optimizer']}, {_setting(r)}): two compiled programs of the same computation "
            "round differently, and the difference grows over training. Gaps of that size "
            "between settings are not evidence for either.\n")


def _plateau(p) -> str:
    if not p:
        return ""
    gain = p["gain"]
    verdict = (f"within the {PLATEAU_TOLERANCE} bpc that marks a trained operating point"
               if gain <= PLATEAU_TOLERANCE else
               f"MORE than {PLATEAU_TOLERANCE} bpc: these runs were still learning")
    return (f"**Trained to the plateau?** The best clipped LSTM/Adam setting of the grid "
            f"({p['rule']} {p['threshold']}) was trained again, seed {p['seed']}, for "
            f"{p['long_steps']} steps instead of {p['steps']}: {fmt(p['bpc_at_steps'], 4)} val bpc "
            f"at step {p['steps']} (the grid's run: {fmt(p['grid_bpc_at_steps'], 4)}), best "
            f"{fmt(p['best_bpc_long'], 4)} by step {p['long_steps']}. Twice the training buys "
            f"{gain:.3f} bpc, {verdict}.\n")


def section(results: dict, fig: str) -> str:
    a = results["ablation"]
    cfg = a["config"]
    sw, m, t = cfg["sweep"], cfg["model"], cfg["train"]
    ws = winners(a["rules_table"])
    strengths = "; ".join(
        f"{rule} {', '.join(sw['strengths'][rule])}" for rule in sw["rules"] if rule != "none")
    figure = (f"\n![thresholds in force]({fig}/threshold_in_force.png)\n"
              if a.get("threshold_figure") else "")
    return f"""
### 2.2 Every clipping rule at a trained operating point

The same grid, every rule of `charrnn/clipping.py` ({', '.join(sw['rules'])}) at its
strengths ({strengths}; `Nx` is N times the reference norm, the other numbers are absolute:
the value bound, AGC's λ, the per-tensor RMS, AutoClip's percentile, ZClip's z-score), on
cells {', '.join(cell_name(c) for c in sw['cells'])} ({m['num_layers']}×{m['hidden_size']}),
SGD and Adam, seeds {', '.join(str(s) for s in sw['seeds'])}: {len(a['rows'])} runs of
{t['num_steps']} steps (B = {t['batch_size']}, T = {t['seq_len']}), each rule's runs of one
(cell, optimizer) one jitted program. Total training time
{a['seconds'] / 60:.1f} minutes on this machine.

{_plateau(a.get('plateau'))}
Per cell and optimizer, the setting with the lowest mean final val bpc among those where no
seed diverged:

{''.join(_winner_line(w) for w in ws)}
{_rule_wins(ws)}{_optimizer_finding(ws)}
{_noise(noise_floor(a['rules_table']))}
The adaptive rules move their threshold during training (AutoClip: a percentile of the norms
seen; ZClip: the mean plus z standard deviations of an EMA of them); the threshold in force at
every step of seed {min(sw['seeds'])}'s runs, over the pre-clip norm (grey):
{figure}
<details><summary>All settings: mean ± std over seeds</summary>

{a['markdown']}
</details>
"""
