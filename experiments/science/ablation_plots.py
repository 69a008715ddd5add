"""Figures of the clipping ablation (used by clip_ablation.py; matplotlib, Agg backend).

- val_bpc_vs_threshold.png: final val bpc against τ (as a multiple of the
  reference norm, or absolute), one panel per cell, SGD and Adam, seeds as
  dots, no clipping at the right edge; the axes span the runs that trained,
  diverged runs are crosses at the top edge with their count;
- loss_curves.png: training loss (bits/char, smoothed) of seed 0 per threshold,
  the y axis zoomed on the trained runs after the first tenth of training;
- grad_norm_traces.png: the pre-clip global gradient norm of seed 0's
  unclipped run and of its clipped runs, with each run's τ drawn;
- threshold_in_force.png: the adaptive rules' threshold over training (seed 0).

A panel whose runs all diverged says so in words.
"""

import math
import os

import numpy as np

LN2 = math.log(2.0)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _x_of(row):
    """x position of a threshold: its multiple (relative) or τ (absolute); inf for none."""
    label = row["threshold"]
    if label == "none":
        return math.inf
    return float(label[:-1]) if label.endswith("x") else float(label)


def _relative(rows) -> bool:
    return all(r["threshold"] == "none" or r["threshold"].endswith("x") for r in rows)


def _smooth(y, width):
    y = np.asarray(y, float)
    if width <= 1 or y.size < width:
        return y
    kernel = np.ones(width) / width
    return np.convolve(np.where(np.isfinite(y), y, np.nan), kernel, mode="valid")


def _diverged(row) -> bool:
    return bool(row["diverged"]) or not math.isfinite(row["final_val_bpc"])


def _trained_range(values, headroom=0.0):
    """(bottom, top) around the finite ``values`` with a margin, ``headroom`` (a fraction of
    the span) added on top for the marks of diverged runs; None without finite values."""
    values = np.asarray([v for v in values if math.isfinite(v)], float)
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    pad = max(0.08 * (high - low), 0.01)
    return low - pad, high + pad + headroom * max(high - low, 0.05)


def _say_all_diverged(ax, rows) -> bool:
    """Write 'every run diverged' across a panel whose runs all diverged; True if so."""
    if rows and all(_diverged(r) for r in rows):
        ax.text(0.5, 0.5, f"all {len(rows)} runs diverged", transform=ax.transAxes,
                ha="center", va="center", fontsize=10, color="C3")
        return True
    return False


def plot_val_vs_threshold(path, rows):
    """Final val bpc against τ, one panel per cell. The axes span the runs that trained;
    a diverged run (its bpc is often hundreds) is a cross at the top edge of its panel,
    and an optimizer whose runs all diverged says so in the legend."""
    plt = _plt()
    cells = sorted({r["cell"] for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.6 * len(cells), 3.6), squeeze=False)
    finite_x = [_x_of(r) for r in rows if math.isfinite(_x_of(r))]
    none_x = (max(finite_x) * 3) if finite_x else 1.0
    for ax, cell in zip(axes[0], cells):
        mine = [r for r in rows if r["cell"] == cell]
        span = _trained_range([r["final_val_bpc"] for r in mine if not _diverged(r)],
                              headroom=0.3)
        for i, opt in enumerate(sorted({r["optimizer"] for r in rows})):
            rs = [r for r in mine if r["optimizer"] == opt]
            if not rs:
                continue
            xs = sorted({_x_of(r) for r in rs})
            plot_x = [none_x if math.isinf(x) else x for x in xs]
            means = []
            for x, px in zip(xs, plot_x):
                vals = [r for r in rs if _x_of(r) == x]
                ok = [r["final_val_bpc"] for r in vals if not _diverged(r)]
                ax.scatter([px] * len(ok), ok, marker="o", color=f"C{i}", s=22, alpha=0.7)
                bad = len(vals) - len(ok)
                if bad:  # at the top edge, one row per optimizer
                    ax.scatter([px], [0.96 - 0.07 * i], marker="x", color=f"C{i}", s=40,
                               transform=ax.get_xaxis_transform(), clip_on=False)
                    ax.annotate(f"{bad}", (px, 0.96 - 0.07 * i), xycoords=("data", "axes fraction"),
                                xytext=(5, -3), textcoords="offset points", fontsize=7,
                                color=f"C{i}")
                means.append(np.mean(ok) if ok else np.nan)
            label = opt if any(not _diverged(r) for r in rs) else f"{opt}: all {len(rs)} diverged"
            ax.plot(plot_x, means, color=f"C{i}", label=label)
        ax.set_xscale("log")
        ticks = sorted(set(finite_x)) + [none_x]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["none"], fontsize=7)
        ax.minorticks_off()
        if span:
            ax.set_ylim(*span)
        else:
            ax.set_yticks([])
        _say_all_diverged(ax, mine)
        ax.set_title(f"{cell}: final val bpc" + (" (x at the top: n seeds diverged)" if any(
            _diverged(r) for r in mine) else ""), fontsize=9)
        ax.set_xlabel("τ / reference norm" if _relative(rows) else "τ")
        ax.set_ylabel("bits/char")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _panels(records, order):
    """(figure, [(axis, cell, optimizer, seed, that panel's records sorted by ``order``)]):
    one panel per (cell, optimizer), each showing the first seed's runs."""
    plt = _plt()
    groups = sorted({(r["row"]["cell"], r["row"]["optimizer"]) for r in records})
    seed = min(r["row"]["seed"] for r in records)
    # one column per optimizer when there are several cells (a row per cell), else a row
    opts = sorted({opt for _, opt in groups})
    rows = len(groups) // len(opts) if len(groups) > 3 and len(groups) % len(opts) == 0 else 1
    cols = len(groups) // rows
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    panels = []
    for ax, (cell, opt) in zip(axes.ravel(), groups):
        rs = sorted((r for r in records if r["row"]["cell"] == cell
                     and r["row"]["optimizer"] == opt and r["row"]["seed"] == seed), key=order)
        panels.append((ax, cell, opt, seed, rs))
    return fig, panels


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)


