"""The host side of training: the loop that feeds :mod:`charrnn.step`, and its records.

:func:`train_and_evaluate` (the entry point) validates the config, reads the
text, takes the workdir's lock, resumes from the latest checkpoint when there
is one (:mod:`charrnn.restore` checks that it fits), then runs :class:`_Loop`:
batches from the :class:`data.Batcher` into the jitted train step, a train
record every ``log_every`` steps, val (and at the end test) every
``eval_every``, a checkpoint every ``checkpoint_every``, and a clean stop with
a checkpoint on SIGTERM/SIGINT. The run begins with a header saying what it
trains and ends with the commands to use the result (:mod:`charrnn.runinfo`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from charrnn import config as config_lib
from charrnn import data, diagnostics, memory, models, optim, parallel, restore, runinfo
from charrnn import start as start_lib
from charrnn import step as step_lib
from charrnn import workdir as workdir_lib
from charrnn.checkpoint import Checkpointer, decode_step_metrics, encode_step_metrics
from charrnn.errors import UserError
from charrnn.metrics import MetricWriter
from charrnn.step import LN2


# Step metrics measured only on some steps (clip_at=bptt, step.bptt_gradients): a record
# gives their mean over the steps that measured them (null when none did).
MEASURED_SOMETIMES = ("grad_norm_unclipped", "bptt_norm_ratio")


def train_record(step_metrics: list[dict]) -> dict:
    """One train record from the per-step metrics since the last record (host arrays)."""
    stacked = {k: np.stack([m[k] for m in step_metrics]) for k in step_metrics[0]}
    finite = stacked["nonfinite"] == 0
    loss = float(stacked["loss"][finite].mean()) if finite.any() else float("nan")
    record = {"loss": loss, "bpc": loss / LN2}
    for key, values in stacked.items():
        if key in ("loss", "clipped", "nonfinite"):
            continue
        record[key] = float(values.mean())
    for key in MEASURED_SOMETIMES:  # NaN on the steps that did not measure it
        if key in stacked:
            measured = stacked[key][np.isfinite(stacked[key])]
            record[key] = float(measured.mean()) if measured.size else float("nan")
    record["grad_norm_max"] = float(stacked["grad_norm"].max())
    record["clip_fraction"] = float(stacked["clipped"].mean())
    record["nonfinite_steps"] = int(stacked["nonfinite"].sum())
    record["lr"] = float(stacked["lr"][-1])
    return record


def train_and_evaluate(config, workdir: str, *, fresh: bool = False, launch: dict | None = None,
                       init_from: str | None = None, init_step: int | None = None) -> dict:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Writes config.json, metrics.jsonl, launches.jsonl, TensorBoard events and
    checkpoints. Returns the last val (and test) losses. SIGTERM/SIGINT stop the
    run after the current step with a checkpoint saved. A bad config, or a
    checkpoint of another run (:func:`restore.check_resumable`), raises a
    UserError before anything is written. One process at a time trains in a
    workdir (a lock, see :mod:`charrnn.workdir`); ``fresh=True`` moves a
    previous run's files into ``<workdir>/previous-<time>/`` and starts from step 0.

    ``init_from``: fine-tuning. A new run starts from the parameters (only) of
    that workdir's checkpoint ``init_step`` (default: its latest) and its
    vocabulary, on this config's text; the optimizer state, step count and
    schedule start afresh. Run again, it resumes like any run.
    ``launch``: ``{"config_arg", "argv"}`` of the command line, for the record
    appended to ``<workdir>/launches.jsonl`` (default: no --config, ``sys.argv``).
    """
    config_lib.validate(config)
    config = _with_absolute_path(config)
    # Read before the workdir is touched: a bad data file leaves no trace there.
    text = data.load_corpus(config.data)
    num_train, _, _ = data.split_sizes(len(text), config.data.val_fraction,
                                       config.data.test_fraction)
    data.check_fits_one_window(num_train, config.train.batch_size, config.train.seq_len,
                               text_chars=len(text))
    memory.check_training_fits(config, vocab_size=len(set(text)))
    main = jax.process_index() == 0  # process 0 alone writes the (shared) workdir
    with workdir_lib.WorkdirLock(workdir) if main else contextlib.nullcontext():
        if fresh and main:
            moved = workdir_lib.set_aside_previous_run(workdir)
            if moved:
                print(f"--fresh: moved the previous run into {moved}", flush=True)
        if fresh and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("charrnn fresh start")
        return _train_and_evaluate(config, workdir, text, launch or {}, (init_from, init_step))


