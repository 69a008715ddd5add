"""A tanh RNN language model trained with NumPy only: the benchmark's NumPy contender.

Forward and backward are written by hand, the way a careful NumPy user would:
the input projection, the head and all weight gradients are single GEMMs over
the T*B positions; only h_t = tanh(z_t + h_{t-1} W_hh) and its backward
dz_t = (dh_t + dh) (1 - h_t²), dh = dz_t W_hhᵀ loop over time. Then global-norm
clipping (τ = 1, optax's rule) and Adam, in place. float32 throughout.
"""

from __future__ import annotations

import numpy as np

from experiments.bench.task import EMBED, VOCAB, Task, random_tokens as _random_tokens


class NumpyRNNTrain(Task):
    """Embedding [V, E] -> tanh RNN [H] -> head [H, V]; mean cross-entropy; clip; Adam."""

    def __init__(self, spec, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, tau=1.0):
        if spec["cell"] != "rnn" or spec["layers"] != 1:
            raise ValueError("the NumPy contender is a 1-layer tanh RNN")
        rng = np.random.default_rng(0)
        H, B, T = spec["hidden"], spec["batch"], spec["seq_len"]
        init = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        self.params = {"embed": init(VOCAB, EMBED) * 0.1, "W_xh": init(EMBED, H),
                       "W_hh": init(H, H), "b": np.zeros(H, np.float32),
                       "W_y": init(H, VOCAB), "b_y": np.zeros(VOCAB, np.float32)}
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.hp = (lr, b1, b2, eps, tau)
        self.t = 0
        self.x = _random_tokens((B, T), 1).T.copy()  # time-major [T, B]
        self.y = _random_tokens((B, T), 2).T.reshape(-1)
        self.h = np.zeros((B, H), np.float32)
        self.unit_size = B * T

    def run_units(self, n):
        for _ in range(n):
            loss, grads = self.loss_and_grads()
            self.update(grads)

    def loss_and_grads(self):
        """(mean cross-entropy, {name: gradient}) of the window; carries h to the next.

        Forward, time-major: z = x W_xh + b ([T, B, H], one GEMM), h_t = tanh(z_t + h_{t-1}
        W_hh), logits = h W_y + b_y ([T·B, V]). Backward: dlogits = (softmax - onehot)/(T·B);
        dz_t = (dh_t + dh_{t+1→t}) ⊙ (1 - h_t²), dh_{t→t-1} = dz_t W_hhᵀ; the weight
        gradients are GEMMs over all T·B positions.
        """
        p = self.params
        T, B = self.x.shape
        H = p["W_hh"].shape[0]
        xs = p["embed"][self.x]  # [T, B, E]
        z = (xs.reshape(T * B, -1) @ p["W_xh"] + p["b"]).reshape(T, B, H)
        hs = np.empty((T, B, H), np.float32)
        h = self.h
        for t in range(T):
            np.matmul(h, p["W_hh"], out=hs[t])
            hs[t] += z[t]
            np.tanh(hs[t], out=hs[t])
            h = hs[t]
        flat = hs.reshape(T * B, H)
        logits = flat @ p["W_y"] + p["b_y"]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        rows = np.arange(T * B)
        loss = -np.log(probs[rows, self.y]).mean()

        dlogits = probs
        dlogits[rows, self.y] -= 1.0
        dlogits /= T * B
        grads = {"W_y": flat.T @ dlogits, "b_y": dlogits.sum(axis=0)}
        dhs = (dlogits @ p["W_y"].T).reshape(T, B, H)
        w_hh_t = np.ascontiguousarray(p["W_hh"].T)
        dz = np.empty_like(hs)
        dh = np.zeros((B, H), np.float32)
        for t in range(T - 1, -1, -1):
            np.multiply(dhs[t] + dh, 1.0 - hs[t] * hs[t], out=dz[t])
            dh = dz[t] @ w_hh_t
        dz_flat = dz.reshape(T * B, H)
        h_prev = np.concatenate([self.h[None], hs[:-1]]).reshape(T * B, H)
        grads["W_hh"] = h_prev.T @ dz_flat
        grads["W_xh"] = xs.reshape(T * B, -1).T @ dz_flat
        grads["b"] = dz_flat.sum(axis=0)
        dxs = dz_flat @ p["W_xh"].T
        onehot = np.eye(VOCAB, dtype=np.float32)[self.x.reshape(-1)]
        grads["embed"] = onehot.T @ dxs
        self.h = hs[-1].copy()  # truncated BPTT: the next window starts here
        return loss, grads

    def update(self, grads):
        """Global-norm clip g ← g·min(1, τ/‖g‖₂), then Adam with bias correction, in place."""
        lr, b1, b2, eps, tau = self.hp
        norm = np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
        scale = tau / norm if norm > tau else 1.0
        self.t += 1
        for k, g in grads.items():
            g *= scale
            self.m[k] *= b1
            self.m[k] += (1 - b1) * g
            self.v[k] *= b2
            self.v[k] += (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            self.params[k] -= lr * m_hat / (np.sqrt(v_hat) + eps)
