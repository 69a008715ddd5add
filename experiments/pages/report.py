"""Regenerate REPORT.md: the seed's three questions answered with charrnn's own measurements.

    python experiments/pages/report.py                      # full: REPORT.md + report/*.png
    python experiments/pages/report.py --smoke --outdir=DIR # tiny: DIR/REPORT.md + DIR/*.png
    python experiments/pages/report.py --workdir=W --steps=cliff,lm   # those steps into W only
    python experiments/pages/report.py --workdir=W --reuse  # the page from W's finished steps

Only the full run with the default --outdir writes the committed REPORT.md (and
report/); a smoke run, or any run given another --outdir, writes its Markdown
beside its figures in that outdir (a smoke run without --outdir: runs/report_smoke),
so trying the pipeline never overwrites the committed page. The page states
its own wall time.

Runs, each as its own process (the experiment scripts are the source of every number):

1. experiments/science/exploding_gradients.py: ||∂h_T/∂h_{T-k}|| for W_hh = ρQ;
2. launch.py: trains a small LSTM language model (its metrics.jsonl and
   TensorBoard files are the telemetry shown), then, in this process, measures
   the clipping cosine on one of its real gradients, the BPTT Jacobian of its
   trained layer, and draws a sample with charrnn.sampling; launch.py again: the same
   model in the old carried-state regime, for the hand-over (report_handover.py);
3. experiments/science/clip_ablation.py: every clipping rule × strength × optimizer × cell
   × seed, and the plateau check;
4. experiments/bench/bench_sweep.py: one-program sweep against sequential runs;
5. experiments/science/cliff.py: Pascanu et al.'s one-unit cliff, SGD with and without clipping;
6. experiments/science/smoothness.py: Zhang et al.'s smoothness against the gradient norm
   along an LSTM's training;
7. experiments/science/stability.py: the largest learning rate each clipping setting survives;
8. experiments/science/placement.py: the same rules clipping the gradient, the update, each
   sequence's gradient or each step's cotangent inside BPTT.

Code shown in the report is read from the source files when the report is
generated, with its line numbers. Nothing in REPORT.md is typed by hand.
Figures and small tables go to --outdir; checkpoints and per-run histories
go to --workdir (a temporary directory unless given).
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import cli
from experiments.configs import clip_ablation as ablation_config
from experiments.configs import placement as placement_config
from experiments.configs import stability as stability_config

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(_HERE))

DEFAULT_OUTDIR = os.path.join(REPO, "report")
DEFAULT_REPORT = os.path.join(REPO, "REPORT.md")
_OUTDIR = flags.DEFINE_string("outdir", None, "Figures and tables referenced by the report, and "
                              "(unless this is the full run into report/) the Markdown itself. "
                              "Default: report/ (full run), runs/report_smoke (--smoke).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Checkpoints and run histories (default: a "
                               "temporary directory, removed at the end).")
_REUSE = flags.DEFINE_bool("reuse", False, "Reuse finished steps found in --workdir.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Every step tiny: the whole pipeline in about a minute.")
_DATA_PATH = flags.DEFINE_string("data_path", "", "A text file instead of the built-in corpus.")
_STEPS = flags.DEFINE_list("steps", None, "Run only these steps into --workdir and write no "
                           "page (of: exploding, lm, lm_carried, ablation, bench, cliff, "
                           "smoothness, stability, placement): the pieces a later --reuse run "
                           "renders from.")

# The language model whose telemetry and sample the report shows.
LM_FLAGS = ["--config.model.cell=lstm", "--config.model.hidden_size=256",
            "--config.model.num_layers=1", "--config.train.num_steps=2000",
            "--config.train.eval_every=500", "--config.train.checkpoint_every=1000",
            "--config.train.log_every=50",
            # τ near the median gradient norm of this model (0.28-0.34 in its train records
            # when it trained with τ = 1, where nothing was clipped): clipping is active.
            "--config.optim.clip_norm=0.3"]
SAMPLE = {"prompt": "ROMEO:", "length": 400, "temperature": 0.8, "seed": 0}
# The old carried-state regime (issue 26): the state carried from window to window and
# restarted from zeros only at an epoch's start; the lm_carried step trains LM_FLAGS with it.
CARRIED_FLAGS = ["--config.model.start_state=zero", "--config.train.reset_prob=0"]


class ReportError(Exception):
    """A step of the pipeline failed; the message names it."""


def run_script(args: list, what: str, timed: bool = True) -> str:
    """Run ``python ARGS`` in the repository; return stdout, raise with stderr's tail.

    The wall time is added to ``<workdir>/timings.json`` (kept when steps are reused)
    unless ``timed`` is false (work that only redraws a step's outputs).
    """
    start = time.perf_counter()
    out = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise ReportError(f"{what} failed (exit {out.returncode}):\n{tail}")
    if not timed:
        return out.stdout
    elapsed = time.perf_counter() - start
    print(f"{what}: {elapsed:.0f} s", flush=True)
    _TIMINGS[what] = elapsed
    return out.stdout


_TIMINGS = {}  # step -> seconds, of this invocation and (with --reuse) earlier ones


def _load_timings(work: str) -> None:
    path = os.path.join(work, "timings.json")
    if _REUSE.value and os.path.exists(path):
        with open(path) as f:
            _TIMINGS.update(json.load(f))


def _add_timings(work: str) -> None:
    """This run's timings added to the workdir's, under a lock: runs with --steps may
    finish in one workdir at the same time."""
    import fcntl
    with open(os.path.join(work, "timings.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mine = dict(_TIMINGS)
        path = os.path.join(work, "timings.json")
        if os.path.exists(path):
            with open(path) as f:
                _TIMINGS.update(json.load(f))
        _TIMINGS.update(mine)
        _save_timings(work)


def _save_timings(work: str) -> None:
    with open(os.path.join(work, "timings.json"), "w") as f:
        json.dump(_TIMINGS, f, indent=1)


def _data_flags() -> list:
    if not _DATA_PATH.value:
        return []
    return [f"--config.data.path={os.path.abspath(_DATA_PATH.value)}"]


def _script_result(work: str, sub: str, module: str, smoke: bool,
                   extra=(), stale: str | None = None) -> dict:
    """Run ``python -m experiments.<module>`` into work/sub (unless --reuse finds its JSON
    result there) and return that result; ``stale``: a subdirectory to clear before running.
    A reused result of a script that trains runs (one with a ``stale`` directory of them) is
    aggregated again (``--aggregate``): its tables and figures are redrawn by this checkout's
    code from the runs it left, without training them again."""
    out = os.path.join(work, sub)
    script = module.rpartition(".")[2]
    path = os.path.join(out, f"{script}.json")
    args = ["-m", f"experiments.{module}", f"--outdir={out}"] + (["--smoke"] if smoke else [])
    if not (_REUSE.value and os.path.exists(path)):
        if stale and os.path.isdir(os.path.join(out, stale)):
            shutil.rmtree(os.path.join(out, stale))
        run_script(args + list(extra), script)
    elif stale:
        run_script(args + ["--aggregate"], f"{script} --aggregate", timed=False)
    with open(path) as f:
        result = json.load(f)
    if script not in _TIMINGS and "seconds" in result:
        # trained outside this workdir's report runs: the training time its runs recorded
        _TIMINGS[f"{script} (training time its runs recorded)"] = result["seconds"]
    return result


def exploding(work: str, smoke: bool) -> dict:
    return _script_result(work, "exploding", "science.exploding_gradients", smoke)


def ablation(work: str, smoke: bool) -> dict:
    # runs/ cleared first: a stale grid must not mix in
    result = _script_result(work, "ablation", "science.clip_ablation", smoke, extra=_data_flags(),
                            stale="runs")
    result["config"] = ablation_config.get_config(
        "smoke" if smoke else None).to_dict()
    return result


def stability(work: str, smoke: bool) -> dict:
    result = _script_result(work, "stability", "science.stability", smoke, extra=_data_flags(),
                            stale="grid")
    result["config"] = stability_config.get_config("smoke" if smoke else None).to_dict()
    return result


def placement(work: str, smoke: bool) -> dict:
    result = _script_result(work, "placement", "science.placement", smoke, extra=_data_flags(),
                            stale="runs")
    result["config"] = placement_config.get_config("smoke" if smoke else None).to_dict()
    return result


def bench(work: str, smoke: bool) -> dict:
    return _script_result(work, "bench", "bench.bench_sweep", smoke)


def cliff(work: str, smoke: bool) -> dict:
    return _script_result(work, "cliff", "science.cliff", smoke)


def smoothness(work: str, smoke: bool) -> dict:
    extra = [f"--data_path={os.path.abspath(_DATA_PATH.value)}"] if _DATA_PATH.value else []
    return _script_result(work, "smoothness", "science.smoothness", smoke, extra=extra)


def train_lm(work: str, smoke: bool, sub: str = "lm", extra=(),
             what: str = "train the language model (launch.py)") -> str:
    """Train the report's language model with launch.py (``extra``: more flags) into
    work/sub; returns that workdir."""
    lm = os.path.join(work, sub)
    if _REUSE.value and os.path.exists(os.path.join(lm, "metrics.jsonl")):
        if what not in _TIMINGS:  # trained outside the report's runs: its loop's own clock
            from charrnn import metrics
            walls = [r["wall_s"] for r in metrics.read_metrics(lm) if r.get("wall_s")]
            if walls:
                _TIMINGS[f"{what}: its training loop's wall_s"] = max(walls)
        return lm
    if os.path.isdir(lm):
        shutil.rmtree(lm)
    config = "experiments/configs/default.py" + (":smoke" if smoke else "")
    flags_ = [] if smoke else LM_FLAGS
    run_script(["launch.py", f"--workdir={lm}", f"--config={config}"] + flags_ + list(extra)
               + _data_flags(), what)
    return lm


def train_lm_carried(work: str, smoke: bool) -> str:
    """The same language model trained in the old carried-state regime (CARRIED_FLAGS)."""
    return train_lm(work, smoke, "lm_carried", CARRIED_FLAGS,
                    "train the language model, carried state (launch.py)")


# name -> step(work, smoke), as in main
STEPS = {"exploding": exploding, "lm": train_lm, "lm_carried": train_lm_carried,
         "ablation": ablation, "bench": bench, "cliff": cliff, "smoothness": smoothness,
         "stability": stability, "placement": placement}


def run_steps(names: list, work: str, smoke: bool) -> None:
    """--steps: run the named steps into ``work`` (a ReportError names a failed one)."""
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ReportError(f"--steps: unknown {', '.join(unknown)}; choose from "
                          f"{', '.join(STEPS)}")
    if not _WORKDIR.value:
        raise ReportError("--steps needs --workdir (where a later --reuse run finds them)")
    _TIMINGS.clear()
    for name in names:
        STEPS[name](work, smoke)
    _add_timings(work)


def tensorboard_tags(logdir: str) -> list:
    """Scalar tags in the TensorBoard event files under ``logdir`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents*"), recursive=True):
        with open(path, "rb") as f:
            blob = f.read()
        pos = 0
        while pos + 12 <= len(blob):
            (length,) = struct.unpack("<Q", blob[pos:pos + 8])
            pos += 12  # length, then its CRC
            event = event_pb2.Event.FromString(blob[pos:pos + length])
            pos += length + 4  # the record, then its CRC
            tags.update(v.tag for v in event.summary.value)
    return sorted(tags)


def measure_lm(lm: str, outdir: str, smoke: bool) -> dict:
    """Telemetry, clipping cosine, trained Jacobian and a sample of the trained model."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from charrnn import clipping, data, diagnostics, metrics, optim
    from charrnn import restore
    from charrnn import step as step_lib

    config, vocab, model, params, step = restore.load_checkpoint(lm)
    records = metrics.read_metrics(lm)
    text = data.load_corpus(config.data)
    _, val_ids, _ = data.split(vocab.encode(text), config.data.val_fraction,
                               config.data.test_fraction)
    B, T = 2, min(config.train.seq_len, 64)
    x = jnp.asarray(val_ids[:B * (T + 1)].reshape(B, T + 1))
    loss = lambda p: step_lib.loss_fn(p, model, model.initial_carry(B), x[:, :-1], x[:, 1:])[0]
    grads = jax.grad(loss)(params)
    g = float(optim.global_norm(grads))
    flat = np.concatenate([np.abs(np.ravel(a)) for a in jax.tree.leaves(grads)])
    rules = [("global_norm", 0.5 * g, "τ = 0.5·‖g‖"),
             ("value", float(np.median(flat)), "bound = median |g_i|"),
             ("agc", 0.01, "λ = 0.01")]
    cosines = []
    for mode, bound, label in rules:
        clip = clipping.from_config(ml_collections.ConfigDict(
            {"clip_mode": mode, "clip_norm": bound})).transform
        clipped, _ = clip.update(grads, clip.init(params), params)
        cosines.append({"mode": mode, "setting": label, "bound": bound,
                        "cosine": float(diagnostics.tree_cosine(grads, clipped)),
                        "norm_before": g, "norm_after": float(optim.global_norm(clipped))})
    K = T if not smoke else min(T, 16)
    jac = np.asarray(diagnostics.model_jacobian_norms(model, params, x[:, :-1], 0, K), np.float64)
    ln_curve = np.log(jac).mean(axis=0)
    _plot_trained_jacobian(os.path.join(outdir, "trained_jacobian.png"), ln_curve, config)
    sample = draw_sample(lm, vocab, smoke)
    return {"config": config.to_dict(), "step": step, "records": records,
            "tb_tags": tensorboard_tags(lm), "cosines": cosines,
            "whh": diagnostics.whh_summary(params),
            "jacobian_ln": ln_curve.tolist(),
            "jacobian_slope": diagnostics.log_slope(np.exp(ln_curve)),
            "sample": sample}


def draw_sample(lm: str, vocab, smoke: bool) -> dict:
    """A sample from the trained model with charrnn.sampling (if that module is installed)."""
    try:
        from charrnn import sampling
    except ImportError:
        return {"available": False}
    settings = dict(SAMPLE, length=80 if smoke else SAMPLE["length"])
    if any(ch not in vocab.chars for ch in settings["prompt"]):
        settings["prompt"] = ""
    texts = sampling.sample(lm, **settings)
    return {"available": True, "text": texts[0], **settings}


def _plot_trained_jacobian(path, ln_curve, config):
    import math
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    k = np.arange(1, len(ln_curve) + 1)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(k, np.asarray(ln_curve) / math.log(10))
    ax.set_xlabel("k (steps back)")
    ax.set_ylabel("log10 ||∂s_T/∂s_{T-k}||₂")
    ax.set_title(f"trained {config.model.cell} 1×{config.model.hidden_size}, val text")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def collect_figures(work: str, outdir: str) -> None:
    """Copy the experiments' figures and small tables next to the report."""
    wanted = [("exploding", "jacobian_norms.png"), ("exploding", "jacobian_slopes.csv"),
              ("ablation", "val_bpc_vs_threshold.png"), ("ablation", "loss_curves.png"),
              ("ablation", "grad_norm_traces.png"), ("ablation", "clip_ablation.csv"),
              ("ablation", "threshold_in_force.png"), ("bench", "bench_sweep.json"),
              ("cliff", "cliff.png"), ("smoothness", "smoothness.png"),
              ("stability", "stability_map.png"), ("stability", "stability.csv"),
              ("placement", "placement.png"), ("placement", "placement.csv")]
    for sub, name in wanted:
        src = os.path.join(work, sub, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(outdir, name))


def destinations(outdir: str | None, smoke: bool) -> tuple[str, str]:
    """(figure directory, Markdown file): the committed REPORT.md only for the full run
    into the default report/; otherwise REPORT.md beside the figures."""
    if outdir is None:
        outdir = DEFAULT_OUTDIR if not smoke else os.path.join(REPO, "runs", "report_smoke")
    outdir = os.path.abspath(outdir)
    if not smoke and outdir == DEFAULT_OUTDIR:
        return outdir, DEFAULT_REPORT
    return outdir, os.path.join(outdir, "REPORT.md")


def main(argv):
    cli.start(argv)
    from experiments.pages import report_handover, report_sections
    smoke = _SMOKE.value
    if _STEPS.value:
        try:
            run_steps(_STEPS.value, os.path.abspath(_WORKDIR.value), smoke)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    outdir, report_path = destinations(_OUTDIR.value, smoke)
    os.makedirs(outdir, exist_ok=True)
    work = os.path.abspath(_WORKDIR.value) if _WORKDIR.value else tempfile.mkdtemp("-report")
    _load_timings(work)
    try:
        results = {"smoke": smoke, "exploding": exploding(work, smoke)}
        lm = train_lm(work, smoke)
        start = time.perf_counter()
        results["lm"] = measure_lm(lm, outdir, smoke)
        _TIMINGS["measurements in report.py"] = time.perf_counter() - start
        carried = train_lm_carried(work, smoke)
        start = time.perf_counter()
        results["handover"] = report_handover.measure({"carried": carried, "restarts": lm},
                                                      outdir, smoke)
        _TIMINGS["hand-over measurements"] = time.perf_counter() - start
        results["ablation"] = ablation(work, smoke)
        results["bench"] = bench(work, smoke)
        results["cliff"] = cliff(work, smoke)
        results["smoothness"] = smoothness(work, smoke)
        results["stability"] = stability(work, smoke)
        results["placement"] = placement(work, smoke)
        collect_figures(work, outdir)
        _save_timings(work)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if not _WORKDIR.value:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = sum(_TIMINGS.values())
    results["timings"] = dict(_TIMINGS)
    report_dir = os.path.dirname(report_path)
    markdown = report_sections.render(results, os.path.relpath(outdir, report_dir))
    with open(report_path, "w") as f:
        f.write(markdown)
    print(f"wrote {report_path} and the figures in {outdir} "
          f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    app.run(main)
