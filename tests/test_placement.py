"""Where clipping sits (optim.clip_at), each placement against its equation.

bptt against a hand-computed clipped recursion, the derived and tuned backward
passes and the autodiff path; update against optax.chain(base, clip); example
against per-row gradients taken one row at a time. The two checks that run in
child processes (device on 4 CPU devices, the launcher's bptt run) are in
test_placement_runs.py, a file of its own so that the test runner's two workers
(``--dist loadfile``) share the slow parts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from charrnn import data, models, optim, scan
from charrnn import step as step_lib
from charrnn.cells.base import Cell


class Linear(Cell):
    """h_t = zx_t + zh_t: the BPTT recursion is plain linear algebra."""
    num_gates = 1

    def update(self, params, h, zx, zh):
        h = zx + zh
        return h, h


def _hand_clipped_bptt(w_xh, w_hh, b, xs, h0, c, tau):
    """numpy: the gradients of L = Σ_t <c_t, h_t> through h_t = x_t W_xh + b + h_{t-1} W_hh
    with every step's cotangent δ_t = ∂L/∂z_t clipped into [−τ, τ] before it moves on."""
    T = xs.shape[0]
    hs = [h0]
    for t in range(T):
        hs.append(xs[t] @ w_xh + b + hs[-1] @ w_hh)
    d_w_xh, d_w_hh, d_b = np.zeros_like(w_xh), np.zeros_like(w_hh), np.zeros_like(b)
    dh, clipped = np.zeros_like(h0), 0
    for t in reversed(range(T)):
        delta = dh + c[t]  # ∂L/∂h_t = ∂L/∂z_t (linear)
        clipped += int(np.any(np.abs(delta) > tau, axis=-1).sum())
        delta = np.clip(delta, -tau, tau)
        d_w_xh += xs[t].T @ delta
        d_w_hh += hs[t].T @ delta
        d_b += delta.sum(axis=0)
        dh = delta @ w_hh.T  # the clipped cotangent carried to step t-1
    return d_w_xh, d_w_hh, d_b, dh, clipped


def test_bptt_value_clip_is_the_hand_computed_clipped_recursion():
    rng = np.random.default_rng(0)
    T, B, E, H = 3, 2, 2, 2
    w_xh = rng.normal(size=(E, H)).astype(np.float32)
    w_hh = np.array([[1.5, 0.4], [-0.3, 1.2]], np.float32)  # growing: later cotangents clip
    b = rng.normal(size=H).astype(np.float32)
    xs = rng.normal(size=(T, B, E)).astype(np.float32)
    h0 = rng.normal(size=(B, H)).astype(np.float32)
    c = rng.normal(size=(T, B, H)).astype(np.float32)
    tau = 1.3

    def loss(params, h0, tau):
        _, ys = scan.recurrence(Linear(), params, h0, xs,
                                clip=scan.CotangentClip("value", tau))
        return jnp.sum(ys * c)

    params = {"W_xh": w_xh, "W_hh": w_hh, "b": b}
    grads, dh0, count = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, h0, jnp.float32(tau))
    d_w_xh, d_w_hh, d_b, dh, clipped = _hand_clipped_bptt(w_xh, w_hh, b, xs, h0, c, tau)
    assert 0 < clipped < T * B  # some cotangents clipped, some not
    np.testing.assert_allclose(grads["W_hh"], d_w_hh, rtol=1e-5)
    np.testing.assert_allclose(grads["W_xh"], d_w_xh, rtol=1e-5)
    np.testing.assert_allclose(grads["b"], d_b, rtol=1e-5)
    np.testing.assert_allclose(dh0, dh, rtol=1e-5)
    assert float(count) == clipped  # the count travels as τ's cotangent
    # Clipping only the gradient that reaches the weights (not the recursion) differs.
    unclipped = _hand_clipped_bptt(w_xh, w_hh, b, xs, h0, c, np.inf)
    assert not np.allclose(np.clip(unclipped[1], -tau, tau), d_w_hh, rtol=1e-3)


def _layer(name, H=8, E=5, B=3, T=7, seed=0):
    """A layer's parameters, a carry, inputs and output weights for a random loss."""
    k = jax.random.split(jax.random.key(seed), 4)
    module = models.cell_module(name, H)
    carry = jax.tree.map(lambda a: jax.random.normal(k[0], a.shape), module.initial_carry(B))
    xs = jax.random.normal(k[1], (T, B, E))
    params = module.init(k[2], carry, xs[0])["params"]
    return module.cell, params, carry, xs, jax.random.normal(k[3], (T, B, H))


