"""BPTT Jacobian norms and the clipping cosine tied to their math on small exact cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from charrnn import diagnostics, models, optim
from charrnn import step as step_lib


def _linear_step(w, u):
    def step(h, x):
        h = h @ w + x @ u
        return h, h
    return step


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.0, 1.1])
def test_linear_rnn_with_scaled_identity_gives_rho_to_the_k(rho):
    H, T, B = 6, 12, 2
    step = _linear_step(rho * jnp.eye(H), jnp.ones((3, H)))
    xs = jax.random.normal(jax.random.key(0), (T, B, 3))
    norms = diagnostics.jacobian_norms(step, jnp.zeros((B, H)), xs)
    assert norms.shape == (B, T)
    expected = rho ** np.arange(1, T + 1)
    np.testing.assert_allclose(norms, np.broadcast_to(expected, (B, T)), rtol=1e-5)


def test_linear_rnn_with_scaled_orthogonal_has_slope_log_rho():
    H, T, rho = 8, 20, 1.3
    q = jax.nn.initializers.orthogonal()(jax.random.key(1), (H, H))
    xs = jax.random.normal(jax.random.key(2), (T, 1, H))
    norms = diagnostics.jacobian_norms(_linear_step(rho * q, jnp.eye(H)), jnp.zeros((1, H)), xs)
    np.testing.assert_allclose(norms[0], rho ** np.arange(1, T + 1), rtol=1e-4)
    assert diagnostics.log_slope(norms[0]) == pytest.approx(np.log(rho), abs=1e-5)


def _tanh_cell(w_hh, H, E, key):
    params = {"W_xh": jax.random.normal(key, (E, H)), "W_hh": w_hh, "b": jnp.zeros(H)}
    cell = models.cell_module("rnn", hidden_size=H)
    return params, lambda h, x: cell.apply({"params": params}, h, x)


@pytest.mark.parametrize("scale", [0.9, 1.5, 3.0])
def test_tanh_norms_never_exceed_the_bound(scale):
    # ||∂h_T/∂h_{T-k}|| ≤ Π ||diag(1 - h²)|| ||W_hh|| ≤ ||W_hh||₂^k (γ = 1).
    H, E, T, B = 10, 4, 15, 3
    w = scale * jax.random.normal(jax.random.key(3), (H, H)) / np.sqrt(H)
    _, step = _tanh_cell(w, H, E, jax.random.key(4))
    xs = jax.random.normal(jax.random.key(5), (T, B, E))
    norms = np.asarray(diagnostics.jacobian_norms(step, jnp.zeros((B, H)), xs), np.float64)
    bound = diagnostics.top_singular_value(w) ** np.arange(1, T + 1)
    assert np.all(norms <= bound * (1 + 1e-5))
    assert np.all(norms < bound)  # strictly: tanh' < 1 wherever h ≠ 0


def test_tanh_norms_equal_the_product_of_step_jacobians():
    # ∂h_t/∂h_{t-1} = diag(1 - h_t²) W_hhᵀ in column form; the product over the last k steps.
    H, E, T = 5, 3, 7
    w = jax.random.normal(jax.random.key(6), (H, H)) * 0.8
    params, step = _tanh_cell(w, H, E, jax.random.key(7))
    xs = jax.random.normal(jax.random.key(8), (T, 1, E))
    _, hs = models.reference_scan(step, jnp.zeros((1, H)), xs)
    hs = np.asarray(hs[:, 0], np.float64)
    norms = np.asarray(diagnostics.jacobian_norms(step, jnp.zeros((1, H)), xs))[0]
    product = np.eye(H)
    for k in range(1, T + 1):
        t = T - k  # index of h_{t+1} in hs
        product = product @ (np.diag(1 - hs[t] ** 2) @ np.asarray(w, np.float64).T)
        assert norms[k - 1] == pytest.approx(np.linalg.norm(product, 2), rel=1e-4)


def test_max_k_keeps_the_last_steps_and_lstm_state_is_c_and_h():
    model = models.CharRNN(vocab_size=9, cell="lstm", hidden_size=6, num_layers=2, embed_dim=4)
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 9)
    full = diagnostics.model_jacobian_norms(model, params, tokens, layer=1)
    tail = diagnostics.model_jacobian_norms(model, params, tokens, layer=1, max_k=4)
    assert full.shape == (2, 9) and tail.shape == (2, 4)
    np.testing.assert_allclose(tail, full[:, :4], rtol=1e-5)
    with pytest.raises(ValueError, match="max_k"):
        diagnostics.model_jacobian_norms(model, params, tokens, max_k=10)


def _real_gradient():
    model = models.CharRNN(vocab_size=7, cell="rnn", hidden_size=8, num_layers=1, embed_dim=4)
    params = model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 6), 0, 7)
    grads = jax.grad(lambda p: step_lib.loss_fn(p, model, model.initial_carry(2), x, x)[0])(params)
    return grads, float(optim.global_norm(grads))


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_clipping_a_real_gradient_keeps_its_direction_and_caps_its_norm(fraction):
    grads, g = _real_gradient()
    tau = fraction * g
    # τ as a runtime array, as the sweep passes it, against optax with a Python float.
    clip_traced = jax.jit(lambda gr, t: optax.clip_by_global_norm(t).update(gr, None)[0])
    clipped = clip_traced(grads, jnp.float32(tau))
    reference, _ = optax.clip_by_global_norm(tau).update(grads, None)
    np.testing.assert_allclose(_flat(clipped), _flat(reference), rtol=1e-6, atol=1e-9)
    assert float(diagnostics.tree_cosine(grads, clipped)) == pytest.approx(1.0, abs=1e-6)
    assert float(optim.global_norm(clipped)) == pytest.approx(tau, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, np.inf])  # multiples of ||g||; inf = "none"
def test_clipping_leaves_a_gradient_at_or_below_tau_unchanged(tau):
    grads, g = _real_gradient()
    clipped, _ = optax.clip_by_global_norm(jnp.float32(tau * g)).update(grads, None)
    np.testing.assert_allclose(_flat(clipped), _flat(grads), rtol=1e-6)


def test_cosine_detects_a_turned_gradient():
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}
    by_value, _ = optax.clip(1.0).update(g, None)  # (1, 0, 1): turned
    assert float(diagnostics.tree_cosine(g, by_value)) == pytest.approx(7 / (5 * np.sqrt(2)))
    assert float(diagnostics.tree_cosine(g, jax.tree.map(jnp.zeros_like, g))) == 1.0


def test_train_step_reports_the_clip_cosine(smoke_config):
    from test_train import _batch, _setup
    for mode, below_one in (("global_norm", False), ("value", True)):
        smoke_config.optim.clip_mode, smoke_config.optim.clip_norm = mode, 1e-3
        _, state, step_fn = _setup(smoke_config)
        _, m = step_fn(state, _batch(smoke_config))
        cosine = float(m["clip_cosine"])
        assert (cosine < 0.999) if below_one else cosine == pytest.approx(1.0, abs=1e-6)


def test_spectral_radius_is_the_eigenvalues_not_the_singular_values():
    """A non-normal W_hh: [[0.5, 3], [0, 0.5]] has both eigenvalues 0.5 (triangular) and
    ||W||₂ = (3 + √10)/2 ≈ 3.08 (the square root of the top eigenvalue of WᵀW); in a gated
    cell's [H, 2H] the radius is the largest over the blocks, the singular value the whole's."""
    w = np.array([[0.5, 3.0], [0.0, 0.5]], np.float32)
    assert diagnostics.spectral_radius(w) == pytest.approx(0.5, rel=1e-6)
    assert diagnostics.top_singular_value(w) == pytest.approx((3 + np.sqrt(10)) / 2, rel=1e-6)
    summary = diagnostics.whh_summary({"layer_0": {"W_hh": np.concatenate([w, 0.2 * w], 1)},
                                       "layer_1": {"W_hh": 0.4 * w.T}})
    assert summary["whh_spectral_radius/0"] == pytest.approx(0.5, rel=1e-6)
    assert summary["whh_spectral_radius/1"] == pytest.approx(0.2, rel=1e-6)
    assert summary["whh_top_singular/1"] == pytest.approx(0.4 * (3 + np.sqrt(10)) / 2, rel=1e-6)
    assert summary["whh_top_singular/0"] == pytest.approx(
        np.sqrt(1.04) * (3 + np.sqrt(10)) / 2, rel=1e-6)  # [W, 0.2W]: σ·√(1 + 0.2²)


def test_exploding_gradients_smoke_run_writes_its_outputs(report_smoke):
    """``report.py --smoke --steps=exploding`` (once per session: conftest.ReportSmoke):
    the linear RNN's measured slope is ln ρ for every ρ, the tanh RNN stays under the bound."""
    import csv
    import json
    out = report_smoke.step("exploding")
    result = json.loads((out / "exploding_gradients.json").read_text())
    assert result["settings"]["hidden_size"] == 16 and result["settings"]["seq_len"] == 20
    for s in result["slopes"]:
        assert s["linear_slope"] == pytest.approx(np.log(s["rho"]), abs=1e-5)
        assert s["tanh_max_over_bound"] <= 1 + 1e-5
    with open(out / "jacobian_norms.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["slopes"]) * 2 * 20  # ρ × (linear, tanh) × k = 1..T
    assert (out / "jacobian_slopes.md").read_text() == result["markdown"]
    assert (out / "jacobian_norms.png").stat().st_size > 1000
    assert (out / "jacobian_slopes.csv").is_file()
