"""Exploding and vanishing BPTT Jacobians, measured against the theory.

A tanh RNN and a linear RNN share W_hh = ρ·Q with Q a random orthogonal
[H, H] matrix (every singular value of W_hh is ρ) and random inputs. For each
ρ the script measures ||∂h_T/∂h_{T-k}||₂, k = 1..T, by autodiff through the
training scan (:func:`charrnn.diagnostics.jacobian_norms`) and fits the slope
of ln-norm against k:

- linear, h_t = h_{t-1} W_hh + x_t W_xh: ∂h_T/∂h_{T-k} = (W_hhᵀ)^k, whose norm is
  exactly ρ^k, so the slope is ln ρ;
- tanh, h_t = tanh(h_{t-1} W_hh + x_t W_xh): each step multiplies by
  diag(1 - h_t²) W_hhᵀ with |tanh'| ≤ γ = 1, so ρ^k is an upper bound and the
  slope is at most ln ρ (Pascanu, Mikolov & Bengio 2013, §2.1).

    python experiments/science/exploding_gradients.py --outdir=DIR [--rhos=0.5,0.9,1.0,1.1,1.5] [--smoke]

Writes to DIR: jacobian_norms.csv (one row per ρ, cell and k), jacobian_slopes.csv
and jacobian_slopes.md (the fitted slopes beside ln ρ), jacobian_norms.png and
exploding_gradients.json (everything, for experiments/pages/report.py).
"""

import csv
import json
import math
import os

from absl import app, flags

from experiments import cli

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for the tables and the figure.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
_RHOS = flags.DEFINE_list("rhos", ["0.5", "0.9", "1.0", "1.1", "1.5"],
                          "Spectral scales ρ of W_hh = ρ·Q (comma separated, > 0).")
