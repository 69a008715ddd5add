"""Whole-sequence recurrences with hand-written backward passes.

``recurrence(cell, params, carry, xs)`` runs one layer over T steps: its input
projection x W_xh as one large product over all T*B positions, then the time
loop, and returns (final carry, h_1..T [T, B, H]). For the first layer,
``recurrence(..., ids, table=P)`` reads row ``ids[t]`` of a [V, G*H] table
inside the loop instead (see ``CharRNN._first_layer_inputs``). It computes
what ``models.unroll`` over the layer's Flax cell computes, but its gradient
is a ``jax.custom_vjp`` written for speed on CPU:

* Autodiff of ``lax.scan`` accumulates ∂L/∂W_hh inside the backward loop:
  one [H, B] x [B, G*H] product per time step on the sequential path. Here
  the backward loop carries only ∂L/∂h (and ∂L/∂c) and emits the gate
  pre-activation gradients dz_t, doing one product per step,
  dh_{t-1} = dz_t W_hhᵀ (W_hhᵀ transposed once, before the loop). After it,
  with all T*B rows stacked, the weight gradients are one large GEMM,
  [W_xh; W_hh] gets [X, H_prev]ᵀ DZ, and dX = DZ W_xhᵀ another.
* The forward loop saves, instead of activations, the [B, H] coefficients
  that the backward step multiplies by (e.g. ∂c_t/∂z_f = c_{t-1} σ'(z_f)), so
  the backward step is a few multiplies: no transcendental functions and no
  slicing of a gate vector (both slow inside an XLA CPU loop). The LSTM
  applies one ``tanh`` to its whole 4H gate vector, since σ(x) = ½(1 + tanh(x/2)).

With ``matmul_dtype=jnp.bfloat16`` every product reads bfloat16 operands and
accumulates in float32 (:func:`matmul`); parameters, state and all other
arithmetic stay float32. On CPUs with AMX or AVX512-BF16 and on GPUs/TPUs such
products run 2-3x faster than float32 ones.

Measured and slower on this project's 2-core Xeon (LSTM, B=32, T=128, A/B in one
process): saving the gate vector, c_{t-1} and tanh(c_t) and computing the factors
in the backward loop (layer forward+backward 1.04-1.10x the time, H=128 float32,
H=512 both dtypes); computing them after the forward loop in one vectorised pass
(forward 1.14-1.34x); one concatenated save per step (1.12-1.17x); a two-layer
wavefront, layer 0 at step t and layer 1 at step t-1 in one loop body with
h0 [W_hh0 | W_xh1] as one product (two-layer forward 1.26-1.31x: the hoisted
input GEMM of layer 1 is cheaper than the wider in-loop product).

Each cell is a forward step ``(weights, carry, zx_t) -> (carry, h_t, saved)``
and a backward step; :func:`_layer` turns the pair into one custom-VJP
function. Equations and gate orders are those of :mod:`charrnn.models`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(a, b, dtype=jnp.float32):
    """a @ b with operands in ``dtype`` and a float32 result (dtype float32: plain a @ b)."""
    if dtype == jnp.float32:
        return a @ b
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def recurrence(cell: str, params: dict, carry, xs, table=None, unroll: int = 1,
               matmul_dtype=jnp.float32):
    """Run one layer over time with the hand-written VJP.

    cell: ``rnn``, ``gru`` or ``lstm``; params: the layer's parameters
    (``W_xh`` [in, G*H], ``W_hh`` [H, G*H], ``b`` [G*H], GRU also ``b_hn`` [H]);
    carry: [B, H] (LSTM: (c, h)); xs: the inputs [T, B, in]. With ``table``
    [V, G*H], xs are int token ids [T, B] instead and step t's input
    pre-activation x_t W_xh + b is row xs[t] of the table (W_xh, b unused).
    ``matmul_dtype``: operand type of the products (float32 or bfloat16).
    Returns (carry after step T, hs [T, B, H]).
    """
    if cell not in _CELLS:
        raise ValueError(f"unknown cell {cell!r}")
    rec = (params["W_hh"], params["b_hn"]) if cell == "gru" else (params["W_hh"],)
    proj = None if table is not None else (params["W_xh"], params["b"])
    return _layer(cell, unroll, jnp.dtype(matmul_dtype), rec, proj, table, xs, carry)


def cell_step(cell: str, rec: tuple, carry, zx_t):
    """One step of :func:`recurrence`'s forward loop, for inference: (carry, h_t [B, H]).

    zx_t: the input pre-activation x_t W_xh + b [B, G*H]; rec: (W_hh,) (GRU:
    (W_hh, b_hn)) with W_hh already in the products' operand type.
    """
    carry, h, _ = _CELLS[cell][0](rec, carry, zx_t, False)
    return carry, h


def _shift(first, xs):
    """[first, xs_0, ..., xs_{T-2}]: the value before each step ([T, ...])."""
    return jnp.concatenate([first[None], xs[:-1]], axis=0)


def _transposed(x, dtype):
    """xᵀ of a 2-D matrix [N, K], cast to ``dtype``.

    XLA on CPU folds a plain ``x.T`` into the product that reads it, and in
    bfloat16 a product with a transposed operand takes a slow path (on this
    project's 2-core Xeon with AMX: dW = Hᵀ DZ, [1024 x 4096] x [4096 x 2048],
    68 ms vs 14 ms; dX = DZ W_xhᵀ, [4096 x 2048] x [2048 x 512], 36 ms vs 5.5 ms). Transposing a 3-D view [f, N/f, K] and reshaping
    cannot be folded, so XLA writes the transposed matrix out (1-2 ms) and
    the product reads plain row-major operands. In float32 the folded
    transpose is as fast, so there it stays.
    """
    n, k = x.shape
    f = next((f for f in range(2, int(n ** 0.5) + 1) if n % f == 0), None)
    if dtype == jnp.float32 or f is None:  # N prime: no 3-D view, the plain transpose
        return x.T.astype(dtype)
    x = x.astype(dtype).reshape(f, n // f, k)
    return jnp.transpose(x, (2, 0, 1)).reshape(k, n)


def _flat(a):
    """[T, B, F] -> [T*B, F]: all time steps as rows of one matrix."""
    return a.reshape(-1, a.shape[-1])


def _step_matmul(a, w):
    """A loop step's product with a weight already cast (once, before the loop)."""
    return matmul(a, w, w.dtype)


