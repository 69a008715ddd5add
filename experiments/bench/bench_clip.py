"""Training-step throughput with each clipping rule, against global_norm, in one process.

    python experiments/bench/bench_clip.py --outdir=DIR [--smoke] [--cell=lstm --hidden_size=128]

Every rule registered in charrnn/clipping.py, at its default settings, runs
the real training step (:func:`charrnn.step.make_train_step`: jitted, state
donated) of the same model on the same pre-made batches; compilation is
excluded. Timing windows alternate between the rules and each keeps its best
window, so a machine shared with other jobs biases no rule.

Prints JSON (also written to DIR/bench_clip.json): chars/s per rule and
``ratio`` = a rule's chars/s / global_norm's (≥ 0.95 is the target: a rule
should cost no more than 5% of the step). ``window_spread``: slowest /
fastest window of each rule (the timing noise).
"""

from absl import app, flags

from charrnn import runinfo
from experiments import cli
from experiments.configs import default as default_config

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for bench_clip.json.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
_MODEL = cli.define_model_flags("B.")
_STEPS = flags.DEFINE_integer("steps", 5, "Training steps per timing window.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 30, "Timing windows per rule; the best counts (many short windows: on a shared "
    "machine a best-of-5 was off by up to 13%, even for `none` against `global_norm`).")
_VOCAB = 65


def _config(rule: str, smoke: bool):
    """default.py's run config (Adam) with this model, batch and clipping rule."""
    config = default_config.get_config()
    size = {name: flag.value for name, flag in _MODEL.items()}
    config.model.cell, config.model.num_layers = size["cell"], size["num_layers"]
    config.model.hidden_size, config.model.embed_dim = (16, 8) if smoke else (size["hidden_size"], 64)
    config.train.batch_size, config.train.seq_len = (4, 16) if smoke else (
        size["batch_size"], size["seq_len"])
    config.optim.clip_mode = rule
    return config


def measure(smoke: bool, steps: int, repeats: int) -> dict:
    import jax
    from charrnn import clipping, models
    from experiments.bench import harness

    configs = {rule: _config(rule, smoke) for rule in clipping.RULES}
    first = configs["global_norm"]
    model = models.CharRNN.from_config(first.model, _VOCAB)
    timing = harness.time_train_steps(model, configs, _VOCAB, steps, repeats)
    rate = timing["chars_per_sec"]
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu": runinfo.cpu_model(), "cell": first.model.cell,
            "hidden_size": first.model.hidden_size, "num_layers": first.model.num_layers,
            "batch_size": first.train.batch_size, "seq_len": first.train.seq_len,
            "steps_per_window": steps, "repeats": repeats, "chars_per_sec": rate,
            "ratio": {rule: r / rate["global_norm"] for rule, r in rate.items()},
            "window_spread": timing["window_spread"]}


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    if min(_STEPS.value, _REPEATS.value) < 1:
        raise app.UsageError("--steps and --repeats must be positive")
    steps, repeats = (2, 2) if _SMOKE.value else (_STEPS.value, _REPEATS.value)
    result = measure(_SMOKE.value, steps, repeats)
    cli.write_json(_OUTDIR.value, "bench_clip.json", result)


if __name__ == "__main__":
    app.run(main)
