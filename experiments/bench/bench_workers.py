"""The contenders of experiments/bench/benchmark.py, each hosted by a worker process.

One worker process per framework
(``python -m experiments.bench.bench_workers jax|torch|numpy``):
PyTorch's OpenMP threads and OpenBLAS's never share a process with XLA's, so
no contender inherits another's spinning threads, and the parent interleaves
timing windows across processes. A worker holds named tasks and reads JSON
commands on stdin: ``["setup", name, spec]`` (answered with the seconds to the
first finished unit of work, compilation included) and ``["run", name,
seconds]`` (answered with units done, wall and CPU seconds), one JSON reply
per line on its stdout (anything else it prints goes to stderr).

Units: training tasks count characters (B*T per step, R*B*T for an R-run
sweep); sampling tasks count generated characters (batch*length per call);
``gemm`` counts floating-point operations.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from experiments.bench.task import EMBED, VOCAB, Task, random_tokens as _random_tokens

TEMPERATURE = 1.0


def serve(framework: str, commands, replies):
    """Answer JSON commands, one per line, until "stop" or the end of input.

    framework: ``jax``, ``torch`` or ``numpy``; ``jax_1thread``/``numpy_1thread``
    run the same tasks on one thread (see :func:`_one_thread_jax`; NumPy's BLAS
    reads OPENBLAS_NUM_THREADS=1, which the parent sets); ``jax_2dev`` sees two
    CPU devices (XLA_FLAGS, set by the parent), one per core.
    """
    tasks = {}
    base = framework.split("_")[0]
    if framework == "jax_1thread":
        _one_thread_jax()
    factories = {"jax": _jax_tasks, "torch": _torch_tasks, "numpy": _numpy_tasks}[base]()
    for line in commands:
        command = json.loads(line)
        if command[0] == "stop":
            break
        try:
            if command[0] == "setup":
                _, name, spec = command
                start = time.perf_counter()
                task = factories[spec["kind"]](spec)
                task.run_units(1)  # the first unit: compilation, first allocation
                task.units_per_call = spec.get("units_per_call", 1)
                tasks[name] = task
                reply = {"first_s": time.perf_counter() - start}
            else:  # ("run", name, seconds)
                _, name, seconds = command
                reply = tasks[name].window(seconds)
        except Exception as e:  # reported to the parent, which marks the contender failed
            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# ----------------------------------------------------------------------------------
# JAX / charrnn


def _one_thread_jax():
    """Start XLA's CPU client while this process may use one core only, then lift that.

    XLA sizes its thread pool and splits ops into parallel tasks by the cores
    it may run on when the client starts: this gives single-threaded code (the
    counterpart of ``torch.set_num_threads(1)``) that the OS may still move
    between cores.
    """
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    import jax
    jax.devices()
    os.sched_setaffinity(0, cores)


def _jax_tasks():
    return {"train": JaxTrain, "train_cudnn": JaxCudnnTrain, "sweep": JaxSweep,
            "sample_scan": JaxSampleScan, "sample_loop": JaxSampleLoop, "gemm": JaxGemm}


def charrnn_config(spec):
    """The default run config with the benchmark's sizes (B, T, model) and Adam, clip 1.0."""
    from experiments.configs import default
    config = default.get_config()
    config.model.cell, config.model.hidden_size = spec["cell"], spec["hidden"]
    config.model.num_layers, config.model.embed_dim = spec["layers"], EMBED
    config.model.fast_vjp = spec.get("fast_vjp", True)
    config.model.remat = spec.get("remat", False)
    config.model.matmul_dtype = spec.get("matmul_dtype", "float32")
    config.train.batch_size, config.train.seq_len = spec["batch"], spec["seq_len"]
    config.optim.name, config.optim.clip_mode, config.optim.clip_norm = "adam", "global_norm", 1.0
    return config


class JaxTrain(Task):
    """charrnn's real training step: ``step.make_train_step`` (jitted, state donated).

    With several devices (the ``jax_2dev`` worker: two CPU devices), the step
    runs as ``train_and_evaluate`` runs it there: ``parallel.DataParallel``,
    batch rows sharded over a data mesh, gradients all-reduced by XLA.
    """

    def __init__(self, spec):
        import functools
        import numpy as np
        from charrnn import models, optim, parallel
        from charrnn import step as step_lib
        config = charrnn_config(spec)
        self.model = self.build_model(models.CharRNN.from_config(config.model, VOCAB))
        dp = parallel.DataParallel.create(spec["batch"])
        optimizer = optim.Optimizer.from_config(config)
        self.state = dp.create_state(functools.partial(
            step_lib.init_state, self.model, optimizer, spec["batch"], config.seed))
        self.step = dp.wrap_step(step_lib.make_train_step(
            self.model, optimizer, dp.mesh, reset_prob=config.train.reset_prob))
        shape = (spec["batch"], spec["seq_len"])
        self.batch = {"x": _random_tokens(shape, 1), "y": _random_tokens(shape, 2),
                      "reset": np.bool_(False)}
        self.unit_size = shape[0] * shape[1]

    def build_model(self, model):
        return model

    def run_units(self, n):
        import jax
        pending = None
        for _ in range(n):  # one step in flight while the next is dispatched, as in training
            self.state, metrics = self.step(self.state, self.batch)
            if pending is not None:
                jax.block_until_ready(pending)
            pending = metrics["loss"]
        jax.block_until_ready(pending)


