"""Packing a sweep's rules into one program: throughput and compile time, before and after.

    python experiments/bench/bench_packing.py --outdir=DIR [--smoke] [--cell=rnn]
        [--runs_per_chunk=1,0] [--compile_grid]

Before the packing a sweep compiled one program per (rule, cell, optimizer);
now the runs of every rule of a (cell, optimizer) share one, the rule a
runtime index (:func:`charrnn.clipping.switch`). Two measurements:

- throughput: the runs of one cell and optimizer (every rule of the report's
  grid, its strengths, two seeds; the report's model sizes) stepped by the
  per-rule programs one after another ("grouped") and by the one packed
  program ("packed"), each for ``--runs_per_chunk`` C (1: runs one by one, the
  switch a real branch; 0: all vmapped, the switch a select over every rule's
  branch). Both see the same pre-made batches; compilation is excluded; timing
  windows alternate between the variants and each keeps its best window.
  ``ratio`` = packed chars/s / grouped chars/s per C (best windows, within this
  one run); ``ratio_median_of_rounds``: the median over the rounds of that ratio
  from the round's two windows.
- ``--compile_grid``: the report's whole grid (experiments/configs/clip_ablation.py)
  as programs before and after, each lowered and compiled without training
  (``jit(...).lower(...).compile()`` on abstract inputs); program count and
  compile seconds, in the layout the CPU sweep uses (C = 1, one device).

Prints JSON (also written to DIR/bench_packing.json).
"""

import time

from absl import app, flags

from experiments import cli

_OUTDIR = flags.DEFINE_string("outdir", None, "Directory for bench_packing.json.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes and one strength per rule: seconds.")
_CELL = flags.DEFINE_string("cell", "rnn", "Cell of the throughput grid.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["sgd", "adam"], "Its optimizer.")
_CHUNKS = flags.DEFINE_list("runs_per_chunk", ["1", "0"], "Layouts to time (0 = all vmapped).")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per (rule, strength).", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timing window.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timing windows per variant; the best counts.",
                                lower_bound=1)
_COMPILE = flags.DEFINE_bool("compile_grid", False,
                             "Also compile the report's whole grid before and after.")
_VOCAB = 65


def _config(smoke: bool):
    from experiments.configs import clip_ablation
    return clip_ablation.get_config("smoke" if smoke else None)


def _programs(config, runs, pack_rules: bool) -> dict:
    """program key -> the run configs it trains (strength labels as numbers: a relative
    'Nx' stands for N, the reference norm being a runtime value anyway)."""
    from charrnn import sweep
    out = {}
    for run in runs:
        tau = sweep.parse_strength(run.rule, run.strength)[1]
        out.setdefault(run.program(pack_rules), []).append(
            (sweep.run_config(config, run, tau), tau))
    return out


def _batches(num_runs: int, B: int, T: int):
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    tokens = lambda: jnp.asarray(rng.integers(0, _VOCAB, (num_runs, B, T), dtype=np.int32))
    return {"x": tokens(), "y": tokens(), "reset": jnp.zeros((num_runs,), bool)}


