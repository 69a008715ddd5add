"""Child process of test_parallel.py: runs with several CPU devices, prints JSON.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX
starts, so the multi-device checks run here, in a fresh interpreter:

    python tests/parallel_child.py devices CORPUS     # data mesh vs one device
    python tests/parallel_child.py sweep CORPUS       # run axis on the mesh vs one device

The last stdout line is a JSON object the parent test asserts on.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments", "configs"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import default  # noqa: E402
from charrnn import data, models, optim, parallel, train  # noqa: E402

NUM_STEPS = 4


def devices_config(corpus: str):
    config = default.get_config("smoke")
    config.data.path = corpus
    config.train.batch_size = 8  # two streams per device on 4 devices
    config.optim.learning_rate = 0.05  # big steps: the gradient norm moves across τ
    config.optim.clip_norm = 0.5
    return config


def train_steps(config, dp: parallel.DataParallel) -> dict:
    """NUM_STEPS steps on the corpus with ``dp``'s placement; metrics and final params."""
    text = data.load_text(path=config.data.path)
    vocab = data.Vocab.from_text(text)
    batcher = data.Batcher(vocab.encode(text), config.train.batch_size, config.train.seq_len,
                           config.seed)
    model = models.CharRNN.from_config(config.model, vocab.size)
    state = dp.place_state(train.init_state(model, optim.make_optimizer(config),
                                            config.train.batch_size, config.seed))
    step_fn = dp.wrap_step(train.make_train_step(model, config))
    out = {"loss": [], "grad_norm": [], "clipped": []}
    for step in range(NUM_STEPS):
        x, y, reset = batcher.next()
        batch = {"x": x, "y": y, "reset": np.bool_(reset)}
        state, metrics = step_fn(state, batch, jax.random.fold_in(jax.random.key(1), step))
        for key in out:
            out[key].append(jax.device_get(metrics[key]).item())
    out["params"] = [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)]
    out["carry_spec"] = [str(c.sharding.spec) if hasattr(c.sharding, "spec") else None
                         for c in jax.tree.leaves(state.carry)]
    out["param_replicated"] = all(p.sharding.is_fully_replicated
                                  for p in jax.tree.leaves(state.params))
    return out


def check_devices(corpus: str) -> dict:
    config = devices_config(corpus)
    one = train_steps(config, parallel.DataParallel(mesh=None))
    four = train_steps(config, parallel.DataParallel.create(config.train.batch_size))
    try:
        parallel.DataParallel.create(6)
        error = None
    except parallel.ParallelError as e:
        error = str(e)
    return {"device_count": jax.device_count(), "one": one, "four": four, "error": error}


def sweep_steps(corpus: str, mesh) -> dict:
    """NUM_STEPS steps of a 4-run sweep (sweep.py's vmapped group step), runs on ``mesh``."""
    import jax.numpy as jnp
    from charrnn import sweep
    text = data.load_text(path=corpus)
    vocab = data.Vocab.from_text(text)
    ids = vocab.encode(text)
    configs = []
    for seed in (0, 1, 0, 1):
        config = default.get_config("smoke")
        config.seed, config.optim.learning_rate = seed, 0.05
        configs.append(config)
    taus = jnp.array([np.inf, 0.5, 0.3, 0.1], jnp.float32)  # no clipping, then ever more
    model = models.CharRNN.from_config(configs[0].model, vocab.size)
    state = sweep.init_group(model, configs)
    step_fn = sweep.make_group_step(model, configs[0])  # all runs vmapped at once
    batchers = [data.Batcher(ids, c.train.batch_size, c.train.seq_len, c.seed) for c in configs]
    if mesh is not None:
        state, taus = parallel.shard_runs((state, taus), mesh)
    out = {"loss": [], "grad_norm": [], "clipped": []}
    for _ in range(NUM_STEPS):
        batch = sweep.stack_batches([b.next() for b in batchers])
        if mesh is not None:
            batch = parallel.shard_runs(batch, mesh)
        state, metrics = step_fn(state, batch, taus)
        for key in out:
            out[key].append(np.asarray(metrics[key]).tolist())
    out["params"] = [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)]
    out["param_specs"] = sorted({str(p.sharding.spec) for p in jax.tree.leaves(state.params)
                                 if hasattr(p.sharding, "spec")})
    # Runs held by each device, per parameter: [1, 1, 1, 1] when the run axis is split.
    out["runs_per_device"] = [[s.data.shape[0] for s in p.addressable_shards]
                              for p in jax.tree.leaves(state.params)]
    return out


def check_sweep(corpus: str) -> dict:
    one = sweep_steps(corpus, None)
    four = sweep_steps(corpus, parallel.make_mesh())
    try:
        parallel.shard_runs(np.zeros((6, 2)), parallel.make_mesh())
        error = None
    except parallel.ParallelError as e:
        error = str(e)
    return {"device_count": jax.device_count(), "one": one, "four": four, "error": error}


def main():
    mode = sys.argv[1]
    if mode == "devices":
        result = check_devices(sys.argv[2])
    elif mode == "sweep":
        result = check_sweep(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