class JaxCudnnTrain(JaxTrain):
    """The same training step with the LSTM layers as one cuDNN call
    (experiments/bench/cudnn_lstm.py; off a GPU its lax.scan reference)."""

    def build_model(self, model):
        from experiments.bench import cudnn_lstm
        return cudnn_lstm.CudnnLSTM.for_backend(model)


class JaxSweep(Task):
    """R runs (one clipping threshold each) stepped by one program: ``sweep.make_group_step``.

    With several devices (the ``jax_2dev`` worker) the runs are split over
    them, as ``sweep.run_group`` does with a mesh.
    """

    def __init__(self, spec):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from charrnn import models, parallel, sweep
        config = charrnn_config(spec)
        runs = spec["runs"]
        configs = []
        for seed in range(runs):
            c = charrnn_config(spec)
            c.seed = seed
            configs.append(c)
        model = models.CharRNN.from_config(config.model, VOCAB)
        mesh = parallel.make_mesh() if jax.device_count() > 1 else None
        self.step = sweep.make_group_step(model, config, sweep.default_runs_per_chunk(), mesh)
        shape = (runs, spec["batch"], spec["seq_len"])
        self.state, self.batch, self.taus = (
            sweep.init_group(model, configs),
            {"x": _random_tokens(shape, 1), "y": _random_tokens(shape, 2),
             "reset": np.zeros((runs,), bool)},
            {"strength": jnp.asarray(np.geomspace(0.1, 10.0, runs), jnp.float32)})
        if mesh is not None:
            self.state, self.batch, self.taus = parallel.shard_runs(
                (self.state, self.batch, self.taus), mesh)
        self.unit_size = runs * spec["batch"] * spec["seq_len"]

    def run_units(self, n):
        import jax
        for _ in range(n):
            self.state, metrics = self.step(self.state, self.batch, self.taus)
        jax.block_until_ready(metrics["loss"])


def _sampling_model(spec):
    import jax
    from charrnn import models
    model = models.CharRNN(VOCAB, cell="lstm", hidden_size=spec["hidden"],
                           num_layers=spec["layers"], embed_dim=EMBED)
    params = model.init(jax.random.key(0))
    logits = jax.random.normal(jax.random.key(1), (spec["batch"], VOCAB))
    return model, params, model.initial_carry(spec["batch"]), logits


class JaxSampleScan(Task):
    """charrnn's sampler: ``sampling.generate``, one jitted scan over all characters."""

    def __init__(self, spec):
        import functools
        from charrnn import sampling
        self.model, self.params, self.carry, self.logits = _sampling_model(spec)
        self.fn = functools.partial(sampling.generate, model=self.model, length=spec["length"],
                                    temperature=TEMPERATURE)
        self.unit_size, self.count = spec["batch"] * spec["length"], 0

    def run_units(self, n):
        import jax
        import numpy as np
        for _ in range(n):
            self.count += 1
            np.asarray(self.fn(self.params, self.carry, self.logits, jax.random.key(self.count)))


class JaxSampleLoop(JaxSampleScan):
    """One jitted step per character driven from Python (experiments/bench/bench_sample.make_loop)."""

    def __init__(self, spec):
        from experiments.bench import bench_sample
        self.model, self.params, self.carry, self.logits = _sampling_model(spec)
        loop = bench_sample.make_loop(self.model, TEMPERATURE, sync=False)
        self.fn = lambda params, carry, logits, key: loop(params, carry, logits, key,
                                                          spec["length"])
        self.unit_size, self.count = spec["batch"] * spec["length"], 0


class JaxGemm(Task):
    """float32 ``jnp.matmul`` of two [n, n] matrices (2 n³ FLOPs per unit)."""

    def __init__(self, spec):
        import jax
        import jax.numpy as jnp
        n = spec["n"]
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.fn = jax.jit(jnp.matmul)
        self.unit_size = 2 * n ** 3

    def run_units(self, n):
        import jax
        for _ in range(n):
            jax.block_until_ready(self.fn(self.a, self.b))


