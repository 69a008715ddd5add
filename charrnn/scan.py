"""One layer over time: a ``lax.scan`` whose backward pass is derived from the cell.

``recurrence(cell, params, carry, xs)`` runs one layer over T steps: its input
projection x W_xh as one large product over all T*B positions, then the time
loop, and returns (final carry, y_1..T [T, B, H]). For the first layer,
``recurrence(..., ids, table=P)`` reads row ``ids[t]`` of a [V, G*H] table
inside the loop instead (see :class:`charrnn.models.Layer`). It computes
what the reference, ``models.reference_scan`` over the layer's Flax module, computes; its gradient is
a ``jax.custom_vjp`` shaped for speed:

* Autodiff of ``lax.scan`` accumulates ∂L/∂W_hh inside the backward loop:
  one [H, B] x [B, G*H] product per time step on the sequential path. Here
  the backward loop carries only the carry's gradient and emits the
  pre-activation gradients dzx_t, dzh_t, doing one product per step,
  dh_{t-1} += dzh_t W_hhᵀ (W_hhᵀ transposed once, before the loop). After it,
  with all T*B rows stacked, the weight gradients are large GEMMs:
  dW_hh = H_prevᵀ DZH, dW_xh = Xᵀ DZX, dX = DZX W_xhᵀ ([W_xh; W_hh] as one
  GEMM when dzx = dzh, i.e. when the update reads only zx + zh).
* The per-step backward is the cell's own update differentiated by JAX: the
  forward loop runs ``jax.vjp`` of ``cell.update`` and stacks the pullback's
  residuals (the factors the backward multiplies by, e.g. 1 - h² for tanh),
  and the backward loop applies the pullbacks in reverse. So the backward
  loop does no transcendental function and no recomputation. A built-in cell
  may instead give a hand-tuned pair (``Cell.tuned_forward``/``tuned_backward``)
  with the same contract, kept only where measured faster.

With ``matmul_dtype=jnp.bfloat16`` every product reads bfloat16 operands and
accumulates in float32 (:func:`matmul`); parameters, state and all other
arithmetic stay float32.

Clipping inside BPTT (``optim.clip_at=bptt``, a :class:`CotangentClip`): the
backward loop clips each step's pre-activation cotangents dzx_t, dzh_t [B, G*H]
as soon as the cell's backward step emits them, before dzh_t W_hhᵀ carries them
to step t-1 and before they reach the weight gradients (one elementwise pass
per step: no extra sequential work). With δ_t = ∂L/∂z_t:

    value:        δ̃_t = clip(δ_t, −τ, τ)                 every component
    global_norm:  δ̃_t[b] = δ_t[b]·τ/‖δ_t[b]‖₂ if ‖δ_t[b]‖₂ > τ   per row b

so the recursion is dh_{t-1} = (direct part) + δ̃zh_t W_hhᵀ and the weights get
dW_hh = Σ_t h_{t-1}ᵀ δ̃zh_t, dW_xh = Σ_t x_tᵀ δ̃zx_t. The norm is over one row
(one sequence), one layer, one time step (the G*H gate pre-activations): no
row's clip depends on the others, so the result does not depend on the batch.
A cell whose update reads only zx + zh has one cotangent (dzx = dzh); a GRU
clips its two each on its own. The cell's extra parameters (a GRU's b_hn) get
their gradient from the cell's own backward step, before the clip. This is
Graves's clipping ("Generating Sequences With Recurrent Neural Networks" 2013,
§2.1: the derivatives with respect to the LSTM's inputs before the
nonlinearities, clipped to [−1, 1]) and Mikolov's "temporal components clipped
element-wise" (as Pascanu, Mikolov & Bengio 2013 §3.1 describe it). The
autodiff path clips the same cotangents with :func:`clip_pre_activations`.
Telemetry travels as the threshold's cotangent: ∂/∂τ of the loss is zero (the
forward pass does not read τ), so the backward pass returns in its place the
number of (row, step) cotangents it clipped.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def _clip_value(g, tau):
    """Each component into [−τ, τ]."""
    return jnp.clip(g, -tau, tau)


def _clip_row_norm(g, tau):
    """Each row g[..., :] rescaled to L2 norm ≤ τ (as optax's clip_by_global_norm, no ε)."""
    norm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
    return g * jnp.where(norm > tau, tau / jnp.where(norm > 0, norm, 1.0), 1.0)


# The clipping rules (charrnn.clipping's names) that optim.clip_at=bptt can apply to a
# step's cotangent; config validation reads the names from here.
BPTT_RULES = {"value": _clip_value, "global_norm": _clip_row_norm}


@flax.struct.dataclass
class CotangentClip:
    """Clipping inside BPTT: the rule (a :data:`BPTT_RULES` name) and its threshold τ
    (float32 [], may be traced). Its gradient's ``tau`` is the number of (row, layer,
    time step) cotangents that were clipped (see the module docstring)."""
    rule: str = flax.struct.field(pytree_node=False)
    tau: jax.Array


def clip_cotangents(rule: str, tau, dzx, dzh):
    """(dzx', dzh', clipped rows (float32 [])) of one step's cotangents [..., G*H].

    ``dzx is dzh`` (the update reads zx + zh): one array, clipped once. A row is
    counted when the rule changed either of its cotangents.
    """
    clip = BPTT_RULES[rule]
    new_h = clip(dzh, tau)
    changed = jnp.any(new_h != dzh, axis=-1)
    if dzx is dzh:
        new_x = new_h
    else:
        new_x = clip(dzx, tau)
        changed = changed | jnp.any(new_x != dzx, axis=-1)
    return new_x, new_h, jnp.sum(changed.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def clip_pre_activations(rule: str, tau, zx, zh):
    """The identity on one step's pre-activations (zx, zh) [B, G*H] whose backward
    clips their cotangents (:func:`clip_cotangents`): BPTT clipping for the autodiff
    path. τ's cotangent is the number of rows clipped."""
    del rule, tau
    return zx, zh


def _clip_pre_activations_fwd(rule, tau, zx, zh):
    del rule
    return (zx, zh), tau


def _clip_pre_activations_bwd(rule, tau, cotangents):
    dzx, dzh = cotangents
    dzx, dzh, count = clip_cotangents(rule, tau, dzx, dzh)
    return jnp.broadcast_to(count, jnp.shape(tau)).astype(jnp.result_type(tau)), dzx, dzh


clip_pre_activations.defvjp(_clip_pre_activations_fwd, _clip_pre_activations_bwd)


def matmul(a, b, dtype=jnp.float32):
    """a @ b with operands in ``dtype`` and a float32 result (dtype float32: plain a @ b)."""
    if dtype == jnp.float32:
        return a @ b
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def split_params(params: dict):
    """A layer's parameters as (W_hh, extras, (W_xh, b)); extras: all other names."""
    extras = {k: v for k, v in params.items() if k not in ("W_hh", "W_xh", "b")}
    return params["W_hh"], extras, (params["W_xh"], params["b"])


def recurrence(cell, params: dict, carry, xs, table=None, unroll: int = 1,
               matmul_dtype=jnp.float32, derived: bool = False,
               clip: CotangentClip | None = None):
    """Run one layer over time with the scan-shaped VJP.

    cell: a :class:`charrnn.cells.base.Cell`; params: the layer's parameters
    (``W_xh`` [in, G*H], ``W_hh`` [H, G*H], ``b`` [G*H], the cell's extras);
    carry: the cell's carry (leaves [B, ...]); xs: the inputs [T, B, in]. With
    ``table`` [V, G*H], xs are int token ids [T, B] instead and step t's input
    pre-activation x_t W_xh + b is row xs[t] of the table (W_xh, b unused).
    ``matmul_dtype``: operand type of the products (float32 or bfloat16).
    ``derived``: use the derived backward even where the cell has a tuned one.
    ``clip``: clip every step's pre-activation cotangents in the backward loop.
    Returns (carry after step T, ys [T, B, H]).
    """
    w_hh, extras, proj = split_params(params)
    proj = None if table is not None else proj
    mode = "derived" if derived or cell.tuned_forward is None else "tuned"
    rule, tau = (None, None) if clip is None else (clip.rule, clip.tau)
    return _layer(cell, unroll, jnp.dtype(matmul_dtype), mode, rule, w_hh, extras, proj, table,
                  xs, carry, tau)


def cell_step(cell, rec: tuple, carry, zx_t):
    """One inference step: (carry, y_t [B, H]) from zx_t = x_t W_xh + b [B, G*H].

    rec: (W_hh already in the products' operand type, the extras dict).
    """
    w_hh, extras = rec
    return cell.update(extras, carry, zx_t, _step_matmul(cell.recurrent_input(carry), w_hh))


def _shift(first, xs):
    """[first, xs_0, ..., xs_{T-2}]: the value before each step ([T, ...])."""
    return jnp.concatenate([first[None], xs[:-1]], axis=0)


def _transposed(x, dtype):
    """xᵀ of a 2-D matrix [N, K], cast to ``dtype``.

    XLA on CPU folds a plain ``x.T`` into the product that reads it, and in
    bfloat16 a product with a transposed operand takes a slow path
    (docs/design-notes.md). Transposing a 3-D view [f, N/f, K] and reshaping
    cannot be folded, so XLA writes the transposed matrix out and the product
    reads plain row-major operands. In float32 the folded transpose is as
    fast, so there it stays.
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


# --- the per-step forward with residuals, and the per-step backward ---------------

def _forward_saving(cell, mode, extras, carry, zx_t, zh_t, varying):
    """(carry_t, y_t, saved): saved is what :func:`_backward_step` needs from step t.

    Derived: the leaves of ``jax.vjp(update)``'s pullback that vary from step
    to step (``varying``, from :func:`_pullback_layout`); the rest (constants,
    functions of the extras alone) are made once, outside the loop.
    """
    if mode == "tuned":
        return cell.tuned_forward(extras, carry, zx_t, zh_t)
    (carry, y), pullback = jax.vjp(cell.update, extras, carry, zx_t, zh_t)
    leaves = jax.tree.leaves(pullback)
    if len(leaves) != len(varying):  # a pullback shaped unlike the probe's: never seen
        raise RuntimeError(f"{cell!r}: the update's pullback has {len(leaves)} residuals in "
                           f"the loop but {len(varying)} when probed")
    return carry, y, [leaf for leaf, v in zip(leaves, varying) if v]


def _backward_step(cell, mode, extras, layout, saved, cotangents):
    """(d extras, d carry_{t-1} (direct part), dzx_t, dzh_t) from (d carry_t, dy_t)."""
    if mode == "tuned":
        return cell.tuned_backward(extras, saved, cotangents)
    treedef, varying, fixed = layout
    per_step, fixed = iter(saved), iter(fixed)
    leaves = [next(per_step) if v else next(fixed) for v in varying]
    return jax.tree.unflatten(treedef, leaves)(cotangents)


def _pullback_layout(cell, extras, carry, width):
    """(treedef, varying, fixed leaves) of the pullback of ``cell.update``.

    A leaf varies when it depends on the carry or the pre-activations
    (dependence read from the jaxpr); the others (e.g. the constant 0.5 of
    σ(x) = ½ tanh(x/2) + ½) are computed here once instead of stacked T times.
    """
    h = jax.tree.leaves(carry)[0]
    # zeros of the carry's JAX type (under shard_map: varying over the same mesh axes), so
    # that the probe's pullback expects the cotangents the loop will give it
    z = jnp.broadcast_to(0.0 * h[..., :1], h.shape[:1] + (width,))
    tree = {}

    def pullback_leaves(c, zx, zh):
        leaves, tree["def"] = jax.tree.flatten(jax.vjp(cell.update, extras, c, zx, zh)[1])
        return leaves

    closed = jax.make_jaxpr(pullback_leaves)(carry, z, z)
    depends = set(closed.jaxpr.invars)
    for eqn in closed.jaxpr.eqns:
        if any(not isinstance(v, jax_core.Literal) and v in depends for v in eqn.invars):
            depends.update(eqn.outvars)
    varying = tuple(not isinstance(v, jax_core.Literal) and v in depends
                    for v in closed.jaxpr.outvars)
    leaves = jax_core.jaxpr_as_fun(closed)(*jax.tree.leaves((carry, z, z)))
    return tree["def"], varying, [leaf for leaf, v in zip(leaves, varying) if not v]


# --- one layer: forward scan, backward scan, weight gradients as GEMMs ------------

def _scan_forward(cell, mode, dtype, w_hh, extras, carry, table, zx, bias, unroll, save,
                  varying=None):
    """The time loop -> (last carry, (ys, hs, saved)).

    Step t's input pre-activation: ``table[zx[t]]`` (zx holds token ids) or
    ``zx[t] + bias`` (the bias added inside the loop saves a pass over zx). hs:
    ``recurrent_input`` of each new carry, for dW_hh, or () where it is y itself.
    """
    w_hh = w_hh.astype(dtype)

    def step(carry, x_t):
        zx_t = table[x_t] if table is not None else x_t + bias
        zh_t = _step_matmul(cell.recurrent_input(carry), w_hh)
        if not save:
            carry, y = cell.update(extras, carry, zx_t, zh_t)
            return carry, (y, (), ())
        carry, y, saved = _forward_saving(cell, mode, extras, carry, zx_t, zh_t, varying)
        h = cell.recurrent_input(carry)
        return carry, (y, () if h is y else h, saved)  # `is`: the same traced value

    return jax.lax.scan(step, carry, zx, unroll=unroll)


def _inputs(dtype, table, xs, proj):
    """What the loop reads: token ids (with a table) or x W_xh [T, B, G*H], one GEMM."""
    if table is not None:
        return xs, None
    w_xh, bias = proj
    return matmul(xs, w_xh, dtype), bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _layer(cell, unroll, dtype, mode, rule, w_hh, extras, proj, table, xs, carry, tau):
    del rule, tau  # the backward pass's
    zx, bias = _inputs(dtype, table, xs, proj)
    last, (ys, _, _) = _scan_forward(cell, mode, dtype, w_hh, extras, carry, table, zx, bias,
                                     unroll, save=False)
    return last, ys


def _layer_fwd(cell, unroll, dtype, mode, rule, w_hh, extras, proj, table, xs, carry, tau):
    del rule
    zx, bias = _inputs(dtype, table, xs, proj)
    varying = None if mode == "tuned" else _pullback_layout(cell, extras, carry, w_hh.shape[1])[1]
    last, (ys, hs, saved) = _scan_forward(cell, mode, dtype, w_hh, extras, carry, table, zx,
                                          bias, unroll, save=True, varying=varying)
    h_prev = _shift(cell.recurrent_input(carry), ys if isinstance(hs, tuple) else hs)  # [T, B, H]
    return (last, ys), (w_hh, extras, proj, table, xs, carry, h_prev, saved, tau)


def _layer_bwd(cell, unroll, dtype, mode, rule, residuals, cotangents):
    w_hh, extras, proj, table, xs, carry0, h_prev, saved, tau = residuals
    dlast, dys = cotangents
    w_hh_t = _transposed(w_hh, dtype)  # [G*H, H]: transposed (and cast) once, before the loop
    _, to_carry = jax.vjp(cell.recurrent_input, carry0)  # dh [B, H] -> d carry
    layout = None if mode == "tuned" else _pullback_layout(cell, extras, carry0, w_hh.shape[1])

    def step(dcarry, inputs):
        saved_t, dy_t = inputs
        dextras, dcarry, dzx, dzh = _backward_step(cell, mode, extras, layout, saved_t,
                                                   (dcarry, dy_t))
        clipped = ()
        if rule is not None:  # clip_at=bptt: before the cotangent moves on to step t-1
            dzx, dzh, clipped = clip_cotangents(rule, tau, dzx, dzh)
        dcarry = jax.tree.map(jnp.add, dcarry, to_carry(_step_matmul(dzh, w_hh_t))[0])
        # `is`: the update read zx + zh
        return dcarry, (dzh, () if dzx is dzh else dzx, dextras, clipped)

    dcarry0, (dzh, dzx, dextras, clipped) = jax.lax.scan(step, dlast, (saved, dys),
                                                         reverse=True, unroll=unroll)
    dextras = jax.tree.map(lambda g: jnp.sum(g, axis=0), dextras)
    dtau = None if rule is None else jnp.sum(clipped).astype(jnp.result_type(tau))
    dw_hh, dproj, dtable, dxs = _weight_gradients(dtype, proj, table, xs, h_prev, dzh,
                                                  dzh if isinstance(dzx, tuple) else dzx,
                                                  isinstance(dzx, tuple))
    return dw_hh, dextras, dproj, dtable, dxs, dcarry0, dtau


def _weight_gradients(dtype, proj, table, xs, h_prev, dzh, dzx, shared):
    """(dW_hh, (dW_xh, db), d table, dX) from the stacked pre-activation gradients [T, B, G*H].

    ``shared``: dzx = dzh, so [W_xh; W_hh] gets one GEMM [X, H_prev]ᵀ DZ.
    """
    if table is not None:
        # d table: the rows of dzx summed per token id (the transpose of the lookup),
        # after the loop; see docs/design-notes.md for the in-loop variant.
        dtable = jnp.zeros_like(table).at[xs].add(dzx)
        return matmul(_transposed(_flat(h_prev), dtype), _flat(dzh), dtype), None, dtable, None
    w_xh, _ = proj
    if shared:
        dw = matmul(_transposed(_flat(jnp.concatenate([xs, h_prev], axis=-1)), dtype),
                    _flat(dzh), dtype)
        dw_xh, dw_hh = dw[:xs.shape[-1]], dw[xs.shape[-1]:]
    else:
        dw_xh = matmul(_transposed(_flat(xs), dtype), _flat(dzx), dtype)
        dw_hh = matmul(_transposed(_flat(h_prev), dtype), _flat(dzh), dtype)
    dxs = matmul(dzx, _transposed(w_xh, dtype), dtype)
    return dw_hh, (dw_xh, jnp.sum(dzx, axis=(0, 1))), None, dxs


_layer.defvjp(_layer_fwd, _layer_bwd)
