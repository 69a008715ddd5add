"""Clipping tied to its definition: ĝ = g·τ/||g|| when ||g|| > τ, else g."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from charrnn import models, optim
from charrnn import step as step_lib


def _optim_config(**kw):
    c = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-2, schedule="constant",
                                       warmup_steps=2, final_lr_fraction=0.1, b1=0.9, b2=0.999,
                                       momentum=0.0, clip_mode="global_norm", clip_norm=1.0))
    c.update(kw)
    return c


GRADS = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}  # ||g|| = 5


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _clip(**optim_fields):
    config = ml_collections.ConfigDict({"optim": _optim_config(**optim_fields),
                                        "train": {"num_steps": 10}})
    return optim.Optimizer.from_config(config).clip.transform


def test_the_optimizer_clips_with_the_configured_rule_at_the_configured_strength():
    clip = _clip(clip_norm=2.5)
    clipped, _ = clip.update(GRADS, clip.init(GRADS))
    np.testing.assert_allclose(_flat(clipped), _flat(GRADS) * 0.5, rtol=1e-6)
    clip = _clip(clip_mode="value", clip_norm=1.0)
    np.testing.assert_array_equal(_flat(clip.update(GRADS, clip.init(GRADS))[0]), [1.0, 0.0, 1.0])


def _real_step(smoke_config, **optim_fields):
    """(params before, grads at them, params after, metrics) of one real train step."""
    smoke_config.optim.update(optim_fields)
    model = models.CharRNN.from_config(smoke_config.model, 12)
    optimizer = optim.Optimizer.from_config(smoke_config)
    state = step_lib.init_state(model, optimizer, smoke_config.train.batch_size, smoke_config.seed)
    batch = _batch(smoke_config)
    before = jax.tree.map(np.array, state.params)
    carry = model.initial_carry(smoke_config.train.batch_size)
    grads = jax.grad(lambda p: step_lib.loss_fn(p, model, carry, batch["x"], batch["y"])[0])(
        state.params)
    state, metrics = step_lib.make_train_step(model, optimizer)(state, batch)
    return before, grads, jax.tree.map(np.array, state.params), metrics


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.train.seq_len)
    return {"x": rng.integers(0, 12, shape, dtype=np.int32),
            "y": rng.integers(0, 12, shape, dtype=np.int32), "reset": np.bool_(True)}


@pytest.mark.parametrize("tau", [1e-2, 1e6])
def test_sgd_receives_the_clipped_gradient(smoke_config, tau):
    """θ' = θ − lr·g·τ/||g|| when ||g|| > τ, θ − lr·g otherwise, through train_step."""
    lr = 0.5
    before, grads, after, metrics = _real_step(
        smoke_config, name="sgd", learning_rate=lr, momentum=0.0, clip_norm=tau)
    norm = float(optim.global_norm(grads))
    scale = tau / norm if norm > tau else 1.0
    assert (norm > tau) == (tau == 1e-2)  # one case clips, the other does not
    for b, g, a in zip(jax.tree.leaves(before), jax.tree.leaves(grads), jax.tree.leaves(after)):
        step = (-lr * scale * np.asarray(g, np.float64)).astype(np.float32)
        np.testing.assert_allclose(a, b + step, rtol=1e-6, atol=1e-7)
    assert float(metrics["clip_threshold"]) == pytest.approx(tau)


