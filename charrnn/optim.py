"""The optimizer: a clipping rule followed by Adam, AdamW or SGD, built once per run.

    update = base(schedule)( clip(τ)(∇θ L) )        (optax.chain(clip, base), by hand)

:class:`Optimizer` is the one object that the train step, the sweep, resuming
and the studies use: :meth:`Optimizer.from_config` builds the clipping rule
(:mod:`charrnn.clipping`, the one ``optim.clip_mode`` names), the update rule
and its learning-rate schedule from a run config; :meth:`Optimizer.init`
makes its state and :meth:`Optimizer.update` steps it. The state's layout
(a ``(clip state, update-rule state)`` pair, as ``optax.chain`` keeps it, so
checkpoints of every earlier version restore) is this class's business alone.

Clipping acts on the raw gradient exactly between ``jax.value_and_grad`` and
the update rule (Pascanu, Mikolov & Bengio 2013, "On the difficulty of
training recurrent neural networks", Algorithm 1). For ``global_norm`` the
project matches optax:

    g = ||∇θ L||_2 ;  ĝ = ∇θ L · τ / g  if g > τ,  else ∇θ L

(no epsilon: PyTorch's ``clip_grad_norm_`` divides by g + 1e-6 instead.)
Scaling every component by the same factor keeps the gradient's direction.

Where the rule acts is ``optim.clip_at`` (:data:`PLACEMENTS`). With g_b the
gradient of row (sequence) b's mean loss, g = (1/B) Σ_b g_b the batch's, g_d
= the mean of device d's rows' (D devices), clip the rule and base the update rule:

    gradient  (default)  u = base(clip(g))               Pascanu et al. 2013, Alg. 1
    update               u = clip(base(g))               optax.chain(base, clip): the
                         update the optimizer computed is clipped ("update clipping")
    bptt                 u = base(g̃), g̃ from a backward pass that clips each step's
                         pre-activation cotangent (charrnn.scan: Graves 2013 §2.1;
                         Mikolov, as Pascanu et al. 2013 §3.1 describe it);
                         rules ``value`` and ``global_norm`` only (:data:`BPTT_RULES`)
    example              u = base((1/B) Σ_b clip(g_b))   per-example clipping (Abadi et
                         al. 2016, "Deep Learning with Differential Privacy", §3.1, without
                         the noise); B = 1 is ``gradient``
    device               u = base((1/D) Σ_d clip(g_d))   each device's gradient clipped
                         before the data-parallel all-reduce; one device is ``gradient``

A rule with state (``autoclip``, ``zclip``) keeps one state wherever it sits:
at ``update`` it tracks the norms of the updates; at ``example`` and ``device``
every row (device) clips against the same state, and the new state is the mean
of the B (D) states their updates would leave: autoclip's history gets the mean
per-row (per-device) norm of each step, zclip's μ and σ² follow the mean of the
parts' clipped norms, and the logged threshold is the mean of the parts'.

The optimizer also owns the averaged weights' decay (``optim.ema_decay``,
0 = none): ema_k = d·ema_{k-1} + (1-d)·θ_k after every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from charrnn import clipping, scan
from charrnn import config as config_lib

OPTIMIZERS = config_lib.CHOICES["optim.name"]
SCHEDULES = config_lib.CHOICES["optim.schedule"]
PLACEMENTS = config_lib.CHOICES["optim.clip_at"]  # where the clipping rule acts
BPTT_RULES = tuple(scan.BPTT_RULES)  # the rules clip_at=bptt can apply


def make_schedule(optim_config, num_steps: int, learning_rate=None) -> optax.Schedule:
    """Learning rate per step: constant, or linear warmup then cosine decay, peaking at
    ``optim.learning_rate``. ``learning_rate`` (e.g. a sweep's traced scalar) replaces
    that peak: the schedule is then its shape at peak 1, scaled by it (optax's cosine
    schedule cannot take a traced peak)."""
    if learning_rate is None:
        return _schedule(optim_config, num_steps, optim_config.learning_rate)
    unit = _schedule(optim_config, num_steps, 1.0)
    return lambda count: learning_rate * unit(count)


def _schedule(optim_config, num_steps: int, peak) -> optax.Schedule:
    if optim_config.schedule == "constant":
        return optax.constant_schedule(peak)
    if optim_config.schedule == "cosine":
        warmup = min(optim_config.warmup_steps, max(num_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=peak * optim_config.final_lr_fraction)
    raise ValueError(f"unknown optim.schedule {optim_config.schedule!r}; choose from {SCHEDULES}")


def make_base_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The update rule that receives the (possibly clipped) gradient, at ``schedule``."""
    if optim_config.name == "adam":
        return optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2)
    if optim_config.name == "adamw":
        # Decoupled weight decay (Loshchilov & Hutter 2019): θ ← θ − lr·(adam step + λ·θ),
        # on the matrices only (embedding, kernels); biases are not decayed.
        return optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           weight_decay=optim_config.weight_decay, mask=decay_mask)
    if optim_config.name == "sgd":
        return optax.sgd(schedule, momentum=optim_config.momentum or None)
    raise ValueError(f"unknown optim.name {optim_config.name!r}; choose from {OPTIMIZERS}")


