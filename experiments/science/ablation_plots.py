"""Figures of the clipping ablation (used by clip_ablation.py; matplotlib, Agg backend).

- val_bpc_vs_threshold.png: final val bpc against τ (as a multiple of the
  reference norm, or absolute), one panel per cell, SGD and Adam, seeds as
  dots, diverged runs as crosses, no clipping at the right edge;
- loss_curves.png: training loss (bits/char, smoothed) of seed 0 per threshold;
- grad_norm_traces.png: the pre-clip global gradient norm of seed 0's
  unclipped run and of its clipped runs, with each run's τ drawn;
- threshold_in_force.png: the adaptive rules' threshold over training (seed 0).
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


def plot_val_vs_threshold(path, rows):
    plt = _plt()
    cells = sorted({r["cell"] for r in rows})
    fig, axes = plt.subplots(1, len(cells), figsize=(4.6 * len(cells), 3.6), squeeze=False)
    finite_x = [_x_of(r) for r in rows if math.isfinite(_x_of(r))]
    none_x = (max(finite_x) * 3) if finite_x else 1.0
    ceiling = max(r["initial_val_bpc"] for r in rows) + 0.5  # diverged runs are drawn here
    for ax, cell in zip(axes[0], cells):
        for i, opt in enumerate(sorted({r["optimizer"] for r in rows})):
            rs = [r for r in rows if r["cell"] == cell and r["optimizer"] == opt]
            if not rs:
                continue
            xs = sorted({_x_of(r) for r in rs})
            plot_x = [none_x if math.isinf(x) else x for x in xs]
            means = []
            for x, px in zip(xs, plot_x):
                vals = [r for r in rs if _x_of(r) == x]
                for r in vals:
                    y = r["final_val_bpc"]
                    bad = r["diverged"] or not math.isfinite(y)
                    ax.scatter([px], [min(y, ceiling) if math.isfinite(y) else ceiling],
                               marker="x" if bad else "o", color=f"C{i}", s=22, alpha=0.7)
                finite = [min(r["final_val_bpc"], ceiling) for r in vals
                          if math.isfinite(r["final_val_bpc"])]
                means.append(np.mean(finite) if finite else ceiling)
            ax.plot(plot_x, means, color=f"C{i}", label=opt)
        ax.set_xscale("log")
        ticks = sorted(set(finite_x)) + [none_x]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["none"], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(top=ceiling + 0.2)
        ax.set_title(f"{cell}: final val bpc (x: diverged, drawn at most {ceiling:.1f})",
                     fontsize=9)
        ax.set_xlabel("τ / reference norm" if _relative(rows) else "τ")
        ax.set_ylabel("bits/char")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    fig, panels = _panels(records, order=lambda r: _x_of(r["row"]))
    for ax, cell, opt, seed, rs in panels:
        top = 0.0
        for i, r in enumerate(rs):
            loss = np.asarray(r["history"]["loss"], float) / LN2
            width = max(1, loss.size // 50)
            y = _smooth(loss, width)
            ax.plot(np.arange(y.size) + width, y, color=f"C{i}", linewidth=1,
                    label=r["row"]["threshold"])
            top = max(top, r["row"]["initial_val_bpc"])
        ax.set_ylim(bottom=0, top=top * 1.6)
        ax.set_title(f"{cell} / {opt}: train loss, seed {seed}")
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
