"""Each cell against an independent reference; the registry; a user's own cell.

References: flax.linen's SimpleCell (rnn), GRUCell (gru), OptimizedLSTMCell
(lstm) and MGUCell (mgu) with our W_xh / W_hh / b mapped onto their per-gate
Dense kernels; irnn by hand. Same outputs and carries over a sequence.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from charrnn import cells, data, diagnostics, models, restore, sampling, scan, train
from charrnn.cells.base import Cell
from conftest import REPO

B, E, H, T = 3, 5, 4, 7
FIXTURE = os.path.join(REPO, "tests", "fixtures", "old_cell_checkpoints")


def _random_params(cell, key=0, scale=0.7):
    """Random (not initial) parameters of one CellModule, so that no block is trivial."""
    module = models.CellModule(cell, hidden_size=H)
    params = module.init(jax.random.key(key), cell.init_carry(1, H), jnp.zeros((1, E)))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key + 1), len(leaves))
    return module, jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape)
                                             for k, x in zip(keys, leaves)])


def _problem(cell):
    """(module, random params, a random carry, inputs xs [T, B, E]) for gradient checks."""
    module, p = _random_params(cell, scale=0.5)
    xs = jax.random.normal(jax.random.key(3), (T, B, E))
    carry = jax.tree.map(lambda a: 0.3 * jax.random.normal(jax.random.key(4), a.shape),
                         cell.init_carry(B, H))
    return module, p, carry, xs


def _run(step, carry, xs):
    return jax.lax.scan(step, carry, xs)


def _blocks(w, names):
    return dict(zip(names, jnp.split(w, len(names), axis=-1)))


def _flax_reference(name, p):
    """(flax cell, its params) computing what our cell ``name`` with params p computes."""
    if name == "rnn":
        return nn.SimpleCell(features=H), {"i": {"kernel": p["W_xh"], "bias": p["b"]},
                                           "h": {"kernel": p["W_hh"]}}
    if name in ("gru", "mgu"):
        gates = ("r", "z", "n") if name == "gru" else ("f", "n")
        wx, wh, b = (_blocks(p[k], gates) for k in ("W_xh", "W_hh", "b"))
        ref = {f"i{g}": {"kernel": wx[g], "bias": b[g]} for g in gates}
        ref.update({f"h{g}": {"kernel": wh[g]} for g in gates})
        ref["hn"]["bias"] = p["b_hn"]
        return (nn.GRUCell(features=H) if name == "gru" else nn.MGUCell(features=H)), ref
    if name == "lstm":
        gates = ("i", "f", "g", "o")
        wx, wh, b = (_blocks(p[k], gates) for k in ("W_xh", "W_hh", "b"))
        ref = {f"i{g}": {"kernel": wx[g]} for g in gates}
        ref.update({f"h{g}": {"kernel": wh[g], "bias": b[g]} for g in gates})
        return nn.OptimizedLSTMCell(features=H), ref
    raise KeyError(name)


@pytest.mark.parametrize("name", ["rnn", "gru", "mgu", "lstm"])
def test_cell_equals_flax_reference_over_a_sequence(name):
    cell = cells.get(name)
    module, p = _random_params(cell)
    ref_cell, ref_p = _flax_reference(name, p)
    xs = jax.random.normal(jax.random.key(9), (T, B, E))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(jax.random.key(8), a.shape),
                         cell.init_carry(B, H))
    ours = _run(lambda c, x: module.apply({"params": p}, c, x), carry, xs)
    flax_carry = carry  # flax's LSTM carry is (c, h) as ours
    theirs = _run(lambda c, x: ref_cell.apply({"params": ref_p}, c, x), flax_carry, xs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(ours[1])) > 0.1  # not saturated or zero


def test_irnn_is_a_relu_rnn_starting_from_the_identity():
    cell = cells.get("irnn")
    module = models.CellModule(cell, hidden_size=H)
    p = module.init(jax.random.key(0), cell.init_carry(1, H), jnp.zeros((1, E)))["params"]
    np.testing.assert_array_equal(p["W_hh"], np.eye(H))
    np.testing.assert_array_equal(p["b"], np.zeros(H))
    _, p = _random_params(cell)
    xs = np.asarray(jax.random.normal(jax.random.key(9), (T, B, E)))
    h = np.ones((B, H), np.float32)
    hs = []
    for x in xs:
        h = np.maximum(x @ np.asarray(p["W_xh"]) + np.asarray(p["b"]) + h @ np.asarray(p["W_hh"]), 0)
        hs.append(h)
    last, ys = _run(lambda c, x: module.apply({"params": p}, c, x), jnp.ones((B, H)), xs)
    np.testing.assert_allclose(ys, np.stack(hs), rtol=1e-5, atol=1e-6)
    assert (np.stack(hs) == 0).any() and (np.stack(hs) > 0).any()  # both sides of the ReLU


@pytest.mark.parametrize("name", cells.names())
def test_fast_path_gradients_equal_autodiff_of_the_module(name):
    """Per leaf ||g_scan - g_autodiff|| <= 1e-5 ||g_autodiff||, float32."""
    cell = cells.get(name)
    module, p, carry, xs = _problem(cell)

    def loss(run, p, carry, xs):
        last, ys = run(p, carry, xs)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c ** 2) for c in jax.tree.leaves(last))

    fast = lambda p, c, xs: scan.recurrence(cell, p, c, xs, derived=True)
    ref = lambda p, c, xs: _run(lambda c, x: module.apply({"params": p}, c, x), c, xs)
    g_fast = jax.grad(loss, (1, 2, 3))(fast, p, carry, xs)
    g_ref = jax.grad(loss, (1, 2, 3))(ref, p, carry, xs)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        assert float(jnp.linalg.norm(b)) > 0
        assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b))


@pytest.mark.parametrize("name", [n for n in cells.names() if cells.get(n).tuned_forward])
def test_hand_tuned_backward_equals_the_derived_one(name):
    cell = cells.get(name)
    _, p, carry, xs = _problem(cell)

    def loss(derived, p, c, xs):
        last, ys = scan.recurrence(cell, p, c, xs, derived=derived)
        return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(last))

    tuned = jax.grad(loss, (1, 2, 3))(False, p, carry, xs)
    derived = jax.grad(loss, (1, 2, 3))(True, p, carry, xs)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(derived)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", cells.names())
def test_bfloat16_scan_gradients_equal_bfloat16_autodiff(name):
    """Both paths read bfloat16 operands in every product: the gradients agree to
    bfloat16's rounding of the backward products' operands (a few 1e-3), values compared."""
    model = models.CharRNN(11, cell=name, hidden_size=8, num_layers=2, embed_dim=4,
                           matmul_dtype="bfloat16")
    params = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, 11)

    def loss(model, p):
        carry, logits = model(p, model.initial_carry(3), tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + sum(
            jnp.mean(c) for c in jax.tree.leaves(carry))

    g_fast = jax.grad(lambda p: loss(model, p))(params)
    ref = models.CharRNN(11, cell=name, hidden_size=8, num_layers=2, embed_dim=4,
                         matmul_dtype="bfloat16", fast_vjp=False)
    g_ref = jax.grad(lambda p: loss(ref, p))(params)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * scale + 1e-7)
        assert float(jnp.linalg.norm(a - b)) <= 1e-2 * float(jnp.linalg.norm(b)) + 1e-7


# --- checkpoints written before cells were defined once ---------------------------

@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_parameters_written_by_the_old_code_evaluate_and_sample_the_same(name):
    """tests/fixtures/old_cell_checkpoints: a 3-step run of each cell saved by the code before
    cells were defined once (commit a787547)
    (make_fixture.py), with its loss on the text, a greedy sample and init sums."""
    expected = json.load(open(os.path.join(FIXTURE, "expected.json")))[name]
    text = open(os.path.join(FIXTURE, "text.txt")).read()
    flat = dict(np.load(os.path.join(FIXTURE, f"{name}_params.npz")))
    params = {}
    for path, value in flat.items():
        node = params
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    vocab = data.Vocab(expected["vocab"])
    model = models.CharRNN(vocab.size, cell=name, hidden_size=8, num_layers=2, embed_dim=4)
    like = jax.eval_shape(model.init, jax.random.key(0))  # same names and shapes
    assert jax.tree.map(lambda a: a.shape, like) == jax.tree.map(lambda a: a.shape, params)
    ids = jnp.asarray(vocab.encode(text))[None]
    _, logits = model(params, model.initial_carry(1), ids[:, :-1])
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
    assert float(loss) == pytest.approx(expected["loss"], rel=1e-6)
    greedy = sampling.sample(params, vocab, model, prompt="First", length=40, temperature=0)
    assert greedy[0] == expected["greedy"]
    init = model.init(jax.random.key(0))  # the same initial numbers as before
    for path, value in jax.tree_util.tree_flatten_with_path(init)[0]:
        key = "/".join(k.key for k in path)
        assert float(jnp.sum(value)) == pytest.approx(expected["init_sums"][key], abs=1e-5)


# --- the registry and a user's own cell --------------------------------------------

class Leaky(Cell):
    """A user's cell: h_t = (1 - a) h_{t-1} + a tanh(zx_t + zh_t), a = σ(a_logit) per unit."""
    num_gates = 1

    def extra_params(self, hidden_size):
        return {"a_logit": ((hidden_size,), lambda key, shape: jnp.zeros(shape))}

    def update(self, params, h, zx, zh):
        a = jax.nn.sigmoid(params["a_logit"])
        h = (1.0 - a) * h + a * jnp.tanh(zx + zh)
        return h, h


