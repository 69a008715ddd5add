"""What a recurrent cell is: its parameters, its carry and its update.

A cell with G gate blocks and hidden size H has the parameters

    W_xh [E, G*H]   input weights (E: the layer's input size)
    W_hh [H, G*H]   recurrent weights, one block per gate (diagnostics read it by name)
    b    [G*H]      bias
    extras          any further parameters, from :meth:`Cell.extra_params`

and one *update*: with the pre-activations zx_t = x_t W_xh + b and
zh_t = h_{t-1} W_hh (both [B, G*H]; h_{t-1} = ``recurrent_input(carry)``),

    carry_t, y_t = update(extras, carry_{t-1}, zx_t, zh_t)

where y_t [B, H] is the layer's output. Everything else is derived from
that: the Flax module (``models.CellModule``), the training scan and its
backward pass (``charrnn.scan``: the per-step backward is ``jax.vjp`` of
``update``), the inference step and the diagnostics.

A user cell subclasses :class:`Cell`, sets ``num_gates`` and writes
``update`` (README, "Your own cell"); :func:`check` tries it on a tiny input.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Cell:
    """Base class of every cell; a subclass sets ``num_gates`` and defines :meth:`update`.

    Optional overrides: :meth:`extra_params`, :meth:`init_carry` with
    :meth:`recurrent_input` (a carry other than one [B, H] array), the
    initialisers, and a hand-tuned backward pair (:meth:`tuned_forward`,
    :meth:`tuned_backward`) that must equal the derived one.
    """
    num_gates: int = 0  # G: W_hh is [H, G*H]
    title: str = ""  # a human name for reports ("tanh RNN"); defaults to the class name

    def update(self, params: dict, carry, zx, zh):
        """(extras, carry_{t-1}, zx_t [B, G*H], zh_t [B, G*H]) -> (carry_t, y_t [B, H])."""
        raise NotImplementedError

    def extra_params(self, hidden_size: int) -> dict:
        """Further parameters: {name: (shape, initializer(key, shape))}; none by default."""
        del hidden_size
        return {}

    def init_carry(self, batch_size: int, hidden_size: int):
        """The zero state: [B, H] by default."""
        return jnp.zeros((batch_size, hidden_size))

    def recurrent_input(self, carry):
        """The [B, H] part of the carry that multiplies W_hh (the carry itself by default)."""
        return carry

    def input_init(self, key, shape, dtype=jnp.float32):
        """W_xh: Glorot uniform."""
        return nn.initializers.glorot_uniform()(key, shape, dtype)

    def recurrent_init(self, key, shape, dtype=jnp.float32):
        """W_hh: each [H, H] gate block orthogonal (all its singular values 1)."""
        keys = jax.random.split(key, self.num_gates)
        return jnp.concatenate([nn.initializers.orthogonal()(k, (shape[0],) * 2, dtype)
                                for k in keys], axis=1)

    def bias_init(self, key, shape, dtype=jnp.float32):
        """b: zeros."""
        del key
        return jnp.zeros(shape, dtype)

    # A hand-tuned backward (built-in cells, only where it measures >= 5% faster than
    # the derived one; tests/test_cells.py ties it to jax.vjp of update):
    #   tuned_forward(params, carry, zx, zh) -> (carry, y, saved)
    #   tuned_backward(params, saved, (dcarry, dy)) -> (dparams, dcarry_prev, dzx, dzh)
    # where dcarry_prev is only the direct part (not through zh).
    tuned_forward = None
    tuned_backward = None

    @property
    def name(self) -> str:
        return self.title or type(self).__name__

    def __repr__(self):
        return f"{type(self).__module__}.{type(self).__qualname__}()"


@jax.custom_jvp
def tanh(x):
    """tanh, differentiated as tanh' = 1 - tanh².

    JAX's own rule multiplies by (1 + y) and (1 - y) separately, so a saved
    backward pass (charrnn.scan) would store both; this rule stores one factor.
    """
    return jnp.tanh(x)


@tanh.defjvp
def _tanh_jvp(primals, tangents):
    y = jnp.tanh(primals[0])
    return y, tangents[0] * (1.0 - y * y)


def sigmoid(x):
    """σ(x) = ½ tanh(x/2) + ½: one tanh, which XLA's CPU loops run faster than exp."""
    return 0.5 * tanh(0.5 * x) + 0.5


def check(cell: Cell, name: str, error: type) -> None:
    """Raise ``error`` (one line) unless ``cell`` provides what the derivations need.

    Tries update on abstract shapes (B=2, H=3, one gate block per num_gates): the
    new carry must have the structure and shapes of ``init_carry``, y must be [B, H].
    """
    G = cell.num_gates
    if not (isinstance(G, int) and not isinstance(G, bool) and G >= 1):
        raise error(f"model.cell {name!r}: num_gates must be a positive integer, got {G!r}")
    if type(cell).update is Cell.update:
        raise error(f"model.cell {name!r}: the class defines no update(params, carry, zx, zh)")
    B, H = 2, 3
    try:
        extras = {k: jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
                  for k, (shape, _) in cell.extra_params(H).items()}
        carry = jax.eval_shape(lambda: cell.init_carry(B, H))
        z = jax.ShapeDtypeStruct((B, G * H), jnp.float32)
        h = jax.eval_shape(cell.recurrent_input, carry)
        new_carry, y = jax.eval_shape(cell.update, extras, carry, z, z)
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported in one line
        raise error(f"model.cell {name!r}: trying update on a [2, {G * H}] input failed: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    if getattr(h, "shape", None) != (B, H):
        raise error(f"model.cell {name!r}: recurrent_input(carry) must be [B, H] = {(B, H)}, "
                    f"got {shapes(h)}")
    if shapes(new_carry) != shapes(carry):
        raise error(f"model.cell {name!r}: update returned a carry shaped {shapes(new_carry)}; "
                    f"init_carry gives {shapes(carry)}")
    if getattr(y, "shape", None) != (B, H):
        raise error(f"model.cell {name!r}: update's output must be [B, H] = {(B, H)}, "
                    f"got {shapes(y)}")
