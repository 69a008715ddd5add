"""The start state (model.start_state), random restarts (train.reset_prob) and the
start_loss / context_loss measure of charrnn.start."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import config as config_lib
from charrnn import data, models, optim, restore, sampling, start, train
from charrnn import step as step_lib
from conftest import _SPEECH

TEXT = _SPEECH * 15
VOCAB = data.Vocab.from_text(TEXT)
IDS = VOCAB.encode(TEXT)


def _model(cell="rnn", start_state="learned", **kw):
    return models.CharRNN(VOCAB.size, cell=cell, hidden_size=8, num_layers=1, embed_dim=4,
                          start_state=start_state, **kw)


def _with_start(model, params, seed=1, scale=0.5):
    """params with a nonzero learned start state (a trained one is never exactly zero)."""
    leaves, tree = jax.tree.flatten(params["start"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]
    return {**params, "start": jax.tree.unflatten(tree, drawn)}


def _numpy_rnn_nll(p, h0, x, y):
    """Elman RNN by hand: h_t = tanh(E[x_t] W_xh + b + h_{t-1} W_hh); -log softmax(h W + c)[y]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    layer = p["layer_0"]
    h = np.broadcast_to(h0, (x.shape[0], h0.shape[-1]))
    out = np.zeros(x.shape)
    for t in range(x.shape[1]):
        h = np.tanh(p["embed"][x[:, t]] @ layer["W_xh"] + layer["b"] + h @ layer["W_hh"])
        z = h @ p["head"]["kernel"] + p["head"]["bias"]
        log_z = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        out[:, t] = log_z - z[np.arange(len(z)), y[:, t]]
    return out


def test_start_loss_equals_a_hand_computation():
    model = _model()
    params = _with_start(model, model.init(jax.random.key(0)))
    newline = start.newline_id(VOCAB)
    scalars, curves = start.measure(model, params, IDS, newline)
    # Every newline with 255 characters before it and 64 after it is a line start here.
    s = np.flatnonzero(IDS == newline)
    s = s[(s >= 255) & (s + 64 < len(IDS))]
    assert 100 < len(s) <= start.START_LINES
    h0 = np.asarray(params["start"][0])
    j = np.arange(64)
    by_hand_start = _numpy_rnn_nll(params, h0, IDS[s[:, None] + j], IDS[s[:, None] + j + 1])
    read = s[:, None] + np.arange(-255, 64)
    by_hand_context = _numpy_rnn_nll(params, h0, IDS[read], IDS[read + 1])[:, 255:]
    np.testing.assert_allclose(curves[0], by_hand_start.mean(0), rtol=2e-5)
    np.testing.assert_allclose(curves[1], by_hand_context.mean(0), rtol=2e-5)
    assert scalars["start_loss"] == pytest.approx(by_hand_start[:, :16].mean(), rel=2e-5)
    assert scalars["context_loss"] == pytest.approx(by_hand_context[:, :16].mean(), rel=2e-5)
    assert scalars["start_gap"] == pytest.approx(
        by_hand_start[:, :16].mean() - by_hand_context[:, :16].mean(), abs=1e-5)
    assert scalars["start_gap"] != 0  # the two reads do differ
    assert start.measure(model, params, IDS, None) == (None, None)  # no newline: no measure


def test_line_starts_are_a_fixed_even_choice_over_the_split():
    ids = np.zeros(100, np.int32)
    ids[[2, 9, 10, 30, 50, 70, 80, 96]] = 1
    # context 10: s >= 9; length 4: s + 4 < 100. Candidates 9 10 30 50 70 80 (not 2, 96).
    np.testing.assert_array_equal(data.line_starts(ids, 1, 10, 10, 4), [9, 10, 30, 50, 70, 80])
    # 3 of 6: ranks round(0), round(2.5) = 2, 5 (numpy rounds half to even).
    np.testing.assert_array_equal(data.line_starts(ids, 1, 3, 10, 4), [9, 30, 80])


