"""Every registered clipping rule on tiny pytrees, against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from charrnn import clipping

GRADS = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array([[4.0]])}}  # ||g|| = 5


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _apply(rule, grads, strength=None, params=None, **settings):
    tx = clipping.RULES[rule].make(strength, **settings)
    return tx.update(grads, tx.init(grads), params)[0]


def _cosine(a, b):
    a, b = _flat(a), _flat(b)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_the_registry_holds_the_rules_and_the_default_config_their_fields():
    assert set(clipping.RULES) == {"none", "global_norm", "value", "agc", "block_rms",
                                   "autoclip", "zclip"}
    from experiments.configs import default
    optim = default.get_config().optim
    for field, value in clipping.config_fields().items():
        assert optim[field] == value, field  # the defaults are the registry's
    for rule in clipping.RULES.values():  # each has its math and a reference
        assert "References:" in rule.factory.__doc__, rule.name


def test_none_changes_nothing_and_its_threshold_is_infinite():
    np.testing.assert_array_equal(_flat(_apply("none", GRADS)), _flat(GRADS))
    clip = clipping.from_config(ml_collections.ConfigDict({"clip_mode": "none"}))
    assert math.isinf(float(clip.threshold(clip.transform.init(GRADS))))


@pytest.mark.parametrize("tau", [0.5, 2.5])
def test_global_norm_scales_to_tau_and_keeps_the_direction(tau):
    clipped = _apply("global_norm", GRADS, tau)
    np.testing.assert_allclose(_flat(clipped), _flat(GRADS) * tau / 5.0, rtol=1e-6)
    assert _cosine(GRADS, clipped) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(_flat(_apply("global_norm", GRADS, 5.0)), _flat(GRADS))


def test_value_bounds_each_component():
    g = {"a": jnp.array([3.0, -0.25]), "b": jnp.array([[-4.0]])}
    np.testing.assert_array_equal(_flat(_apply("value", g, 1.0)), [1.0, -0.25, -1.0])


def test_agc_unit_by_unit():
    # Kernel [in=2, out=2]: a unit is a column. Column 0: ||W|| = 5, ||G|| = 10, ratio 2 > λ = 1:
    # G scaled to λ·5 = norm 5, i.e. halved. Column 1: ||W|| = 1, ||G|| = 0.5, ratio 0.5: kept.
    # Bias (a vector is one unit): ||W|| = 0 -> max(0, 1e-3); ||G|| = 0.5 -> scaled to 1e-3.
    params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "bias": jnp.zeros(2)}
    grads = {"w": jnp.array([[6.0, 0.0], [8.0, 0.5]]), "bias": jnp.array([0.3, 0.4])}
    clipped = _apply("agc", grads, 1.0, params)
    np.testing.assert_allclose(clipped["w"], [[3.0, 0.0], [4.0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(clipped["bias"], [0.3 * 2e-3, 0.4 * 2e-3], rtol=1e-5)


def test_block_rms_tensor_by_tensor():
    # rms([3, 4]) = sqrt(12.5) > 1: divided by it; rms([[0.5]]) = 0.5 <= 1: kept.
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.5]])}
    clipped = _apply("block_rms", g, 1.0)
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) / math.sqrt(12.5), rtol=1e-6)
    np.testing.assert_array_equal(clipped["b"], [[0.5]])


@pytest.mark.parametrize("rule,strength", [("global_norm", 1.0), ("value", 1.0),
                                           ("block_rms", 1.0), ("agc", 0.5)])
def test_stateless_rules_are_idempotent(rule, strength):
    params = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5]])}}
    once = _apply(rule, GRADS, strength, params)
    assert not np.allclose(_flat(once), _flat(GRADS))  # it did clip
    np.testing.assert_allclose(_flat(_apply(rule, once, strength, params)), _flat(once),
                               rtol=1e-6)


def _norm_sequence(rule, norms, strength, **settings):
    """Feed gradients of the given norms (all along one direction); return
    (clipped norms, thresholds, states, cosines)."""
    tx = clipping.RULES[rule].make(strength, **settings)
    direction = {"a": jnp.array([0.6, 0.0]), "b": {"c": jnp.array([[0.8]])}}  # unit norm
    state = tx.init(direction)
    out, thresholds, states, cosines = [], [], [], []
    update = jax.jit(tx.update)
    for n in norms:
        g = jax.tree.map(lambda d: d * n, direction)
        clipped, state = update(g, state)
        out.append(float(np.linalg.norm(_flat(clipped))))
        thresholds.append(float(state.threshold))
        states.append(state)
        cosines.append(_cosine(g, clipped))
    return np.array(out), np.array(thresholds), states, np.array(cosines)


def test_autoclip_threshold_is_the_percentile_of_a_bounded_history():
    # H = 3, p = 50 (the median), the current norm joins the history first:
    # [3] -> 3; [3, 1] -> 2; [3, 1, 4] -> 3; ring [1, 1, 4] -> 1; ring [1, 5, 4] -> 4.
    norms = [3.0, 1.0, 4.0, 1.0, 5.0]
    clipped, thresholds, states, cosines = _norm_sequence("autoclip", norms, 50.0, history=3)
    np.testing.assert_allclose(thresholds, [3.0, 2.0, 3.0, 1.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(clipped, [3.0, 1.0, 3.0, 1.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-6)  # norm-type: direction kept
    np.testing.assert_allclose(states[-1].history, [1.0, 5.0, 4.0])
    assert int(states[-1].count) == 5


@pytest.mark.parametrize("p", [0.5, 10.0, 37.0, 90.0, 100.0])
def test_the_jitted_percentile_is_numpys(p):
    values = np.random.default_rng(0).lognormal(size=16).astype(np.float32)
    for n in (1, 2, 7, 16):
        got = float(jax.jit(clipping.percentile_of_first)(jnp.asarray(values), n, p))
        assert got == pytest.approx(float(np.percentile(values[:n], p)), rel=1e-5)


def test_zclip_statistics_and_threshold_after_a_known_sequence():
    alpha, z_thr, eps = 0.5, 1.0, clipping.ZCLIP_EPS
    norms = [1.0, 2.0, 3.0, 10.0, 2.0]
    clipped, thresholds, states, cosines = _norm_sequence("zclip", norms, z_thr, alpha=alpha,
                                                          warmup=3)
    # Warm-up: no clipping, no threshold; then μ, σ² of [1, 2, 3].
    np.testing.assert_allclose(clipped[:3], norms[:3], rtol=1e-6)
    assert np.all(np.isinf(thresholds[:3]))
    mu, var = 2.0, 2.0 / 3.0
    assert float(states[2].mean) == pytest.approx(mu) and float(states[2].var) == pytest.approx(var)
    # Step 4: z = 8/(σ+ε) > 1, a spike: clipped to μ + z_thr·σ/(z/z_thr), fed back.
    sigma = math.sqrt(var)
    z = (10.0 - mu) / (sigma + eps)
    target = mu + z_thr * sigma / (z / z_thr)
    assert target == pytest.approx(2.0 + 1.0 / 12.0, rel=1e-5)
    assert clipped[3] == pytest.approx(target, rel=1e-5)
    assert thresholds[3] == pytest.approx(mu + z_thr * (sigma + eps), rel=1e-6)
    mu4 = alpha * mu + (1 - alpha) * target
    var4 = alpha * var + (1 - alpha) * (target - mu4) ** 2
    assert float(states[3].mean) == pytest.approx(mu4, rel=1e-6)
    assert float(states[3].var) == pytest.approx(var4, rel=1e-5)
    # Step 5: z < 0, kept; the EMA takes the norm itself.
    assert clipped[4] == pytest.approx(2.0, rel=1e-6)
    assert float(states[4].mean) == pytest.approx(alpha * mu4 + (1 - alpha) * 2.0, rel=1e-6)
    assert thresholds[4] == pytest.approx(mu4 + z_thr * (math.sqrt(var4) + eps), rel=1e-5)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-6)


@pytest.mark.parametrize("rule,strength,settings", [
    ("global_norm", 0.7, {}), ("value", 0.3, {}), ("agc", 0.2, {}), ("block_rms", 0.4, {}),
    ("autoclip", 30.0, {"history": 4}), ("zclip", 1.5, {"warmup": 2, "alpha": 0.9})])
def test_a_traced_strength_gives_what_a_constant_does(rule, strength, settings):
    """The sweep passes strengths as runtime arrays (vmapped over runs)."""
    params = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5]])}}
    seq = [jax.tree.map(lambda g: g * s, GRADS) for s in (1.0, 0.2, 3.0, 0.5)]

    def run(tau):
        tx = clipping.RULES[rule].make(tau, **settings)
        state, outs = tx.init(params), []
        for g in seq:
            out, state = tx.update(g, state, params)
            outs.append(out)
        return outs

    constant = run(strength)
    vmapped = jax.jit(jax.vmap(run))(jnp.array([strength, 2 * strength], jnp.float32))
    for c, v in zip(constant, vmapped):
        np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[0], v)), _flat(c), rtol=1e-6)


def test_a_switch_steps_the_chosen_rule_and_only_its_state():
    """clipping.switch with every rule, the rule a runtime index per run (vmapped: every
    branch computed, each run's selected): each run's output and threshold are its own
    rule's, and the other rules' states stay as they were initialised."""
    names = tuple(clipping.RULES)
    optim = _optim(autoclip_history=4, zclip_warmup=2, zclip_alpha=0.9)
    strengths = {"none": math.inf, "global_norm": 0.7, "value": 0.3, "agc": 0.2,
                 "block_rms": 0.4, "autoclip": 30.0, "zclip": 1.5}
    params = {"a": jnp.array([1.0, -2.0]), "b": {"c": jnp.array([[0.5]])}}
    seq = [jax.tree.map(lambda g: g * s, GRADS) for s in (1.0, 0.2, 3.0, 0.5)]

    def run(clip):
        state, outs = clip.transform.init(params), []
        for g in seq:
            out, state = clip.transform.update(g, state, params)
            outs.append((out, clip.threshold(state)))
        return outs, state

    packed = jax.jit(jax.vmap(lambda i, tau: run(clipping.switch(names, i, tau, optim))))(
        jnp.arange(len(names)), jnp.array([strengths[n] for n in names], jnp.float32))
    initial = clipping.switch(names, 0, 1.0, optim).transform.init(params)
    for i, name in enumerate(names):
        rule = clipping.RULES[name]
        alone, state = run(clipping.from_rule(name, None if rule.strength is None
                                              else strengths[name],
                                              **clipping.settings_of(rule, optim)))
        got = jax.tree.map(lambda x: x[i], packed)
        for (out, threshold), (want, want_threshold) in zip(got[0], alone):
            np.testing.assert_allclose(_flat(out), _flat(want), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(threshold, want_threshold, rtol=1e-6, err_msg=name)
        for j, own in enumerate(got[1]):
            expected = state if j == i else initial[j]
            assert jax.tree.structure(own) == jax.tree.structure(expected)
            for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(expected)):
                np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"{name}: {names[j]}")
    # the rules acted differently on these gradients (else the test could not tell them apart)
    assert len({tuple(np.round(_flat(jax.tree.map(lambda x: x[i], packed[0][2][0])), 5))
                for i in range(len(names))}) == len(names)


def _optim(**kw):
    return ml_collections.ConfigDict({"clip_mode": "global_norm", **kw})


@pytest.mark.parametrize("fields,message", [
    ({"clip_mode": "norm"}, "unknown optim.clip_mode 'norm'; choose from none, global_norm, "
                            "value, agc, block_rms, autoclip, zclip"),
    ({"clip_norm": 0.0}, "optim.clip_norm must be a positive number with "
                         "optim.clip_mode=global_norm, got 0.0"),
    ({"clip_mode": "agc", "clip_norm": -1.0}, "optim.clip_norm must be a positive number"),
    ({"clip_mode": "autoclip", "autoclip_percentile": 0.0},
     "optim.autoclip_percentile must be in (0, 100]"),
    ({"clip_mode": "autoclip", "autoclip_percentile": 101}, "in (0, 100]"),
    ({"clip_mode": "autoclip", "autoclip_history": 0}, "optim.autoclip_history must be an "
                                                       "integer >= 1"),
    ({"clip_mode": "zclip", "zclip_z": 0.0}, "optim.zclip_z must be a positive number"),
    ({"clip_mode": "zclip", "zclip_alpha": 1.0}, "optim.zclip_alpha must be in (0, 1)"),
    ({"clip_mode": "zclip", "zclip_warmup": 2.5}, "optim.zclip_warmup must be an integer"),
])
def test_bad_settings_are_named(fields, message):
    problems = clipping.config_problems(_optim(**fields))
    assert len(problems) == 1 and message in problems[0]


def test_settings_of_other_rules_are_not_checked():
    assert clipping.config_problems(_optim(clip_norm=1.0, zclip_alpha=5.0)) == []
    assert clipping.config_problems(_optim(clip_mode="none", clip_norm=-1.0)) == []
