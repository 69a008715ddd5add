"""The registry of gradient-clipping rules: each one an ``optax.GradientTransformation``.

A rule is a factory ``rule(strength, **settings) -> GradientTransformation``
registered with :func:`register`. ``strength`` is the one scalar a sweep
varies (it may be a traced value: one compiled program serves a grid of
strengths); ``settings`` are secondary, static choices with defaults. Each
maps to a field of the ``optim`` config block, so config validation, the
launcher's messages, the sweep and the tests all read :data:`RULES`: adding a
rule is one registered factory here, and there is no other list of names.

Every rule acts on the raw gradient g (a pytree) between the backward pass
and the optimizer (Pascanu, Mikolov & Bengio 2013, Algorithm 1). Norm-type
rules rescale the whole gradient, ĝ = g·τ/‖g‖₂ when ‖g‖₂ > τ, so they keep its
direction; ``value``, ``agc`` and ``block_rms`` act per component, unit or
tensor and may turn it.

Stateless rules keep optax's empty state; ``autoclip`` and ``zclip`` keep a
``NamedTuple`` (part of the optimizer state, hence of every checkpoint) whose
``threshold`` field is the threshold in force at the last update. The train
step logs it as ``clip_threshold`` (:meth:`Rule.threshold`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Setting:
    """One number of a rule, read from ``optim.<field>``; passed as ``kwarg``.

    Allowed values: ``low < v < high``, with ``low``/``high`` included where
    ``closed`` says so; ``integer`` requires an int.
    """
    field: str
    kwarg: str
    default: float
    low: float = 0.0
    high: float = math.inf
    closed: tuple = (False, False)  # (low included, high included)
    integer: bool = False
    sizes_state: bool = False  # the value sets a state shape: fixed once a run has started

    def allows(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        above = value >= self.low if self.closed[0] else value > self.low
        below = value <= self.high if self.closed[1] else value < self.high
        return above and below and math.isfinite(value)

    @property
    def allowed(self) -> str:
        if self.integer:
            return f"an integer >= {self.low:g}"
        if math.isinf(self.high):
            return "a positive number" if self.low == 0 else f"a number > {self.low:g}"
        left, right = ("[" if self.closed[0] else "("), ("]" if self.closed[1] else ")")
        return f"in {left}{self.low:g}, {self.high:g}{right}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A registered rule: its factory and the config fields it reads.

    ``norm_threshold``: the strength is a global-norm threshold τ, so a sweep's
    ``'Nx'`` label (N times the run's reference norm) means something for it.
    ``stateful``: the state carries the threshold in force (``state.threshold``).
    """
    name: str
    factory: Callable[..., optax.GradientTransformation]
    strength: Setting | None
    settings: tuple = ()
    norm_threshold: bool = False
    stateful: bool = False

    def make(self, strength=None, **settings) -> optax.GradientTransformation:
        """The transform at ``strength`` (default: the strength field's default)."""
        kwargs = {s.kwarg: settings.get(s.kwarg, s.default) for s in self.settings}
        if self.strength is None:
            return self.factory(**kwargs)
        return self.factory(self.strength.default if strength is None else strength, **kwargs)

    def threshold(self, state, strength) -> jax.Array:
        """The threshold in force (float32 []): the state's for adaptive rules,
        the strength for the others, inf for ``none``."""
        if self.stateful:
            return state.threshold
        value = math.inf if self.strength is None else strength
        return jnp.asarray(value, jnp.float32)


RULES: dict[str, Rule] = {}


def register(name: str, *, strength: Setting | None, settings: tuple = (),
             norm_threshold: bool = False, stateful: bool = False):
    """Decorator: add a rule factory to :data:`RULES` under ``name``."""
    def add(factory):
        RULES[name] = Rule(name, factory, strength, tuple(settings), norm_threshold, stateful)
        return factory
    return add


class Clip(NamedTuple):
    """A rule bound to its strength: the transform and the threshold-in-force function."""
    transform: optax.GradientTransformation
    threshold: Callable[[Any], jax.Array]  # clip state after an update -> float32 []


