"""The figure of the stability map (used by stability.py; matplotlib, Agg backend).

stability_map.png: one heatmap per (cell, optimizer), learning rate across and the
clipping setting down, coloured by the mean final val bpc of the seeds that did not
diverge (up to 1 bpc above the panel's best; beyond, the top colour). A cell whose seeds all diverged is grey and crossed (its bpc, often hundreds,
does not set the colour scale); one where some diverged says how many. A box marks each
setting's largest stable learning rate, bold type its best reachable loss.
"""

import numpy as np

from experiments.science.ablation_plots import _plt

SATURATION = 1.0  # bits/char above a panel's best mean at which the colour scale ends


def _lr_label(lr: float) -> str:
    return f"{lr:g}"


def _panel(ax, entries, fig):
    """One (cell, optimizer): ``entries`` are its settings (stability.table)."""
    lrs = sorted({c["learning_rate"] for e in entries for c in e["cells"]})
    names = [e["setting"] for e in entries]
    values = np.full((len(names), len(lrs)), np.nan)
    for i, e in enumerate(entries):
        for c in e["cells"]:
            values[i, lrs.index(c["learning_rate"])] = c["mean"]
    shown = np.ma.masked_invalid(values)
    cmap = _plt().get_cmap("viridis").copy()
    cmap.set_bad("0.88")
    # the colours resolve the trained runs: SATURATION bpc above the panel's best and beyond
    # is the top colour (the numbers still say how far)
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    high = min(float(np.nanmax(values)), low + SATURATION) if np.isfinite(values).any() else 1.0
    image = ax.imshow(shown, cmap=cmap, aspect="auto", vmin=low, vmax=max(high, low + 1e-3))
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                       extend="max" if high < np.nanmax(values, initial=-np.inf) else "neither")
    bar.set_label("final val bpc", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    middle = (low + high) / 2
    for i, e in enumerate(entries):
        best = e["best"]
        for c in e["cells"]:
            j = lrs.index(c["learning_rate"])
            if c["diverged"] == c["seeds"]:
                ax.text(j, i, "×", ha="center", va="center", fontsize=13, color="0.35")
                continue
            dark = values[i, j] < middle  # light text on the dark end of viridis
            text = f"{c['mean']:.2f}"
            if c["diverged"]:
                text += f"\n{c['diverged']}/{c['seeds']} ×"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black",
                    fontweight="bold" if best is c else "normal")
        if e["largest_stable_lr"] is not None:
            j = lrs.index(e["largest_stable_lr"])
            ax.add_patch(_plt().Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                          edgecolor="red", linewidth=1.6))
    ax.set_xticks(range(len(lrs)), [_lr_label(x) for x in lrs], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("learning rate", fontsize=8)


def plot_map(path, table) -> None:
    """stability_map.png from :func:`stability.table`'s entries."""
    plt = _plt()
    groups = sorted({(e["cell"], e["optimizer"]) for e in table})
    cells = sorted({c for c, _ in groups})
    opts = sorted({o for _, o in groups}, reverse=True)  # sgd first: where clipping matters
    fig, axes = plt.subplots(len(cells), len(opts), squeeze=False,
                             figsize=(6.4 * len(opts), 0.4 + (1.2 + 0.4 * _rows(table)) * len(cells)))
    for ax in axes.ravel():
        ax.set_visible(False)
    for cell, opt in groups:
        ax = axes[cells.index(cell)][opts.index(opt)]
        ax.set_visible(True)
        mine = [e for e in table if e["cell"] == cell and e["optimizer"] == opt]
        _panel(ax, mine, fig)
        seeds = max(c["seeds"] for e in mine for c in e["cells"])
        ax.set_title(f"{cell} / {opt}: mean final val bpc over {seeds} seed"
                     + ("s" if seeds > 1 else ""), fontsize=9)
    fig.text(0.5, 0.002, "× grey: every seed diverged · k/n ×: k of n seeds diverged (the "
             "colour is the mean of the rest) · red box: the largest learning rate with no "
             "diverged seed · bold: the lowest mean of the row", ha="center", va="bottom",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rows(table) -> int:
    """Settings per panel (the most of any panel), for the figure's height."""
    counts = {}
    for e in table:
        key = (e["cell"], e["optimizer"])
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values()) if counts else 1

