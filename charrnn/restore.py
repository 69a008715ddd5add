"""Checkpoints read back: resuming a run, and loading one for eval and sampling.

- :func:`check_resumable`: whether the workdir's checkpoint can continue under
  the current config (same shapes, same optimizer state structure);
- :func:`load_checkpoint`: (config, vocab, model, params, step) of a workdir,
  from the checkpoint alone, on any machine;
- :func:`evaluate_workdir`: ``--mode=eval``, val and test loss of a checkpoint.

Sampling imports this module, not the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from charrnn import clipping, data, metrics, models, optim
from charrnn import config as config_lib
from charrnn import start as start_lib
from charrnn import step as step_lib
from charrnn import workdir as workdir_lib
from charrnn.checkpoint import CheckpointError, CheckpointGone, Checkpointer


# Fields whose change makes a checkpoint unusable: parameter or carry shapes,
# or the optimizer state's structure.
_SHAPE_FIELDS = ("model.cell", "model.hidden_size", "model.num_layers", "model.embed_dim",
                 "train.batch_size", "optim.name", "optim.clip_mode", "model.start_state")
# Fields whose change would make the resumed run another run: the batcher position
# means other text under another seq_len, seed or split; the random streams differ.
_SAME_RUN_FIELDS = ("seed", "train.seq_len", "data.encoding", "data.val_fraction",
                    "data.test_fraction", "train.reset_prob")
# The model fields a fine-tuned run (--init_from) must share with its source.
MODEL_FIELDS = ("model.cell", "model.hidden_size", "model.num_layers", "model.embed_dim",
                "model.start_state")
_ELSEWHERE = ("use another --workdir, --fresh to set the old run aside and start afresh, or "
              "--init_from=WORKDIR to start a new run from its weights")


def _field(tree: dict, field: str):
    for name in field.split("."):
        tree = tree.get(name) if isinstance(tree, dict) else None
    return config_lib.ADDED.get(field) if tree is None else tree  # absent: its old meaning


def differences(saved: dict, current: dict, fields) -> list[str]:
    """``field old -> new`` for every field of ``fields`` that differs."""
    out = []
    for field in fields:
        old, new = _field(saved, field), _field(current, field)
        if old != new:
            out.append(f"{field} {old!r} -> {new!r}")
    return out


def corpus_of(config: dict) -> tuple[str, str]:
    """(field, value) naming a config's text: its data.path (absolute) or its data.name."""
    path = _field(config, "data.path")
    if path:
        return "data.path", os.path.abspath(os.path.expanduser(path))
    return "data.name", _field(config, "data.name")


def check_resumable(meta: dict, config, text_sha256: str) -> None:
    """Raise a CheckpointError naming every field in which ``config`` is another run.

    ``meta``: the checkpoint's metadata (its config, and the sha256 of the text it
    was trained on, absent in checkpoints written before it was kept).
    ``text_sha256``: that of the text this run has read.
    """
    saved, current = config_lib.upgrade(meta["config"]).to_dict(), config_lib.upgrade(config).to_dict()
    differing = differences(saved, current, _SHAPE_FIELDS + _SAME_RUN_FIELDS)
    if current["optim"]["name"] == "sgd" and (
            bool(saved["optim"].get("momentum")) != bool(current["optim"]["momentum"])):
        differing.append("optim.momentum (on/off)")  # plain SGD keeps no momentum state
    if bool(saved["optim"]["ema_decay"]) != bool(current["optim"]["ema_decay"]):
        differing.append("optim.ema_decay (on/off)")  # the averaged weights are state
    differing += clipping.resume_problems(saved.get("optim", {}), current["optim"])
    old, new = corpus_of(saved), corpus_of(current)
    if old != new:
        differing.append(_corpus_change(old, new))
    elif meta.get("text_sha256") not in (None, text_sha256):
        differing.append(f"the text of {new[1]} (sha256 {meta['text_sha256'][:12]}… -> "
                         f"{text_sha256[:12]}…)")
    if differing:
        raise CheckpointError(
            "the workdir's checkpoint was trained with a different config: "
            + ", ".join(differing) + f" ({_ELSEWHERE})")


