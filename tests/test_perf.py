"""The benchmark's pieces that are not timings: FLOP counts, the NumPy contender's
gradients, how comparisons pick each side's fastest setting, and the allocator setting."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import bench_report, benchmark
from experiments.bench.numpy_rnn import NumpyRNNTrain


def test_training_flops_per_char_count_every_matmul_three_times():
    # LSTM 1x128, E=64, V=65: forward 2*(64+128)*512 + 2*128*65 multiply-adds*2.
    assert benchmark.train_flops_per_char("lstm", 128, 1) == 3 * (2 * 192 * 512 + 2 * 128 * 65)
    # tanh RNN 2x8, E=4, V=5: layer 0 reads E, layer 1 reads H.
    assert benchmark.train_flops_per_char("rnn", 8, 2, embed=4, vocab=5) == \
        3 * (2 * 12 * 8 + 2 * 16 * 8 + 2 * 8 * 5)


def test_numpy_rnn_gradients_equal_autodiff():
    task = NumpyRNNTrain({"cell": "rnn", "layers": 1, "hidden": 8, "batch": 3, "seq_len": 5})
    task.h = np.random.default_rng(1).standard_normal(task.h.shape).astype(np.float32)
    h0, x, y = task.h.copy(), task.x, task.y
    loss, grads = task.loss_and_grads()

    def reference(p):
        h, hs = jnp.asarray(h0), []
        for t in range(x.shape[0]):
            h = jnp.tanh(p["embed"][x[t]] @ p["W_xh"] + p["b"] + h @ p["W_hh"])
            hs.append(h)
        logits = jnp.stack(hs).reshape(-1, 8) @ p["W_y"] + p["b_y"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.size), y])

    ref_loss, ref_grads = jax.value_and_grad(reference)(task.params)
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6)
    assert not np.allclose(task.h, h0)  # the carried state moved on to the window's end


def _result(rate):
    return {"per_sec": rate}


def test_comparisons_take_each_side_at_its_fastest_setting():
    train = {"contenders": {"charrnn": _result(100.0), "charrnn_1thread": _result(150.0),
                            "charrnn_2dev": {"error": "x"}, "pytorch": _result(50.0),
                            "pytorch_1thread": _result(120.0),
                            "charrnn_sweep8": _result(900.0),
                            "charrnn_bf16": _result(300.0), "pytorch_bf16": _result(400.0)}}
    out = {"train": {"lstm_1x128": train},
           "sample": {"lstm_1x128/batch1": {"charrnn_scan": _result(1000.0),
                                            "charrnn_loop": _result(50.0),
                                            "pytorch_onednn": _result(10.0),
                                            "pytorch_no_onednn": _result(400.0)}},
           "memory": {"spec": {"layers": 2, "hidden": 512, "batch": 32, "seq_len": 1024},
                      "results": {"charrnn": {"step_peak_mb": 100.0},
                                  "charrnn_remat": {"step_peak_mb": 20.0}}},
           "first_step_default": {"config": "default.py", "first_step_s": 6.0}}
    rows, targets = bench_report.compare(out, 8)
    bf16 = {(r["comparison"], r["b"]): r["ratio"] for r in rows if r["a"] == "charrnn_bf16"}
    # bfloat16 against bfloat16, and against our fastest float32 setting; never a target
    assert bf16 == {("train lstm_1x128 bfloat16", "pytorch_bf16"): pytest.approx(0.75),
                    ("train lstm_1x128", "charrnn_1thread"): pytest.approx(2.0)}
    assert all(t["a"] != "charrnn_bf16" for t in targets)
    by_name = {t["comparison"] + "|" + t["b"] if "b" in t else t["comparison"]: t
               for t in targets}
    train_row = by_name["train lstm_1x128|pytorch_1thread"]
    assert train_row["a"] == "charrnn_1thread" and train_row["ratio"] == pytest.approx(1.25)
    assert train_row["met"] and not train_row["stretch_met"]
    sweep = by_name["8-run sweep lstm_1x128|8 sequential pytorch_1thread"]
    assert sweep["ratio"] == pytest.approx(7.5) and sweep["met"]
    torch_sample = by_name["sample lstm_1x128/batch1|pytorch_no_onednn"]
    assert torch_sample["ratio"] == pytest.approx(2.5) and torch_sample["met"]
    assert by_name["sample lstm_1x128/batch1|per-char loop"]["ratio"] == pytest.approx(20.0)
    assert by_name["memory T=1024|charrnn"]["ratio"] == pytest.approx(0.2)
    assert not by_name["first step default.py"]["met"]  # 6 s > 5 s
    out.update(gemm={"peak_flops": 1.0, "numpy": _result(1.0)},
               settings={"batch": 32, "seq_len": 128, "sample_length": 1000})
    out["comparisons"], out["targets"] = bench_report.compare(out, 8)
    assert bench_report.failures(out) == ["train lstm_1x128/charrnn_2dev"]
    # Two devices, when they ran, against the faster one-device setting (not a target).
    train["contenders"]["charrnn_2dev"] = _result(225.0)
    rows, targets = bench_report.compare(out, 8)
    assert [(r["b"], r["ratio"]) for r in rows
            if r["a"] == "charrnn_2dev" and r["b"].startswith("charrnn")] == [
        ("charrnn_1thread", pytest.approx(1.5))]
    assert not [t for t in targets if t["a"] == "charrnn_2dev" and t["b"].startswith("charrnn")]
    assert "NOT MET" in bench_report.text_tables(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_takes_effect_once():
    from charrnn import hostmem
    assert hostmem.keep_freed_memory() and hostmem.keep_freed_memory()


def test_sweep_benchmark_smoke_run_writes_its_ratios(report_smoke):
    """``report.py --smoke --steps=bench`` (bench_sweep.py --smoke; once per session)."""
    import json
    result = json.loads((report_smoke.step("bench") / "bench_sweep.json").read_text())
    assert set(result["ratio"]) == {"1", "2", "0"} and all(v > 0 for v in result["ratio"].values())
    assert result["num_runs"] > 1 and result["hidden_size"] == 16
