"""Checkpoints read back: resuming a run, and loading one for eval and sampling.

- :func:`check_resumable`: whether the workdir's checkpoint can continue under
  the current config (same shapes, same optimizer state structure);
- :func:`load_checkpoint`: (config, vocab, model, params, step) of a workdir,
  from the checkpoint alone, on any machine;
- :func:`evaluate_workdir`: ``--mode=eval``, val and test loss of a checkpoint.

Sampling imports this module, not the training loop.
"""

from __future__ import annotations

import jax
import numpy as np

from charrnn import clipping, data, models, optim
from charrnn import step as step_lib
from charrnn.checkpoint import CheckpointError, Checkpointer


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


def encode_resumed(vocab, text: str, checkpoint_dir: str | None) -> np.ndarray:
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
        like = jax.eval_shape(lambda: step_lib.init_state(
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
    return result
