"""The measuring machinery the benchmark scripts share (benchmark.py, gpu.py): worker
processes, timing groups rotated over contenders, fresh processes, the machine's facts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from charrnn import runinfo


class Workers:
    """One worker process per framework (bench_workers.py); contenders are (framework, task)."""

    def __init__(self, frameworks):
        import subprocess
        env = {"_1thread": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
               "_2dev": {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_force_host_platform_device_count=2").strip()}}
        self.procs = {}
        for fw in frameworks:
            extra = next((v for k, v in env.items() if fw.endswith(k)), {})
            self.procs[fw] = subprocess.Popen(
                [sys.executable, "-m", "experiments.bench.bench_workers", fw],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={**os.environ, **extra})

    def ask(self, framework, message):
        proc = self.procs[framework]
        proc.stdin.write(json.dumps(message) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            return {"error": f"the {framework} worker exited (status {proc.wait()})"}
        return json.loads(line)

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.stdin.write(json.dumps(["stop"]) + "\n")
                proc.stdin.close()
        for proc in self.procs.values():
            proc.wait(timeout=60)


def measure_group(workers, contenders, repeats, window, log):
    """Set up every contender, then rotate timing windows; per contender: windows and medians.

    contenders: {label: (framework, spec)}. A contender whose framework is
    missing or whose setup fails is reported with its error and left out.
    """
    results, live = {}, []
    for label, (fw, spec) in contenders.items():
        if fw not in workers.procs:
            results[label] = {"skipped": f"{fw} is not installed"}
            continue
        reply = workers.ask(fw, ("setup", label, spec))
        if "error" in reply:
            results[label] = {"error": reply["error"]}
            log(f"  {label}: FAILED {reply['error']}\n{reply.get('trace', '')}")
            continue
        workers.ask(fw, ("run", label, min(window, 0.5)))  # warm-up window, not counted
        results[label] = {"first_step_s": reply["first_s"], "windows": []}
        live.append(label)
    for rep in range(repeats):
        order = live if rep % 2 == 0 else live[::-1]  # no contender always runs first
        for label in order:
            reply = workers.ask(contenders[label][0], ("run", label, window))
            if "error" in reply:
                raise RuntimeError(f"{label}: {reply['error']}\n{reply.get('trace', '')}")
            results[label]["windows"].append(reply)
    for label in live:
        ws = results[label]["windows"]
        rates = [w["units"] / w["wall"] for w in ws]
        results[label].update(per_sec=statistics.median(rates), per_sec_max=max(rates),
                              per_cpu_sec=statistics.median(w["units"] / w["cpu"] for w in ws))
        log(f"  {label}: {results[label]['per_sec']:,.0f}/s (median of {len(ws)}), "
            f"first {results[label]['first_step_s']:.2f} s")
    return results


def fresh_process(flag):
    """Run bench_memory.py with one flag in a new interpreter; its last stdout line is JSON."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "experiments.bench.bench_memory", flag],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_info():
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu": runinfo.cpu_model(), "charrnn_commit": runinfo.package_commit()}
    from importlib import metadata
    for pkg in ("jax", "jaxlib", "numpy", "torch"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    info["load_average"] = os.getloadavg()
    return info


def has_torch():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def time_train_steps(model, configs: dict, vocab_size: int, steps: int, repeats: int) -> dict:
    """Best-window chars/s of the real training step of ``model`` under each run config.

    configs: {label: run config} (the same batch shape); every label's step
    (:func:`charrnn.step.make_train_step`: jitted, state donated) trains on the
    same random batch; compilation is excluded. Timing windows of ``steps``
    steps alternate between the labels and each keeps its best of ``repeats``,
    so a machine shared with other jobs biases no label. Returns
    ``{"chars_per_sec": {label: ...}, "window_spread": {label: slowest / fastest}}``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from charrnn import optim
    from charrnn import step as step_lib

    first = next(iter(configs.values()))
    B, T = first.train.batch_size, first.train.seq_len
    rng = np.random.default_rng(0)
    tokens = lambda: jnp.asarray(rng.integers(0, vocab_size, (B, T), dtype=np.int32))
    batch = {"x": tokens(), "y": tokens(), "reset": np.bool_(False)}

    def timed(step_fn):
        def run(state):
            for _ in range(steps):
                state, m = step_fn(state, batch)
            jax.block_until_ready(m)
            return state
        return run

    runs, states, times = {}, {}, {}
    for label, config in configs.items():
        optimizer = optim.Optimizer.from_config(config)
        runs[label] = timed(step_lib.make_train_step(model, optimizer))
        state = step_lib.init_state(model, optimizer, B, config.seed)
        states[label] = runs[label](state)  # compile and warm up
        times[label] = []
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            states[label] = run(states[label])
            times[label].append(time.perf_counter() - start)
    chars = steps * B * T
    return {"chars_per_sec": {label: chars / min(t) for label, t in times.items()},
            "window_spread": {label: max(t) / min(t) for label, t in times.items()}}
