"""Pascanu, Mikolov & Bengio (2013): the cliff of a one-unit recurrent network, measured.

The model is eq. (8) of §2.3 ("The geometrical interpretation") of "On the difficulty
of training recurrent neural networks" (ICML 2013, PMLR 28:1310–1318; arXiv:1211.5063),
the network of their Fig. 6 (the error surface with a wall and the clipped/unclipped
trajectories):

    x_t = w·σ(x_{t−1}) + b,  t = 1..T,  σ the logistic sigmoid, no input,
    E(w, b) = (σ(x_T) − 0.7)²,  x_0 = 0.5,  T = 50.

x_0 = 0.5, the target 0.7 on σ(x_50) and the squared error are the paper's (§2.3:
"Fig. 6 shows the error surface E_50 = (σ(x_50) − 0.7)², where x_0 = .5"). The paper
gives no grid range, learning rate, threshold or starting points: those below are our
choice, made so that the trajectories meet the wall (see :data:`FULL`).

Where the wall is, exactly. For w > 0 the map f(x) = w·σ(x) + b is increasing, so
x_0, x_1, ... is monotone: it rises when f(x_0) > x_0 and falls when f(x_0) < x_0. The
line f(x_0) = x_0, i.e. b = x_0 − w·σ(x_0), therefore splits the plane into the
parameters whose x_T climbs and those whose x_T sinks. For w > w_c = 1/σ'(x_0)
(= 4.2553 at x_0 = 0.5), x_0 is an unstable fixed point on that line, f has two
attractors, and x_T jumps from the lower to the upper one across it: the loss steps
from (σ(x_lo) − 0.7)² to (σ(x_hi) − 0.7)² (→ 0.49 and 0.09 as w grows; 0.34 and 0.01 at w = 5) inside a band
whose width shrinks like
(w·σ'(x_0))^−T, and ∂E/∂θ grows like (w·σ'(x_0))^T there. That segment of the line is
the wall. Every start lies below the line (x_T sinks, E ≈ 0.49); a step of SGD *lands
past the wall* when it ends above the line at w > w_c, and how far past is the distance
of its end point from the line.

Measured: the loss and ‖∇E‖ over a (w, b) grid (jax.vmap of jax.grad, float64), and
SGD θ ← θ − η·clip(∇E) from each start, once with the project's ``none`` rule and once
with ``global_norm`` at τ (charrnn.clipping: ĝ = g·τ/‖g‖ when ‖g‖ > τ), so that every
clipped step has length ≤ η·τ.

    python experiments/science/cliff.py --outdir=DIR [--smoke]

Writes to DIR: cliff.json (settings, the wall's numbers, one summary per start and
variant), cliff_steps.csv (every SGD step: start, variant, step, w, b, loss, grad
norm, step length, distance past the wall) and cliff.png (the log-loss surface with both
trajectories, and the log gradient norm with the wall line).
"""

import csv
import math
import os
import sys

from absl import app, flags

from experiments import cli

X0, TARGET, T = 0.5, 0.7, 50  # Pascanu et al. 2013, §2.3 and Fig. 6

# Our choices (the paper does not state them). Starts lie on the high-loss side of
# the wall (x_T sinks to the lower attractor, E ≈ 0.49), where ∇E points at the wall.
FULL = {"w_range": (0.0, 10.0), "b_range": (-8.0, 2.0), "grid": 401, "lr": 0.5, "tau": 1.0,
        "steps": 1000,
        "starts": ((5.0, -4.0), (6.0, -4.0), (6.5, -4.0), (7.0, -4.2), (7.5, -4.5))}
SMOKE = dict(FULL, grid=61, steps=200, starts=((5.0, -4.0), (6.5, -4.0)))
SOURCE = ("Pascanu, Mikolov & Bengio 2013, On the difficulty of training recurrent neural "
          "networks, ICML (PMLR 28:1310-1318), arXiv:1211.5063, section 2.3, eq. (8), Fig. 6")
VARIANTS = {"unclipped": "none", "clipped": "global_norm"}  # label -> charrnn.clipping rule


def sigmoid_prime(x: float) -> float:
    s = 1.0 / (1.0 + math.exp(-x))
    return s * (1.0 - s)


def w_critical(x0: float = X0) -> float:
    """w_c = 1/σ'(x_0): above it x_0 is an unstable fixed point on the wall line."""
    return 1.0 / sigmoid_prime(x0)


def wall_b(w, x0: float = X0):
    """The wall line b = x_0 − w·σ(x_0) (where f(x_0) = x_0); works on floats and arrays."""
    return x0 - w / (1.0 + math.exp(-x0))


def wall_distance(w, b, x0: float = X0):
    """Signed distance of (w, b) from the wall line, > 0 on the side where x_t climbs."""
    s = 1.0 / (1.0 + math.exp(-x0))
    return (b - wall_b(w, x0)) / math.hypot(1.0, s)


def loss(theta, x0: float = X0, target: float = TARGET, steps: int = T):
    """E(θ) = (σ(x_T) − target)², θ = [w, b] (float64 [2]); x_t by jax.lax.fori_loop."""
    import jax
    w, b = theta[0], theta[1]
    x = jax.lax.fori_loop(0, steps, lambda _, x: w * jax.nn.sigmoid(x) + b, x0 + 0.0 * w)
    return (jax.nn.sigmoid(x) - target) ** 2


