"""Clipping tied to its definition: ĝ = g·τ/||g|| when ||g|| > τ, else g."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from charrnn import optim


def _optim_config(**kw):
    c = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-2, schedule="constant",
                                       warmup_steps=2, final_lr_fraction=0.1, b1=0.9, b2=0.999,
                                       momentum=0.0, clip_mode="global_norm", clip_norm=1.0))
    c.update(kw)
    return c


GRADS = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}  # ||g|| = 5


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.5])
def test_global_norm_clip_caps_the_norm_and_keeps_the_direction(tau):
    clip = optim.make_clip(_optim_config(clip_norm=tau))
    clipped, _ = clip.update(GRADS, clip.init(GRADS))
    g, c = _flat(GRADS), _flat(clipped)
    assert float(optim.global_norm(GRADS)) == pytest.approx(5.0)
    assert np.linalg.norm(c) == pytest.approx(tau, rel=1e-6)
    cosine = g @ c / (np.linalg.norm(g) * np.linalg.norm(c))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(c, g * tau / 5.0, rtol=1e-6)


def test_global_norm_clip_leaves_small_gradients_unchanged():
    clip = optim.make_clip(_optim_config(clip_norm=5.0))  # g == τ: unchanged too
    clipped, _ = clip.update(GRADS, clip.init(GRADS))
    np.testing.assert_array_equal(_flat(clipped), _flat(GRADS))


def test_value_clip_bounds_each_component():
    clip = optim.make_clip(_optim_config(clip_mode="value", clip_norm=1.0))
    clipped, _ = clip.update(GRADS, clip.init(GRADS))
    np.testing.assert_array_equal(_flat(clipped), [1.0, 0.0, 1.0])


def test_the_chain_is_clip_then_adam():
    config = ml_collections.ConfigDict({"optim": _optim_config(clip_norm=1.0),
                                        "train": {"num_steps": 10}})
    tx = optim.make_optimizer(config)
    params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros((1, 1))}}
    updates, _ = tx.update(GRADS, tx.init(params), params)
    # Adam's first step moves every coordinate with a non-zero gradient by -lr·sign(g).
    np.testing.assert_allclose(_flat(updates), [-1e-2, 0.0, -1e-2], rtol=1e-4)


@pytest.mark.parametrize("field,value", [("clip_mode", "bogus"), ("name", "bogus"),
                                         ("schedule", "bogus")])
def test_unknown_choices_are_rejected(field, value):
    config = ml_collections.ConfigDict({"optim": _optim_config(**{field: value}),
                                        "train": {"num_steps": 10}})
    with pytest.raises(ValueError, match="unknown"):
        optim.make_optimizer(config)


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
    tx = optim.make_optimizer(config)
    params = {"kernel": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "bias": jnp.array([5.0, 6.0])}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.5 * params["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], [0.0, 0.0])
