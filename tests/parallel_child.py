"""Child process of test_parallel.py: runs with several CPU devices, prints JSON.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX
starts, so the multi-device checks run here, in a fresh interpreter:

    python tests/parallel_child.py devices CORPUS     # data mesh vs one device
    python tests/parallel_child.py sweep CORPUS       # run axis on the mesh vs one device

The last stdout line is a JSON object the parent test asserts on.
"""

import json
import re
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from charrnn import data, models, optim, parallel  # noqa: E402
from charrnn import step as step_lib  # noqa: E402
from experiments.configs import default  # noqa: E402

NUM_STEPS = 4


def devices_config(corpus: str):
    config = default.get_config("smoke")
    config.data.path = corpus
    config.train.batch_size = 8  # two streams per device on 4 devices
    config.optim.learning_rate = 0.05  # big steps: the gradient norm moves across τ
    config.optim.clip_norm = 0.35  # between the norms of the steps: some clipped, some not
    # Each device draws its rows of the whole batch's dropout mask and the same W_hh mask.
    config.model.dropout, config.model.weight_drop = 0.3, 0.2
    return config


def train_steps(config, dp: parallel.DataParallel) -> dict:
    """NUM_STEPS steps on the corpus with ``dp``'s placement; metrics and final params."""
    text = data.load_text(path=config.data.path)
    vocab = data.Vocab.from_text(text)
    batcher = data.Batcher(vocab.encode(text), config.train.batch_size, config.train.seq_len,
                           config.seed)
    model = models.CharRNN.from_config(config.model, vocab.size)
    optimizer = optim.Optimizer.from_config(config)
    state = dp.place_state(step_lib.init_state(model, optimizer, config.train.batch_size,
                                               config.seed))
    step_fn = dp.wrap_step(step_lib.make_train_step(model, optimizer, dp.mesh))
    out = {"loss": [], "grad_norm": [], "clipped": []}
    for step in range(NUM_STEPS):
        state, metrics = step_fn(state, batcher.next_batch())
        for key in out:
            out[key].append(jax.device_get(metrics[key]).item())
    out["params"] = [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)]
    out["carry_spec"] = [str(c.sharding.spec) if hasattr(c.sharding, "spec") else None
                         for c in jax.tree.leaves(state.carry)]
    out["param_replicated"] = all(p.sharding.is_fully_replicated
                                  for p in jax.tree.leaves(state.params))
    # evaluation with the batch rows over the devices: the loss of the whole split, and the
    # compiled window has no collective (an all-reduce per window deadlocked on 2 devices)
    eval_fn = dp.wrap_eval(step_lib.make_eval_step(model))
    ids = vocab.encode(text)[:2000]
    out["val_loss"] = step_lib.evaluate(eval_fn, model, state.params, ids, 8, 16)["loss"]
    if dp.mesh is not None:
        window = next(data.eval_windows(ids, 8, 16, data.EVAL_BURN_IN))
        carry, x, y, mask = parallel.shard_batch((model.initial_carry(8), *window), dp.mesh)
        hlo = step_lib.make_eval_step(model).lower(state.params, carry, x, y, mask).compile()
        out["eval_collectives"] = collectives(hlo.as_text())
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


def sweep_configs(corpus: str) -> list:
    """4 runs of the clip_ablation smoke config: seeds 0, 1 and τ = inf, 0.1, 0.4, 0.32."""
    from charrnn import sweep
    from experiments.configs import clip_ablation
    base = clip_ablation.get_config("smoke")
    base.data.path = corpus
    base.data.val_fraction = base.data.test_fraction = 0.1
    base.sweep.eval_every = 2
    base.sweep.learning_rate.adam = 0.05  # big steps: the norms cross the thresholds
    runs = [sweep.Run("lstm", "adam", seed, label)
            for seed, label in ((0, "none"), (1, "0.1"), (0, "0.4"), (1, "0.32"))]
    taus = [sweep.parse_threshold(r.strength)[1] for r in runs]
    return [sweep.run_config(base, r, t) for r, t in zip(runs, taus)], taus


def collectives(hlo: str) -> list:
    """The cross-device operations named in a compiled program's HLO text."""
    return sorted(set(re.findall(
        r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter", hlo)))


def sweep_layout(configs, taus, vocab_size: int, mesh) -> dict:
    """How the compiled group step lays out its runs on ``mesh``: output specs, collectives."""
    import jax.numpy as jnp
    from charrnn import sweep
    model = models.CharRNN.from_config(configs[0].model, vocab_size)
    state = sweep.init_group(model, configs)
    c = configs[0].train
    batch = {"x": np.zeros((len(configs), c.batch_size, c.seq_len), np.int32),
             "y": np.zeros((len(configs), c.batch_size, c.seq_len), np.int32),
             "reset": np.zeros(len(configs), bool)}
    args = parallel.shard_runs((state, batch, {"strength": jnp.asarray(taus, jnp.float32)}), mesh)
    compiled = sweep.make_group_step(model, configs[0], 1, mesh).lower(*args).compile()
    new_state = compiled.output_shardings[0]
    hlo = compiled.as_text()
    return {"param_specs": sorted({str(s.spec) for s in jax.tree.leaves(new_state.params)}),
            "collectives": collectives(hlo)}


def check_sweep(corpus: str) -> dict:
    from charrnn import sweep
    configs, taus = sweep_configs(corpus)
    data_ = sweep.Corpus.from_config(configs[0])
    mesh = parallel.make_mesh()
    result = {"device_count": jax.device_count()}
    # one device, all runs vmapped; four devices, each vmapping its runs / stepping them one by one
    for name, m, chunk in (("one", None, 0), ("four", mesh, 0), ("four_one_by_one", mesh, 1)):
        histories = sweep.run_group(configs, taus, data_, runs_per_chunk=chunk,
                                    num_steps=NUM_STEPS, mesh=m)
        result[name] = {k: [np.asarray(h[k]).tolist() for h in histories]
                        for k in ("loss", "grad_norm", "clipped", "val_loss")}
    result["layout"] = sweep_layout(configs, taus, data_.vocab_size, mesh)
    sizes = lambda m: None if m is None else m.devices.size
    result["group_mesh"] = [sizes(sweep.group_mesh(*args)) for args in
                            ((3,), (6,), (1,), (8, 2), (8, 1), (12, 0))]
    # 3 runs on 2 devices: the last run repeated to fill them, its copy dropped
    histories = sweep.run_group(configs[:3], taus[:3], data_, runs_per_chunk=1,
                                num_steps=NUM_STEPS, mesh=parallel.make_mesh(2))
    result["three_on_two"] = {k: [np.asarray(h[k]).tolist() for h in histories]
                              for k in ("loss", "grad_norm", "clipped", "val_loss")}
    try:
        parallel.shard_runs(np.zeros((6, 2)), mesh)
        result["error"] = None
    except parallel.ParallelError as e:
        result["error"] = str(e)
    return result


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