# --- tanh RNN: h_t = tanh(zx_t + h_{t-1} W_hh) -----------------------------------

def _rnn_forward(weights, h, zx_t, save):
    h = jnp.tanh(zx_t + _step_matmul(h, weights[0]))
    return h, h, (1.0 - h * h,) if save else ()  # tanh' = 1 - h²


def _rnn_backward(w_hh_t, dh, saved, dh_out):
    (dtanh,) = saved
    dz = (dh + dh_out) * dtanh
    return _step_matmul(dz, w_hh_t), (dz,)


# --- LSTM: gates i, f, g, o; c_t = f c_{t-1} + i g; h_t = o tanh(c_t) -------------

def _lstm_forward(weights, carry, zx_t, save):
    c_prev, h = carry
    hidden = h.shape[-1]
    half = jnp.full((hidden,), 0.5)
    scale = jnp.concatenate([half, half, jnp.ones((hidden,)), half])
    t = jnp.split(jnp.tanh((zx_t + _step_matmul(h, weights[0])) * scale), 4, axis=-1)
    i, f, o = 0.5 * t[0] + 0.5, 0.5 * t[1] + 0.5, 0.5 * t[3] + 0.5  # σ(x) = ½ tanh(x/2) + ½
    g = t[2]
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    h = o * tanh_c
    if not save:
        return (c, h), h, ()
    # σ'(x) = ¼ (1 - tanh²(x/2)); tanh' = 1 - tanh². The backward step computes
    # dc_t = dc + dh k_c, dz = (dc_t k_i, dc_t k_f, dc_t k_g, dh k_o), dc_{t-1} = dc_t f.
    k_i = g * 0.25 * (1.0 - t[0] * t[0])
    k_f = c_prev * 0.25 * (1.0 - t[1] * t[1])
    k_g = i * (1.0 - g * g)
    k_o = tanh_c * 0.25 * (1.0 - t[3] * t[3])
    k_c = o * (1.0 - tanh_c * tanh_c)
    return (c, h), h, (k_i, k_f, k_g, k_o, k_c, f)


def _lstm_backward(w_hh_t, dcarry, saved, dh_out):
    dc, dh = dcarry
    k_i, k_f, k_g, k_o, k_c, f = saved
    dh = dh + dh_out
    dc = dc + dh * k_c
    dz = jnp.concatenate([dc * k_i, dc * k_f, dc * k_g, dh * k_o], axis=-1)
    return (dc * f, _step_matmul(dz, w_hh_t)), (dz,)


# --- GRU: r, z gates, candidate n = tanh(x_n + r (h W_hn + b_hn)) -----------------

