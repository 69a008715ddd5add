"""The step maths: the loss, one jitted train step, and evaluation of a split.

One training iteration, in the order the seed describes it:

1. forward pass over a window of T characters (teacher forcing: the input at
   t is the true character x[t]), carrying the hidden state from the previous
   window (truncated BPTT);
2. loss: mean cross-entropy against the next characters, in nats/char;
3. backward pass (BPTT through the scan): raw gradients g;
4. clipping: the rule of ``optim.clip_mode`` — by default exactly between the
   backward pass and the update rule (:meth:`optim.Optimizer.update`);
   ``optim.clip_at`` moves it (inside the backward pass, per row, per device,
   or after the update rule: :mod:`charrnn.optim`);
5. the update rule: Adam (or SGD) on the clipped gradient.

Everything here is a pure function of arrays (plus the jit wrappers that bind
a model and an optimizer); the host loop that feeds it is :mod:`charrnn.train`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from charrnn import data, diagnostics, hostmem, models, optim, parallel

LN2 = math.log(2.0)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; a pytree of arrays (saved as-is in checkpoints)."""
    step: jax.Array  # int32 []: steps taken (skipped non-finite steps included)
    params: dict
    opt_state: Any  # optim.Optimizer's state (its own layout)
    carry: tuple  # hidden state carried into the next window, [B, H] per layer
    rng: jax.Array  # uint32 key data; the dropout key of step s is fold_in(key, s)
    nonfinite_run: jax.Array  # int32 []: consecutive skipped steps so far
    nonfinite_total: jax.Array  # int32 []: all skipped steps
    # Averaged weights (optim.ema_decay > 0; None when off): ema_k = d·ema_{k-1} + (1-d)·θ_k
    # after step k, from ema_0 = θ_0; a skipped step changes it no more than θ.
    ema: Any = None


def init_state(model: models.CharRNN, optimizer: optim.Optimizer, batch_size: int,
               seed: int) -> TrainState:
    """Step 0 of a run (with averaged weights when ``optimizer.ema_decay`` > 0)."""
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = model.init(init_key)
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the state is donated
    return TrainState(step=zero(), params=params, opt_state=optimizer.init(params),
                      carry=model.initial_carry(batch_size),
                      rng=jax.random.key_data(dropout_key), nonfinite_run=zero(), nonfinite_total=zero(),
                      ema=jax.tree.map(jnp.copy, params) if optimizer.ema_decay else None)


def update_ema(ema, params, decay):
    """One step of the average: ``decay·ema + (1 - decay)·params``, leaf by leaf."""
    return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, ema, params)


def loss_fn(params, model: models.CharRNN, carry, x, y, dropout_key=None, batch_rows=None,
            restart=None, clip=None):
    """Mean cross-entropy in nats/char of targets y [B, T] given inputs x [B, T].

    Returns (loss, carry after the window). ``batch_rows``: see ``CharRNN.__call__``.
    ``restart``: bool [B], rows that begin from the start state instead of ``carry``
    (inside the loss, so that a learned start state gets its gradient).
    ``clip``: a :class:`charrnn.scan.CotangentClip`, clipping inside BPTT.
    """
    if restart is not None:
        carry = model.restart(params, carry, restart)
    carry, logits = model(params, carry, x, dropout_key, batch_rows=batch_rows, clip=clip)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), carry


