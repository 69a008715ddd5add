"""Child process of test_parallel.py: runs with several CPU devices, prints JSON.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX
starts, so the multi-device checks run here, in a fresh interpreter:

    python tests/parallel_child.py devices CORPUS     # data mesh vs one device
    python tests/parallel_child.py sweep              # run axis on the mesh vs one device

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


def main():
    mode = sys.argv[1]
    if mode == "devices":
        result = check_devices(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
