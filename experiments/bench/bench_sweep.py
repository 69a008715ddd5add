"""Throughput of one R-run sweep program against the same R runs one after another.

    python experiments/bench/bench_sweep.py --outdir=DIR [--smoke] [--cell=lstm --hidden_size=128]

Sequential: R runs, each with its own state, stepped by the plain jitted
:func:`charrnn.step.make_train_step` (the training path of one run).
Sweep: :func:`charrnn.sweep.make_group_step` stepping all R runs at once, for
each ``--runs_per_chunk`` C (0 = all R runs vmapped; 1 = one run at a time
inside the program). Both see the same pre-made batches; compilation is
excluded. Timing windows alternate between the variants and each keeps its
best window, so a machine shared with other jobs biases no variant.

Prints JSON (also written to DIR/bench_sweep.json): chars/s of every variant
and ``ratio`` = sweep chars/s / sequential chars/s per C; ratio ≥ 1 means the
one-program sweep is at least as fast as running the runs one by one.
``window_spread``: slowest / fastest window of each variant (timing noise).
"""

import time

from absl import app, flags

from experiments import cli

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for bench_sweep.json.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: the same pipeline in seconds.")
_MODEL = cli.define_model_flags("B per run.")
_RUNS = flags.DEFINE_integer("num_runs", 8, "R, runs in the sweep.")
_CHUNKS = flags.DEFINE_list("runs_per_chunk", ["1", "2", "0"],
                            "Sweep layouts to time: runs vmapped together (0 = all).")
_STEPS = flags.DEFINE_integer("steps", 4, "Sweep steps per timing window (R× as many sequential).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timing windows per variant; the best counts.")
_VOCAB = 65


def _config(smoke: bool):
    from ml_collections import ConfigDict
    size = {name: flag.value for name, flag in _MODEL.items()}
    hidden, batch, seq_len = size["hidden_size"], size["batch_size"], size["seq_len"]
    if smoke:
        hidden, batch, seq_len = 16, 4, 16
    return ConfigDict({
        "seed": 0,
        "model": {"cell": size["cell"], "hidden_size": hidden, "num_layers": size["num_layers"],
                  "embed_dim": 64 if not smoke else 8, "dropout": 0.0},
        "train": {"batch_size": batch, "seq_len": seq_len, "num_steps": 1000},
        "optim": {"name": "adam", "learning_rate": 2e-3, "schedule": "constant",
                  "warmup_steps": 0, "final_lr_fraction": 0.1, "b1": 0.9, "b2": 0.999,
                  "momentum": 0.0, "clip_mode": "global_norm", "clip_norm": 1.0}})


def measure(config, num_runs: int, chunks: list, steps: int, repeats: int) -> dict:
    """chars/s (R·steps·B·T per window, best window) of sequential runs and of each chunk
    layout of the one-program sweep, their ratios and the window spread."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from charrnn import models, optim, sweep
    from charrnn import step as step_lib

    B, T = config.train.batch_size, config.train.seq_len
    model = models.CharRNN.from_config(config.model, _VOCAB)
    rng = np.random.default_rng(0)
    tokens = lambda *shape: jnp.asarray(rng.integers(0, _VOCAB, shape, dtype=np.int32))
    # Each run gets its own batches; windows reuse them (the work does not depend on the text).
    batches = {"x": tokens(num_runs, B, T), "y": tokens(num_runs, B, T),
               "reset": jnp.zeros((num_runs,), bool)}
    run_batch = [jax.tree.map(lambda a: a[r], batches) for r in range(num_runs)]
    seeds = [_with_seed(config, s) for s in range(num_runs)]
    optimizers = [optim.Optimizer.from_config(c) for c in seeds]
    step_one = step_lib.make_train_step(model, optimizers[0])

    def sequential(states):
        for r in range(num_runs):  # run r's steps, then the next run's
            for _ in range(steps):
                states[r], m = step_one(states[r], run_batch[r])
        jax.block_until_ready(m)
        return states

    variants = {"sequential": ([step_lib.init_state(model, tx, B, c.seed)
                                for tx, c in zip(optimizers, seeds)], sequential)}
    taus = {"strength": jnp.ones((num_runs,), jnp.float32)}
    for chunk in chunks:
        step_all = sweep.make_group_step(model, seeds[0], chunk)

        def swept(state, step_all=step_all):
            for _ in range(steps):
                state, m = step_all(state, batches, taus)
            jax.block_until_ready(m)
            return state
        variants[f"sweep_chunk{chunk}"] = (sweep.init_group(model, seeds), swept)

    states, times = {}, {}
    for name, (state, fn) in variants.items():
        states[name] = fn(state)  # compile and warm up
        times[name] = []
    for _ in range(repeats):
        for name, (_, fn) in variants.items():
            start = time.perf_counter()
            states[name] = fn(states[name])
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    chars = num_runs * steps * B * T
    result = {"backend": jax.default_backend(), "cell": config.model.cell,
              "hidden_size": config.model.hidden_size, "num_layers": config.model.num_layers,
              "batch_size": B, "seq_len": T, "num_runs": num_runs, "steps_per_window": steps,
              "repeats": repeats,
              "chars_per_sec": {name: chars / t for name, t in best.items()}}
    seq = result["chars_per_sec"]["sequential"]
    result["ratio"] = {str(c): result["chars_per_sec"][f"sweep_chunk{c}"] / seq for c in chunks}
    result["best_ratio"] = max(result["ratio"].values())
    # How much one variant's windows differ (slowest / fastest): the timing noise of the machine.
    result["window_spread"] = {name: max(t) / min(t) for name, t in times.items()}
    return result


def _with_seed(config, seed: int):
    from ml_collections import ConfigDict
    c = ConfigDict(config.to_dict())
    c.seed = seed
    return c


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    chunks = cli.chunk_sizes(_CHUNKS.value)
    if min(chunks + [_RUNS.value - 1, _STEPS.value - 1, _REPEATS.value - 1]) < 0:
        raise app.UsageError("--num_runs, --steps, --repeats must be positive, chunks >= 0")
    steps, repeats = (1, 2) if _SMOKE.value else (_STEPS.value, _REPEATS.value)
    result = measure(_config(_SMOKE.value), _RUNS.value, chunks, steps, repeats)
    cli.write_json(_OUTDIR.value, "bench_sweep.json", result)


if __name__ == "__main__":
    app.run(main)