def surface(w_axis, b_axis) -> tuple:
    """(E, ‖∇E‖), each float64 [len(b_axis), len(w_axis)] (rows b, columns w)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    with jax.enable_x64(True):
        ww, bb = jnp.meshgrid(jnp.asarray(w_axis, jnp.float64), jnp.asarray(b_axis, jnp.float64))
        thetas = jnp.stack([ww.ravel(), bb.ravel()], axis=1)
        e, g = jax.jit(jax.vmap(jax.value_and_grad(loss)))(thetas)
        shape = ww.shape
        return (np.asarray(e).reshape(shape), np.asarray(jnp.linalg.norm(g, axis=1)).reshape(shape))


def sgd(start, lr: float, rule: str, tau: float, steps: int) -> dict:
    """``steps`` steps of θ ← θ − η·ĝ, ĝ the charrnn.clipping rule applied to ∇E(θ).

    Returns float64 numpy arrays: theta [S+1, 2], loss [S+1], grad_norm [S+1]
    (‖∇E‖ before clipping; the last entries at the final θ) and step [S] (‖Δθ‖).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from charrnn import clipping
    registered = clipping.get(rule)
    transform = registered.make(tau) if registered.strength else registered.make()
    value_and_grad = jax.value_and_grad(loss)

    def body(theta, _):
        e, g = value_and_grad(theta)
        clipped, _ = transform.update(g, transform.init(g))
        new = theta - lr * clipped
        return new, (theta, e, jnp.linalg.norm(g), jnp.linalg.norm(new - theta))

    with jax.enable_x64(True):
        theta0 = jnp.asarray(start, jnp.float64)
        final, (thetas, es, norms, lengths) = jax.jit(
            lambda t: jax.lax.scan(body, t, None, length=steps))(theta0)
        e_final, g_final = value_and_grad(final)
        return {"theta": np.vstack([np.asarray(thetas), np.asarray(final)[None]]),
                "loss": np.append(np.asarray(es), float(e_final)),
                "grad_norm": np.append(np.asarray(norms), float(jnp.linalg.norm(g_final))),
                "step": np.asarray(lengths)}


def past_wall(theta, x0: float = X0):
    """Per point (float [N]): its distance past the wall, i.e. from the wall line when it
    lies on the climbing side (b above the line, x_T → the upper attractor) at w > w_c,
    else 0. The starts lie on the other side."""
    import numpy as np
    d = wall_distance(theta[:, 0], theta[:, 1], x0)
    return np.where((d > 0) & (theta[:, 0] > w_critical(x0)), d, 0.0)


def summarize(run: dict, tau, x0: float = X0) -> dict:
    """The table's numbers for one trajectory (tau None for the unclipped run)."""
    past = past_wall(run["theta"][1:], x0)  # where each step lands
    return {"max_step": float(run["step"].max()),
            "argmax_step": int(run["step"].argmax()),
            "steps_past_wall": int((past > 0).sum()),
            "max_past_wall": float(past.max()),
            "max_grad_norm": float(run["grad_norm"].max()),
            "clipped_steps": 0 if tau is None else int((run["grad_norm"][:-1] > tau).sum()),
            "initial_loss": float(run["loss"][0]),
            "final_loss": float(run["loss"][-1]),
            "final_theta": [float(v) for v in run["theta"][-1]]}


def on_line_norms(w_axis, x0: float = X0) -> dict:
    """‖∇E‖ on the wall line at three w > w_c inside the grid (str(w) -> norm): the wall's
    height, which a grid only samples. A lower bound: float64 rounding moves x_t off the
    unstable fixed point x_0, and the error grows like (w·σ'(x_0))^t before x_T settles."""
    import jax
    import jax.numpy as jnp
    lo = max(w_critical(x0), float(w_axis[0]))
    ws = [lo + f * (float(w_axis[-1]) - lo) for f in (0.25, 0.5, 1.0)]
    with jax.enable_x64(True):
        grad = jax.jit(jax.grad(loss))
        return {f"{w:.3f}": float(jnp.linalg.norm(grad(jnp.array([w, wall_b(w, x0)])))) for w in ws}


def wall_numbers(w_axis, b_axis, e, gnorm, x0: float = X0) -> dict:
    """The wall as seen on the grid: ‖∇E‖'s spread, and whether in each column with
    w > w_c its maximum sits within one b-cell of the wall line."""
    import numpy as np
    db = float(b_axis[1] - b_axis[0])
    cols = [j for j, w in enumerate(w_axis) if w > w_critical(x0)
            and b_axis[0] <= wall_b(w, x0) <= b_axis[-1]]
    on_line = [abs(b_axis[int(gnorm[:, j].argmax())] - wall_b(w_axis[j], x0)) <= db for j in cols]
    return {"w_critical": w_critical(x0), "line": f"b = {x0:g} - w*sigmoid({x0:g})",
            "grad_norm_min": float(gnorm.min()), "grad_norm_median": float(np.median(gnorm)),
            "grad_norm_max": float(gnorm.max()),
            "orders_of_magnitude": float(np.log10(gnorm.max() / np.median(gnorm))),
            "columns_past_w_critical": len(cols),
            "grad_norm_on_line": on_line_norms(w_axis, x0),
            "fraction_max_on_line": float(np.mean(on_line)) if cols else 0.0,
            "loss_min": float(e.min()), "loss_max": float(e.max())}



