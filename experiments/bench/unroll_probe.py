"""Probe: LSTM 1x128 training chars/s on this device against the scan's unroll factor.

    python experiments/bench/unroll_probe.py

B=32, T=128, Adam, global_norm 1.0, one device; prints JSON {unroll: chars/s}.
"""
import json
import time

import jax
import numpy as np

from charrnn import models, optim
from charrnn import step as step_lib
from experiments.configs import default


def rate(unroll, hidden=128, layers=1, steps=50):
    config = default.get_config()
    config.model.hidden_size, config.model.num_layers = hidden, layers
    model = models.CharRNN(65, cell="lstm", hidden_size=hidden, num_layers=layers, embed_dim=64,
                           unroll=unroll)  # model.unroll, as a config would set it
    tx = optim.Optimizer.from_config(config)
    state = step_lib.init_state(model, tx, 32, 0)
    step = step_lib.make_train_step(model, tx)
    rng = np.random.default_rng(0)
    batch = {"x": rng.integers(0, 65, (32, 128), dtype=np.int32),
             "y": rng.integers(0, 65, (32, 128), dtype=np.int32), "reset": np.bool_(False)}
    for _ in range(3):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        best = max(best, steps * 32 * 128 / (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    out = {"device": jax.devices()[0].device_kind}
    for hidden, layers in ((128, 1), (512, 2)):
        out[f"lstm_{layers}x{hidden}"] = {u: rate(u, hidden, layers) for u in (1, 2, 4, 8)}
    print(json.dumps(out))
