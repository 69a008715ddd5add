"""Generation speed: the one-scan sampler against a per-character loop driven from Python.

    python experiments/bench/bench_sample.py --outdir=runs/bench_sample [--smoke]

For LSTM 1x128 and LSTM 2x512 (vocabulary 65, embedding 64, random weights:
speed does not depend on training), at batch 1 and 64, it times

- ``scan``: :func:`charrnn.sampling.generate`, one jitted ``lax.scan`` over all
  characters;
- ``loop``: one jitted function per character (``model.step`` + the same
  ``draw``), called ``length`` times from Python; tokens stay on the device,
  so dispatch runs ahead of the computation (the strongest per-character loop);
- ``loop_sync``: the same loop, but each drawn character is copied to the host
  as it is drawn, as a loop that builds the output string character by
  character does (one device round trip per character).

Both include copying the ids [B, length] to the host. Repetitions are
interleaved (scan, loop, scan, loop, ...) and the median is reported, so load
from other processes hits both alike. chars/s counts all B streams.

At batch 1 every step reads all weights once, so for 2x512 the scan is bounded
by (bytes of weights per character) / (memory bandwidth); the bandwidth is
measured with a NumPy copy (read + write bytes, one core) of a buffer as large
as the weights (the working set the sampler streams through), interleaved with
the same repetitions, and of a 256 MiB buffer afterwards.

Prints one JSON line per measurement and a summary; writes
``<outdir>/bench_sample.json``. Targets (batch 1): scan >= 10x the loop for
1x128, >= 3x for 2x512, reported against both loops; with --check_targets a
missed one (against either) exits with status 1.
"""

import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags

_OUTDIR = flags.DEFINE_string("outdir", "runs/bench_sample", "Where bench_sample.json goes.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny run of the same pipeline (about a minute).")
_LENGTH = flags.DEFINE_integer("length", 1000, "Characters per sample (smoke: 100).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions (smoke: 2).")
_UNROLL = flags.DEFINE_integer("unroll", 1, "lax.scan unroll of the sampler.")
_CHECK = flags.DEFINE_bool("check_targets", False, "Exit 1 when a speed target is missed.")

VOCAB_SIZE, EMBED_DIM = 65, 64
MODELS = {"lstm_1x128": (128, 1), "lstm_2x512": (512, 2)}
BATCHES = (1, 64)
TARGETS = {"lstm_1x128": 10.0, "lstm_2x512": 3.0}  # scan / loop at batch 1
TEMPERATURE = 1.0


def make_loop(model, temperature, sync: bool):
    """The baseline: one jitted step per character, driven from Python.

    sync: copy every drawn character to the host before the next step.
    """
    import jax
    import numpy as np
    from charrnn import sampling

    step_weights = jax.jit(model.step_weights)

    @jax.jit
    def step(weights, carry, token, key):
        carry, logits = model.step(weights, carry, token)
        key, sub = jax.random.split(key)
        return carry, sampling.draw(sub, logits, temperature), key

    def run(params, carry, logits, key, length):
        weights = step_weights(params)  # once, as the scan sampler does
        key, sub = jax.random.split(key)
        token = sampling.draw(sub, logits, temperature)
        tokens = [token]
        for _ in range(length - 1):
            carry, token, key = step(weights, carry, token, key)
            tokens.append(np.asarray(token) if sync else token)
        return jax.numpy.stack(tokens, axis=1)
    return run


def weight_bytes_per_char(model, params) -> int:
    """Bytes read per generated character at batch 1: each array of the step weights
    (``CharRNN.step_weights``) once, but one row of layer 0's input table."""
    import jax
    weights = model.step_weights(params)
    (_, (table,)), *_ = weights["layers"]
    return sum(x.nbytes for x in jax.tree.leaves(weights)) - table.nbytes + table[0].nbytes