@pytest.mark.parametrize("name", ["lstm", "gru"])
@pytest.mark.parametrize("rule", ["value", "global_norm"])
def test_derived_and_tuned_backward_clip_alike(name, rule):
    cell, params, carry, xs, c = _layer(name)
    assert cell.tuned_backward is not None

    def grads(derived, tau):
        def loss(params, tau):
            _, ys = scan.recurrence(cell, params, carry, xs, derived=derived,
                                    clip=scan.CotangentClip(rule, tau))
            return jnp.sum(ys * c)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.float32(tau))

    tau = 0.8 if rule == "value" else 1.2
    (tuned, count), (derived, count_derived) = grads(False, tau), grads(True, tau)
    assert 0 < float(count) < 7 * 3  # the premise: clipping is active, not everywhere
    assert float(count) == float(count_derived)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(derived)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    unclipped, _ = grads(False, np.inf)
    assert not np.allclose(unclipped["W_hh"], tuned["W_hh"], rtol=1e-3)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_fast_path_equals_autodiff_under_bptt_clipping(name):
    V, B, T = 11, 3, 6
    k = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(k[0], (B, T), 0, V)
    targets = jax.random.randint(k[1], (B, T), 0, V)
    clip = scan.CotangentClip("value", jnp.float32(0.01))

    def grads(fast):
        model = models.CharRNN(vocab_size=V, cell=name, hidden_size=8, num_layers=2,
                               embed_dim=4, fast_vjp=fast)
        params = model.init(k[2])
        loss = lambda p, clip: step_lib.loss_fn(p, model, model.initial_carry(B), tokens,
                                                targets, clip=clip)[0]
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, clip)

    (fast, count), (reference, count_ref) = grads(True), grads(False)
    assert 0 < float(count.tau) < 2 * B * T
    assert float(count.tau) == float(count_ref.tau)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _config(smoke_config, **optim_fields):
    smoke_config.train.reset_prob = 0.0
    for field, value in optim_fields.items():
        smoke_config.optim[field] = value
    return smoke_config


def _setup(config):
    text = open(config.data.path).read()
    vocab = data.Vocab.from_text(text)
    batcher = data.Batcher(vocab.encode(text), config.train.batch_size, config.train.seq_len,
                           config.seed)
    model = models.CharRNN.from_config(config.model, vocab.size)
    optimizer = optim.Optimizer.from_config(config)
    state = step_lib.init_state(model, optimizer, config.train.batch_size, config.seed)
    return model, optimizer, state, batcher


def _train(config, steps):
    model, optimizer, state, batcher = _setup(config)
    step_fn = step_lib.make_train_step(model, optimizer)
    out = []
    for _ in range(steps):
        state, m = step_fn(state, batcher.next_batch())
        out.append(jax.device_get(m))
    return state, out


def test_bptt_above_every_cotangent_is_gradient_with_none(smoke_config):
    """Plain SGD at learning rate 1, so each step moves the parameters by the gradient itself
    (Adam would hide a gradient scaled by a constant). The two are different programs, so
    they agree to rounding, not bit for bit: the tests' XLA flags (tests/conftest.py) round
    them differently in the last bit of a few elements."""
    sgd = {"name": "sgd", "learning_rate": 1.0, "momentum": 0.0}
    bptt, m_bptt = _train(_config(smoke_config.copy_and_resolve_references(), clip_at="bptt",
                                  clip_mode="value", clip_norm=1e30, **sgd), 2)
    plain, m_plain = _train(_config(smoke_config, clip_at="gradient", clip_mode="none", **sgd),
                            2)
    for a, b in zip(jax.tree.leaves(bptt.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in m_bptt],
                               [m["grad_norm"] for m in m_plain], rtol=1e-5)
    assert all(m["bptt_clip_fraction"] == 0 and not m["clipped"] for m in m_bptt)


def test_update_placement_is_optax_chain_of_base_then_clip():
    tau = 0.01
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    config = _optim_config("update", "global_norm", tau)
    optimizer = optim.Optimizer.from_config(config)
    reference = optax.chain(optax.adam(0.1), optax.clip_by_global_norm(tau))
    state, ref_state = optimizer.init(params), reference.init(params)
    for k in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(p * (k + 1)), params)
        step = optimizer.update(grads, state, params)
        expected, ref_state = reference.update(grads, ref_state, params)
        state = step.state
        for a, b in zip(jax.tree.leaves(step.updates), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)
        assert float(optim.global_norm(step.updates)) <= tau * (1 + 1e-6)
        assert float(step.metrics["update_norm"]) > tau and bool(step.changed)


def _optim_config(clip_at, rule, tau, name="adam", lr=0.1):
    from experiments.configs import default
    config = default.get_config("smoke")
    config.optim.name, config.optim.learning_rate = name, lr
    config.optim.clip_at, config.optim.clip_mode, config.optim.clip_norm = clip_at, rule, tau
    return config


def _one_sgd_step(config, batch):
    """(params before, params after) of one train step with SGD at learning rate 1."""
    config.optim.name, config.optim.learning_rate, config.optim.momentum = "sgd", 1.0, 0.0
    model, optimizer, state, _ = _setup(config)
    before = jax.tree.map(np.asarray, state.params)
    state, m = jax.jit(lambda s, b: step_lib.train_step(s, b, model=model,
                                                        optimizer=optimizer))(state, batch)
    return model, before, jax.device_get(state.params), m


