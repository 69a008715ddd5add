"""REPORT.md §3.1, the hand-over at the start of a text: the report's language model trained
in the old carried-state regime and in today's (issue 26), read at the val split's line starts.

:func:`measure` computes everything from the two trained workdirs (report.py's steps ``lm``
and ``lm_carried``) and draws report/handover.png; :func:`section` writes the Markdown, every
sentence that states a finding chosen by the numbers.
"""

import numpy as np

from experiments.pages.report_format import fmt

# A regime's start-state curve "meets" the in-context curve at the first position from which
# |gap| stays within MEET_TOL or two standard errors (paired over the line starts) to the end.
MEET_TOL = 0.02  # nats/char
SAMPLES = {"prompt": "", "length": 200, "temperature": 0.8, "seeds": (0, 1, 2)}
SMOKE_LENGTH = 60
# Characters that make up words and lines; a sample's share of others measures its noise.
PLAIN = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ',.;:!?-\n")


def meets(gap: np.ndarray, se: np.ndarray) -> int | None:
    """The first position p (1-based) with |gap_j| <= max(MEET_TOL, 2 se_j) for every j >= p;
    None when the last position is outside too."""
    inside = np.abs(gap) <= np.maximum(MEET_TOL, 2 * se)
    if not inside[-1]:
        return None
    outside = np.flatnonzero(~inside)
    return int(outside[-1]) + 2 if len(outside) else 1


def _row_losses(model, params, ids, config) -> tuple[np.ndarray, np.ndarray]:
    """(nats summed, characters scored) per eval stream [B]: the val evaluation of training
    (charrnn.step.evaluate), kept per stream so two runs can be compared block by block."""
    from charrnn import data
    from charrnn import step as step_lib
    eval_fn = step_lib.make_eval_step(model)
    B = config.train.eval_batch_size
    carry = model.start_carry(params, B)
    total, count = np.zeros(B), np.zeros(B)
    for x, y, mask in data.eval_windows(ids, B, config.train.seq_len, data.EVAL_BURN_IN):
        carry, nll = eval_fn(params, carry, x, y, mask)
        total += np.asarray(nll, np.float64)
        count += np.asarray(mask, np.float64).sum(axis=1)
    return total, count


