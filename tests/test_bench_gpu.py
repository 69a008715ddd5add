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
    params, carry, tokens = cudnn_lstm.random_case(model, B, T)
    return model, params, carry, tokens, jnp.roll(tokens, -1, axis=1)


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


def test_max_differences_is_rounding_for_the_same_model_and_large_for_another(monkeypatch):
    """The check gpu.py runs on the device first (there against real cuDNN)."""
    same = cudnn_lstm.max_differences("ref", hidden=8, layers=2, batch=2, seq_len=4)
    assert max(same["logits"], same["carry"], same["grad_relative"]) < 1e-4, same
    layers = cudnn_lstm.layer_weights
    monkeypatch.setattr(cudnn_lstm, "layer_weights", lambda p, n: [  # gate blocks rotated by one
        tuple(jnp.roll(w, 8, axis=0) for w in layer) for layer in layers(p, n)])
    wrong = cudnn_lstm.max_differences("ref", hidden=8, layers=2, batch=2, seq_len=4)
    assert min(wrong["logits"], wrong["grad_relative"]) > 1e-2, wrong


def test_cudnn_model_refuses_what_cudnn_does_not_compute():
    for kw in ({"cell": "gru"}, {"dropout": 0.1}, {"weight_drop": 0.1},
               {"matmul_dtype": "bfloat16"}):
        base = models.CharRNN(V, **{"cell": "lstm", **kw})
        with pytest.raises(ValueError):
            cudnn_lstm.CudnnLSTM(base, impl="ref")


# ----------------------------------------------------------------------------------
# experiments/bench/gpu.py: the device check, a tiny CPU run, the page

def _gpu_py(*args, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "experiments.bench.gpu", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_gpu_bench_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path):
    result = _gpu_py(f"--outdir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no GPU"), result.stderr
    assert "jax's first device is cpu" in lines[0] and "--allow_cpu" in lines[0]
    assert not (tmp_path / "out").exists()


