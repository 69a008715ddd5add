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
import os

import jax
import numpy as np

from charrnn import clipping, data, models, optim
from charrnn import start as start_lib
from charrnn import step as step_lib
from charrnn.checkpoint import CheckpointError, Checkpointer


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
# What a config saved before a field existed means by its absence.
_ABSENT = {"model.start_state": "zero", "train.reset_prob": 0.0}
_ELSEWHERE = ("use another --workdir, --fresh to set the old run aside and start afresh, or "
              "--init_from=WORKDIR to start a new run from its weights")


def _field(tree: dict, field: str):
    for name in field.split("."):
        tree = tree.get(name) if isinstance(tree, dict) else None
    return _ABSENT.get(field) if tree is None else tree


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
    saved, current = meta["config"], config.to_dict()
    differing = differences(saved, current, _SHAPE_FIELDS + _SAME_RUN_FIELDS)
    if current["optim"]["name"] == "sgd" and (
            bool(saved["optim"].get("momentum")) != bool(current["optim"]["momentum"])):
        differing.append("optim.momentum (on/off)")  # plain SGD keeps no momentum state
    if bool(_field(saved, "optim.ema_decay")) != bool(current["optim"].get("ema_decay")):
        differing.append("optim.ema_decay (on/off)")  # the averaged weights are state
    differing += clipping.resume_problems(saved.get("optim", {}), current["optim"])
    old, new = corpus_of(saved), corpus_of(current)
    if old != new:
        differing.append(f"{new[0]} {old[1]!r} -> {new[1]!r}" if old[0] == new[0] else
                         f"{old[0]}={old[1]!r} -> {new[0]}={new[1]!r}")
    elif meta.get("text_sha256") not in (None, text_sha256):
        differing.append(f"the text of {new[1]} (sha256 {meta['text_sha256'][:12]}… -> "
                         f"{text_sha256[:12]}…)")
    if differing:
        raise CheckpointError(
            "the workdir's checkpoint was trained with a different config: "
            + ", ".join(differing) + f" ({_ELSEWHERE})")


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
        else start from ``init_from``'s weights if given, else from scratch."""
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
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown --weights={weights!r}; choose from {', '.join(WEIGHTS)}")
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
        has_ema = step_lib.ema_decay(config) > 0
        if weights == "ema" and not has_ema:
            raise CheckpointError(
                f"--weights=ema: the run in {workdir} kept no averaged weights "
                "(optim.ema_decay was 0); use --weights=raw")
        like = jax.eval_shape(lambda: step_lib.init_state(
            model, optim.make_optimizer(config), config.train.batch_size, config.seed,
            ema=has_ema))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), like)
        state = ckpt.restore_state(step, like)
    finally:
        ckpt.close()
    params = state.params if weights == "raw" or not has_ema else state.ema
    return config, vocab, model, params, step


def evaluate_workdir(workdir: str, step: int | None = None, weights: str = "auto") -> dict:
    """Val and test loss (nats/char) and bpc of a workdir's checkpoint ``step``
    (default: the latest) with ``weights`` (see :func:`load_checkpoint`); printed."""
    config, vocab, model, params, step = load_checkpoint(workdir, step, weights)
    if weights == "auto":
        weights = "ema" if step_lib.ema_decay(config) > 0 else "raw"
    print(f"step {step} | {'averaged' if weights == 'ema' else 'raw'} weights", flush=True)
    text = data.load_text(config.data.name, config.data.path or None, config.data.encoding)
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