def decay_mask(params):
    """True for the leaves weight decay shrinks: every parameter with two or more axes."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# The optimizer's scalars a sweep may pass as runtime values (keyword arguments of
# Optimizer.from_config), with the config field each replaces. The update rules'
# other scalars (b1, b2, weight decay, momentum) would join here by the same route.
RUNTIME = {"strength": "the clipping rule's strength field", "learning_rate": "learning_rate"}


class Update(NamedTuple):
    """What one :meth:`Optimizer.update` gives back."""
    updates: Any  # the parameter change, θ ← θ + updates
    clipped: Any  # the gradient after the clipping rule (what the update rule read)
    state: Any  # the optimizer state after the step
    threshold: jax.Array  # float32 []: the clipping threshold in force (inf: none)
    raw: Any  # the batch's gradient before the rule acted (bptt: already clipped)
    changed: Any = None  # bool []: the rule changed something (None: clipped != raw)
    metrics: Any = None  # the placement's own metrics (dict of float32 []) or None


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The clipping rule, the update rule and its schedule of one run (or one
    sweep group, whose strength is a traced scalar), plus the averaging decay."""
    clip: clipping.Clip
    base: optax.GradientTransformation
    schedule: optax.Schedule
    ema_decay: float = 0.0
    clip_at: str = PLACEMENTS[0]  # where clip acts (module docstring)
    bptt: scan.CotangentClip | None = None  # clip_at=bptt: what the backward pass clips

    @classmethod
    def from_config(cls, config, strength=None, learning_rate=None) -> "Optimizer":
        """The optimizer of a full run config. The runtime hyperparameters
        (:data:`RUNTIME`), given, replace the config's: a sweep passes traced scalars
        [] so that one compiled step serves every value. ``strength``: the clipping
        rule's strength; ``learning_rate``: the schedule's peak."""
        optim_config = config_lib.upgrade(config).optim
        schedule = make_schedule(optim_config, config.train.num_steps, learning_rate)
        bptt = None
        if optim_config.clip_at == "bptt":
            rule = clipping.get(optim_config.clip_mode)
            tau = clipping.strength_of(rule, optim_config) if strength is None else strength
            bptt = scan.CotangentClip(rule.name, jnp.asarray(tau, jnp.float32))
        return cls(clip=clipping.from_config(optim_config, strength),
                   base=make_base_optimizer(optim_config, schedule), schedule=schedule,
                   ema_decay=float(optim_config.ema_decay), clip_at=optim_config.clip_at,
                   bptt=bptt)

    @classmethod
    def frozen(cls) -> "Optimizer":
        """No clipping and a zero update: a step with it measures without moving."""
        return cls(clip=clipping.from_rule("none"), base=optax.set_to_zero(),
                   schedule=optax.constant_schedule(0.0))

    def init(self, params):
        return (self.clip.transform.init(params), self.base.init(params))

    def update(self, grads, state, params, axis_name: str | None = None) -> Update:
        """Clip where ``clip_at`` says and step the update rule (module docstring).

        grads: the gradient of this device's rows (with ``clip_at=example``: of each
        row, every leaf [B, ...]); ``axis_name``: the devices' mesh axis, over which
        the gradient is averaged into the whole batch's (None: one device).
        """
        if self.clip_at in ("example", "device"):
            return self._update_parts(grads, state, params, axis_name)
        if axis_name is not None:  # the whole batch's gradient: one all-reduce
            grads = jax.lax.pmean(grads, axis_name)
        if self.clip_at == "update":
            return self._update_then_clip(grads, state, params)
        clip_state, base_state = state
        clipped = grads  # clip_at=bptt: the backward pass has clipped already
        if self.clip_at == "gradient":
            # Gradient clipping sits here: after the backward pass, before the update rule.
            clipped, clip_state = self.clip.transform.update(grads, clip_state, params)
        updates, base_state = self.base.update(clipped, base_state, params)
        return Update(updates, clipped, (clip_state, base_state), self.clip.threshold(clip_state),
                      grads)

    def _update_then_clip(self, grads, state, params) -> Update:
        """clip_at=update: u = clip(base(g)), as ``optax.chain(base, clip)``."""
        clip_state, base_state = state
        raw, base_state = self.base.update(grads, base_state, params)
        updates, clip_state = self.clip.transform.update(raw, clip_state, params)
        metrics = {"update_norm": global_norm(raw), "update_norm_clipped": global_norm(updates)}
        return Update(updates, grads, (clip_state, base_state), self.clip.threshold(clip_state),
                      grads, changed=tree_differs(raw, updates), metrics=metrics)

    def _update_parts(self, grads, state, params, axis_name) -> Update:
        """clip_at=example (grads per row, [B, ...]) or device (this device's gradient):
        each part clipped against the same state, then the parts averaged (the states too)."""
        clip_state, base_state = state
        if self.clip_at == "example":
            clip_rows = jax.vmap(self.clip.transform.update, in_axes=(0, None, None))
            clipped, states = clip_rows(grads, clip_state, params)
            part_changed = jax.vmap(tree_differs)(grads, clipped).astype(jnp.float32)  # [B]
            mean = lambda tree: jax.tree.map(_row_mean, tree)
            grads, clipped, part_changed = mean(grads), mean(clipped), jnp.mean(part_changed)
            clip_state = _mean_state(states, _row_mean)
        else:
            clipped, clip_state = self.clip.transform.update(grads, clip_state, params)
            part_changed = tree_differs(grads, clipped).astype(jnp.float32)
        if axis_name is not None:  # the all-reduce, after the clip
            grads, clipped, part_changed = jax.lax.pmean((grads, clipped, part_changed),
                                                         axis_name)
            clip_state = _mean_state(clip_state, lambda a: jax.lax.pmean(a, axis_name))
        updates, base_state = self.base.update(clipped, base_state, params)
        metrics = {f"{self.clip_at}_clip_fraction": part_changed}
        return Update(updates, clipped, (clip_state, base_state), self.clip.threshold(clip_state),
                      grads, changed=part_changed > 0, metrics=metrics)


def tree_differs(a, b) -> jax.Array:
    """bool []: some leaf of ``b`` differs from ``a`` somewhere (two same-shaped pytrees)."""
    return jnp.any(jnp.array([jnp.any(x != y) for x, y in
                              zip(jax.tree.leaves(a), jax.tree.leaves(b))]))


def _row_mean(a):
    """The mean of a [B, ...] over its rows, as a product with (1/B, ..., 1/B): XLA on a
    CPU reduces over a leading axis about 10x slower than it multiplies."""
    return jnp.tensordot(jnp.full(a.shape[:1], 1.0 / a.shape[0], a.dtype), a, axes=1)


def _mean_state(state, mean):
    """A clip state averaged over its parts by ``mean`` (float32 arithmetic, each leaf's
    dtype kept: the integer counters agree across the parts)."""
    return jax.tree.map(lambda a: mean(a.astype(jnp.float32)).astype(a.dtype), state)


def global_norm(tree) -> jnp.ndarray:
    """L2 norm of all leaves of a pytree taken together: sqrt(Σ_i g_i²)."""
    return optax.tree.norm(tree)