def step_key(state: TrainState) -> jax.Array:
    """The dropout key of the step ``state`` is about to take: ``fold_in(key(rng), step)``."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def train_step(state: TrainState, batch: dict, *, model: models.CharRNN,
               optimizer: optim.Optimizer, axis_name: str | None = None,
               reset_prob: float = 0.0, measure_every: int = 0) -> tuple[TrainState, dict]:
    """One update: forward, loss, gradient, clip, optimizer step.

    batch: ``x``, ``y`` int [B, T] and ``reset`` bool [] (start of an epoch:
    every stream restarts from the start state, ``model.start_carry``); besides,
    each stream restarts with probability ``reset_prob`` (:func:`restart_rows`).
    The step's random key (dropout, restarts) is :func:`step_key` of the state. A
    step whose loss, gradient or update is not finite changes neither the
    parameters nor the optimizer state; it is counted instead. (An update whose norm overflows float32, e.g. Adam with a learning
    rate of 1e20, counts too: applying it would leave finite but meaningless
    weights, and the next loss inf.)

    ``axis_name``: run per device under ``jax.shard_map`` over the batch rows
    (:func:`make_train_step` with a mesh): the loss and the gradient are averaged
    over that axis right after the backward pass (equal shares, so this is the
    whole batch's mean and its gradient), and everything after, clipping
    included, sees exactly what one device would; except with ``clip_at=device``,
    where each device clips its own gradient before the average.
    ``measure_every``: see :func:`bptt_gradients`.
    """
    key, rows = step_key(state), None
    if axis_name is not None:
        local = batch["x"].shape[0]
        rows = (jax.lax.axis_index(axis_name) * local, local * jax.lax.axis_size(axis_name))
    restart = restart_rows(batch["reset"], key, reset_prob, batch["x"].shape[0], rows)
    args = (state.params, model, state.carry, batch["x"], batch["y"], key, rows, restart)
    bptt_metrics = {}
    if optimizer.clip_at == "example":  # each row's gradient, [B, ...]: clipped row by row
        (loss, new_carry), grads = row_gradients(*args)
    elif optimizer.bptt is not None:  # clipped inside the backward pass
        (loss, new_carry), grads, bptt_metrics = bptt_gradients(
            args, optimizer.bptt, axis_name, state.step, measure_every)
    else:
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(*args)
    if axis_name is not None:
        loss = jax.lax.pmean(loss, axis_name)

    # The gradient averaged over the devices, clipping, then the update rule
    # (optim.Optimizer.update): between the backward pass and the parameter update.
    step = optimizer.update(grads, state.opt_state, state.params, axis_name)
    grad_norm = optim.global_norm(step.raw)  # g = ||∇θ L||_2, before clipping
    params = optax.apply_updates(state.params, step.updates)
    ema = None if state.ema is None else update_ema(state.ema, params, optimizer.ema_decay)

    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optim.global_norm(step.updates)))
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_new(params, state.params),
        opt_state=keep_new(step.state, state.opt_state),
        carry=keep_new(new_carry, jax.tree.map(jnp.zeros_like, new_carry)),
        rng=state.rng, nonfinite_run=nonfinite_run,
        nonfinite_total=state.nonfinite_total + (1 - finite.astype(jnp.int32)),
        ema=None if ema is None else keep_new(ema, state.ema))
    metrics = _step_metrics(loss, grad_norm, step, finite, optimizer.schedule(state.step))
    metrics.update(step.metrics or {}, **bptt_metrics)
    if bptt_metrics:  # a step is clipped when some cotangent was
        metrics["clipped"] = bptt_metrics["bptt_clip_fraction"] > 0
    if reset_prob > 0:  # the share of streams restarted in this window
        metrics["restart_fraction"] = jnp.mean(restart.astype(jnp.float32))
    return new_state, metrics


def _step_metrics(loss, grad_norm, step: optim.Update, finite, lr) -> dict:
    """What a train step logs: the loss, the gradient's norm before and after clipping
    and how clipping changed it, the threshold in force, the learning rate, and each
    layer's ||∂L/∂W_hh||."""
    grads, clipped = step.raw, step.clipped
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "grad_norm_clipped": optim.global_norm(clipped),
        # cos∠(g, clip(g)): 1 for global-norm clipping, below 1 when a rule turns g.
        "clip_cosine": diagnostics.tree_cosine(grads, clipped),
        "clipped": step.changed if step.changed is not None else optim.tree_differs(grads,
                                                                                    clipped),
        "nonfinite": 1 - finite.astype(jnp.int32),
        "lr": lr,
        "clip_threshold": step.threshold,
    }
    for layer, w_grad in enumerate(models.recurrent_weights(grads)):
        metrics[f"whh_grad_norm/{layer}"] = jnp.linalg.norm(w_grad)
    return metrics


def row_gradients(params, model, carry, x, y, key, rows, restart):
    """clip_at=example: ((mean loss, carry), the gradient of each row's mean loss, every
    leaf [B, ...]). Row b is a batch of one under ``jax.vmap`` that keeps its place in
    the batch (``batch_rows``: its dropout mask rows); the batch's gradient is their mean."""
    start, total = (0, x.shape[0]) if rows is None else rows

    def one_row(carry_b, x_b, y_b, restart_b, b):
        add_row = lambda tree: jax.tree.map(lambda a: a[None], tree)
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model, add_row(carry_b), x_b[None], y_b[None], key, (start + b, total),
            None if restart is None else restart_b[None])
        return (loss, jax.tree.map(lambda a: a[0], new_carry)), grads

    (losses, new_carry), grads = jax.vmap(one_row)(carry, x, y, restart,
                                                   jnp.arange(x.shape[0]))
    return (jnp.mean(losses), new_carry), grads