# ----------------------------------------------------------------------------------
# PyTorch (eager)


def _torch_tasks():
    return {"train": TorchTrain, "sample": TorchSample}


def _torch_model(cell, hidden, layers):
    import torch

    class CharModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, EMBED)
            rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}.get(cell, torch.nn.RNN)  # RNN: tanh
            self.rnn = rnn(EMBED, hidden, layers, batch_first=True)
            self.head = torch.nn.Linear(hidden, VOCAB)

        def forward(self, x, state):
            out, state = self.rnn(self.embed(x), state)
            return self.head(out), state

    torch.manual_seed(0)
    return CharModel()


class TorchTrain(Task):
    """PyTorch eager: nn.LSTM/nn.RNN, cross-entropy, clip_grad_norm_(1.0), Adam; TBPTT.

    With ``matmul_dtype: bfloat16`` the forward pass runs under CPU autocast
    (bfloat16 matmuls and recurrent kernels, float32 parameters): PyTorch's
    counterpart of charrnn's ``model.matmul_dtype=bfloat16``. ``device: cuda``: the
    same on the GPU (cuDNN's RNN kernels, CUDA autocast), synchronised after each call.
    """

    def __init__(self, spec):
        import torch
        self.torch = torch
        self.device = spec.get("device", "cpu")
        self.model = _torch_model(spec["cell"], spec["hidden"], spec["layers"]).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=2e-3)
        shape = (spec["batch"], spec["seq_len"])
        self.x = torch.from_numpy(_random_tokens(shape, 1)).long().to(self.device)
        self.y = torch.from_numpy(_random_tokens(shape, 2)).long().to(self.device)
        zeros = torch.zeros(spec["layers"], spec["batch"], spec["hidden"], device=self.device)
        self.state = (zeros, zeros.clone()) if spec["cell"] == "lstm" else zeros
        self.unit_size = shape[0] * shape[1]
        self.threads = spec.get("threads")  # None: PyTorch's default (one per core)
        self.bf16 = spec.get("matmul_dtype") == "bfloat16"  # autocast: bfloat16 matmuls

    def run_units(self, n):
        torch = self.torch
        default_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or default_threads)
        try:
            self._steps(n)
            if self.device == "cuda":
                torch.cuda.synchronize()
        finally:
            torch.set_num_threads(default_threads)

    def _steps(self, n):
        torch = self.torch
        for _ in range(n):
            state = tuple(s.detach() for s in self.state) if isinstance(self.state, tuple) \
                else self.state.detach()  # truncated BPTT: carry the state, not its graph
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
                logits, self.state = self.model(self.x, state)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(),
                                                         self.y.reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()


class TorchSample(Task):
    """PyTorch sampling loop: one LSTM step, softmax and multinomial per character
    (``device: cuda``: on the GPU, the ids copied to the host at the end)."""

    def __init__(self, spec):
        import torch
        self.torch, self.spec = torch, spec
        self.device = spec.get("device", "cpu")
        self.model = _torch_model("lstm", spec["hidden"], spec["layers"]).eval().to(self.device)
        self.mkldnn = spec.get("mkldnn", True)
        self.unit_size = spec["batch"] * spec["length"]
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def run_units(self, n):
        torch, spec = self.torch, self.spec
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = self.mkldnn
        try:
            with torch.no_grad():
                for _ in range(n):
                    token = torch.zeros(spec["batch"], 1, dtype=torch.long, device=self.device)
                    state, out = None, []
                    for _ in range(spec["length"]):
                        logits, state = self.model(token, state)
                        probs = torch.softmax(logits[:, -1] / TEMPERATURE, dim=-1)
                        token = torch.multinomial(probs, 1, generator=self.generator)
                        out.append(token)
                    torch.cat(out, dim=1).cpu().numpy()
        finally:
            torch.backends.mkldnn.enabled = previous


# ----------------------------------------------------------------------------------
# NumPy


def _numpy_tasks():
    from experiments.bench.numpy_rnn import NumpyRNNTrain
    return {"train": NumpyRNNTrain, "gemm": NumpyGemm}


class NumpyGemm(Task):
    """float32 ``a @ b`` of two [n, n] matrices through NumPy's BLAS."""

    def __init__(self, spec):
        import numpy as np
        rng = np.random.default_rng(0)
        n = spec["n"]
        self.a = rng.standard_normal((n, n), np.float32)
        self.b = rng.standard_normal((n, n), np.float32)
        self.unit_size = 2 * n ** 3

    def run_units(self, n):
        for _ in range(n):
            self.a @ self.b


if __name__ == "__main__":
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the replies
    serve(sys.argv[1], sys.stdin, protocol)