def plot_loss_curves(path, records):
    """Train loss (bits/char, smoothed) of the first seed per threshold. The y axis spans
    the trained runs after the first tenth of training, where the thresholds part; a run
    that diverged is marked where it left that range (or its first non-finite step)."""
    fig, panels = _panels(records, order=lambda r: _x_of(r["row"]))
    for ax, cell, opt, seed, rs in panels:
        curves = []
        for i, r in enumerate(rs):
            loss = np.asarray(r["history"]["loss"], float) / LN2
            width = max(1, loss.size // 50)
            y = _smooth(loss, width)
            x = np.arange(y.size) + width
            diverged = _diverged(r["row"])
            label = r["row"]["threshold"] + (" (diverged)" if diverged else "")
            ax.plot(x, y, color=f"C{i}", linewidth=1, label=label)
            curves.append((x, y, diverged, f"C{i}"))
        later = [v for x, y, bad, _ in curves if not bad for v in y[x >= x[-1] / 10]]
        span = _trained_range(later)
        if span:
            ax.set_ylim(*span)
        for x, y, bad, color in curves:
            if not bad:
                continue
            out = ~np.isfinite(y) | ((y > span[1]) if span else False)
            k = int(np.argmax(out)) if out.any() else len(y) - 1
            ax.scatter([x[k]], [0.97], marker="x", color=color, s=40,
                       transform=ax.get_xaxis_transform(), clip_on=False)
        positive = any(np.any(np.isfinite(y) & (y > 0)) for _, y, _, _ in curves)
        if _say_all_diverged(ax, [r["row"] for r in rs]):
            if positive:
                ax.set_yscale("log")  # the blow-up spans orders of magnitude
            else:  # no finite loss at all: no axis to read
                ax.set_yticks([])
        ax.set_title(f"{cell} / {opt}: train loss, seed {seed}" + (" (y zoomed)" if span else ""),
                     fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("bits/char")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="threshold", title_fontsize=7)
    _save(fig, path)


def plot_grad_norms(path, records):
    # unclipped first, drawn underneath
    fig, panels = _panels(records, order=lambda r: -_x_of(r["row"]))
    for ax, cell, opt, _, rs in panels:
        for i, r in enumerate(rs):
            g = np.asarray(r["history"]["grad_norm"], float)
            color = "black" if r["row"]["threshold"] == "none" else f"C{i}"
            ax.plot(np.arange(1, g.size + 1), g, color=color, linewidth=0.6, alpha=0.8,
                    label=r["row"]["threshold"])
            if math.isfinite(r["row"]["tau"]):
                ax.axhline(r["row"]["tau"], color=color, linestyle="--", linewidth=0.8)
        _say_all_diverged(ax, [r["row"] for r in rs])
        ax.set_yscale("log")
        ax.set_title(f"{cell} / {opt}: ||g|| before clipping (dashed: τ)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="threshold", title_fontsize=7)
    _save(fig, path)


def plot_all(outdir, records, table):
    del table  # the figures show every seed; the table has the means
    rows = [r["row"] for r in records]
    plot_val_vs_threshold(os.path.join(outdir, "val_bpc_vs_threshold.png"), rows)
    plot_loss_curves(os.path.join(outdir, "loss_curves.png"), records)
    plot_grad_norms(os.path.join(outdir, "grad_norm_traces.png"), records)


def plot_thresholds_in_force(path, records) -> bool:
    """threshold_in_force.png: for the adaptive rules (stateful: the threshold moves with
    the run), the threshold in force at every step of the first seed (smoothed) over that
    run's pre-clip norm (grey), one panel per (cell, optimizer). False (nothing written)
    when the grid has no adaptive rule."""
    from charrnn import clipping
    adaptive = [r for r in records if clipping.RULES[r["row"]["rule"]].stateful]
    if not adaptive:
        return False
    fig, panels = _panels(adaptive, order=lambda r: (r["row"]["rule"], _x_of(r["row"])))
    for ax, cell, opt, seed, rs in panels:
        for i, r in enumerate(rs):
            g = np.asarray(r["history"]["grad_norm"], float)
            tau = np.asarray(r["history"]["clip_threshold"], float)
            width = max(1, g.size // 100)
            ax.plot(np.arange(g.size) + 1, g, color="0.75", linewidth=0.4, zorder=0)
            shown = _smooth(np.where(np.isfinite(tau), tau, np.nan), width)
            ax.plot(np.arange(shown.size) + width, shown, color=f"C{i}", linewidth=1,
                    label=f"{r['row']['rule']} {r['row']['threshold']}")
        if not any(np.isfinite(np.asarray(r["history"]["grad_norm"], float)).any() for r in rs):
            ax.text(0.5, 0.5, "no finite norm: these runs diverged", transform=ax.transAxes,
                    ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{cell} / {opt}: threshold in force, seed {seed}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True
