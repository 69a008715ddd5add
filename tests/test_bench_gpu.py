"""The GPU benchmark's pieces on the CPU: charrnn's LSTM in cuDNN's layout, the device
check, a tiny --allow_cpu run and the page rendered from its JSON."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from charrnn import models
from experiments.bench import cudnn_lstm

V, E, H, L, B, T = 7, 6, 4, 2, 3, 5  # E != H: a transposed matrix cannot fit by accident


@pytest.fixture(scope="module")
def case():
    """A 2-layer LSTM with random (not initial) parameters, a random carry (c != h) and data."""
    model = models.CharRNN(V, cell="lstm", hidden_size=H, num_layers=L, embed_dim=E)
    params = model.init(jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten([0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    carry = tuple((jax.random.normal(jax.random.fold_in(k1, l), (B, H)),
                   jax.random.normal(jax.random.fold_in(k2, l), (B, H))) for l in range(L))
    tokens = jax.random.randint(k3, (B, T), 0, V)
    targets = jnp.roll(tokens, -1, axis=1)
    return model, params, carry, tokens, targets


def _loss(model, params, carry, tokens, targets):
    new_carry, logits = model(params, carry, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), \
        (new_carry, logits)


def test_packed_weights_are_what_jax_unpacks_transposed(case):
    model, params, *_ = case
    w_ih, w_hh, b_ih, b_hh = jax.experimental.rnn.unpack_lstm_weights(
        cudnn_lstm.pack_lstm_weights(params, L), E, H, L, False)
    for l in range(L):
        p = params[f"layer_{l}"]
        np.testing.assert_array_equal(w_ih[l], p["W_xh"].T)
        np.testing.assert_array_equal(w_hh[l], p["W_hh"].T)
        np.testing.assert_array_equal(b_ih[l] + b_hh[l], p["b"])


@pytest.mark.parametrize("fast_vjp", [True, False])
def test_charrnn_equals_jax_lstm_ref_forward_and_gradient(case, fast_vjp):
    """charrnn's scan (derived VJP, and plain autodiff) against jax.experimental.rnn.lstm_ref
    reading the converted weights: logits, final (c, h), loss gradient of every parameter."""
    model, params, carry, tokens, targets = case
    model = models.CharRNN(V, cell="lstm", hidden_size=H, num_layers=L, embed_dim=E,
                           fast_vjp=fast_vjp)
    ref = cudnn_lstm.CudnnLSTM(model, impl="ref")
    grad = jax.grad(_loss, argnums=1, has_aux=True)
    g_ours, (carry_ours, logits_ours) = grad(model, params, carry, tokens, targets)
    g_ref, (carry_ref, logits_ref) = grad(ref, params, carry, tokens, targets)
    assert float(jnp.abs(logits_ours).max()) > 0.1  # not a degenerate case
    np.testing.assert_allclose(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    for (c1, h1), (c2, h2) in zip(carry_ours, carry_ref):
        np.testing.assert_allclose(c1, c2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h1, h2, rtol=1e-5, atol=1e-5)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(g_ref))
    for path, a in jax.tree_util.tree_leaves_with_path(g_ours):
        assert float(jnp.abs(a).max()) > 0, path
        np.testing.assert_allclose(a, flat_ref[path], rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_charrnn_equals_torch_nn_lstm_forward_and_gradient(case):
    """The same model in PyTorch (nn.Embedding, nn.LSTM, nn.Linear) with the converted
    weights: loss, final state and every parameter's gradient."""
    torch = pytest.importorskip("torch")
    model, params, carry, tokens, targets = case
    net = torch.nn.ModuleDict({"embed": torch.nn.Embedding(V, E),
                               "rnn": torch.nn.LSTM(E, H, L, batch_first=True),
                               "head": torch.nn.Linear(H, V)}).double()
    state = {"embed.weight": params["embed"], "head.weight": params["head"]["kernel"].T,
             "head.bias": params["head"]["bias"],
             **{f"rnn.{k}": v for k, v in cudnn_lstm.torch_lstm_weights(params, L).items()}}
    net.load_state_dict({k: torch.tensor(np.asarray(v), dtype=torch.float64)
                         for k, v in state.items()})
    h0 = torch.tensor(np.stack([np.asarray(h) for _, h in carry]), dtype=torch.float64)
    c0 = torch.tensor(np.stack([np.asarray(c) for c, _ in carry]), dtype=torch.float64)
    y, (h_n, c_n) = net["rnn"](net["embed"](torch.tensor(np.asarray(tokens)).long()), (h0, c0))
    logits = net["head"](y)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                             torch.tensor(np.asarray(targets)).long().reshape(-1))
    loss.backward()
    (loss_ours, (carry_ours, _)), g = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
        model, params, carry, tokens, targets)
    np.testing.assert_allclose(float(loss_ours), loss.item(), rtol=1e-5)
    for l, (c, h) in enumerate(carry_ours):
        np.testing.assert_allclose(c, c_n[l].detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h, h_n[l].detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    np.testing.assert_allclose(g["embed"], grads["embed.weight"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["head"]["kernel"], grads["head.weight"].T, rtol=1e-4, atol=1e-6)
    for l in range(L):
        ours = g[f"layer_{l}"]
        np.testing.assert_allclose(ours["W_xh"], grads[f"rnn.weight_ih_l{l}"].T, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(ours["W_hh"], grads[f"rnn.weight_hh_l{l}"].T, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(ours["b"], grads[f"rnn.bias_ih_l{l}"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours["b"], grads[f"rnn.bias_hh_l{l}"], rtol=1e-4, atol=1e-6)


def test_cudnn_model_refuses_what_cudnn_does_not_compute():
    for kw in ({"cell": "gru"}, {"dropout": 0.1}, {"weight_drop": 0.1},
               {"matmul_dtype": "bfloat16"}):
        base = models.CharRNN(V, **{"cell": "lstm", **kw})
        with pytest.raises(ValueError):
            cudnn_lstm.CudnnLSTM(base, impl="ref")