def stream_starts(records: list, batch_size: int, windows_per_epoch: int, steps: int) -> float:
    """How many times a training stream began from the start state in ``steps`` windows: every
    stream at each epoch's start (windows 0, W, 2W, ...), plus the restarts the train records'
    ``restart_fraction`` (the share of streams per window, logged when reset_prob > 0) count,
    which include those at the epochs' starts."""
    train = [r for r in records if r["split"] == "train"]
    if train and "restart_fraction" in train[0]:
        covered = np.diff([0] + [r["step"] for r in train])  # steps each record averages
        return float(batch_size * sum(n * r["restart_fraction"] for n, r in zip(covered, train)))
    return float(batch_size * -(-steps // windows_per_epoch))


def _one(workdir: str, smoke: bool) -> dict:
    """The hand-over measures, val loss per stream and samples of one trained workdir."""
    from charrnn import data, metrics, restore, sampling, start
    config, vocab, model, params, step = restore.load_checkpoint(workdir)
    text = data.load_corpus(config.data)
    train, val, _ = data.split(vocab.encode(text), config.data.val_fraction,
                               config.data.test_fraction)
    B = config.train.batch_size
    windows = data.Batcher(train, B, config.train.seq_len, config.seed).windows_per_epoch
    nll_start, nll_context = start.position_nll(model, params, val, start.newline_id(vocab))
    total, count = _row_losses(model, params, val, config)
    scored = count > 0  # streams of a short split may score nothing
    length = SMOKE_LENGTH if smoke else SAMPLES["length"]
    texts = [sampling.sample(params, vocab, model, prompt=SAMPLES["prompt"], length=length,
                             temperature=SAMPLES["temperature"], seed=s)[0]
             for s in SAMPLES["seeds"]]
    return {"step": step, "start_state": config.model.start_state,
            "reset_prob": config.train.reset_prob, "nll_start": nll_start,
            "nll_context": nll_context, "row_loss": total[scored] / count[scored],
            "val_loss": float(total.sum() / count.sum()), "samples": texts,
            "sample_length": length, "batch_size": B, "windows_per_epoch": windows,
            "stream_starts": stream_starts(metrics.read_metrics(workdir), B, windows, step)}


def measure(runs: dict, outdir: str, smoke: bool) -> dict:
    """``runs``: {"carried": workdir, "restarts": workdir}; :func:`summarize` of their
    measures. Draws ``outdir``/handover.png when the val split has line starts."""
    import os
    out = summarize({name: _one(wd, smoke) for name, wd in runs.items()})
    if "gap_diff" in out:
        _plot(os.path.join(outdir, "handover.png"), out["regimes"])
    return out


def summarize(raw: dict) -> dict:
    """Per regime of ``raw`` ({"carried": ..., "restarts": ...}, as :func:`_one` returns):
    start_loss, context_loss, start gap, the curves [L] and their gap's standard error (over
    the line starts), where they meet, the val loss, the samples; and the paired differences
    restarts − carried of the start gap (per line start) and of the val loss (per eval
    stream), each {"mean", "se", "n"}."""
    from charrnn import start
    head = slice(0, start.START_CHARS)
    out = {"regimes": {}, "start_chars": start.START_CHARS, "lines": None,
           "samples": dict(SAMPLES, length=raw["restarts"]["sample_length"])}
    for name, r in raw.items():
        reg = {k: r[k] for k in ("step", "start_state", "reset_prob", "val_loss", "samples",
                                 "batch_size", "windows_per_epoch", "stream_starts")}
        reg["plain_share"] = _plain_share(r["samples"])
        if r["nll_start"] is not None:
            gap = r["nll_start"] - r["nll_context"]  # [K, L]
            se = gap.std(axis=0, ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else 0 * gap[0]
            reg.update(start_loss=float(r["nll_start"][:, head].mean()),
                       context_loss=float(r["nll_context"][:, head].mean()),
                       curve_start=r["nll_start"].mean(axis=0).tolist(),
                       curve_context=r["nll_context"].mean(axis=0).tolist(),
                       gap_se=se.tolist(), meets=meets(gap.mean(axis=0), se))
            reg["start_gap"] = reg["start_loss"] - reg["context_loss"]
            out["lines"] = len(gap)
        out["regimes"][name] = reg
    a, b = raw["carried"], raw["restarts"]
    out["val_diff"] = _paired(b["row_loss"] - a["row_loss"])
    if a["nll_start"] is not None and b["nll_start"] is not None:
        gaps = [(r["nll_start"] - r["nll_context"])[:, head].mean(axis=1) for r in (a, b)]
        out["gap_diff"] = _paired(gaps[1] - gaps[0])
    return out


def _paired(d: np.ndarray) -> dict:
    """Mean and standard error of paired differences d [n]."""
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "n": len(d)}


def _plain_share(texts: list) -> float:
    """Share of the samples' characters that are letters, spaces, newlines or , . ; : ! ? ' -."""
    chars = "".join(texts)
    return sum(c in PLAIN for c in chars) / max(len(chars), 1)


def _label(reg: dict) -> str:
    return f"start_state {reg['start_state']}, reset_prob {reg['reset_prob']:g}"


def _plot(path: str, regimes: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    for (name, reg), color in zip(regimes.items(), ("tab:red", "tab:blue")):
        pos = np.arange(1, len(reg["curve_start"]) + 1)
        left.plot(pos, reg["curve_start"], color=color, label=f"{name}: from the start state")
        left.plot(pos, reg["curve_context"], color=color, ls=":",
                  label=f"{name}: after the true context")
        gap = np.subtract(reg["curve_start"], reg["curve_context"])
        band = 2 * np.asarray(reg["gap_se"])
        right.plot(pos, gap, color=color, label=f"{name} (reset_prob {reg['reset_prob']:g})")
        right.fill_between(pos, gap - band, gap + band, color=color, alpha=0.2, lw=0)
    right.axhline(0, color="k", lw=0.6)
    titles = {left: ("cross-entropy (nats/char)", "loss by position, val line starts"),
              right: ("start gap (nats/char)", "from start − in context (±2 s.e.)")}
    for ax, (ylabel, title) in titles.items():
        ax.set(xscale="log", xlabel="position after a line start", ylabel=ylabel, title=title,
               xticks=[1, 2, 4, 8, 16, 32, 64], xticklabels=["1", "2", "4", "8", "16", "32", "64"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


def _finding_gap(h: dict) -> str:
    old, new = h["regimes"]["carried"], h["regimes"]["restarts"]
    d = h["gap_diff"]
    n = h["start_chars"]
    first = (f"Over the first {n} characters after {h['lines']} val line starts, the start gap "
             f"is {fmt(old['start_gap'])} nats/char with the carried state (start_loss "
             f"{fmt(old['start_loss'], 4)} against {fmt(old['context_loss'], 4)} in context) and "
             f"{fmt(new['start_gap'])} with restarts ({fmt(new['start_loss'], 4)} against "
             f"{fmt(new['context_loss'], 4)}).")
    if abs(d["mean"]) > 2 * d["se"]:
        verdict = (f"Restarts {'narrow' if d['mean'] < 0 else 'WIDEN'} it by "
                   f"{fmt(abs(d['mean']))} nats/char, {abs(d['mean']) / d['se']:.0f} standard "
                   "errors of the paired difference over the line starts.")
    else:
        verdict = (f"The two gaps differ by {fmt(d['mean'])} nats/char, within two standard "
                   f"errors ({fmt(d['se'])}) of the paired difference over the line starts: "
                   "no measurable change.")
    return f"{first} {verdict}"


def _finding_meet(h: dict) -> str:
    def where(name):
        reg = h["regimes"][name]
        p = reg["meets"]
        return (f"{name}: from position {p}" if p is not None else
                f"{name}: not within the {len(reg['curve_start'])} positions measured")
    first = {name: reg["curve_start"][0] - reg["curve_context"][0]
             for name, reg in h["regimes"].items()}
    return (f"The start-state curve meets the in-context one (the gap stays within "
            f"{MEET_TOL} nats/char or two standard errors to the last position) — "
            f"{where('carried')}; {where('restarts')}. The first character after the newline "
            f"alone has a gap of {fmt(first['carried'])} nats/char carried and "
            f"{fmt(first['restarts'])} with restarts.")


def _finding_val(h: dict) -> str:
    old, new = h["regimes"]["carried"], h["regimes"]["restarts"]
    d = h["val_diff"]
    within = abs(d["mean"]) <= 2 * d["se"]
    return (f"Val loss at step {new['step']}: {fmt(old['val_loss'], 4)} nats/char carried, "
            f"{fmt(new['val_loss'], 4)} with restarts, a difference (restarts − carried) of "
            f"{d['mean']:+.4f} with a "
            f"standard error of {fmt(d['se'])} over the {d['n']} contiguous blocks evaluation "
            "reads (its streams): "
            + ("within two standard errors of the evaluation text's own noise."
               if within else "beyond two standard errors of the evaluation text's own noise.")
            + " One training seed per regime: the spread between training seeds is not "
            "measured here and may be larger.")


def glance(h: dict) -> str:
    """The hand-over in one clause for the report's answers at a glance ("" without one)."""
    if "gap_diff" not in h:
        return ""
    old, new = h["regimes"]["carried"], h["regimes"]["restarts"]
    return (f"; at the start of a text (the first {h['start_chars']} characters after a line "
            f"start, from the start state) the model loses {fmt(new['start_gap'])} nats/char "
            f"against reading in context when training restarted its streams, "
            f"{fmt(old['start_gap'])} when it carried the state (§3.1)")


def _samples(h: dict) -> str:
    s = h["samples"]
    parts = []
    for name, reg in h["regimes"].items():
        body = "\n".join(f"seed {seed}:\n{text}\n"
                         for seed, text in zip(s["seeds"], reg["samples"]))
        parts.append(f"**{name}** ({_label(reg)}), {100 * reg['plain_share']:.0f}% of the "
                     f"characters letters, spaces, newlines or , . ; : ! ? ' -:\n\n"
                     f"```text\n{body}```\n")
    return "\n".join(parts)


def _budget(old: dict, new: dict) -> str:
    if old["step"] == new["step"] and old["batch_size"] == new["batch_size"]:
        return (f"the same budget ({new['step']} steps of {new['batch_size']} streams, the "
                "same seed)")
    return (f"budgets that are NOT the same ({old['step']} steps of {old['batch_size']} streams "
            f"carried, {new['step']} of {new['batch_size']} with restarts)")


def _defaults_or_not(reg: dict) -> str:
    """Whether a regime is the default config's, read from experiments/configs/default.py."""
    from experiments.configs import default
    d = default.get_config()
    same = (d.model.start_state, d.train.reset_prob) == (reg["start_state"], reg["reset_prob"])
    return "today's defaults" if same else "NOT today's defaults"


def section(h: dict, fig: str) -> str:
    from charrnn import start
    old, new = h["regimes"]["carried"], h["regimes"]["restarts"]
    s = h["samples"]
    if "gap_diff" not in h:
        measured = "The val split has no line start to measure the hand-over at.\n"
    else:
        measured = (f"{_finding_gap(h)}\n\n{_finding_meet(h)}\n\n"
                    f"![Loss by position after a line start]({fig}/handover.png)\n")
    return f"""
## The hand-over: the first characters of a text

Sampling from an empty prompt, priming and evaluation all begin in the model's start state
(`model.start_state`). Until issue 26 training carried the hidden state from window to window
and restarted it only at an epoch's start. The report's language model was trained twice on
{_budget(old, new)}: **carried** ({_label(old)}: the old regime) and **restarts**
({_label(new)}: {_defaults_or_not(new)}, each stream restarting from the start state with
that probability per window). An
epoch is {old['windows_per_epoch']} windows here, so in training the streams began from the
start state {old['stream_starts']:.0f} times in all with the carried state (every stream at
each epoch's start) and {new['stream_starts']:.0f} times with restarts.

`charrnn/start.py` reads the val split's line starts twice, from the start state primed on
the newline and after the {start.CONTEXT} characters that really precede it, and scores the
same next characters both ways; the start gap is the difference.

{measured}
{_finding_val(h)}

Samples from the empty prompt (temperature {s['temperature']}, {s['length']} characters,
seeds {', '.join(map(str, s['seeds']))}; `launch.py --mode=sample --prompt="{s['prompt']}"
--length={s['length']} --temperature={s['temperature']} --seed=N`):

{_samples(h)}"""
