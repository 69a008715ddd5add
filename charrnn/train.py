"""Training: the loss, the jitted train step, evaluation and the training loop.

One training iteration, in the order the seed describes it:

1. forward pass over a window of T characters (teacher forcing: the input at
   t is the true character x[t]), carrying the hidden state from the previous
   window (truncated BPTT);
2. loss: mean cross-entropy against the next characters, in nats/char;
3. backward pass (BPTT through the scan): raw gradients g;
4. clipping: ``clip.update(g)`` — exactly between the backward pass and the
   optimizer (see :func:`train_step`);
5. optimizer step: Adam (or SGD) on the clipped gradient.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from charrnn import config as config_lib
from charrnn import clipping, data, diagnostics, hostmem, models, optim, parallel
from charrnn import workdir as workdir_lib
from charrnn.checkpoint import (CheckpointError, Checkpointer, decode_step_metrics,
                                encode_step_metrics)
from charrnn.metrics import MetricWriter
from charrnn.errors import UserError

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree of arrays (saved as-is in checkpoints)."""
    step: jax.Array  # int32 []: steps taken (skipped non-finite steps included)
    params: dict
    opt_state: Any  # (clip state, optimizer state), as optax.chain keeps it
    carry: tuple  # hidden state carried into the next window, [B, H] per layer
    rng: jax.Array  # uint32 key data; dropout key of step s = fold_in(key, s)
    nonfinite_run: jax.Array  # int32 []: consecutive skipped steps so far
    nonfinite_total: jax.Array  # int32 []: all skipped steps


def init_state(model: models.CharRNN, tx: optax.GradientTransformation, batch_size: int,
               seed: int) -> TrainState:
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key)
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
    return TrainState(step=zero(), params=params, opt_state=tx.init(params),
                      carry=model.initial_carry(batch_size),
                      rng=jax.random.key_data(dropout_key), nonfinite_run=zero(), nonfinite_total=zero())


def loss_fn(params, model: models.CharRNN, carry, x, y, dropout_key=None, batch_rows=None):
    """Mean cross-entropy in nats/char of targets y [B, T] given inputs x [B, T].

    Returns (loss, carry after the window). ``batch_rows``: see ``CharRNN.__call__``.
    """
    carry, logits = model(params, carry, x, dropout_key, batch_rows=batch_rows)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), carry


def train_step(state: TrainState, batch: dict, key, *, model: models.CharRNN,
               clip: optax.GradientTransformation, optimizer: optax.GradientTransformation,
               schedule, axis_name: str | None = None,
               clip_threshold=None) -> tuple[TrainState, dict]:
    """One update: forward, loss, gradient, clip, optimizer step.

    batch: ``x``, ``y`` int [B, T] and ``reset`` bool [] (start of an epoch:
    the carried hidden state restarts from zeros). key: dropout key of this step.
    A step whose loss, gradient or update is not finite changes neither the
    parameters nor the optimizer state; it is counted instead. (An update whose
    norm overflows float32, e.g. Adam with a learning rate of 1e20, counts too:
    applying it would leave finite but meaningless weights, and the next loss inf.)

    ``axis_name``: run per device under ``jax.shard_map`` over the batch rows
    (:func:`make_train_step` with a mesh): the loss and the gradient are averaged
    over that axis right after the backward pass (equal shares, so this is the
    whole batch's mean and its gradient), and everything after, clipping
    included, sees exactly what one device would.

    ``clip_threshold``: clip state after the update -> the threshold in force
    (``clipping.Clip.threshold``), logged as ``clip_threshold``; None logs none.
    """
    carry = jax.tree.map(lambda c: jnp.where(batch["reset"], jnp.zeros_like(c), c), state.carry)
    rows = None
    if axis_name is not None:
        local = batch["x"].shape[0]
        rows = (jax.lax.axis_index(axis_name) * local, local * jax.lax.axis_size(axis_name))
    (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, model, carry, batch["x"], batch["y"], key, rows)
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)

    grad_norm = optim.global_norm(grads)  # g = ||∇θ L||_2, before clipping
    clip_state, opt_state = state.opt_state
    # Gradient clipping sits here: after the backward pass, before the optimizer.
    clipped, clip_state = clip.update(grads, clip_state, state.params)
    updates, opt_state = optimizer.update(clipped, opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optim.global_norm(updates)))
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_new(params, state.params),
        opt_state=keep_new((clip_state, opt_state), state.opt_state),
        carry=keep_new(new_carry, jax.tree.map(jnp.zeros_like, new_carry)),
        rng=state.rng, nonfinite_run=nonfinite_run,
        nonfinite_total=state.nonfinite_total + (1 - finite.astype(jnp.int32)))

    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "grad_norm_clipped": optim.global_norm(clipped),
        # cos∠(g, clip(g)): 1 for global-norm clipping, below 1 when a rule turns g.
        "clip_cosine": diagnostics.tree_cosine(grads, clipped),
        "clipped": jnp.any(jnp.array([jnp.any(a != b) for a, b in
                                      zip(jax.tree.leaves(clipped), jax.tree.leaves(grads))])),
        "nonfinite": 1 - finite.astype(jnp.int32),
        "lr": schedule(state.step),
    }
    if clip_threshold is not None:
        metrics["clip_threshold"] = clip_threshold(clip_state)
    for layer, w_grad in enumerate(models.recurrent_weights(grads)):
        metrics[f"whh_grad_norm/{layer}"] = jnp.linalg.norm(w_grad)
    return new_state, metrics


