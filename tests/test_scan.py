"""The derived scan VJPs of charrnn.scan against plain autodiff of the Flax modules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAST_AND_ONE_AUTODIFF
from charrnn import models, scan

V, B, T = 11, 3, 6


def _model(cell, **kw):
    kw = {"hidden_size": 8, "num_layers": 2, "embed_dim": 4, **kw}
    return models.CharRNN(vocab_size=V, cell=cell, **kw)


def _random_carry(model, key):
    leaves, tree = jax.tree.flatten(model.initial_carry(B))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, c.shape) for k, c in zip(keys, leaves)])


def _loss(model, params, carry, tokens, targets, dropout_key=None):
    """Cross-entropy plus a term on the final carry, so its cotangent is not zero."""
    new_carry, logits = model(params, carry, tokens, dropout_key)
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    return ce + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(new_carry))


def _grads(model, key=0, dropout_key=None, batch=B):
    k = jax.random.split(jax.random.key(key), 4)
    params = model.init(k[0])
    carry = _random_carry(model, k[1])
    carry = jax.tree.map(lambda c: c[:batch], carry)
    tokens = jax.random.randint(k[2], (batch, T), 0, V)
    targets = jax.random.randint(k[3], (batch, T), 0, V)
    fn = jax.value_and_grad(lambda p, c: _loss(model, p, c, tokens, targets, dropout_key), (0, 1))
    return jax.jit(fn)(params, carry)


def _assert_trees_close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", models.CELLS)
def test_fast_vjp_gradients_equal_autodiff_of_the_cells(cell):
    loss_ref, grads_ref = _grads(_model(cell, fast_vjp=False))
    loss_fast, grads_fast = _grads(_model(cell, fast_vjp=True))
    assert float(loss_fast) == pytest.approx(float(loss_ref), abs=1e-5)
    _assert_trees_close(grads_fast, grads_ref)  # params and the initial carry
    assert float(jnp.abs(grads_ref[0]["layer_0"]["W_hh"]).max()) > 1e-3  # not vacuous


def test_dropout_is_the_same_on_both_paths():
    key = jax.random.key(7)
    model = _model("lstm", num_layers=1, dropout=0.5)
    loss_ref, grads_ref = _grads(dataclasses.replace(model, fast_vjp=False), dropout_key=key)
    loss_fast, grads_fast = _grads(model, dropout_key=key)
    _assert_trees_close((loss_fast, grads_fast), (loss_ref, grads_ref))
    _, grads_off = _grads(model)
    assert not np.allclose(grads_off[0]["head"]["kernel"], grads_fast[0]["head"]["kernel"])


def test_large_vocabulary_projects_embeddings_instead_of_the_table():
    # V > T*B: layer 0 multiplies the looked-up embeddings (no [V, G*H] table).
    model = _model("gru", num_layers=1, fast_vjp=True)
    assert V > T * 1
    _, grads_ref = _grads(dataclasses.replace(model, fast_vjp=False), batch=1)
    _, grads_fast = _grads(model, batch=1)
    _assert_trees_close(grads_fast, grads_ref)


def test_remat_changes_memory_not_numbers():
    model = _model("lstm", num_layers=1)
    reference = _grads(model)
    _assert_trees_close(_grads(dataclasses.replace(model, remat=True)), reference)
    _assert_trees_close(_grads(dataclasses.replace(model, remat=True, fast_vjp=False)), reference)


def test_chunk_length_divides_t_near_its_square_root():
    assert models._chunk_length(1024) == 32
    assert models._chunk_length(128) in (8, 16)
    assert models._chunk_length(6) in (2, 3)
    assert models._chunk_length(7) == 1


def test_bfloat16_matmul_rounds_the_operands_and_accumulates_in_float32():
    a, b = jax.random.normal(jax.random.key(0), (5, 7)), jax.random.normal(jax.random.key(1), (7, 3))
    rounded = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
    out = scan.matmul(a, b, jnp.bfloat16)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, rounded(a) @ rounded(b), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, a @ b, rtol=1e-6, atol=1e-6)  # the rounding did happen
    np.testing.assert_array_equal(scan.matmul(a, b), a @ b)  # float32: the plain product


@pytest.mark.parametrize("rows", [12, 13])  # 13: prime, no 3-D view
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_copy_is_the_transpose(rows, dtype):
    x = jax.random.normal(jax.random.key(2), (rows, 5))
    out = jax.jit(lambda x: scan._transposed(x, dtype))(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, x.T.astype(dtype))


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("cell,fast_vjp", FAST_AND_ONE_AUTODIFF)
def test_bfloat16_matmuls_stay_close_to_float32(cell, fast_vjp):
    """Only the products' operands are rounded (8 significant bits): loss and every
    gradient stay close to float32's, on both the scan and the autodiff path."""
    loss32, grads32 = _grads(_model(cell, fast_vjp=fast_vjp))
    loss16, grads16 = _grads(_model(cell, fast_vjp=fast_vjp, matmul_dtype="bfloat16"))
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    assert float(loss16) != float(loss32)
    for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
        assert g16.dtype == jnp.float32
        assert _cosine(g16, g32) > 0.999


@pytest.mark.parametrize("fast_vjp", [True, False])
def test_unrolling_changes_speed_not_results(fast_vjp, monkeypatch):
    """model.unroll (time steps per loop iteration; 'auto' = 8 on an accelerator) gives the
    loss and gradients of one step per iteration, on the fast path and the reference."""
    loss_one, grads_one = _grads(_model("lstm", fast_vjp=fast_vjp, unroll=1))
    loss_four, grads_four = _grads(_model("lstm", fast_vjp=fast_vjp, unroll=4))
    assert float(loss_four) == pytest.approx(float(loss_one), abs=1e-6)
    _assert_trees_close(grads_four, grads_one, tol=1e-6)
    assert models.resolve_unroll("3") == 3 and models.resolve_unroll("auto") == 1  # on a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert models.resolve_unroll("auto") == models.ACCELERATOR_UNROLL
