"""The optimizer: a clipping rule followed by Adam, AdamW or SGD.

    tx = optax.chain(clip(τ), adam(schedule))

The clipping rules live in :mod:`charrnn.clipping` (their registry); this
module chains the one ``optim.clip_mode`` names in front of the update rule.

Clipping is the first link of the chain, so it acts on the raw gradient
exactly between ``jax.value_and_grad`` and the optimizer's update (Pascanu,
Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
networks", Algorithm 1). For ``global_norm`` the project matches optax:

    g = ||∇θ L||_2 ;  ĝ = ∇θ L · τ / g  if g > τ,  else ∇θ L

(no epsilon: PyTorch's ``clip_grad_norm_`` divides by g + 1e-6 instead.)
Scaling every component by the same factor keeps the gradient's direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from charrnn import clipping

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def make_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Learning rate per step: constant, or linear warmup then cosine decay."""
    lr = optim_config.learning_rate
    if optim_config.schedule == "constant":
        return optax.constant_schedule(lr)
    if optim_config.schedule == "cosine":
        warmup = min(optim_config.warmup_steps, max(num_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=lr * optim_config.final_lr_fraction)
    raise ValueError(f"unknown optim.schedule {optim_config.schedule!r}; choose from {SCHEDULES}")


def make_clip(optim_config) -> optax.GradientTransformation:
    """The clipping link of the chain: the registered rule ``optim.clip_mode``
    (:mod:`charrnn.clipping`) at the config's strength."""
    return clipping.from_config(optim_config).transform


def make_base_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
    """The update rule that receives the (possibly clipped) gradient."""
    schedule = make_schedule(optim_config, num_steps)
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


def make_optimizer(config) -> optax.GradientTransformation:
    """``optax.chain(clip, adam|adamw|sgd)`` for a full run config."""
    return optax.chain(make_clip(config.optim), make_base_optimizer(config.optim, config.train.num_steps))


def global_norm(tree) -> jnp.ndarray:
    """L2 norm of all leaves of a pytree taken together: sqrt(Σ_i g_i²)."""
    return optax.tree.norm(tree)