def throughput(config, cell: str, optimizer: str, chunks: list, steps: int,
               repeats: int) -> dict:
    """chars/s of the grouped and the packed layout of one cell's runs, per chunk size."""
    import jax
    import numpy as np
    from charrnn import models, sweep
    config.sweep.cells, config.sweep.optimizers = (cell,), (optimizer,)
    runs = sweep.make_grid(config.sweep)
    B, T = config.train.batch_size, config.train.seq_len
    model = models.CharRNN.from_config(sweep.run_config(config, runs[0]).model, _VOCAB)
    variants = {}
    for chunk in chunks:
        for name, pack in (("grouped", False), ("packed", True)):
            programs = []
            for members in _programs(config, runs, pack).values():
                configs = [c for c, _ in members]
                step = sweep.make_group_step(model, configs[0], chunk, None,
                                             sweep.group_rules(configs))
                programs.append([step, sweep.init_group(model, configs),
                                 _batches(len(configs), B, T),
                                 sweep.group_hypers(configs, [t for _, t in members])])
            variants[f"{name}_chunk{chunk}"] = programs

    def window(programs):
        for program in programs:  # one program's steps, then the next program's
            step, _, batch, hypers = program
            for _ in range(steps):
                program[1], metrics = step(program[1], batch, hypers)
            jax.block_until_ready(metrics)

    times = {name: [] for name in variants}
    for programs in variants.values():
        window(programs)  # compile and warm up
    for _ in range(repeats):
        for name, programs in variants.items():
            start = time.perf_counter()
            window(programs)
            times[name].append(time.perf_counter() - start)
    chars = len(runs) * steps * B * T
    result = {"cell": cell, "optimizer": optimizer, "hidden_size": config.model.hidden_size,
              "batch_size": B, "seq_len": T, "num_runs": len(runs),
              "rules": list(config.sweep.rules), "steps_per_window": steps, "repeats": repeats,
              "programs": {name: len(p) for name, p in variants.items()},
              "chars_per_sec": {name: chars / min(t) for name, t in times.items()},
              "window_spread": {name: max(t) / min(t) for name, t in times.items()}}
    result["ratio"] = {str(c): result["chars_per_sec"][f"packed_chunk{c}"]
                       / result["chars_per_sec"][f"grouped_chunk{c}"] for c in chunks}
    # The same from each round's two adjacent windows, the median over the rounds: load that
    # drifts between rounds (a shared machine) moves both windows of a round alike.
    result["ratio_median_of_rounds"] = {str(c): float(np.median(
        np.array(times[f"grouped_chunk{c}"]) / np.array(times[f"packed_chunk{c}"])))
        for c in chunks}
    return result


def compile_grid(config) -> dict:
    """Program count and compile seconds of the whole grid, before and after the packing."""
    import jax
    from charrnn import models, sweep
    runs = sweep.make_grid(config.sweep)
    B, T = config.train.batch_size, config.train.seq_len
    out = {"num_runs": len(runs)}
    for name, pack in (("before", False), ("after", True)):
        seconds = []
        for members in _programs(config, runs, pack).values():
            configs = [c for c, _ in members]
            model = models.CharRNN.from_config(configs[0].model, _VOCAB)
            step = sweep.make_group_step(model, configs[0], 1, None, sweep.group_rules(configs))
            shapes = jax.eval_shape(lambda: (sweep.init_group(model, configs),
                                             _batches(len(configs), B, T),
                                             sweep.group_hypers(configs, [t for _, t in members])))
            start = time.perf_counter()
            step.lower(*shapes).compile()
            seconds.append(time.perf_counter() - start)
        out[name] = {"programs": len(seconds), "compile_seconds": sum(seconds),
                     "max_program_seconds": max(seconds)}
    out["compile_ratio"] = out["after"]["compile_seconds"] / out["before"]["compile_seconds"]
    return out


def main(argv):
    cli.start(argv, outdir=_OUTDIR.value)
    chunks = cli.chunk_sizes(_CHUNKS.value)
    from charrnn import models
    if _CELL.value not in models.CELLS:
        raise app.UsageError(f"--cell must be a registered cell: {', '.join(models.CELLS)}")
    config = _config(_SMOKE.value)
    config.sweep.seeds = tuple(range(_SEEDS.value))
    import jax
    result = {"backend": jax.default_backend(),
              "throughput": throughput(config, _CELL.value, _OPTIMIZER.value, chunks,
                                       _STEPS.value, _REPEATS.value)}
    if _COMPILE.value:
        result["compile_grid"] = compile_grid(_config(_SMOKE.value))
    cli.write_json(_OUTDIR.value, "bench_packing.json", result)


if __name__ == "__main__":
    app.run(main)