def make_copy(nbytes: int):
    """A probe: ``np.copyto`` between two buffers of ``nbytes``, repeated to move ~256 MiB.

    Returns (run, bytes moved per run); read and write both count.
    """
    import numpy as np
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    inner = max(1, (256 << 20) // src.nbytes)

    def run():
        for _ in range(inner):
            np.copyto(dst, src)
    return run, 2 * src.nbytes * inner


def bench_model(name, hidden, layers, length, repeats, unroll):
    """Median seconds of every method and batch, repetitions interleaved.

    Returns (weight bytes read per character, results, copy bandwidth in bytes/s
    or None); the copy probe runs only for 2x512, interleaved with the same
    repetitions.
    """
    import jax
    import numpy as np
    from charrnn import models, sampling
    model = models.CharRNN(VOCAB_SIZE, cell="lstm", hidden_size=hidden, num_layers=layers,
                           embed_dim=EMBED_DIM)
    params = model.init(jax.random.key(0))
    # Softmax of moderate logits, as a trained model's: near-uniform draws cost the same.
    logits0 = jax.random.normal(jax.random.key(1), (max(BATCHES), VOCAB_SIZE))
    scan = functools.partial(sampling.generate, model=model, length=length,
                             temperature=TEMPERATURE, unroll=unroll)
    loop, loop_sync = make_loop(model, TEMPERATURE, False), make_loop(model, TEMPERATURE, True)
    methods = {"scan": lambda c, lg, k: scan(params, c, lg, k),
               "loop": lambda c, lg, k: loop(params, c, lg, k, length),
               "loop_sync": lambda c, lg, k: loop_sync(params, c, lg, k, length)}
    nbytes = weight_bytes_per_char(model, params)
    probe = make_copy(nbytes) if name == "lstm_2x512" else None
    times = {(m, b): [] for m in methods for b in BATCHES}
    copy_times = []
    for rep in range(repeats + 1):  # the first round compiles and is not timed
        for batch in BATCHES:
            carry, logits = model.initial_carry(batch), logits0[:batch]
            for method, fn in methods.items():
                key = jax.random.key(rep)
                jax.block_until_ready((carry, logits))
                start = time.perf_counter()
                ids = np.asarray(fn(carry, logits, key))
                elapsed = time.perf_counter() - start
                assert ids.shape == (batch, length)
                if rep:
                    times[method, batch].append(elapsed)
        if probe:
            start = time.perf_counter()
            probe[0]()
            copy_times.append(time.perf_counter() - start)
    results = []
    for (method, batch), ts in times.items():
        median = statistics.median(ts)
        results.append({"model": name, "method": method, "batch": batch, "length": length,
                        "unroll": unroll if method == "scan" else None, "seconds": median,
                        "chars_per_sec": batch * length / median,
                        "steps_per_sec": length / median, "repeats": len(ts)})
    bandwidth = probe[1] / statistics.median(copy_times[1:]) if probe else None
    return nbytes, results, bandwidth


def main(argv):
    del argv
    import jax
    length = 100 if _SMOKE.value else _LENGTH.value
    repeats = 2 if _SMOKE.value else _REPEATS.value
    os.makedirs(_OUTDIR.value, exist_ok=True)
    summary = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
               "length": length, "repeats": repeats, "smoke": _SMOKE.value, "speedups": {}}
    all_results = []
    for name, (hidden, layers) in MODELS.items():
        nbytes, results, bw_weights = bench_model(name, hidden, layers, length, repeats,
                                                  _UNROLL.value)
        for r in results:
            print(json.dumps(r), flush=True)
        all_results += results
        rate = {(r["method"], r["batch"]): r["chars_per_sec"] for r in results}
        for batch in BATCHES:
            for baseline in ("loop", "loop_sync"):
                summary["speedups"][f"{name}/batch{batch}/scan_vs_{baseline}"] = (
                    rate["scan", batch] / rate[baseline, batch])
        if name == "lstm_2x512":
            copy_large, moved = make_copy(256 << 20)
            large = []
            for _ in range(3 if _SMOKE.value else 5):
                start = time.perf_counter()
                copy_large()
                large.append(time.perf_counter() - start)
            bw_large = moved / statistics.median(large)
            summary["bound_2x512"] = {
                "weight_bytes_per_char": nbytes,
                "copy_bandwidth_weights_sized_GBps": bw_weights / 1e9,
                "copy_bandwidth_256MiB_GBps": bw_large / 1e9,
                "bound_chars_per_sec": bw_weights / nbytes,
                "bound_chars_per_sec_256MiB": bw_large / nbytes,
                "scan_batch1_chars_per_sec": rate["scan", 1],
                "scan_fraction_of_bound": rate["scan", 1] * nbytes / bw_weights,
                "scan_fraction_of_bound_256MiB": rate["scan", 1] * nbytes / bw_large,
            }
    summary["targets"] = {
        f"{name}/scan_vs_{baseline}": {
            "want": want, "got": summary["speedups"][f"{name}/batch1/scan_vs_{baseline}"],
            "met": summary["speedups"][f"{name}/batch1/scan_vs_{baseline}"] >= want}
        for name, want in TARGETS.items() for baseline in ("loop", "loop_sync")}
    print(json.dumps({"summary": summary}), flush=True)
    with open(os.path.join(_OUTDIR.value, "bench_sample.json"), "w") as f:
        json.dump({"results": all_results, "summary": summary}, f, indent=2)
    missed = [n for n, t in summary["targets"].items() if not t["met"]]
    if missed:
        print(f"speed target missed: {', '.join(missed)}", file=sys.stderr)
        if _CHECK.value:
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