_HIDDEN = flags.DEFINE_integer("hidden_size", 64, "H, the state size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 60, "T: Jacobians for k = 1..T steps back.")
_BATCH = flags.DEFINE_integer("num_sequences", 8, "Random input sequences averaged over.")
_INPUT_SCALE = flags.DEFINE_float("input_scale", 0.5, "Std of the input x_t W_xh per unit.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of Q and of the inputs.")

CELLS = ("linear", "tanh")


def measure(rho: float, hidden: int, seq_len: int, batch: int, input_scale: float,
            seed: int) -> dict:
    """ln ||∂h_T/∂h_{T-k}||₂ for k = 1..T, averaged over sequences, per cell.

    Returns {"linear": [T], "tanh": [T], "tanh_max_over_bound": float} (mean
    natural-log norms; the last is the largest norm / ρ^k over all sequences and k).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from charrnn import diagnostics, models

    kq, kx = jax.random.split(jax.random.key(seed))
    q = jax.nn.initializers.orthogonal()(kq, (hidden, hidden))
    params = {"W_xh": input_scale * jnp.eye(hidden), "W_hh": rho * q, "b": jnp.zeros(hidden)}
    xs = jax.random.normal(kx, (seq_len, batch, hidden))
    h0 = jnp.zeros((batch, hidden))

    def linear(h, x):
        h = x @ params["W_xh"] + h @ params["W_hh"] + params["b"]
        return h, h

    cell = models.cell_module("rnn", hidden_size=hidden)  # the project's tanh cell, same names
    tanh = lambda h, x: cell.apply({"params": params}, h, x)
    out = {}
    for name, step in (("linear", linear), ("tanh", tanh)):
        norms = np.asarray(diagnostics.jacobian_norms(step, h0, xs), np.float64)  # [B, T]
        out[name] = np.log(norms).mean(axis=0)
        if name == "tanh":
            bound = rho ** np.arange(1, seq_len + 1)
            out["tanh_max_over_bound"] = float((norms / bound).max())
    return out


def write_outputs(outdir: str, rhos: list, curves: dict, seq_len: int, settings: dict) -> dict:
    """CSV, Markdown table, PNG and JSON of the measured curves; returns the summary."""
    from charrnn import diagnostics
    import numpy as np

    rows, table = [], []
    for rho in rhos:
        c = curves[rho]
        for name in CELLS:
            rows += [{"rho": rho, "cell": name, "k": k + 1, "ln_norm": float(v)}
                     for k, v in enumerate(c[name])]
        table.append({
            "rho": rho, "ln_rho": math.log(rho),
            "linear_slope": diagnostics.log_slope(np.exp(c["linear"])),
            "tanh_slope": diagnostics.log_slope(np.exp(c["tanh"])),
            "tanh_max_over_bound": c["tanh_max_over_bound"],
            "linear_norm_T": float(np.exp(c["linear"][-1])),
            "tanh_norm_T": float(np.exp(c["tanh"][-1]))})
    with open(os.path.join(outdir, "jacobian_norms.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["rho", "cell", "k", "ln_norm"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(outdir, "jacobian_slopes.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(table[0]))
        w.writeheader()
        w.writerows(table)
    markdown = slopes_markdown(table, seq_len)
    with open(os.path.join(outdir, "jacobian_slopes.md"), "w") as f:
        f.write(markdown)
    plot(os.path.join(outdir, "jacobian_norms.png"), rhos, curves, seq_len)
    summary = {"settings": settings, "slopes": table, "markdown": markdown,
               "curves": {str(r): {n: [float(v) for v in curves[r][n]] for n in CELLS}
                          for r in rhos}}
    with open(os.path.join(outdir, "exploding_gradients.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def slopes_markdown(table: list, seq_len: int) -> str:
    lines = [f"| ρ | ln ρ | linear: fitted slope | tanh: fitted slope | tanh: max norm / ρ^k "
             f"| linear: norm at k={seq_len} | tanh: norm at k={seq_len} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(f"| {r['rho']:g} | {r['ln_rho']:+.4f} | {r['linear_slope']:+.4f} "
                     f"| {r['tanh_slope']:+.4f} | {r['tanh_max_over_bound']:.4f} "
                     f"| {r['linear_norm_T']:.3g} | {r['tanh_norm_T']:.3g} |")
    return "\n".join(lines) + "\n"


def plot(path: str, rhos: list, curves: dict, seq_len: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    k = np.arange(1, seq_len + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, name in zip(axes, CELLS):
        for i, rho in enumerate(rhos):
            color = f"C{i}"
            ax.plot(k, curves[rho][name] / math.log(10), color=color, label=f"ρ = {rho:g}")
            ax.plot(k, k * math.log10(rho), color=color, linestyle=":", linewidth=1)
        ax.set_title(f"{name} RNN, W_hh = ρQ (dotted: ρ^k)")
        ax.set_xlabel("k (steps back)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log10 ||∂h_T/∂h_{T-k}||₂")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    try:
        rhos = [float(r) for r in _RHOS.value]
    except ValueError:
        raise app.UsageError(f"--rhos must be numbers, got {','.join(_RHOS.value)}") from None
    if not rhos or min(rhos) <= 0:
        raise app.UsageError("--rhos must be positive numbers")
    hidden, seq_len, batch = _HIDDEN.value, _SEQ_LEN.value, _BATCH.value
    if _SMOKE.value:
        hidden, seq_len, batch = 16, 20, 2
    if min(hidden, seq_len, batch) < 1:
        raise app.UsageError("--hidden_size, --seq_len and --num_sequences must be positive")
    os.makedirs(_OUTDIR.value, exist_ok=True)
    settings = {"hidden_size": hidden, "seq_len": seq_len, "num_sequences": batch,
                "input_scale": _INPUT_SCALE.value, "seed": _SEED.value}
    curves = {rho: measure(rho, hidden, seq_len, batch, _INPUT_SCALE.value, _SEED.value)
              for rho in rhos}
    summary = write_outputs(_OUTDIR.value, rhos, curves, seq_len, settings)
    print(summary["markdown"], end="")
    print(f"wrote {_OUTDIR.value}/jacobian_slopes.md, jacobian_norms.csv, jacobian_norms.png")


if __name__ == "__main__":
    app.run(main)