def test_example_placement_is_the_mean_of_rows_clipped_one_at_a_time(smoke_config):
    config = _config(smoke_config, clip_at="example", clip_mode="global_norm")
    model, _, state, batcher = _setup(config)
    batch, params, B = batcher.next_batch(), state.params, config.train.batch_size
    # Each row alone: a batch of one, from the zero state.
    row_grad = jax.jit(jax.grad(lambda p, x, y: step_lib.loss_fn(
        p, model, model.initial_carry(1), x, y)[0]))
    rows = [row_grad(params, batch["x"][b:b + 1], batch["y"][b:b + 1]) for b in range(B)]
    norms = sorted(float(optim.global_norm(g)) for g in rows)
    tau = (norms[1] + norms[2]) / 2  # two rows clipped, two not
    clip = optax.clip_by_global_norm(tau)
    mean = jax.tree.map(lambda *g: sum(g) / B, *(clip.update(g, None)[0] for g in rows))
    config.optim.clip_norm = tau
    _, before, after, m = _one_sgd_step(config, batch)
    assert float(m["example_clip_fraction"]) == 0.5
    for p0, p1, g in zip(*(jax.tree.leaves(t) for t in (before, after, mean))):
        np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=1e-6)
    # Clipping the mean instead (clip_at=gradient) is another update, far outside that.
    whole = clip.update(jax.tree.map(lambda *g: sum(g) / B, *rows), None)[0]
    assert max(float(np.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(whole), jax.tree.leaves(mean))) > 1e-4


def test_example_with_one_row_is_gradient(smoke_config):
    smoke_config.train.batch_size = 1
    config = _config(smoke_config, clip_mode="global_norm", clip_norm=0.2)
    batch = _setup(config)[3].next_batch()
    config.optim.clip_at = "gradient"
    *_, gradient, m = _one_sgd_step(config.copy_and_resolve_references(), batch)
    config.optim.clip_at = "example"
    *_, example, _ = _one_sgd_step(config, batch)
    assert bool(m["clipped"])
    for a, b in zip(jax.tree.leaves(gradient), jax.tree.leaves(example)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_placement_is_a_grid_axis_and_part_of_the_group_key(ablation_config):
    from charrnn import sweep
    s = ablation_config.sweep
    s.cells, s.optimizers, s.seeds = ("lstm",), ("sgd",), (0,)
    s.rules, s.strengths = ("none", "global_norm", "agc"), {"global_norm": ("1",), "agc": ("0.1",)}
    s.placements = ("gradient", "bptt", "example")
    runs = sweep.make_grid(s)
    assert [(r.rule, r.clip_at) for r in runs] == [
        ("none", "gradient"),  # no clipping: once
        ("global_norm", "gradient"), ("global_norm", "bptt"), ("global_norm", "example"),
        ("agc", "gradient"), ("agc", "example")]  # bptt takes value and global_norm only
    # The rules of a placement share a program (their index a runtime value), except at
    # bptt, where the rule acts inside the backward pass; the default placement keeps the
    # key it had before placements existed.
    assert {r.group for r in runs} == {("lstm", "sgd"), ("global_norm", "lstm", "sgd", "bptt"),
                                       ("lstm", "sgd", "example")}
    assert len({r.name for r in runs}) == len(runs)
    assert runs[2].name.endswith("-at_bptt") and runs[1].name == "lstm-sgd-lr1-seed0-global_norm_1"
    assert sweep.run_config(ablation_config, runs[2], 1.0).optim.clip_at == "bptt"
    s.placements = ("gradient", "weights")
    with pytest.raises(sweep.SweepError, match="unknown placement 'weights'"):
        sweep.make_grid(s)


def test_one_program_of_a_placement_equals_its_runs_alone(ablation_config):
    """Two strengths of clipping inside BPTT in one vmapped program = each run alone (the
    threshold a traced value of the backward pass)."""
    from charrnn import sweep
    corpus = sweep.Corpus.from_config(ablation_config)
    runs = [sweep.Run("rnn", "sgd", seed, label, "value", 0.5, "bptt")
            for seed, label in enumerate(("0.05", "100"))]
    configs = [sweep.run_config(ablation_config, r, float(r.strength)) for r in runs]
    group = sweep.run_group(configs, [0.05, 100.0], corpus, runs_per_chunk=0, num_steps=2)
    for config, got in zip(configs, group):
        alone = sweep.run_single(config, corpus, num_steps=2)
        for key in ("loss", "grad_norm", "val_loss"):
            np.testing.assert_allclose(got[key], alone[key], rtol=2e-5, err_msg=key)
        np.testing.assert_array_equal(got["clipped"], alone["clipped"])
    assert group[0]["clipped"].all() and not group[1]["clipped"].any()
