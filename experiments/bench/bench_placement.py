"""Training-step throughput with the clipping rule at each placement, against ``gradient``.

    python experiments/bench/bench_placement.py --outdir=DIR [--smoke] [--steps=2 --repeats=5]

For each model size (LSTM 1x128 and 2x512 by default) every ``optim.clip_at``
(gradient, update, bptt, example, device) runs the real training step of the
same model on the same batch, rule ``global_norm`` (τ = 1), Adam, in one
process: timing windows alternate between the placements and each keeps its
best (:func:`experiments.bench.harness.time_train_steps`), compilation excluded.

Prints JSON (also written to DIR/bench_placement.json): per size, chars/s per
placement and ``ratio`` = its chars/s / gradient's, with the targets
(``bptt`` ≥ 0.9, ``update`` ≥ 0.95) and whether each was met. ``example``
needs every row's gradient (a vmapped backward pass over batches of one, and
B copies of the weight gradients); ``device`` on one device is ``gradient``.
``bptt`` is timed without its once-per-record measurement of the unclipped
norm (a second backward pass on one step in ``train.log_every``).
"""

import re

from absl import app, flags

from charrnn import runinfo
from experiments import cli
from experiments.configs import default as default_config

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for bench_placement.json.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
_SIZES = flags.DEFINE_list("sizes", ["1x128:32x64", "2x512:16x32"],
                           "LAYERSxHIDDEN:BxT of each LSTM measured.")
_STEPS = flags.DEFINE_integer("steps", 2, "Training steps per timing window.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timing windows per placement; the best counts.")
_VOCAB = 65
TARGETS = {"bptt": 0.9, "update": 0.95}  # least chars/s relative to clip_at=gradient


def _config(size: str, clip_at: str):
    """default.py's run config (Adam, global_norm τ = 1) of an LSTM 'LxH:BxT' at clip_at."""
    model, batch = size.split(":")
    config = default_config.get_config()
    config.model.cell = "lstm"
    config.model.num_layers, config.model.hidden_size = (int(v) for v in model.split("x"))
    config.train.batch_size, config.train.seq_len = (int(v) for v in batch.split("x"))
    config.optim.clip_mode, config.optim.clip_norm, config.optim.clip_at = "global_norm", 1.0, clip_at
    return config


def measure(size: str, steps: int, repeats: int) -> dict:
    from charrnn import models, optim
    from experiments.bench import harness

    configs = {clip_at: _config(size, clip_at) for clip_at in optim.PLACEMENTS}
    model = models.CharRNN.from_config(configs["gradient"].model, _VOCAB)
    timing = harness.time_train_steps(model, configs, _VOCAB, steps, repeats)
    rate = timing["chars_per_sec"]
    ratio = {clip_at: r / rate["gradient"] for clip_at, r in rate.items()}
    return {"size": size, "chars_per_sec": rate, "ratio": ratio,
            "target_met": {clip_at: ratio[clip_at] >= least for clip_at, least in TARGETS.items()},
            "window_spread": timing["window_spread"]}


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    if min(_STEPS.value, _REPEATS.value) < 1:
        raise app.UsageError("--steps and --repeats must be positive")
    bad = [size for size in _SIZES.value if not re.fullmatch(r"[1-9]\d*x[1-9]\d*:[1-9]\d*x[1-9]\d*", size)]
    if bad:
        raise app.UsageError(f"--sizes: {', '.join(bad)} is not LAYERSxHIDDEN:BxT (e.g. 2x512:16x32)")
    import jax
    sizes = ["1x16:4x16"] if _SMOKE.value else _SIZES.value
    steps, repeats = (1, 2) if _SMOKE.value else (_STEPS.value, _REPEATS.value)
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "cpu": runinfo.cpu_model(), "steps_per_window": steps, "repeats": repeats,
              "targets": TARGETS, "sizes": [measure(size, steps, repeats) for size in sizes]}
    cli.write_json(_OUTDIR.value, "bench_placement.json", result)


if __name__ == "__main__":
    app.run(main)
