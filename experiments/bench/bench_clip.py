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

import time

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
    import jax.numpy as jnp
    import numpy as np
    from charrnn import clipping, models, optim
    from charrnn import step as step_lib

    configs = {rule: _config(rule, smoke) for rule in clipping.RULES}
    first = configs["global_norm"]
    B, T = first.train.batch_size, first.train.seq_len
    model = models.CharRNN.from_config(first.model, _VOCAB)
    rng = np.random.default_rng(0)
    tokens = lambda: jnp.asarray(rng.integers(0, _VOCAB, (B, T), dtype=np.int32))
    batch = {"x": tokens(), "y": tokens(), "reset": np.bool_(False)}
    def timed(step_fn):
        def run(state):
            for _ in range(steps):
                state, m = step_fn(state, batch)
            jax.block_until_ready(m)
            return state
        return run

    runs, states, times = {}, {}, {}
    for rule, config in configs.items():
        optimizer = optim.Optimizer.from_config(config)
        runs[rule] = timed(step_lib.make_train_step(model, optimizer))
        state = step_lib.init_state(model, optimizer, B, config.seed)
        states[rule] = runs[rule](state)  # compile and warm up
        times[rule] = []
    for _ in range(repeats):
        for rule, run in runs.items():
            start = time.perf_counter()
            states[rule] = run(states[rule])
            times[rule].append(time.perf_counter() - start)
    chars = steps * B * T
    rate = {rule: chars / min(t) for rule, t in times.items()}
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu": runinfo.cpu_model(), "cell": first.model.cell,
            "hidden_size": first.model.hidden_size, "num_layers": first.model.num_layers,
            "batch_size": B, "seq_len": T, "steps_per_window": steps, "repeats": repeats,
            "chars_per_sec": rate,
            "ratio": {rule: r / rate["global_norm"] for rule, r in rate.items()},
            "window_spread": {rule: max(t) / min(t) for rule, t in times.items()}}


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    if min(_STEPS.value, _REPEATS.value) < 1:
        raise app.UsageError("--steps and --repeats must be positive")
    steps, repeats = (2, 2) if _SMOKE.value else (_STEPS.value, _REPEATS.value)
    result = measure(_SMOKE.value, steps, repeats)
    cli.write_json(_OUTDIR.value, "bench_clip.json", result)


if __name__ == "__main__":
    app.run(main)
