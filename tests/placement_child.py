"""Child process of test_placement_runs.py: ``optim.clip_at=device`` on 4 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/placement_child.py CORPUS

One SGD step (learning rate 1) of the smoke LSTM with B = 8 (two rows per device)
under ``clip_at=device``, against the hand average of the 4 shard gradients, each
computed on one device from its two rows and clipped by ``optax.clip_by_global_norm``;
and one step clipped inside BPTT on 4 devices against one device.
The last stdout line is a JSON object the parent test asserts on.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from charrnn import data, models, optim, parallel  # noqa: E402
from charrnn import step as step_lib  # noqa: E402
from experiments.configs import default  # noqa: E402

TAU = 0.5


def main(corpus: str) -> dict:
    config = default.get_config("smoke")
    config.data.path, config.train.batch_size, config.train.reset_prob = corpus, 8, 0.0
    config.optim.name, config.optim.learning_rate = "sgd", 1.0
    config.optim.clip_mode, config.optim.clip_norm = "global_norm", TAU
    text = data.load_text(path=corpus)
    vocab = data.Vocab.from_text(text)
    batch = data.Batcher(vocab.encode(text), 8, config.train.seq_len, config.seed).next_batch()
    model = models.CharRNN.from_config(config.model, vocab.size)
    config.optim.clip_at = "device"
    optimizer = optim.Optimizer.from_config(config)
    dp = parallel.DataParallel.create(8)
    state = dp.place_state(step_lib.init_state(model, optimizer, 8, config.seed))
    before = jax.device_get(state.params)
    step_fn = dp.wrap_step(step_lib.make_train_step(model, optimizer, dp.mesh))
    state, metrics = step_fn(state, batch)
    after, metrics = jax.device_get(state.params), jax.device_get(metrics)
    # By hand: each device's two rows, their mean loss's gradient, clipped; the average.
    shard_grad = jax.jit(jax.grad(lambda p, x, y: step_lib.loss_fn(
        p, model, model.initial_carry(2), x, y)[0]))
    shards = [shard_grad(before, batch["x"][2 * d:2 * d + 2], batch["y"][2 * d:2 * d + 2])
              for d in range(4)]
    clip = optax.clip_by_global_norm(TAU)
    mean = lambda trees: jax.tree.map(lambda *g: sum(g) / 4, *trees)
    average = mean([clip.update(g, None)[0] for g in shards])
    clipped_average = clip.update(mean(shards), None)[0]  # clip_at=gradient's
    leaves = lambda tree: [np.asarray(a) for a in jax.tree.leaves(tree)]
    update = [p0 - p1 for p0, p1 in zip(leaves(before), leaves(after))]
    error = lambda reference: max(float(np.abs(u - g).max())
                                  for u, g in zip(update, leaves(reference)))
    return {"device_count": jax.device_count(), "bptt_error": bptt_four_against_one(config, model, batch),
            "shards_clipped": sum(float(optim.global_norm(g)) > TAU for g in shards),
            "device_clip_fraction": float(metrics["device_clip_fraction"]),
            "max_error": error(average), "clipped_average_differs": error(clipped_average)}


def bptt_four_against_one(config, model, batch) -> float:
    """Largest difference of the parameters after one step clipped inside BPTT on 4
    devices and on one: the cotangents each device clips are those of the whole batch."""
    config.optim.clip_at, config.optim.clip_mode, config.optim.clip_norm = "bptt", "value", 0.1
    optimizer = optim.Optimizer.from_config(config)
    params = []
    for dp in (parallel.DataParallel(mesh=None), parallel.DataParallel.create(8)):
        state = dp.place_state(step_lib.init_state(model, optimizer, 8, config.seed))
        step_fn = dp.wrap_step(step_lib.make_train_step(model, optimizer, dp.mesh))
        params.append(jax.tree.leaves(jax.device_get(step_fn(state, batch)[0].params)))
    return max(float(np.abs(a - b).max()) for a, b in zip(*params))


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