def _corpus_change(old: tuple[str, str], new: tuple[str, str]) -> str:
    """``data.path 'a' -> 'b'`` between two :func:`corpus_of` values."""
    return (f"{new[0]} {old[1]!r} -> {new[1]!r}" if old[0] == new[0] else
            f"{old[0]}={old[1]!r} -> {new[0]}={new[1]!r}")


def check_workdir(workdir: str, config) -> None:
    """Before training writes anything: refuse a workdir whose records it would lose.

    Its run files must be of the right kind (:func:`workdir.check_run_files`). A
    workdir with records in metrics.jsonl (and their TensorBoard events) but no
    checkpoint cannot be resumed, and starting at step 0 would overwrite them:
    refused (``--fresh`` sets them aside), unless they are this run's own, cut
    short before its first checkpoint: config.json is this config (the fields a
    resume checks) and no record lies past step 2·checkpoint_every (saves are
    asynchronous: the steps after the first save run while it is written, and
    the second save waits for it).
    """
    workdir_lib.check_run_files(workdir)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    # Read from the directory, not through orbax: every process of a multi-process run
    # checks, and an extra CheckpointManager on some of them would put their barriers
    # (orbax numbers them per process) out of step with the others'.
    if os.path.isdir(directory) and any(
            name.isdigit() and os.path.isdir(os.path.join(directory, name))
            for name in os.listdir(directory)):
        return  # a finished save (orbax writes a step under a temporary name first)
    if not _record_steps(os.path.join(workdir, "metrics.jsonl")):
        return  # a launch that failed before its first record: nothing to lose
    present = _records(workdir)
    reason = _not_cut_short(workdir, config)
    if reason:
        raise CheckpointError(
            f"workdir {workdir} holds the records of a run ({', '.join(present)}) but no "
            f"checkpoint in {directory}, and {reason}: starting at step 0 would overwrite "
            "them; put the checkpoints back to resume, --fresh to set the records aside, or "
            "use another --workdir")


def _records(workdir: str) -> list[str]:
    """What a run has written into ``workdir`` besides checkpoints, as short phrases."""
    present = []
    path = os.path.join(workdir, "metrics.jsonl")
    steps = _record_steps(path)
    if steps:
        present.append(f"metrics.jsonl up to step {max(steps)}")
    for name in ("config.json", "launches.jsonl"):
        if os.path.isfile(os.path.join(workdir, name)):
            present.append(name)
    events = os.path.join(workdir, "tensorboard")
    if os.path.isdir(events) and any(files for _, _, files in os.walk(events)):
        present.append("tensorboard/")
    return present


def _record_steps(path: str) -> list[int]:
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        return [s for s in map(metrics.step_of, f) if isinstance(s, int)]


def _not_cut_short(workdir: str, config) -> str | None:
    """Why the records are not this run's, stopped before its first checkpoint; None if they are."""
    steps = _record_steps(os.path.join(workdir, "metrics.jsonl"))
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):  # written before the first record: a kill came before it
        return "its config.json is missing" if steps else None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return "its config.json cannot be read"
    current = config.to_dict()
    differing = differences(saved, current, _SHAPE_FIELDS + _SAME_RUN_FIELDS)
    if corpus_of(saved) != corpus_of(current):
        differing.append(_corpus_change(corpus_of(saved), corpus_of(current)))
    if differing:
        return f"its config.json is another run's ({', '.join(differing)})"
    every = _field(saved, "train.checkpoint_every")
    if steps and isinstance(every, int) and max(steps) > 2 * every:
        return (f"its records reach step {max(steps)}, past its first checkpoints (every "
                f"{every} steps)")
    return None


def encode_resumed(vocab, text: str, checkpoint_dir: str | None) -> np.ndarray:
    """ids of ``text``; with a resumed vocabulary, unknown characters name the checkpoint."""
    try:
        return vocab.encode(text)
    except data.DataError as e:
        if checkpoint_dir is None:
            raise
        raise CheckpointError(
            f"the checkpoint in {checkpoint_dir} was trained with another vocabulary: {e} "
            f"({_ELSEWHERE})") from None