def _gru_forward(weights, h_prev, zx_t, save):
    w_hh, b_hn = weights
    x_r, x_z, x_n = jnp.split(zx_t, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(_step_matmul(h_prev, w_hh), 3, axis=-1)
    t_r, t_z = jnp.tanh(0.5 * (x_r + h_r)), jnp.tanh(0.5 * (x_z + h_z))
    r, z = 0.5 * t_r + 0.5, 0.5 * t_z + 0.5
    hn_b = h_n + b_hn
    n = jnp.tanh(x_n + r * hn_b)
    h = (1.0 - z) * n + z * h_prev
    if not save:
        return h, h, ()
    # with dh_t: dn = dh k_n, dr = dh k_r, dz = dh k_z (pre-activation gradients)
    k_n = (1.0 - z) * (1.0 - n * n)
    k_r = k_n * hn_b * 0.25 * (1.0 - t_r * t_r)
    k_z = (h_prev - n) * 0.25 * (1.0 - t_z * t_z)
    return h, h, (k_r, k_z, k_n, r, z)


def _gru_backward(w_hh_t, dh, saved, dh_out):
    k_r, k_z, k_n, r, z = saved
    dh = dh + dh_out
    dn = dh * k_n
    dhh = jnp.concatenate([dh * k_r, dh * k_z, dn * r], axis=-1)  # wrt h_{t-1} W_hh + (0, 0, b_hn)
    return dh * z + _step_matmul(dhh, w_hh_t), (dhh, dn)


_CELLS = {"rnn": (_rnn_forward, _rnn_backward), "lstm": (_lstm_forward, _lstm_backward),
          "gru": (_gru_forward, _gru_backward)}


# --- one layer: forward scan, backward scan, weight gradients as GEMMs ------------

def _scan_forward(cell, dtype, rec, carry, table, zx, bias, unroll, save):
    """The time loop. Step t's input pre-activation: ``table[zx[t]]`` (zx holds token
    ids) or ``zx[t] + bias`` (the bias added inside the loop saves a pass over zx)."""
    forward = _CELLS[cell][0]
    rec = (rec[0].astype(dtype),) + tuple(rec[1:])

    def step(carry, x_t):
        zx_t = table[x_t] if table is not None else x_t + bias
        carry, h, saved = forward(rec, carry, zx_t, save)
        return carry, (h, saved)

    return jax.lax.scan(step, carry, zx, unroll=unroll)


def _inputs(dtype, table, xs, proj):
    """What the loop reads: token ids (with a table) or x W_xh [T, B, G*H], one GEMM."""
    if table is not None:
        return xs, None
    w_xh, bias = proj
    return matmul(xs, w_xh, dtype), bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _layer(cell, unroll, dtype, rec, proj, table, xs, carry):
    zx, bias = _inputs(dtype, table, xs, proj)
    last, (hs, _) = _scan_forward(cell, dtype, rec, carry, table, zx, bias, unroll, save=False)
    return last, hs


def _layer_fwd(cell, unroll, dtype, rec, proj, table, xs, carry):
    zx, bias = _inputs(dtype, table, xs, proj)
    last, (hs, saved) = _scan_forward(cell, dtype, rec, carry, table, zx, bias, unroll, save=True)
    h0 = carry[1] if cell == "lstm" else carry
    return (last, hs), (rec, proj, table, xs, h0, hs, saved)


def _layer_bwd(cell, unroll, dtype, residuals, cotangents):
    rec, proj, table, xs, h0, hs, saved = residuals
    dlast, dhs = cotangents
    backward = _CELLS[cell][1]
    # [G*H, H]: transposed (and cast) once, so each step's product is a plain one
    w_hh_t = _transposed(rec[0], dtype)
    step = lambda dcarry, inputs: backward(w_hh_t, dcarry, *inputs)
    dcarry0, emitted = jax.lax.scan(step, dlast, (saved, dhs), reverse=True, unroll=unroll)
    dz = emitted[0]  # [T, B, G*H], gradient wrt h_{t-1} W_hh (+ b_hn)
    h_prev = _shift(h0, hs)
    hidden = hs.shape[-1]
    if cell == "gru":  # the n block of the input gradient lacks the factor r
        dzx = jnp.concatenate([dz[..., :2 * hidden], emitted[1]], axis=-1)
        extra = (jnp.sum(dz[..., 2 * hidden:], axis=(0, 1)),)  # b_hn
    else:
        dzx, extra = dz, ()
    if table is not None:
        # d table: the rows of dzx summed per token id (the transpose of the lookup),
        # after the loop. (Adding each step's rows inside the loop was 2-6% faster on
        # one device but, with the batch sharded over devices, made every step
        # reduce the replicated table across them: 230k -> 130k chars/s, LSTM 1x128.)
        dtable = jnp.zeros_like(table).at[xs].add(dzx)
        return (matmul(_transposed(_flat(h_prev), dtype), _flat(dz), dtype),) + extra, None, dtable, None, dcarry0
    w_xh, _ = proj
    if dzx is dz:  # dW_xh and dW_hh as one GEMM: [x_t, h_{t-1}]ᵀ dz_t summed over t
        dw = matmul(_transposed(_flat(jnp.concatenate([xs, h_prev], axis=-1)), dtype), _flat(dz), dtype)
        dw_xh, dw_hh = dw[:xs.shape[-1]], dw[xs.shape[-1]:]
    else:
        dw_xh = matmul(_transposed(_flat(xs), dtype), _flat(dzx), dtype)
        dw_hh = matmul(_transposed(_flat(h_prev), dtype), _flat(dz), dtype)
    dproj = (dw_xh, jnp.sum(dzx, axis=(0, 1)))
    return (dw_hh,) + extra, dproj, None, matmul(dzx, _transposed(w_xh, dtype), dtype), dcarry0


_layer.defvjp(_layer_fwd, _layer_bwd)