TINY_ONLY = ["train/lstm_1x128/B32"]  # every kind of training contender, jax_cudnn included


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """gpu.py --allow_cpu timing one group (the others recorded as not selected: the whole
    tiny run takes minutes on 2 cores), one short window per contender."""
    out = tmp_path_factory.mktemp("gpu_bench")
    result = _gpu_py("--allow_cpu", f"--outdir={out}", f"--markdown={out / 'page.md'}",
                     "--repeats=1", "--window=0.05", "--only=" + ",".join(TINY_ONLY),
                     tmp_path=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_gpu_bench_allow_cpu_writes_every_planned_key(tiny_run):
    from experiments.bench import gpu_plan
    result, out = tiny_run
    saved = json.loads((out / "benchmark_gpu.json").read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == saved  # printed = written
    planned = gpu_plan.plan(tiny=True, device="cpu")
    has_torch = "torch" in saved["machine"] and saved["machine"]["torch"] is not None
    for section, groups in planned.items():
        assert list(saved[section]) == list(groups), section
        for key, group in groups.items():
            assert list(saved[section][key]) == list(group), key
            selected = f"{section}/{key}" in TINY_ONLY
            for label, (framework, _) in group.items():
                r = saved[section][key][label]
                if not selected:
                    assert r == {"skipped": "not selected (--only)"}
                elif framework == "torch" and not has_torch:
                    assert "skipped" in r
                else:
                    assert r["per_sec"] > 0 and r["first_step_s"] > 0, (key, label, r)
    assert list(saved["memory"]) == list(gpu_plan.memory_plan(tiny=True, device="cpu"))
    assert saved["settings"]["tiny"] is True and saved["machine"]["jax_platform"] == "cpu"
    assert saved["equivalence"]["impl"] == "ref" and saved["equivalence"]["logits"] < 1e-4
    group = saved["train"]["lstm_1x128/B32"]
    row = next(r for r in saved["comparisons"]
               if r["comparison"] == "train lstm_1x128/B32" and r["b"] == "jax_cudnn")
    assert row["ratio"] == pytest.approx(group["charrnn"]["per_sec"]
                                         / group["jax_cudnn"]["per_sec"])


def test_gpu_bench_page_of_the_tiny_run_says_it_is_one(tiny_run):
    _, out = tiny_run
    page = (out / "page.md").read_text()
    assert "Generated by `experiments/bench/gpu.py`" in page
    assert "A tiny run on the CPU" in page and "--allow_cpu" in page
    assert "| lstm_1x128/B32 | jax_cudnn |" in page


def _h200_like_results(slow_key="lstm_2x512/B32"):
    """A full run's JSON with made-up rates: charrnn 1.25x PyTorch, except 0.625x at
    ``slow_key``; charrnn's peak memory 1.5x PyTorch's."""
    from experiments.bench import gpu_plan, gpu_report
    rates = {"charrnn": 100.0, "charrnn_bf16": 150.0, "jax_cudnn": 120.0, "pytorch": 80.0,
             "pytorch_bf16": 90.0, "charrnn_sweep8": 600.0, "charrnn_sweep64": 3000.0,
             "charrnn_scan": 1000.0, "charrnn_loop": 100.0}
    out = {"machine": {"python": "3.12.3", "platform": "Linux", "cpus": 16, "cpu": "x86",
                       "date": "2026-12-04 12:00", "jax": "0.11.2", "jaxlib": "0.11.2",
                       "numpy": "2.5.2", "torch": "2.11.0", "load_average": [0, 0, 0],
                       "jax_platform": "gpu", "jax_device": "NVIDIA H200",
                       "jax_default_matmul_precision": None, "torch_cuda": True,
                       "torch_cuda_version": "13.0", "torch_cudnn": 91000,
                       "torch_device": "NVIDIA H200", "torch_matmul_allow_tf32": False,
                       "torch_cudnn_allow_tf32": True},
           "settings": {"tiny": False, "repeats": 3, "window_s": 0.5, "budget_s": 420.0,
                        "seq_len": 128, "batches": [32, 128], "vocab": 65, "embed": 64,
                        "sample_length": 1000, "sweep_runs": [8, 64], "torch_device": "cuda",
                        "only": None, "total_s": 400.0,
                        "command": "python experiments/bench/gpu.py --markdown=BENCHMARKS-gpu.md"},
           "equivalence": {"impl": "cudnn", "logits": 2e-6, "carry": 1e-6,
                           "grad_relative": 5e-6},
           "memory_spec": gpu_plan.memory_plan(tiny=False, device="cuda")["charrnn"],
           "memory": {"charrnn": {"device_peak_mb": 300.0}, "pytorch": {"device_peak_mb": 200.0}}}
    for section, groups in gpu_plan.plan(tiny=False, device="cuda").items():
        out[section] = {key: {label: {"per_sec": rates[label] * (
            0.5 if (key, label) == (slow_key, "charrnn") else 1.0), "first_step_s": 2.0}
            for label in group} for key, group in groups.items()}
    out["comparisons"] = gpu_report.compare(out)
    return out


def test_gpu_page_renders_from_saved_json_naming_device_ratios_and_targets(tmp_path):
    path, page_path = tmp_path / "results.json", tmp_path / "page.md"
    path.write_text(json.dumps(_h200_like_results()))
    result = _gpu_py(f"--render_only={path}", f"--markdown={page_path}", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    page = page_path.read_text()
    assert "Device: NVIDIA H200" in page and "cuDNN 91000" in page
    assert "python experiments/bench/gpu.py --markdown=BENCHMARKS-gpu.md" in page
    assert "| train lstm_1x128/B32 | 1.25x | >= 1.0x | met |" in page
    assert "| train lstm_2x512/B32 | 0.62x | >= 1.0x | NOT MET |" in page
    assert "| train gru_1x512/B128 | charrnn / pytorch | 100 | 80 | 1.25x |" in page
    assert "| sweep lstm_1x128/B32/runs64 | charrnn_sweep64 / 64 sequential charrnn | 3,000 " \
        "| 100 | 30.00x |" in page
    assert "| charrnn / pytorch | 1.50x |" in page  # peak memory
    assert ("charrnn's default float32 step is slower than PyTorch on cuDNN for "
            "lstm_2x512/B32 (0.62x); at least as fast for lstm_1x128/B32, lstm_3x768/B32.") in page
    assert "`jax_cudnn` (cudnn) computes the same model as charrnn's scan" in page
    # The fastest path per model: jax_cudnn (120) beats charrnn (50) where charrnn is slow.
    assert "| lstm_2x512/B32 | jax_cudnn | 120 | charrnn_bf16 | 150 |" in page


def test_gpu_page_finding_follows_the_numbers():
    from experiments.bench import gpu_report
    assert gpu_report.finding(_h200_like_results(slow_key=None)) == (
        "charrnn's default float32 step is at least as fast as PyTorch on cuDNN for every "
        "target model (lstm_1x128/B32, lstm_2x512/B32, lstm_3x768/B32).")


def test_gpu_page_says_when_the_cudnn_contender_computes_another_model():
    from experiments.bench import gpu_report
    out = _h200_like_results()
    out["equivalence"]["grad_relative"] = 0.3
    assert "`jax_cudnn` (cudnn) DIFFERS from charrnn's scan" in gpu_report.equivalence(out)


def test_gpu_render_only_of_a_bad_file_is_one_error_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    result = _gpu_py(f"--render_only={path}", tmp_path=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot render"), result.stderr


def test_gpu_runs_merge_group_by_group_and_compare_within_a_run(tmp_path):
    """A later run (--only) replaces the groups it measured, no others; the page names
    each run and each group's; a sweep is not compared with sequential runs of another run."""
    from experiments.bench import gpu_report
    first, later = _h200_like_results(), _h200_like_results(slow_key=None)
    for section in ("train", "sweep", "sample"):
        for key, group in later[section].items():
            if (section, key) != ("train", "lstm_1x128/B32"):
                later[section][key] = {label: {"skipped": "not selected (--only)"} for label in group}
    later["train"]["lstm_1x128/B32"]["charrnn"]["per_sec"] = 400.0
    later["memory"] = {"charrnn": {"device_peak_mb": 100.0}, "pytorch": {"skipped": "--only"}}
    later["settings"]["command"] += " --only=train/lstm_1x128/B32"
    merged = gpu_report.merge([first, later])
    assert merged["train"]["lstm_1x128/B32"]["charrnn"]["per_sec"] == 400.0
    assert merged["train"]["lstm_2x512/B32"] == first["train"]["lstm_2x512/B32"]
    assert merged["memory"] == {"charrnn": {"device_peak_mb": 100.0},
                                "pytorch": {"device_peak_mb": 200.0}}
    assert merged["origin"]["train/lstm_1x128/B32"] == 2 and merged["origin"]["sample/" + next(
        iter(first["sample"]))] == 1
    ratio = {(c["comparison"], c["a"], c["b"]): c["ratio"] for c in merged["comparisons"]}
    assert ratio[("train lstm_1x128/B32", "charrnn", "pytorch")] == 5.0  # 400 / 80, run 2
    assert ratio[("sweep lstm_1x128/B32/runs8", "charrnn_sweep8", "8 sequential charrnn")] is None
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, out in zip(paths, (first, later)):
        path.write_text(json.dumps(out))
    result = _gpu_py(f"--render_only={paths[0]},{paths[1]}", f"--markdown={tmp_path / 'p.md'}",
                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "p.md").read_text()
    assert "2. `python experiments/bench/gpu.py --markdown=BENCHMARKS-gpu.md --only=train/" \
           "lstm_1x128/B32` (2026-12-04 12:00, charrnn unknown): memory/charrnn, " \
           "train/lstm_1x128/B32\n" in page
    assert "| lstm_1x128/B32 | charrnn | 400 | 2.00 | 2 |" in page