@dataclasses.dataclass
class RunStart:
    """Where a training run starts: step 0, its own checkpoint, or another run's weights.

    ``step``: the checkpoint resumed from (0: none); ``meta``: its metadata;
    ``vocab`` and ``ids`` (the text encoded with it); ``text_sha256`` of the text;
    ``init_from``: ``{"workdir", "step"}`` of a fine-tuned run's source, and
    ``params``: the source's parameters when the run starts from them now.
    """
    vocab: data.Vocab
    ids: np.ndarray
    text_sha256: str
    step: int = 0
    meta: dict | None = None
    init_from: dict | None = None
    params: object = None

    @classmethod
    def find(cls, ckpt: Checkpointer, config, text: str, init_from: str | None = None,
             init_step: int | None = None) -> "RunStart":
        """Resume from ``ckpt``'s latest checkpoint if any (it must be the same run),
        else start from ``init_from``'s weights if given, else from scratch. A failure
        leaves no ``checkpoints/`` that this launch created."""
        try:
            return cls._find(ckpt, config, text, init_from, init_step)
        except Exception:
            ckpt.remove_if_unused()
            raise

    @classmethod
    def _find(cls, ckpt: Checkpointer, config, text: str, init_from, init_step) -> "RunStart":
        sha = data.text_sha256(text)
        latest = ckpt.latest_step()
        if latest is not None:
            _, meta = ckpt.restore_meta(latest)
            origin = meta.get("init_from")
            if init_from is not None and not _same_source(origin, init_from, init_step):
                raise CheckpointError(
                    f"--init_from starts a new run, but {ckpt.directory} already holds one "
                    f"(checkpoint {latest}{_describe(origin)}); use another --workdir, or "
                    "--fresh to set that run aside")
            check_resumable(meta, config, sha)
            vocab = data.Vocab.from_json(meta["vocab"])
            return cls(vocab, encode_resumed(vocab, text, ckpt.directory), sha, latest, meta,
                       origin)
        if init_from is None:
            vocab = data.Vocab.from_text(text)
            return cls(vocab, vocab.encode(text), sha)
        source, vocab, params, step = load_init(init_from, init_step, config)
        try:
            ids = vocab.encode(text)
        except data.DataError as e:
            raise CheckpointError(
                f"--init_from={init_from}: {e} (the model reads and predicts only the "
                f"{vocab.size} characters it was trained on; remove them from the text, or "
                "train a new model)") from None
        return cls(vocab, ids, sha, init_from={"workdir": source, "step": step}, params=params)


def load_init(workdir: str, step: int | None, config):
    """(absolute workdir, vocab, params, step) of the checkpoint a fine-tuned run starts
    from; its model fields must be this config's (the parameters' shapes)."""
    source = os.path.abspath(workdir)
    try:
        saved, vocab, _, params, step = load_checkpoint(source, step)
    except CheckpointError as e:
        raise CheckpointError(f"--init_from={workdir}: {e}") from None
    differing = differences(saved.to_dict(), config.to_dict(), MODEL_FIELDS)
    if differing:
        raise CheckpointError(
            f"--init_from={workdir}: its model differs from this config's: "
            + ", ".join(differing) + " (set these --config.model fields to the checkpoint's)")
    return source, vocab, params, step


def _same_source(origin: dict | None, init_from: str, init_step: int | None) -> bool:
    return bool(origin) and origin.get("workdir") == os.path.abspath(init_from) and (
        init_step is None or origin.get("step") == init_step)


def _describe(origin: dict | None) -> str:
    return f", fine-tuned from {origin['workdir']} step {origin['step']}" if origin else ""


WEIGHTS = ("auto", "ema", "raw")


def load_checkpoint(workdir: str, step: int | None = None, weights: str = "raw"):
    """(config, vocab, model, params, step) of a workdir's checkpoint (latest by default).

    The config and vocabulary come from the checkpoint itself, so this works
    on any machine, CPU-only included, whatever device trained it.
    ``weights``: "raw" the trained parameters; "ema" the averaged ones (an error
    when the run kept none, optim.ema_decay = 0); "auto" the averaged ones when kept.
    """
    return _load(workdir, step, weights)[:5]