def test_adam_update_differs_with_and_without_clipping(smoke_config):
    """Adam's first step is scale invariant, so two steps: with global-norm clipping
    Adam's second update follows the clipped gradients (checked against optax.adam
    fed g·τ/||g|| by hand), which differ in ratio from the raw ones."""
    def two_steps(clip_mode):
        config = ml_collections.ConfigDict(smoke_config.to_dict())
        config.optim.update(name="adam", clip_mode=clip_mode, clip_norm=1e-2)
        model = models.CharRNN.from_config(config.model, 12)
        optimizer = optim.Optimizer.from_config(config)
        state = step_lib.init_state(model, optimizer, config.train.batch_size, 0)
        start = jax.tree.map(jnp.array, state.params)
        step = step_lib.make_train_step(model, optimizer)
        batches = [_batch(config, 0), _batch(config, 1)]
        for i, b in enumerate(batches):
            state, _ = step(state, b)
        return model, config, start, batches, jax.tree.map(np.array, state.params)

    model, config, start, batches, clipped_run = two_steps("global_norm")
    *_, raw_run = two_steps("none")
    adam = optax.adam(config.optim.learning_rate, b1=config.optim.b1, b2=config.optim.b2)
    params, opt_state = start, adam.init(start)
    carry = model.initial_carry(config.train.batch_size)  # every batch has reset=True
    for b in batches:  # the reference: optax.adam on hand-clipped gradients
        g = jax.grad(lambda p: step_lib.loss_fn(p, model, carry, b["x"], b["y"])[0])(params)
        g = jax.tree.map(lambda x: x * min(1.0, 1e-2 / float(optim.global_norm(g))), g)
        updates, opt_state = adam.update(g, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_allclose(_flat(clipped_run), _flat(params), rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(_flat(clipped_run) - _flat(raw_run))) > 1e-4


@pytest.mark.parametrize("name,schedule", [("sgd", "constant"), ("adam", "cosine")])
def test_a_traced_learning_rate_steps_as_the_constant_does(smoke_config, name, schedule):
    """One compiled step serves every learning rate of a sweep: with the rate a traced
    scalar the update equals the update of the optimizer built with that constant."""
    smoke_config.optim.update(name=name, schedule=schedule, warmup_steps=2, learning_rate=0.3)
    model = models.CharRNN.from_config(smoke_config.model, 12)
    constant = optim.Optimizer.from_config(smoke_config)
    state = step_lib.init_state(model, constant, smoke_config.train.batch_size, 0)
    state = state.replace(step=jnp.int32(3))  # past the warm-up: the schedule's rate matters
    batch = _batch(smoke_config)
    want_state, want = jax.jit(functools.partial(step_lib.train_step, model=model,
                                                 optimizer=constant))(state, batch)

    def traced(state, batch, lr):
        tx = optim.Optimizer.from_config(smoke_config, learning_rate=lr)
        return step_lib.train_step(state, batch, model=model, optimizer=tx)
    got_state, got = jax.jit(traced)(state, batch, jnp.float32(0.3))
    np.testing.assert_allclose(_flat(got_state.params), _flat(want_state.params), rtol=1e-6)
    assert float(got["lr"]) == pytest.approx(float(want["lr"])) and float(want["lr"]) > 0.1
    _, other = jax.jit(traced)(state, batch, jnp.float32(0.03))  # the rate is really read
    assert float(other["lr"]) == pytest.approx(0.1 * float(want["lr"]))


@pytest.mark.parametrize("field,value", [("clip_mode", "bogus"), ("name", "bogus"),
                                         ("schedule", "bogus")])
def test_unknown_choices_are_rejected(field, value):
    config = ml_collections.ConfigDict({"optim": _optim_config(**{field: value}),
                                        "train": {"num_steps": 10}})
    with pytest.raises(ValueError, match="unknown"):
        optim.Optimizer.from_config(config)


def test_cosine_schedule_warms_up_then_decays():
    schedule = optim.make_schedule(_optim_config(schedule="cosine", warmup_steps=2), 10)
    lrs = [float(schedule(s)) for s in range(11)]
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_adamw_decays_the_matrices_and_not_the_biases():
    # With a zero gradient Adam's step is 0, so AdamW's update is exactly -lr·λ·θ on
    # every parameter of two or more axes, and 0 on the vectors.
    config = ml_collections.ConfigDict({"optim": _optim_config(name="adamw", weight_decay=0.5),
                                        "train": {"num_steps": 10}})
    tx = optim.Optimizer.from_config(config)
    params = {"kernel": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "bias": jnp.array([5.0, 6.0])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = tx.update(zeros, tx.init(params), params).updates
    np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.5 * params["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], [0.0, 0.0])