def bptt_gradients(args: tuple, clip, axis_name, step, measure_every: int):
    """clip_at=bptt: ((loss, carry), the gradient with every step's cotangent clipped,
    metrics). ``args``: :func:`loss_fn`'s first eight.

    The rule's τ bounds ∂L_b/∂z_t, L_b the summed loss of row b (Graves 2013 clipped
    the derivatives of a sequence's summed loss to [−1, 1]): the batch's mean loss
    L = Σ_b L_b / (B·T) has the cotangents ∂L_b/∂z_t / (B·T), so those are clipped at
    τ / (B·T), whatever B and T.

    Metrics: ``bptt_clip_fraction``, the share of (row, layer, time step) cotangents
    clipped (counted by the backward pass, returned as τ's cotangent: charrnn.scan);
    with ``measure_every`` > 0, on every step s with (s + 1) % measure_every == 0 also
    ``grad_norm_unclipped``, the norm of the gradient the same window would give without
    clipping, and ``bptt_norm_ratio``, the clipped gradient's norm over it (a second
    backward pass, so only then; NaN on the other steps).
    """
    model, x = args[1], args[3]
    # τ bounds the cotangent of one sequence's summed loss (Graves's convention); the loss
    # differentiated here is the mean over this device's B·T characters, whose cotangents
    # are 1/(B·T) of those.
    clip = clip.replace(tau=clip.tau / x.size)
    value_and_grad = jax.value_and_grad(loss_fn, argnums=(0, 8), has_aux=True)
    (loss, new_carry), (grads, dclip) = value_and_grad(*args, clip)
    cotangents = x.size * model.num_layers  # B * T * L (this device's rows)
    metrics = {"bptt_clip_fraction": dclip.tau / cotangents}
    if axis_name is not None:
        metrics = jax.lax.pmean(metrics, axis_name)
    if measure_every:
        def norms():  # (unclipped, clipped) of the batch's gradient
            free = clip.replace(tau=jnp.full_like(clip.tau, jnp.inf))
            both = (value_and_grad(*args, free)[1][0], grads)
            if axis_name is not None:
                both = jax.lax.pmean(both, axis_name)
            return tuple(optim.global_norm(g).astype(jnp.float32) for g in both)
        nan = jnp.full((), jnp.nan, jnp.float32)
        unclipped, clipped = jax.lax.cond((step + 1) % measure_every == 0, norms,
                                          lambda: (nan, nan))
        metrics["grad_norm_unclipped"] = unclipped
        metrics["bptt_norm_ratio"] = clipped / unclipped
    return (loss, new_carry), grads, metrics


# fold_in(step key, RESTART_STREAM) draws the restarts; dropout folds in 0..num_layers.
RESTART_STREAM = 0x7E57A27


def restart_rows(reset, key, reset_prob: float, batch_size: int, batch_rows=None):
    """Streams that start this window from the start state: bool [B].

    All of them when ``reset`` (bool [], an epoch's start); else stream b when
    u_b < ``reset_prob``, u_b ~ U[0, 1) drawn from ``fold_in(key, RESTART_STREAM)``
    for the whole batch, so resuming from a checkpoint redraws the same restarts.
    ``batch_rows`` (start, total): these B rows are rows start.. of the whole batch
    (one device's share), which take their own draws of the whole batch's.
    """
    restart = jnp.broadcast_to(reset, (batch_size,))
    if reset_prob == 0:
        return restart
    start, total = (0, batch_size) if batch_rows is None else batch_rows
    u = jax.random.uniform(jax.random.fold_in(key, RESTART_STREAM), (total,))
    return restart | (jax.lax.dynamic_slice_in_dim(u, start, batch_size) < reset_prob)