def make_train_step(model, config, mesh=None):
    """``train_step`` bound to this run's model and optimizer, jitted once, state donated.

    With a data ``mesh`` (:class:`parallel.DataParallel`'s) each device steps its
    rows of the batch and carry under ``jax.shard_map``, with one all-reduce of
    the gradient (``train_step``'s ``axis_name``); the parameters, optimizer
    state and metrics are the same on every device. Feed it batches placed by
    ``DataParallel.wrap_step``.
    """
    hostmem.keep_freed_memory()  # on CPU, stops every step page-faulting its buffers in again
    axis = None if mesh is None else mesh.axis_names[0]
    clip = clipping.from_config(config.optim)
    step = functools.partial(
        train_step, model=model, clip=clip.transform, clip_threshold=clip.threshold,
        optimizer=optim.make_base_optimizer(config.optim, config.train.num_steps),
        schedule=optim.make_schedule(config.optim, config.train.num_steps), axis_name=axis)
    if mesh is not None:
        rows, whole = parallel.P(axis), parallel.P()
        state = TrainState(step=whole, params=whole, opt_state=whole, carry=rows, rng=whole,
                           nonfinite_run=whole, nonfinite_total=whole)
        batch = {"x": rows, "y": rows, "reset": whole}
        # check_vma=False: the hand-written VJPs (charrnn.fused) do not type their
        # cotangents by device variance; train_step averages the gradient itself.
        step = jax.shard_map(step, mesh=mesh, in_specs=(state, batch, whole),
                             out_specs=(state, whole), check_vma=False)
    return jax.jit(step, donate_argnums=0)