def test_learned_start_state_gets_gradients_and_changes_with_training(smoke_config):
    smoke_config.model.start_state = "learned"
    model = models.CharRNN.from_config(smoke_config.model, 12)
    optimizer = optim.Optimizer.from_config(smoke_config)
    state = step_lib.init_state(model, optimizer, smoke_config.train.batch_size,
                                smoke_config.seed)
    zero_config = smoke_config.model.copy_and_resolve_references()
    zero_config.start_state = "zero"
    zero = models.CharRNN.from_config(zero_config, 12)
    zero_params = zero.init(jax.random.key(0))
    learned_params = model.init(jax.random.key(0))
    # 'learned' adds params['start'] (zeros) and leaves every other draw as 'zero' makes it.
    assert set(learned_params) - set(zero_params) == {"start"}
    jax.tree.map(np.testing.assert_array_equal, zero_params,
                 {k: v for k, v in learned_params.items() if k != "start"})
    assert all(not np.any(a) for a in jax.tree.leaves(learned_params["start"]))
    rng = np.random.default_rng(0)
    shape = (smoke_config.train.batch_size, smoke_config.train.seq_len)
    batch = {"x": rng.integers(0, 12, shape, dtype=np.int32),
             "y": rng.integers(0, 12, shape, dtype=np.int32), "reset": np.bool_(True)}
    grads = jax.grad(lambda p: step_lib.loss_fn(
        p, model, state.carry, batch["x"], batch["y"],
        restart=jnp.ones(shape[0], bool))[0])(state.params)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads["start"]))
    step_fn = step_lib.make_train_step(model, optimizer)
    for _ in range(3):
        state, _ = step_fn(state, batch)
    assert all(np.any(a != 0) for a in jax.tree.leaves(state.params["start"]))


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_zero_start_restart_inside_the_loss_is_the_old_zeroing(cell):
    """With start_state=zero, restarting rows inside the loss (this step) gives the same
    loss, carry and gradient, to the last bit, as zeroing them before it (the step before)."""
    model = _model(cell, "zero")
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, VOCAB.size, (5, 7), dtype=np.int32) for _ in range(2))
    carry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                         model.initial_carry(5))
    rows = jnp.asarray([True, False, True, False, False])
    pick = lambda c: jnp.where(rows.reshape((-1,) + (1,) * (c.ndim - 1)), 0.0, c)
    old = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(
        params, model, jax.tree.map(pick, carry), x, y)
    new = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(
        params, model, carry, x, y, restart=rows)
    jax.tree.map(np.testing.assert_array_equal, old, new)
    # p = 0 draws nothing: the rows restarted are exactly the epoch's reset.
    for reset in (True, False):
        np.testing.assert_array_equal(
            step_lib.restart_rows(np.bool_(reset), jax.random.key(3), 0.0, 5), [reset] * 5)


def test_restarts_happen_at_the_configured_rate_and_are_per_row():
    p, batch, n_keys = 0.05, 64, 2000
    draw = jax.jit(jax.vmap(lambda k: step_lib.restart_rows(False, k, p, batch)))
    keys = jax.random.split(jax.random.key(0), n_keys)
    rows = np.asarray(draw(keys))
    sigma = math.sqrt(p * (1 - p) / rows.size)
    assert abs(rows.mean() - p) < 4 * sigma  # 4 standard deviations: fails 1 run in 16,000
    per_row = rows.mean(axis=0)  # every stream restarts at the rate ...
    assert np.all(np.abs(per_row - p) < 5 * math.sqrt(p * (1 - p) / n_keys))
    # ... independently: restarts per window vary as a binomial's, B p (1-p) = 3.04, not as
    # one draw shared by the rows would make them (B² p (1-p) = 195).
    assert rows.sum(axis=1).var() < 1.5 * batch * p * (1 - p)
    np.testing.assert_array_equal(step_lib.restart_rows(True, keys[0], p, batch), [True] * batch)
    # One device's share (rows 16..31 of 64) takes exactly those rows of the whole draw.
    share = step_lib.restart_rows(False, keys[0], p, 16, batch_rows=(16, 64))
    np.testing.assert_array_equal(share, rows[0, 16:32])


def test_restarts_happen_only_in_the_drawn_streams(smoke_config):
    smoke_config.model.start_state, smoke_config.train.reset_prob = "learned", 0.5
    smoke_config.train.batch_size = 16
    model = models.CharRNN.from_config(smoke_config.model, 12)
    optimizer = optim.Optimizer.from_config(smoke_config)
    state = step_lib.init_state(model, optimizer, 16, 0)
    rng = np.random.default_rng(0)
    carry = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), state.carry)
    state = state.replace(params=_with_start(model, state.params), carry=carry)
    x = rng.integers(0, 12, (16, smoke_config.train.seq_len), dtype=np.int32)
    params = jax.tree.map(jnp.array, state.params)  # a copy: the step donates the state
    key = step_lib.step_key(state)  # the step's own key: fold_in(key(rng), step)
    expected = np.asarray(step_lib.restart_rows(False, key, 0.5, 16))
    assert 0 < expected.sum() < 16
    carried, _ = model(params, carry, x)
    restarted, _ = model(params, model.start_carry(params, 16), x)
    new, m = step_lib.make_train_step(model, optimizer, reset_prob=0.5)(
        state, {"x": x, "y": x, "reset": np.bool_(False)})
    for got, c, r in zip(jax.tree.leaves(new.carry), jax.tree.leaves(carried),
                         jax.tree.leaves(restarted)):
        np.testing.assert_allclose(got[expected], r[expected], atol=1e-6)
        np.testing.assert_allclose(got[~expected], c[~expected], atol=1e-6)
        assert not np.allclose(c[expected], r[expected], atol=1e-3)  # the two do differ
    assert float(m["restart_fraction"]) == expected.mean()