def run_and_write(outdir: str, setting: dict, smoke: bool = False) -> dict:
    """Measure the grid and the runs; write cliff.json, cliff_steps.csv and cliff.png."""
    import time
    import numpy as np
    t0 = time.time()
    w_axis = np.linspace(*setting["w_range"], setting["grid"])
    b_axis = np.linspace(*setting["b_range"], setting["grid"])
    e, gnorm = surface(w_axis, b_axis)
    lr, tau = setting["lr"], setting["tau"]
    runs, table, rows = {}, [], []
    for i, start in enumerate(setting["starts"]):
        for label, rule in VARIANTS.items():
            run = sgd(start, lr, rule, tau, setting["steps"])
            runs[(i, label)] = run
            entry = summarize(run, tau if rule != "none" else None)
            table.append({"start": list(start), "variant": label, "rule": rule, **entry})
            past = past_wall(run["theta"])
            rows += [{"start": i, "variant": label, "step": k, "w": run["theta"][k, 0],
                      "b": run["theta"][k, 1], "loss": run["loss"][k],
                      "grad_norm": run["grad_norm"][k],
                      "step_length": run["step"][k] if k < len(run["step"]) else "",
                      "past_wall": past[k]}
                     for k in range(len(run["loss"]))]
    with open(os.path.join(outdir, "cliff_steps.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(os.path.join(outdir, "cliff.png"), w_axis, b_axis, e, gnorm, runs, setting)
    result = {"settings": {**setting, "x0": X0, "target": TARGET, "T": T, "smoke": smoke,
                           "model": "x_t = w*sigmoid(x_{t-1}) + b, E = (sigmoid(x_T) - target)^2",
                           "source": SOURCE, "float": "float64"},
              "bound": lr * tau, "wall": wall_numbers(w_axis, b_axis, e, gnorm),
              "runs": table, "seconds": round(time.time() - t0, 2)}
    cli.write_json(outdir, "cliff.json", result)
    return result


def plot(path: str, w_axis, b_axis, e, gnorm, runs: dict, setting: dict) -> None:
    """Panels: log10 E with the unclipped trajectories; the same with the clipped ones;
    log10 ‖∇E‖ with the wall line (w > w_c). Dots mark the starts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    extent = [w_axis[0], w_axis[-1], b_axis[0], b_axis[-1]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    log_e = np.log10(np.maximum(e, 1e-8))
    panels = ((log_e, "log10 E, SGD unclipped", "viridis", "unclipped"),
              (log_e, f"log10 E, SGD clipped at tau = {setting['tau']:g}", "viridis", "clipped"),
              (np.log10(np.maximum(gnorm, 1e-12)), "log10 ||grad E||", "magma", None))
    for ax, (img, title, cmap, variant) in zip(axes, panels):
        im = ax.imshow(img, origin="lower", extent=extent, aspect="auto", cmap=cmap)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("w")
        for (i, label), run in runs.items():
            if label == variant:
                ax.plot(run["theta"][:, 0], run["theta"][:, 1], "-", color=f"C{i}",
                        linewidth=1.0, marker=".", markersize=3, label=f"start {i}")
                ax.plot(*run["theta"][0], "o", color="white", markersize=4)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
    wl = np.linspace(max(w_critical(), w_axis[0]), w_axis[-1], 50)
    axes[2].plot(wl, wall_b(wl), color="cyan", linestyle=":", label="wall line (w > w_c)")
    for ax in axes:
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("b")
    fig.suptitle(f"x_t = w sigmoid(x_t-1) + b, x_0 = {X0:g}, E = (sigmoid(x_{T}) - {TARGET:g})^2; "
                 f"SGD lr = {setting['lr']:g}, {setting['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    setting = dict(SMOKE if _SMOKE.value else FULL)
    for name, holder in (("lr", _LR), ("tau", _TAU)):
        if holder.value is not None:
            if not holder.value > 0 or math.isinf(holder.value):
                print(f"error: --{name} must be a positive finite number, got {holder.value}",
                      file=sys.stderr)
                sys.exit(1)
            setting[name] = holder.value
    os.makedirs(_OUTDIR.value, exist_ok=True)
    run_and_write(_OUTDIR.value, setting, smoke=_SMOKE.value)


# flags only when run as a script: tests import this module beside other scripts
if __name__ == "__main__":
    _OUTDIR = flags.DEFINE_string("outdir", None, "Directory for the JSON, CSV and figure.")
    _SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
    _LR = flags.DEFINE_float("lr", None, "SGD learning rate η (default: the setting's).")
    _TAU = flags.DEFINE_float("tau", None, "Global-norm clipping threshold τ (default: the setting's).")
    app.run(main)