def get(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown optim.clip_mode {name!r}; choose from {', '.join(RULES)}")
    return RULES[name]


def settings_of(rule: Rule, optim_config) -> dict:
    """The rule's secondary settings from an ``optim`` config (defaults where absent:
    configs saved before a field existed lack it)."""
    return {s.kwarg: optim_config.get(s.field, s.default) for s in rule.settings}


def strength_of(rule: Rule, optim_config):
    """The rule's strength from an ``optim`` config; None for ``none``."""
    if rule.strength is None:
        return None
    return optim_config.get(rule.strength.field, rule.strength.default)


def from_config(optim_config, strength=None) -> Clip:
    """The rule ``optim.clip_mode`` at ``strength`` (default: the config's, which
    a sweep replaces by a traced scalar)."""
    rule = get(optim_config.clip_mode)
    if strength is None:
        strength = strength_of(rule, optim_config)
    return from_rule(rule.name, strength, **settings_of(rule, optim_config))


def from_rule(name: str, strength=None, **settings) -> Clip:
    """The registered rule ``name`` at ``strength`` (default: its strength field's
    default) with ``settings`` (kwargs; defaults where absent)."""
    rule = get(name)
    if strength is None and rule.strength is not None:
        strength = rule.strength.default
    return Clip(rule.make(strength, **settings), lambda state: rule.threshold(state, strength))


def switch(names: tuple, index, strength, optim_config) -> Clip:
    """Rule ``names[index]`` at ``strength``, the rule itself a runtime value: the packed
    rule of a sweep program that trains runs of several rules.

    ``index``: int32 [] (traced; one per run under ``jax.vmap``); ``strength``: the
    chosen rule's strength; every rule's settings come from ``optim_config``. The
    state is the tuple of every rule's state (the union: a run carries them all);
    an update steps rule ``names[index]`` and its own state and hands the others
    back unchanged, so they stay at their initial values. The threshold in force
    is the chosen rule's.

    ``jax.lax.switch`` runs one branch when ``index`` is one number; under
    ``jax.vmap`` with an index per run it computes every branch and selects each
    run's (``experiments/bench/bench_packing.py`` measures that cost).
    """
    rules = [get(name) for name in names]
    transforms = [r.make(strength, **settings_of(r, optim_config)) for r in rules]

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def branch(i):
        def update(updates, state, params):
            clipped, own = transforms[i].update(updates, state[i], params)
            return clipped, state[:i] + (own,) + state[i + 1:]
        return update

    def update(updates, state, params=None):
        return jax.lax.switch(index, [branch(i) for i in range(len(rules))], updates, state,
                              params)

    def threshold(state):  # every rule's (scalars; a constant for some), then the run's
        return jnp.stack([r.threshold(s, strength) for r, s in zip(rules, state)])[index]

    return Clip(optax.GradientTransformation(init, update), threshold)


def config_problems(optim_config) -> list[str]:
    """One message per bad clipping field of an ``optim`` config (read by charrnn.config)."""
    name = optim_config.get("clip_mode")
    if name not in RULES:
        return [f"unknown optim.clip_mode {name!r}; choose from {', '.join(RULES)}"]
    rule = RULES[name]
    problems = []
    for setting in ((rule.strength,) if rule.strength else ()) + rule.settings:
        value = optim_config.get(setting.field, setting.default)
        if not setting.allows(value):
            problems.append(f"optim.{setting.field} must be {setting.allowed} with "
                            f"optim.clip_mode={name}, got {value!r}")
    return problems


def resume_problems(saved: dict, current: dict) -> list[str]:
    """The settings of the current rule whose change breaks a checkpoint's clip state.

    ``optim.clip_mode`` itself is compared by the caller; a setting that sizes
    the state (autoclip's history length) may not change. The strength and the
    other settings may change on resume: the state keeps its shapes.
    """
    rule = RULES.get(current.get("clip_mode"))
    if rule is None or saved.get("clip_mode") != rule.name:
        return []
    return [f"optim.{s.field} {saved.get(s.field, s.default)!r} -> {current.get(s.field, s.default)!r}"
            for s in rule.settings if s.sizes_state
            and saved.get(s.field, s.default) != current.get(s.field, s.default)]


def config_fields() -> dict:
    """Every config field any rule reads -> its default (for default configs and old checkpoints)."""
    out = {}
    for rule in RULES.values():
        for s in ((rule.strength,) if rule.strength else ()) + rule.settings:
            out[s.field] = s.default
    return out


# ---------------------------------------------------------------------------
# The rules

_TAU = Setting("clip_norm", "tau", 1.0)  # the contract field: τ, the bound, λ


@register("none", strength=None)
def no_clipping() -> optax.GradientTransformation:
    """ĝ = g. Threshold in force: ∞.

    References: the baseline of Pascanu, Mikolov & Bengio 2013.
    """
    return optax.identity()


@register("global_norm", strength=_TAU, norm_threshold=True)
def global_norm(tau) -> optax.GradientTransformation:
    """ĝ = g·τ/‖g‖₂ if ‖g‖₂ > τ else g, ‖g‖₂ over all leaves (optax's, no epsilon).

    References: Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
    recurrent neural networks", Algorithm 1.
    """
    return optax.clip_by_global_norm(tau)


@register("value", strength=_TAU)
def value(tau) -> optax.GradientTransformation:
    """ĝ_i = clip(g_i, −τ, τ) for every component (optax.clip); turns the gradient.

    References: Mikolov 2012 (PhD thesis), clipping gradient components.
    """
    return optax.clip(tau)


@register("agc", strength=_TAU)
def agc(tau) -> optax.GradientTransformation:
    """Unit-wise: G_u ← λ·max(‖W_u‖, ε)/‖G_u‖ · G_u if ‖G_u‖/max(‖W_u‖, ε) > λ.

    λ = τ, ε = 1e-3 (optax.adaptive_grad_clip). A unit is a column of a 2-D
    kernel [in, out] (the norm over axis 0: one per output unit) and the whole
    of a vector (bias, gain).

    References: Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization", §4.1.
    """
    return optax.adaptive_grad_clip(tau)


@register("block_rms", strength=_TAU)
def block_rms(tau) -> optax.GradientTransformation:
    """Per tensor (leaf) G: G ← G / max(1, rms(G)/τ), rms(G) = sqrt(mean(G²)).

    References: optax.clip_by_block_rms (per-block RMS bound, as in Adafactor's
    update clipping, Shazeer & Stern 2018, §6).
    """
    return optax.clip_by_block_rms(tau)


def _rescale(updates, norm, tau):
    """g·τ/‖g‖ where ‖g‖ > τ, else g (leaf dtypes kept)."""
    scale = jnp.where(norm > tau, tau / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)


class AutoClipState(NamedTuple):
    """history: f32 [H] ring buffer of pre-clip norms; count: i32 [] norms seen;
    threshold: f32 [] the τ_t of the last update."""
    history: jax.Array
    count: jax.Array
    threshold: jax.Array


def percentile_of_first(values, n, p):
    """The p-th percentile (numpy's default, linear interpolation) of ``values[:n]``.

    values: [H], n: i32 [] with 1 ≤ n ≤ H, p in (0, 100]; jittable (the
    entries past n are pushed to the end of the sort as +inf and never read).
    """
    size = values.shape[0]
    ordered = jnp.sort(jnp.where(jnp.arange(size) < n, values, jnp.inf))
    pos = (n - 1).astype(jnp.float32) * (jnp.asarray(p, jnp.float32) / 100.0)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    frac = pos - lo.astype(jnp.float32)
    return ordered[lo] + frac * (ordered[hi] - ordered[lo])


@register("autoclip", strength=Setting("autoclip_percentile", "percentile", 10.0, 0.0, 100.0,
                                       closed=(False, True)),
          settings=(Setting("autoclip_history", "history", 1000, 1, closed=(True, False),
                            integer=True, sizes_state=True),),
          stateful=True)
def autoclip(percentile, history: int = 1000) -> optax.GradientTransformation:
    """τ_t = the p-th percentile of the last min(t, H) pre-clip norms, this step's
    included; then ĝ = g·τ_t/‖g‖ if ‖g‖ > τ_t.

    The current norm joins the history before τ_t is taken (as in the authors'
    code), so the first step is never clipped (τ_1 = ‖g_1‖) and until H norms
    have been seen the percentile is over those seen so far. The history is a
    ring buffer of H = ``history`` float32 norms (the oldest replaced), so the
    step is jittable; the percentile interpolates linearly (numpy's default).
    A step whose norm is not finite is discarded whole by the train step, so
    it never enters the history.

    References: Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive
    Gradient Clipping for Source Separation Networks" (MLSP), §2.
    """
    def init(params):
        del params
        return AutoClipState(jnp.zeros((history,), jnp.float32), jnp.zeros((), jnp.int32),
                             jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates).astype(jnp.float32)
        buffer = state.history.at[state.count % history].set(norm)
        count = state.count + 1
        tau = percentile_of_first(buffer, jnp.minimum(count, history), percentile)
        return _rescale(updates, norm, tau), AutoClipState(buffer, count, tau)

    return optax.GradientTransformation(init, update)


class ZClipState(NamedTuple):
    """count: i32 [] norms seen; mean, var: f32 [] statistics of the (clipped)
    norms; threshold: f32 [] the spike level μ + z_thr·(σ + ε) of the last update
    (∞ during the warm-up)."""
    count: jax.Array
    mean: jax.Array
    var: jax.Array
    threshold: jax.Array


ZCLIP_EPS = 1e-6  # ε of z = (g − μ)/(σ + ε), the reference implementation's


@register("zclip", strength=Setting("zclip_z", "z_thr", 2.5),
          settings=(Setting("zclip_alpha", "alpha", 0.97, 0.0, 1.0),
                    Setting("zclip_warmup", "warmup", 25, 1, closed=(True, False), integer=True)),
          stateful=True)
def zclip(z_thr, alpha: float = 0.97, warmup: int = 25) -> optax.GradientTransformation:
    """Z-score clipping of the global norm g_t against EMA statistics.

    Warm-up (steps 1..N, N = ``warmup``): no clipping; μ and σ² are the mean and
    population variance of the norms so far (Welford), so after N steps they
    are those of the first N norms. Then, with σ = √σ²,

        z = (g − μ)/(σ + ε);  if z > z_thr:  τ = μ + z_thr·σ/(z/z_thr),  ĝ = g·τ/g
        g' = τ if clipped else g;  μ ← αμ + (1−α)g';  σ² ← ασ² + (1−α)(g' − μ)²

    (μ updated first, then σ² with the new μ; the clipped norm is fed back so a
    spike does not inflate the statistics). This is the paper's default
    "adaptive_scaling" variant (clip factor 1, no max-norm cap): the larger the
    spike, the lower the target. The logged threshold is the spike level
    μ + z_thr·(σ + ε) above which a norm is clipped.

    References: Kumar, Owen, Chowdhury & Güra 2025, "ZClip: Adaptive Spike
    Mitigation for LLM Pre-Training" (arXiv 2504.02507), Algorithm 1.
    """
    z_thr = jnp.asarray(z_thr, jnp.float32)

    def init(params):
        del params
        zero = lambda: jnp.zeros((), jnp.float32)
        return ZClipState(jnp.zeros((), jnp.int32), zero(), zero(), zero())

    def update(updates, state, params=None):
        del params
        g = optax.tree.norm(updates).astype(jnp.float32)
        warming = state.count < warmup
        # Warm-up: running mean and population variance (Welford).
        n = (state.count + 1).astype(jnp.float32)
        delta = g - state.mean
        w_mean = state.mean + delta / n
        w_var = (state.var * (n - 1.0) + delta * (g - w_mean)) / n
        # After: z-score against the statistics, adaptive target, EMA of the clipped norm.
        std = jnp.sqrt(state.var)
        z = (g - state.mean) / (std + ZCLIP_EPS)
        spike = (~warming) & (z > z_thr)
        target = state.mean + z_thr * std / jnp.where(spike, z / z_thr, 1.0)
        fed = jnp.where(spike, target, g)
        e_mean = alpha * state.mean + (1.0 - alpha) * fed
        e_var = alpha * state.var + (1.0 - alpha) * jnp.square(fed - e_mean)
        level = jnp.where(warming, jnp.inf, state.mean + z_thr * (std + ZCLIP_EPS))
        clipped = _rescale(updates, g, jnp.where(spike, target, jnp.inf))
        new = ZClipState(state.count + 1, jnp.where(warming, w_mean, e_mean),
                         jnp.where(warming, w_var, e_var), level)
        return clipped, new

    return optax.GradientTransformation(init, update)