def test_sampling_and_evaluation_start_from_the_start_state():
    model = _model("lstm")
    params = _with_start(model, model.init(jax.random.key(0)))
    # Priming: the inference step (model.step) run from params['start'] by hand.
    prompt = VOCAB.encode("All:\n")
    carry = jax.tree.map(lambda a: a[None], params["start"])
    weights = model.step_weights(params)
    for token in prompt:
        carry, logits = model.step(weights, carry, jnp.asarray([token]))
    primed, primed_logits = sampling.prime(params, jnp.asarray(prompt), model=model)
    np.testing.assert_allclose(primed_logits, logits, atol=1e-5)
    zero_logits = sampling.prime({k: v for k, v in params.items() if k != "start"},
                                 jnp.asarray(prompt), model=_model("lstm", "zero"))[1]
    assert not np.allclose(zero_logits, logits, atol=1e-3)
    # Evaluation reads every stream from the start state, and stays batch-independent.
    eval_fn = step_lib.make_eval_step(model)
    loss = lambda b, p=params: step_lib.evaluate(eval_fn, model, p, IDS, b, 16)["loss"]
    one = loss(1)
    zeroed = {**params, "start": jax.tree.map(jnp.zeros_like, params["start"])}
    assert abs(loss(1, zeroed) - one) > 1e-5
    for b in (3, 64):
        assert loss(b) == pytest.approx(one, abs=2e-4)


def test_bad_values_are_named(smoke_config):
    for kind in config_lib.CHOICES["model.start_state"]:  # every choice of the schema builds
        models.CharRNN(12, start_state=kind, hidden_size=4, embed_dim=2).init(jax.random.key(0))
    for field, value, message in (
            ("train.reset_prob", 1.0, r"train.reset_prob must be in \[0, 1\), got 1.0"),
            ("train.reset_prob", -0.1, r"train.reset_prob must be in \[0, 1\), got -0.1"),
            ("model.start_state", "random",
             "unknown model.start_state 'random'; choose from zero, learned")):
        config = smoke_config.copy_and_resolve_references()
        group, name = field.split(".")
        config[group][name] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(config)


def test_a_config_without_the_fields_means_zero_and_no_restarts():
    """config.upgrade: a config saved before the fields existed gets their old meaning."""
    old = {"model": {"cell": "lstm"}, "train": {"batch_size": 4}, "optim": {"name": "adam"}}
    new = config_lib.upgrade(old)
    assert (new.model.start_state, new.train.reset_prob) == ("zero", 0.0)
    assert new.model.cell == "lstm" and "start_state" not in old["model"]
    kept = config_lib.upgrade({"model": {"start_state": "learned"}, "train": {"reset_prob": 0.1}})
    assert (kept.model.start_state, kept.train.reset_prob) == ("learned", 0.1)


def test_a_checkpoint_without_the_fields_evaluates_and_samples(smoke_config, tmp_path, capsys):
    """A run saved before model.start_state and train.reset_prob existed (its config lacks
    them) restores, evaluates (start_loss included) and samples from the zero state."""
    del smoke_config.model["start_state"], smoke_config.train["reset_prob"]
    (tmp_path / "long.txt").write_text(_SPEECH * 150)  # val: 2,800 characters, line starts
    smoke_config.data.path = str(tmp_path / "long.txt")
    smoke_config.train.num_steps = 4
    workdir = str(tmp_path / "old")
    train.train_and_evaluate(smoke_config, workdir)
    config, vocab, model, params, _ = restore.load_checkpoint(workdir)
    assert model.start_state == "zero" and config.train.reset_prob == 0.0  # config.upgrade
    assert "start" not in params
    result = restore.evaluate_workdir(workdir)
    assert result["val"]["start_loss"] > 0 and "from start" in capsys.readouterr().out
    text = sampling.sample(workdir, length=20, temperature=0)[0]
    # Greedy from the empty prompt: the zero state primed on a newline, then argmax steps.
    carry, logits = model(params, model.initial_carry(1), jnp.asarray(vocab.encode("\n"))[None])
    assert text[0] == vocab.chars[int(jnp.argmax(logits[0, -1]))]