def _load(workdir: str, step: int | None, weights: str, attempts: int = 5):
    """:func:`load_checkpoint`'s tuple and the checkpoint's metadata.

    The latest checkpoint may be removed while it is read, when a training run
    still writing the workdir saves a newer one and rotates: then the newest is
    read instead (up to ``attempts`` times). A checkpoint named by ``step`` is not
    replaced by another: its removal is an error that says what happened.
    """
    for attempt in range(attempts):
        try:
            return _load_once(workdir, step, weights)
        except CheckpointGone:
            if step is not None or attempt == attempts - 1:
                raise


def _load_once(workdir: str, step: int | None, weights: str):
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown --weights={weights!r}; choose from {', '.join(WEIGHTS)}")
    ckpt = Checkpointer(workdir, create=False)
    try:
        step, meta = ckpt.restore_meta(step)
        config = config_lib.upgrade(meta["config"])
        vocab = data.Vocab.from_json(meta["vocab"])
        model = models.CharRNN.from_config(config.model, vocab.size)
        # Shapes only (initialising the weights would compile dozens of ops), placed on
        # this process's first device: the checkpoint's own shardings name the devices
        # that saved it (e.g. cuda:0), which this machine may not have.
        optimizer = optim.Optimizer.from_config(config)
        has_ema = optimizer.ema_decay > 0
        if weights == "ema" and not has_ema:
            raise CheckpointError(
                f"--weights=ema: the run in {workdir} kept no averaged weights "
                "(optim.ema_decay was 0); use --weights=raw")
        like = jax.eval_shape(lambda: step_lib.init_state(
            model, optimizer, config.train.batch_size, config.seed))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), like)
        state = ckpt.restore_state(step, like)
    finally:
        ckpt.close()
    params = state.params if weights == "raw" or not has_ema else state.ema
    return config, vocab, model, params, step, meta


def _eval_text(config, meta: dict, step: int, changed_text: bool) -> str:
    """The text the checkpoint was trained on, read again; a changed one (its sha256
    differs from the checkpoint's) is an error unless ``changed_text`` (then said)."""
    text = data.load_corpus(config.data)
    saved, now = meta.get("text_sha256"), data.text_sha256(text)
    if saved in (None, now):  # None: a checkpoint from before the hash was kept
        return text
    name = corpus_of(config.to_dict())[1]
    hashes = f"sha256 {saved[:12]}… when trained, {now[:12]}… now"
    if not changed_text:
        raise CheckpointError(
            f"the text of {name} changed since checkpoint {step} was trained on it ({hashes}); "
            "put the original text back, or pass --changed_text to evaluate on the new one")
    print(f"step {step} | evaluating on a changed text: {name} ({hashes})", flush=True)
    return text


def evaluate_workdir(workdir: str, step: int | None = None, weights: str = "auto",
                     changed_text: bool = False) -> dict:
    """Val and test loss (nats/char) and bpc of a workdir's checkpoint ``step``
    (default: the latest) with ``weights`` (see :func:`load_checkpoint`); printed.

    The text is read again from the checkpoint's data.path (or data.name); one whose
    sha256 is not the checkpoint's is refused unless ``changed_text``."""
    config, vocab, model, params, step, meta = _load(workdir, step, weights)
    if weights == "auto":
        weights = "ema" if config.optim.ema_decay > 0 else "raw"
    print(f"step {step} | {'averaged' if weights == 'ema' else 'raw'} weights", flush=True)
    text = _eval_text(config, meta, step, changed_text)
    _, val_ids, test_ids = data.split(vocab.encode(text), config.data.val_fraction,
                                      config.data.test_fraction)
    eval_fn = step_lib.make_eval_step(model)
    result = {}
    for split, ids in (("val", val_ids), ("test", test_ids)):
        if len(ids) < 2:
            print(f"step {step} | {split}: empty split")
            continue
        result[split] = step_lib.evaluate(eval_fn, model, params, ids, config.train.eval_batch_size,
                                 config.train.seq_len)
        print(f"step {step} | {split} loss {result[split]['loss']:.4f} nats/char "
              f"| {split} bpc {result[split]['bpc']:.4f}", flush=True)
        scalars, curves = start_lib.measure(model, params, ids, start_lib.newline_id(vocab))
        if scalars:
            result[split].update(scalars)
            table = f"\nloss by position after a line start ({split}):\n" \
                + start_lib.format_curves(curves) if split == "val" else ""
            print(f"step {step} | {split} {start_lib.describe(scalars)}{table}", flush=True)
    return result
