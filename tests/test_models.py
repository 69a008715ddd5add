"""The cells and the scan tied to their equations on small exact cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_AND_ONE_AUTODIFF
from charrnn import dropout, models


def _model(cell, **kw):
    kw = {"hidden_size": 8, "num_layers": 2, "embed_dim": 4, **kw}
    return models.CharRNN(vocab_size=11, cell=cell, **kw)


def test_rnn_cell_is_the_elman_equation():
    model = _model("rnn", num_layers=1)
    params = model.init(jax.random.key(0))
    p = params["layer_0"]
    x = jax.random.normal(jax.random.key(1), (3, 4))
    h = jax.random.normal(jax.random.key(2), (3, 8))
    h_new, out = model.cell_step(params, 0)(h, x)
    expected = np.tanh(np.asarray(x) @ p["W_xh"] + np.asarray(h) @ p["W_hh"] + p["b"])
    np.testing.assert_allclose(h_new, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(h_new, out)


@pytest.mark.parametrize("cell,gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_recurrent_weights_are_found_by_name(cell, gates):
    params = _model(cell).init(jax.random.key(0))
    w = models.recurrent_weights(params)
    assert len(w) == 2 and all(m.shape == (8, gates * 8) for m in w)
    # orthogonal initialisation of each gate block
    block = np.asarray(w[0][:, :8])
    np.testing.assert_allclose(block.T @ block, np.eye(8), atol=1e-5)


@pytest.mark.parametrize("cell", models.CELLS)
def test_carrying_the_state_over_two_windows_equals_one_long_window(cell):
    model = _model(cell)
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 11)
    carry0 = model.initial_carry(3)
    carry_long, logits_long = model(params, carry0, tokens)
    carry_a, logits_a = model(params, carry0, tokens[:, :5])
    carry_b, logits_b = model(params, carry_a, tokens[:, 5:])
    np.testing.assert_allclose(jnp.concatenate([logits_a, logits_b], 1), logits_long, atol=1e-5)
    for a, b in zip(jax.tree.leaves(carry_b), jax.tree.leaves(carry_long)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cell,fast_vjp", FAST_AND_ONE_AUTODIFF)
def test_step_by_step_equals_the_scan(cell, fast_vjp):
    model = _model(cell, fast_vjp=fast_vjp)
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
    _, logits = model(params, model.initial_carry(2), tokens)
    carry, weights = model.initial_carry(2), model.step_weights(params)
    for t in range(6):
        carry, step_logits = model.step(weights, carry, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)


def test_step_with_bfloat16_products_equals_the_scan():
    # step_weights casts the weights once; the step's products read the same bfloat16 operands
    model = _model("lstm", matmul_dtype="bfloat16")
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
    _, logits = model(params, model.initial_carry(2), tokens)
    _, logits_f32 = dataclasses.replace(model, matmul_dtype="float32")(
        params, model.initial_carry(2), tokens)
    carry, weights = model.initial_carry(2), model.step_weights(params)
    assert weights["layers"][1][0][0].dtype == jnp.bfloat16
    for t in range(6):
        carry, step_logits = model.step(weights, carry, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)
    assert not np.allclose(logits, logits_f32, atol=1e-5)  # bfloat16 products do differ


def test_dropout_only_with_a_key():
    model = _model("lstm", dropout=0.5)
    params = model.init(jax.random.key(0))
    tokens = jnp.zeros((2, 5), jnp.int32)
    _, a = model(params, model.initial_carry(2), tokens)
    _, b = model(params, model.initial_carry(2), tokens)
    _, c = model(params, model.initial_carry(2), tokens, dropout_key=jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dropout_on_some_rows_uses_those_rows_of_the_whole_batch_mask():
    # What one device of a data mesh does with its rows 2..3 of a batch of 6.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 8)), jnp.float32)  # [T, B, H]
    key = jax.random.key(4)
    whole = dropout.dropout(x, key, 0.5, layer=1)
    part = dropout.dropout(x[:, 2:4], key, 0.5, 1, batch_rows=(2, 6))
    np.testing.assert_array_equal(part, whole[:, 2:4])
    assert (np.asarray(part) == 0).any() and (np.asarray(part) != 0).any()
    # ... with the offset traced, as under shard_map (only those rows are hashed)
    traced = jax.jit(lambda start: dropout.dropout(x[:, 2:4], key, 0.5, 1, batch_rows=(start, 6)))
    np.testing.assert_array_equal(traced(jnp.int32(2)), whole[:, 2:4])


@pytest.mark.parametrize("keep", [0.6, 0.75, 0.9])
def test_keep_mask_is_bernoulli_keep_and_independent(keep):
    n = 1 << 20
    a = np.asarray(dropout.keep_mask(jax.random.key(0), keep, (n,)))
    b = np.asarray(dropout.keep_mask(jax.random.key(1), keep, (n,)))
    sigma = np.sqrt(keep * (1 - keep) / n)
    assert abs(a.mean() - keep) < 5 * sigma
    # Independent across keys and between neighbouring elements: P(both kept) = keep².
    assert abs(np.mean(a & b) - keep ** 2) < 5 * sigma
    assert abs(np.mean(a[1:] & a[:-1]) - keep ** 2) < 5 * sigma
    # Same key, same mask; a shape is the flat mask reshaped.
    np.testing.assert_array_equal(dropout.keep_mask(jax.random.key(0), keep, (n // 4, 4)),
                                  a.reshape(-1, 4))


@pytest.mark.parametrize("cell,fast_vjp", FAST_AND_ONE_AUTODIFF)
def test_weight_drop_is_dropconnect_on_the_recurrent_matrices(cell, fast_vjp):
    keep = 0.7
    model = _model(cell, hidden_size=32, weight_drop=1 - keep, fast_vjp=fast_vjp)
    params = model.init(jax.random.key(0))
    for layer in range(2):  # no zero in W_hh (irnn's starts as I): a zero means dropped
        p = params[f"layer_{layer}"]
        p["W_hh"] = p["W_hh"] + 0.01 * jax.random.normal(jax.random.key(layer), p["W_hh"].shape)
    key = jax.random.key(5)
    dropped = dropout.drop_recurrent_weights(params, key, 1 - keep, model.num_layers)
    for layer in range(2):
        w, d = params[f"layer_{layer}"]["W_hh"], dropped[f"layer_{layer}"]["W_hh"]
        kept = np.asarray(d != 0)
        np.testing.assert_allclose(np.asarray(d)[kept], np.asarray(w)[kept] / keep, rtol=1e-6)
        assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / kept.size)
        for name in ("W_xh", "b"):  # only W_hh is dropped
            np.testing.assert_array_equal(dropped[f"layer_{layer}"][name], params[f"layer_{layer}"][name])
    assert not np.array_equal(dropped["layer_0"]["W_hh"] != 0, dropped["layer_1"]["W_hh"] != 0)
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    carry = model.initial_carry(3)

    def loss(p, k):
        return jnp.sum(model(p, carry, tokens, dropout_key=k)[1] ** 2)

    # The forward pass with a key is the plain model on the dropped matrices ...
    np.testing.assert_allclose(loss(params, key), loss(dropped, None), rtol=1e-5)
    # ... and the gradient reaches W_hh only through the kept elements, scaled by 1/keep.
    g, g_dropped = jax.grad(loss)(params, key), jax.grad(loss)(dropped, None)
    for layer in range(2):
        d = np.asarray(dropped[f"layer_{layer}"]["W_hh"])
        expected = np.where(d != 0, np.asarray(g_dropped[f"layer_{layer}"]["W_hh"]) / keep, 0.0)
        scale = max(1.0, float(np.abs(expected).max()))  # irnn's grow large: float32 rounding
        np.testing.assert_allclose(g[f"layer_{layer}"]["W_hh"], expected, rtol=1e-4,
                                   atol=1e-6 * scale)


@pytest.mark.parametrize("kind", ["step", "locked"])
def test_dropout_masks_per_step_or_locked_over_the_window(kind):
    """Inverted dropout on a layer's output x [T, B, H]: kept units scaled by 1/keep,
    Bernoulli(keep) overall; 'locked' keeps one mask per row for all T steps, 'step'
    draws a new one at every step; under data parallelism each device gets its rows
    of the whole batch's mask."""
    keep, T, B, H = 0.75, 16, 32, 64
    x = jnp.ones((T, B, H))
    key = jax.random.key(3)
    locked = kind == "locked"
    y = np.asarray(dropout.dropout(x, key, 1 - keep, 0, locked))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / keep, rtol=1e-6)
    n = T * B * H if kind == "step" else B * H  # independent draws
    assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
    same_over_time = np.all(kept == kept[:1])
    assert same_over_time == (kind == "locked")
    if kind == "step":  # neighbouring steps independent: P(kept at t and t+1) = keep²
        assert abs(np.mean(kept[1:] & kept[:-1]) - keep ** 2) < 5 * np.sqrt(keep * (1 - keep) / n)
    assert not np.array_equal(kept, np.asarray(dropout.dropout(x, key, 1 - keep, 1, locked)) != 0)
    # Rows 8..15 of a batch of 32 (one device's share) get those rows of the full mask.
    part = np.asarray(dropout.dropout(x[:, 8:16], key, 1 - keep, 0, locked, batch_rows=(8, B)))
    np.testing.assert_array_equal(part, y[:, 8:16])


def test_locked_dropout_trains_and_is_off_without_a_key():
    model = _model("lstm", dropout=0.5, dropout_mask="locked")
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)
    carry = model.initial_carry(3)
    plain = _model("lstm")(params, carry, tokens)[1]
    np.testing.assert_array_equal(model(params, carry, tokens)[1], plain)  # eval: no dropout
    dropped = model(params, carry, tokens, dropout_key=jax.random.key(2))[1]
    assert not np.allclose(dropped, plain)