def _with_absolute_path(config):
    """A copy of ``config`` whose data.path is absolute, so that config.json and the
    checkpoints name the text wherever eval or sampling later runs from."""
    config = config_lib.upgrade(config.copy_and_resolve_references())  # every field present
    if config.data.path:
        config.data.path = os.path.abspath(os.path.expanduser(config.data.path))
    return config


def _train_and_evaluate(config, workdir: str, text: str, launch: dict, init) -> dict:
    os.makedirs(workdir, exist_ok=True)
    restore.check_workdir(workdir, config)  # records without a checkpoint are refused
    ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
    start = restore.RunStart.find(ckpt, config, text, *init)
    train_ids, val_ids, test_ids = data.split(start.ids, config.data.val_fraction,
                                              config.data.test_fraction)
    batcher = data.Batcher(train_ids, config.train.batch_size, config.train.seq_len, config.seed)
    model = models.CharRNN.from_config(config.model, start.vocab.size)
    optimizer = optim.Optimizer.from_config(config)
    # One device: no mesh. Several (or several processes): batch rows over a data mesh.
    dp = parallel.DataParallel.create(config.train.batch_size)
    state = dp.create_state(functools.partial(
        step_lib.init_state, model, optimizer, config.train.batch_size, config.seed))
    pending = []  # per-step metrics since the last train record
    if start.step:
        state = ckpt.restore_state(start.step, state)
        batcher.load_state_dict(start.meta["batcher"])
        pending = decode_step_metrics(start.meta.get("step_metrics"))
    elif start.params is not None:  # fine-tuning: the source's weights, all else new
        ema = None if state.ema is None else jax.tree.map(jnp.copy, start.params)
        state = dp.place_state(state.replace(params=start.params, ema=ema))
    # After the restore: a checkpoint that cannot be restored leaves the workdir as it was.
    writer = MetricWriter(workdir, enabled=dp.is_main)  # only process 0 writes metrics
    # Records past the checkpoint (or all, with none: a run killed before its first
    # save) are rewritten identically by the steps that follow.
    writer.truncate_after(start.step)
    if dp.is_main and start.step < config.train.num_steps:  # else: only "already trained"
        saved = json.loads(config.to_json_best_effort())
        if start.init_from:
            saved["init_from"] = start.init_from
        workdir_lib.write_atomically(os.path.join(workdir, "config.json"),
                                     json.dumps(saved, indent=2) + "\n")
        runinfo.append_launch(workdir, runinfo.launch_record(
            start.step, launch.get("config_arg"), launch.get("argv", sys.argv)))
    print(runinfo.header(config, workdir, params=state.params, text_chars=len(text),
                         vocab_size=start.vocab.size, splits=(train_ids, val_ids, test_ids),
                         start_step=start.step, checkpoints=ckpt.directory,
                         init_from=start.init_from), flush=True)

    loop = _Loop(config, model, optimizer, start, batcher, ckpt, writer, (val_ids, test_ids), dp)
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

    def __init__(self, config, model, optimizer, start, batcher, ckpt, writer, eval_splits,
                 dp=None):
        """``start``: a :class:`restore.RunStart` (vocabulary, text hash, fine-tuning source)."""
        self.config, self.model, self.start = config, model, start
        self.batcher, self.ckpt, self.writer = batcher, ckpt, writer
        self.val_ids, self.test_ids = eval_splits
        self.dp = dp or parallel.DataParallel(mesh=None)
        self.step_fn = self.dp.wrap_step(step_lib.make_train_step(
            model, optimizer, self.dp.mesh, reset_prob=config.train.reset_prob,
            measure_every=config.train.log_every))
        self.eval_fn = self.dp.wrap_eval(step_lib.make_eval_step(model))

    def run(self, state: step_lib.TrainState, stop: _StopOnSignal,
            pending: list | None = None) -> dict:
        """Steps from ``state.step`` to ``train.num_steps``; ``pending``: the per-step
        metrics since the last train record, as saved in the checkpoint resumed from."""
        cfg = self.config.train
        start = int(state.step)
        chars_per_step = cfg.batch_size * cfg.seq_len
        pending, result = list(pending or []), {}
        tick, timed_steps = time.perf_counter(), 0  # throughput excludes compilation, eval, saves
        self.started = tick  # eval records carry wall_s: seconds since this process began training
        if start >= cfg.num_steps:
            print(f"already trained for {start} steps (train.num_steps={cfg.num_steps})", flush=True)
        steps = step_lib.run_steps(self.step_fn, state, self.batcher.next_batch, start,
                                   cfg.num_steps)
        for done, state, metrics in steps:
            pending.append(metrics)
            last = done == cfg.num_steps
            if done == start + 1:
                jax.block_until_ready(metrics)
                print(f"first step (compilation included) took {time.perf_counter() - tick:.2f} s",
                      flush=True)
                tick = time.perf_counter()
            else:
                timed_steps += 1
            if done % cfg.log_every == 0 or last:
                record = train_record(jax.device_get(pending))
                elapsed = time.perf_counter() - tick
                rate = timed_steps / elapsed if timed_steps else float("nan")
                record["chars_per_sec"] = rate * chars_per_step
                self._log_train(done, record, eta=(cfg.num_steps - done) / rate if timed_steps else 0)
                pending, tick, timed_steps = [], time.perf_counter(), 0
                self._check_nonfinite(state)
            paused = time.perf_counter()
            if done % cfg.eval_every == 0 or last:
                result = self._evaluate(done, state.params, state.ema,
                                        with_test=done == cfg.num_steps)
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
        if self.start.init_from and step <= self.config.train.log_every:  # the run's first
            record = {**record, **{f"init_from_{k}": v for k, v in self.start.init_from.items()}}
        self.writer.write({"step": step, "split": "train", **record})
        print(f"step {step}/{self.config.train.num_steps} | loss {record['loss']:.4f} "
              f"| bpc {record['bpc']:.3f} | grad_norm {record['grad_norm']:.3g} "
              f"(max {record['grad_norm_max']:.3g}) | clipped {100 * record['clip_fraction']:.0f}% "
              f"| {record['chars_per_sec'] / 1e3:.1f}k chars/s | ETA {_duration(eta)}"
              + (f" | skipped {record['nonfinite_steps']} non-finite" if record["nonfinite_steps"] else ""),
              flush=True)

    def _evaluate(self, step, params, ema, with_test):
        """Records of the val (and test) loss of the raw weights; with averaged weights
        (``ema``, None when off) their loss too, as ``ema_loss`` and ``ema_bpc``."""
        cfg = self.config.train
        splits = [("val", self.val_ids)] + ([("test", self.test_ids)] if with_test else [])
        result = {}
        for split, ids in splits:
            if len(ids) < 2:
                continue
            record = step_lib.evaluate(self.eval_fn, self.model, params, ids,
                                       cfg.eval_batch_size, cfg.seq_len)
            line = f"step {step} | {split} loss {record['loss']:.4f} | {split} bpc {record['bpc']:.3f}"
            if ema is not None:
                averaged = step_lib.evaluate(self.eval_fn, self.model, ema, ids,
                                             cfg.eval_batch_size, cfg.seq_len)
                record.update(ema_loss=averaged["loss"], ema_bpc=averaged["bpc"])
                line += f" | averaged weights: loss {averaged['loss']:.4f} bpc {averaged['bpc']:.3f}"
            record["wall_s"] = time.perf_counter() - self.started
            if split == "val":
                record.update(diagnostics.whh_summary(params))
                hand_over, _ = start_lib.measure(self.model, params, ids,
                                                 start_lib.newline_id(self.start.vocab))
                if hand_over:  # start_loss, context_loss, start_gap
                    record.update(hand_over)
                    line += " | " + start_lib.describe(hand_over)
            self.writer.write({"step": step, "split": split, **record})
            print(line, flush=True)
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
        meta = {"vocab": self.start.vocab.to_json(), "config": self.config.to_dict(),
                "batcher": self.batcher.state_dict(), "format": 1,
                "text_sha256": self.start.text_sha256, "init_from": self.start.init_from,
                "step_metrics": encode_step_metrics(jax.device_get(pending))}
        self.ckpt.save(step, state, meta)


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