def eval_step(params, carry, x, y, mask, *, model):
    """Summed cross-entropy (nats) over the unmasked positions of one window."""
    carry, logits = model(params, carry, x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return carry, jnp.sum(nll * mask)


def make_eval_step(model):
    return jax.jit(functools.partial(eval_step, model=model))


def evaluate(eval_fn, model, params, ids: np.ndarray, batch_size: int, seq_len: int) -> dict:
    """Loss over a whole split, the hidden state carried from window to window.

    Returns ``{"loss": nats/char, "bpc": bits/char}``.
    """
    carry = model.initial_carry(batch_size)
    total, count = 0.0, 0
    for x, y, mask in data.eval_windows(ids, batch_size, seq_len):
        carry, nll = eval_fn(params, carry, x, y, mask)
        total += nll  # stays on device until the end
        count += int(mask.sum())
    loss = float(total) / count
    return {"loss": loss, "bpc": loss / LN2}


def summarize(step_metrics: list[dict]) -> dict:
    """One train record from the per-step metrics since the last record (host arrays)."""
    stacked = {k: np.stack([m[k] for m in step_metrics]) for k in step_metrics[0]}
    finite = stacked["nonfinite"] == 0
    loss = float(stacked["loss"][finite].mean()) if finite.any() else float("nan")
    record = {"loss": loss, "bpc": loss / LN2}
    for key, values in stacked.items():
        if key in ("loss", "clipped", "nonfinite"):
            continue
        record[key] = float(values.mean())
    record["grad_norm_max"] = float(stacked["grad_norm"].max())
    record["clip_fraction"] = float(stacked["clipped"].mean())
    record["nonfinite_steps"] = int(stacked["nonfinite"].sum())
    record["lr"] = float(stacked["lr"][-1])
    return record


# Fields whose change makes a checkpoint unusable: parameter or carry shapes,
# or the optimizer state's structure.
_RESUME_FIELDS = ("model.cell", "model.hidden_size", "model.num_layers", "model.embed_dim",
                  "train.batch_size", "optim.name", "optim.clip_mode")


def check_resumable(saved: dict, config) -> None:
    """Raise a CheckpointError naming every field that differs from the checkpoint's."""
    current = config.to_dict()
    differing = []
    for field in _RESUME_FIELDS:
        group, name = field.split(".")
        old, new = saved.get(group, {}).get(name), current[group][name]
        if old != new:
            differing.append(f"{field} {old!r} -> {new!r}")
    if current["optim"]["name"] == "sgd" and (
            bool(saved["optim"].get("momentum")) != bool(current["optim"]["momentum"])):
        differing.append("optim.momentum (on/off)")  # plain SGD keeps no momentum state
    differing += clipping.resume_problems(saved.get("optim", {}), current["optim"])
    if differing:
        raise CheckpointError(
            "the workdir's checkpoint was trained with a different config: " + ", ".join(differing)
            + " (use another --workdir, or --fresh to set the old run aside and start afresh)")


def _encode(vocab, text: str, checkpoint_dir: str | None) -> np.ndarray:
    """ids of ``text``; with a resumed vocabulary, unknown characters name the checkpoint."""
    try:
        return vocab.encode(text)
    except data.DataError as e:
        if checkpoint_dir is None:
            raise
        raise CheckpointError(
            f"the checkpoint in {checkpoint_dir} was trained with another vocabulary: {e} "
            "(use another --workdir, or --fresh to set the old run aside and start afresh)"
        ) from None


def train_and_evaluate(config, workdir: str, *, fresh: bool = False) -> dict:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Writes config.json, metrics.jsonl, TensorBoard events and checkpoints.
    Returns the last val (and test) losses. SIGTERM/SIGINT stop the run after
    the current step with a checkpoint saved. A bad config raises a UserError
    before anything is written. One process at a time trains in a workdir (a
    lock, see :mod:`charrnn.workdir`); ``fresh=True`` moves a previous run's
    files into ``<workdir>/previous-<time>/`` and starts from step 0.
    """
    config_lib.validate(config)
    # Read before the workdir is touched: a bad data file leaves no trace there.
    text = data.load_text(config.data.name, config.data.path or None, config.data.encoding)
    num_train, _, _ = data.split_sizes(len(text), config.data.val_fraction,
                                       config.data.test_fraction)
    data.check_fits_one_window(num_train, config.train.batch_size, config.train.seq_len)
    main = jax.process_index() == 0  # process 0 alone writes the (shared) workdir
    with workdir_lib.WorkdirLock(workdir) if main else contextlib.nullcontext():
        if fresh and main:
            moved = workdir_lib.set_aside_previous_run(workdir)
            if moved:
                print(f"--fresh: moved the previous run into {moved}", flush=True)
        if fresh and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("charrnn fresh start")
        return _train_and_evaluate(config, workdir, text)


def _train_and_evaluate(config, workdir: str, text: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        _, meta = ckpt.restore_meta(latest)
        check_resumable(meta["config"], config)
        vocab = data.Vocab.from_json(meta["vocab"])
    else:
        vocab = data.Vocab.from_text(text)
    train_ids, val_ids, test_ids = data.split(
        _encode(vocab, text, ckpt.directory if latest is not None else None),
        config.data.val_fraction, config.data.test_fraction)
    batcher = data.Batcher(train_ids, config.train.batch_size, config.train.seq_len, config.seed)
    model = models.CharRNN.from_config(config.model, vocab.size)
    # One device: no mesh. Several (or several processes): batch rows over a data mesh.
    dp = parallel.DataParallel.create(config.train.batch_size)
    state = dp.create_state(functools.partial(
        init_state, model, optim.make_optimizer(config), config.train.batch_size, config.seed))
    pending = []  # per-step metrics since the last train record
    if latest is not None:
        state = ckpt.restore_state(latest, state)
        batcher.load_state_dict(meta["batcher"])
        pending = decode_step_metrics(meta.get("step_metrics"))
        print(f"resuming from step {latest} ({ckpt.directory})", flush=True)
    # After the restore: a checkpoint that cannot be restored leaves the workdir as it was.
    writer = MetricWriter(workdir, enabled=dp.is_main)  # only process 0 writes metrics
    # Records past the checkpoint (or all, with none: a run killed before its first
    # save) are rewritten identically by the steps that follow.
    writer.truncate_after(latest or 0)
    if dp.is_main:
        workdir_lib.write_atomically(os.path.join(workdir, "config.json"),
                                     config.to_json_best_effort(indent=2) + "\n")

    loop = _Loop(config, model, vocab, batcher, ckpt, writer, (val_ids, test_ids), dp)
    with _StopOnSignal() as stop:
        try:
            return loop.run(state, stop, pending)
        finally:
            ckpt.wait()
            ckpt.close()
            writer.close()


class _StopOnSignal:
    """Turn SIGTERM/SIGINT into a flag the loop checks after every step."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __bool__(self):
        return self.signal_name is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                # A background job of a shell script starts with SIGINT ignored, so that
                # Ctrl-C in the terminal leaves it alone: keep it that way, as Python does.
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Loop:
    """The host side of training: feeding batches, logging, evaluating, saving."""

    def __init__(self, config, model, vocab, batcher, ckpt, writer, eval_splits, dp=None):
        self.config, self.model, self.vocab = config, model, vocab
        self.batcher, self.ckpt, self.writer = batcher, ckpt, writer
        self.val_ids, self.test_ids = eval_splits
        self.dp = dp or parallel.DataParallel(mesh=None)
        self.step_fn = self.dp.wrap_step(make_train_step(model, config, self.dp.mesh))
        self.eval_fn = self.dp.wrap_eval(make_eval_step(model))

    def run(self, state: TrainState, stop: _StopOnSignal, pending: list | None = None) -> dict:
        """Steps from ``state.step`` to ``train.num_steps``; ``pending``: the per-step
        metrics since the last train record, as saved in the checkpoint resumed from."""
        cfg = self.config.train
        base_key = jax.random.wrap_key_data(np.asarray(state.rng))
        start = int(state.step)
        chars_per_step = cfg.batch_size * cfg.seq_len
        pending, result = list(pending or []), {}
        tick, timed_steps = time.perf_counter(), 0  # throughput excludes compilation, eval, saves
        self.started = tick  # eval records carry wall_s: seconds since this process began training
        if start >= cfg.num_steps:
            print(f"already trained for {start} steps (train.num_steps={cfg.num_steps})", flush=True)
        for step in range(start, cfg.num_steps):
            x, y, reset = self.batcher.next()
            batch = {"x": x, "y": y, "reset": np.bool_(reset)}
            state, metrics = self.step_fn(state, batch, jax.random.fold_in(base_key, step))
            pending.append(metrics)
            done = step + 1
            last = done == cfg.num_steps
            if done == start + 1:
                jax.block_until_ready(metrics)
                print(f"first step (compilation included) took {time.perf_counter() - tick:.2f} s",
                      flush=True)
                tick = time.perf_counter()
            else:
                timed_steps += 1
            if done % cfg.log_every == 0 or last:
                record = summarize(jax.device_get(pending))
                elapsed = time.perf_counter() - tick
                rate = timed_steps / elapsed if timed_steps else float("nan")
                record["chars_per_sec"] = rate * chars_per_step
                self._log_train(done, record, eta=(cfg.num_steps - done) / rate if timed_steps else 0)
                pending, tick, timed_steps = [], time.perf_counter(), 0
                self._check_nonfinite(state)
            paused = time.perf_counter()
            if done % cfg.eval_every == 0 or last:
                result = self._evaluate(done, state.params, with_test=done == cfg.num_steps)
            # Asked after the eval, so that a signal arriving during it still saves at this
            # step. Stopping writes no records of its own: the metrics of the steps since
            # the last record travel in the checkpoint, and the resumed run writes exactly
            # the records an uninterrupted one would have.
            stopping = self.dp.should_stop(stop, sync_point=done % cfg.log_every == 0)
            if done % cfg.checkpoint_every == 0 or last or stopping:
                self._save(done, state, pending)
            tick += time.perf_counter() - paused
            if stopping:
                self.ckpt.wait()
                signal_name = stop.signal_name or "a stop signal (on another process)"
                print(f"received {signal_name}: saved a checkpoint at step {done} in "
                      f"{self.ckpt.directory}; run the same command again to resume", flush=True)
                break
        return result

    def _log_train(self, step, record, eta):
        self.writer.write({"step": step, "split": "train", **record})
        print(f"step {step}/{self.config.train.num_steps} | loss {record['loss']:.4f} "
              f"| bpc {record['bpc']:.3f} | grad_norm {record['grad_norm']:.3g} "
              f"(max {record['grad_norm_max']:.3g}) | clipped {100 * record['clip_fraction']:.0f}% "
              f"| {record['chars_per_sec'] / 1e3:.1f}k chars/s | ETA {_duration(eta)}"
              + (f" | skipped {record['nonfinite_steps']} non-finite" if record["nonfinite_steps"] else ""),
              flush=True)

    def _evaluate(self, step, params, with_test):
        cfg = self.config.train
        splits = [("val", self.val_ids)] + ([("test", self.test_ids)] if with_test else [])
        result = {}
        for split, ids in splits:
            if len(ids) < 2:
                continue
            record = evaluate(self.eval_fn, self.model, params, ids, cfg.eval_batch_size, cfg.seq_len)
            record["wall_s"] = time.perf_counter() - self.started
            if split == "val":
                record.update(diagnostics.whh_summary(params))
            self.writer.write({"step": step, "split": split, **record})
            print(f"step {step} | {split} loss {record['loss']:.4f} | {split} bpc {record['bpc']:.3f}",
                  flush=True)
            result[split] = record
        return result

    def _check_nonfinite(self, state):
        """Stop after ``train.max_consecutive_nonfinite`` skipped steps in a row.

        Checked at log steps only: reading the counter makes the host wait for the
        device, which at every step would stall the dispatch pipeline. A skipped
        step changes no weights, so stopping up to log_every - 1 steps late loses nothing.
        """
        run = int(state.nonfinite_run)
        if run >= self.config.train.max_consecutive_nonfinite:
            self.ckpt.wait()
            latest = self.ckpt.latest_step()
            kept = ("no checkpoint was written" if latest is None else
                    f"the last good checkpoint (step {latest}) is in {self.ckpt.directory}")
            raise NonFiniteError(
                f"stopped at step {int(state.step)}: the last {run} steps had a non-finite loss, "
                f"gradient or update (train.max_consecutive_nonfinite="
                f"{self.config.train.max_consecutive_nonfinite}); {kept}; lower "
                "optim.learning_rate or enable clipping (optim.clip_mode)")

    def _save(self, step, state, pending):
        if not all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params)):
            print(f"step {step}: parameters are not finite; checkpoint not written", flush=True)
            return
        meta = {"vocab": self.vocab.to_json(), "config": self.config.to_dict(),
                "batcher": self.batcher.state_dict(), "format": 1,
                "step_metrics": encode_step_metrics(jax.device_get(pending))}
        self.ckpt.save(step, state, meta)


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def load_checkpoint(workdir: str, step: int | None = None):
    """(config, vocab, model, params, step) of a workdir's checkpoint (latest by default).

    The config and vocabulary come from the checkpoint itself, so this works
    on any machine, CPU-only included, whatever device trained it.
    """
    import ml_collections
    ckpt = Checkpointer(workdir, create=False)
    try:
        step, meta = ckpt.restore_meta(step)
        config = ml_collections.ConfigDict(meta["config"])
        vocab = data.Vocab.from_json(meta["vocab"])
        model = models.CharRNN.from_config(config.model, vocab.size)
        # Shapes only (initialising the weights would compile dozens of ops), placed on
        # this process's first device: the checkpoint's own shardings name the devices
        # that saved it (e.g. cuda:0), which this machine may not have.
        like = jax.eval_shape(lambda: init_state(
            model, optim.make_optimizer(config), config.train.batch_size, config.seed))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), like)
        state = ckpt.restore_state(step, like)
    finally:
        ckpt.close()
    return config, vocab, model, state.params, step


def evaluate_workdir(workdir: str) -> dict:
    """Val and test loss (nats/char) and bpc of a workdir's latest checkpoint; printed."""
    config, vocab, model, params, step = load_checkpoint(workdir)
    text = data.load_text(config.data.name, config.data.path or None, config.data.encoding)
    _, val_ids, test_ids = data.split(vocab.encode(text), config.data.val_fraction,
                                      config.data.test_fraction)
    eval_fn = make_eval_step(model)
    result = {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        if len(ids) < 2:
            print(f"step {step} | {split}: empty split")
            continue
        result[split] = evaluate(eval_fn, model, params, ids, config.train.eval_batch_size,
                                 config.train.seq_len)
        print(f"step {step} | {split} loss {result[split]['loss']:.4f} nats/char "
              f"| {split} bpc {result[split]['bpc']:.4f}", flush=True)
    return result