class NoUpdate(Cell):
    num_gates = 1


class WrongCarry(Cell):
    num_gates = 2

    def update(self, params, h, zx, zh):
        return zx, h  # carry [B, 2H] instead of [B, H]


def test_registry_lists_one_file_per_cell():
    assert cells.names() == ("gru", "irnn", "lstm", "mgu", "rnn")
    assert models.CELLS == cells.names()
    assert {n: cells.get(n).num_gates for n in cells.names()} == {
        "gru": 3, "irnn": 1, "lstm": 4, "mgu": 2, "rnn": 1}
    assert cells.get("lstm") is cells.get("lstm")  # one instance per name (jit caches)


@pytest.mark.parametrize("name,message", [
    ("transformer", "unknown model.cell 'transformer'; choose from gru, irnn, lstm, mgu, rnn"),
    ("no_such_module:Cell", "cannot import module 'no_such_module'"),
    ("test_cells:Missing", "module 'test_cells' has no 'Missing'"),
    ("json:loads", "loads is not a subclass of charrnn.cells.Cell"),
    ("test_cells:NoUpdate", "the class defines no update(params, carry, zx, zh)"),
    ("test_cells:WrongCarry", "update returned a carry shaped (2, 6); init_carry gives (2, 3)"),
    ("charrnn.cells.base:Cell", "num_gates must be a positive integer, got 0"),
])
def test_a_bad_cell_name_is_one_clear_error(name, message):
    with pytest.raises(cells.CellError, match=None) as info:
        cells.validate(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_cell_defined_in_the_test_module_trains_and_samples(smoke_config, tmp_path):
    smoke_config.model.cell = "test_cells:Leaky"
    smoke_config.train.num_steps = 10
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(smoke_config, workdir)
    config, vocab, model, params, _ = restore.load_checkpoint(workdir)
    assert config.model.cell == "test_cells:Leaky" and model.fast_vjp
    assert set(params["layer_0"]) == {"W_xh", "W_hh", "b", "a_logit"}
    assert not np.allclose(params["layer_0"]["a_logit"], 0)  # its extra parameter trained
    text = sampling.sample(workdir, prompt="First", length=20, seed=1)[0]
    assert text.startswith("First") and len(text) == 25
    assert set(diagnostics.whh_summary(params)) == {"whh_spectral_radius/0", "whh_top_singular/0"}


def test_diagnostics_find_the_gate_blocks_of_every_cell():
    for name in cells.names():
        params = models.CharRNN(11, cell=name, hidden_size=6, num_layers=1, embed_dim=4).init(
            jax.random.key(0))
        blocks = diagnostics.gate_blocks(models.recurrent_weights(params)[0])
        assert len(blocks) == cells.get(name).num_gates
        summary = diagnostics.whh_summary(params)
        assert summary["whh_spectral_radius/0"] == pytest.approx(1.0, abs=1e-5)  # orthogonal / I
