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

The optimizer also owns the averaged weights' decay (``optim.ema_decay``,
0 = none): ema_k = d·ema_{k-1} + (1-d)·θ_k after every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from charrnn import clipping
from charrnn import config as config_lib

OPTIMIZERS = config_lib.CHOICES["optim.name"]
SCHEDULES = config_lib.CHOICES["optim.schedule"]


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


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The clipping rule, the update rule and its schedule of one run (or one
    sweep group, whose strength is a traced scalar), plus the averaging decay."""
    clip: clipping.Clip
    base: optax.GradientTransformation
    schedule: optax.Schedule
    ema_decay: float = 0.0

    @classmethod
    def from_config(cls, config, strength=None, learning_rate=None) -> "Optimizer":
        """The optimizer of a full run config. The runtime hyperparameters
        (:data:`RUNTIME`), given, replace the config's: a sweep passes traced scalars
        [] so that one compiled step serves every value. ``strength``: the clipping
        rule's strength; ``learning_rate``: the schedule's peak."""
        optim_config = config_lib.upgrade(config).optim
        schedule = make_schedule(optim_config, config.train.num_steps, learning_rate)
        return cls(clip=clipping.from_config(optim_config, strength),
                   base=make_base_optimizer(optim_config, schedule), schedule=schedule,
                   ema_decay=float(optim_config.ema_decay))

    @classmethod
    def frozen(cls) -> "Optimizer":
        """No clipping and a zero update: a step with it measures without moving."""
        return cls(clip=clipping.from_rule("none"), base=optax.set_to_zero(),
                   schedule=optax.constant_schedule(0.0))

    def init(self, params):
        return (self.clip.transform.init(params), self.base.init(params))

    def update(self, grads, state, params) -> Update:
        """Clip the raw gradient, then step the update rule on the clipped one."""
        clip_state, base_state = state
        # Gradient clipping sits here: after the backward pass, before the update rule.
        clipped, clip_state = self.clip.transform.update(grads, clip_state, params)
        updates, base_state = self.base.update(clipped, base_state, params)
        return Update(updates, clipped, (clip_state, base_state), self.clip.threshold(clip_state))


def global_norm(tree) -> jnp.ndarray:
    """L2 norm of all leaves of a pytree taken together: sqrt(Σ_i g_i²)."""
    return optax.tree.norm(tree)