def make_train_step(model, optimizer: optim.Optimizer, mesh=None, reset_prob: float = 0.0,
                    measure_every: int = 0):
    """``train_step`` bound to this run's model and optimizer, jitted once, state donated:
    ``(state, batch) -> (state, metrics)``.

    With a data ``mesh`` (:class:`parallel.DataParallel`'s) each device steps its
    rows of the batch and carry under ``jax.shard_map``, with one all-reduce of
    the gradient (``train_step``'s ``axis_name``); the parameters, optimizer
    state and metrics are the same on every device. Feed it batches placed by
    ``DataParallel.wrap_step``. ``reset_prob``: the run's ``train.reset_prob``
    (:func:`train_step`). ``measure_every``: with ``clip_at=bptt``, how often the step
    also measures the unclipped gradient's norm (:func:`bptt_gradients`; 0: never).
    """
    hostmem.keep_freed_memory()  # on CPU, stops every step page-faulting its buffers in again
    axis = None if mesh is None else mesh.axis_names[0]
    step = functools.partial(train_step, model=model, optimizer=optimizer, axis_name=axis,
                             reset_prob=reset_prob, measure_every=measure_every)
    if mesh is not None:
        rows, whole = parallel.P(axis), parallel.P()
        state = TrainState(step=whole, params=whole, opt_state=whole, carry=rows, rng=whole,
                           nonfinite_run=whole, nonfinite_total=whole,
                           ema=whole if optimizer.ema_decay else None)
        batch = {"x": rows, "y": rows, "reset": whole}
        # check_vma=False: the scan's custom VJPs (charrnn.scan) do not type their
        # cotangents by device variance; train_step averages the gradient itself.
        step = jax.shard_map(step, mesh=mesh, in_specs=(state, batch),
                             out_specs=(state, whole), check_vma=False)
    return jax.jit(step, donate_argnums=0)


def run_steps(step_fn, state, next_batch, start: int, stop: int):
    """The one loop over training steps: from step ``start`` to ``stop``, feed
    ``next_batch()`` to ``state, metrics = step_fn(state, batch)``.

    Yields ``(steps done, state, metrics)`` after each step; what to record,
    evaluate or save in between is the caller's (the training loop, a sweep's
    single run or group, the studies).
    """
    for step in range(start, stop):
        state, metrics = step_fn(state, next_batch())
        yield step + 1, state, metrics


def eval_step(params, carry, x, y, mask, *, model):
    """Cross-entropy (nats) summed over the unmasked positions of each row of one window: [B].

    Per row, so that with the rows sharded over devices the program has no collective:
    the host adds the rows up (an all-reduce of the sum in every window deadlocked on two
    CPU devices: the devices' threads waited in different windows' rendezvous).
    """
    carry, logits = model(params, carry, x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return carry, jnp.sum(nll * mask, axis=-1)


def make_eval_step(model, runs: bool = False):
    """:func:`eval_step` jitted; ``runs``: over the params and carries of many runs
    stacked on a leading axis [R, ...] (a sweep group), the windows shared."""
    step = functools.partial(eval_step, model=model)
    return jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, None)) if runs else step)


def evaluate(eval_fn, model, params, ids: np.ndarray, batch_size: int, seq_len: int,
             burn_in: int = data.EVAL_BURN_IN, num_runs: int | None = None) -> dict:
    """Loss over a whole split, the hidden state carried from window to window.

    Every stream starts from the model's start state (:meth:`models.CharRNN.start_carry`).
    The split is read as ``batch_size`` streams, each of which first reads the
    ``burn_in`` characters before its start without scoring them
    (:func:`data.eval_windows`), so the loss is that of one stream carried
    through the whole split, whatever the batch size.
    ``num_runs``: ``params`` are R runs' stacked (``eval_fn`` from
    ``make_eval_step(model, runs=True)``); the losses are then arrays [R].
    Returns ``{"loss": nats/char, "bpc": bits/char}``.
    """
    if num_runs is None:
        carry = model.start_carry(params, batch_size)
    else:  # each run's start state (the learned ones differ)
        carry = jax.vmap(lambda p: model.start_carry(p, batch_size))(params)
    total, count = 0.0, 0
    for x, y, mask in data.eval_windows(ids, batch_size, seq_len, burn_in):
        carry, nll = eval_fn(params, carry, x, y, mask)
        total = total + nll  # per row [(R,) B], stays on device (and sharded) until the end
        count += int(mask.sum())
    loss = _sum_rows(total) / count
    return {"loss": loss, "bpc": loss / LN2}


def _sum_rows(total):
    """The per-row totals [(R,) B] added up over the rows in float64 (a float, or [R]);
    in a multi-process run, every process's rows."""
    if getattr(total, "is_fully_addressable", True):
        rows = jax.device_get(total)
    else:
        from jax.experimental import multihost_utils
        rows = multihost_utils.process_allgather(total, tiled=True)
    summed = np.asarray(rows, np.float64).sum(axis=-1)
    return float(summed) if summed.ndim == 0 else summed
