"""A sweep's grid, written as data: cells × optimizers × clipping rules × seeds ×
each rule's strengths × placements, and the full run config of each point.

``sweep.placements`` (optional; default ``("gradient",)``) lists where the rules act
(``optim.clip_at``). A placement is part of a run's group key: the placements are
different programs (bptt and example change the backward pass, update the order of
clip and update rule, device the all-reduce), not runtime values; at bptt the rule is
part of the key too (the packed rules' runtime switch acts on the gradient, not inside
the backward pass). A rule a placement
cannot apply (bptt takes only value and global_norm) is left out of that placement,
and the rule ``none``, which clips nowhere, is run at the first placement only.

The rules are those of :mod:`charrnn.clipping` (``sweep.rules``;
``sweep.strengths.<rule>`` lists a rule's strength labels). The rule ``none``
has the one label ``none``. A label is an absolute strength (``"2.5"``: τ, a
bound, λ, a percentile or a z-score, whatever the rule's strength is) or, for
a rule whose strength is a global-norm threshold (``global_norm``), a multiple
of the run's reference norm (``"0.5x"``, see :func:`charrnn.sweep.run.reference_norm`).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from charrnn import clipping, models, optim
from charrnn.errors import UserError


class SweepError(UserError):
    """A malformed grid (rule, strength label, cell, optimizer) or run index."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid. ``strength``: the rule's strength label: 'none' (rule
    none), '0.5x' (relative, norm-type rules) or '2.5' (absolute: τ, a bound, λ, a
    percentile or a z-score, whatever the rule's strength is)."""
    cell: str
    optimizer: str
    seed: int
    strength: str
    rule: str = "global_norm"
    learning_rate: float | None = None  # None: the sweep config's one rate for the optimizer
    clip_at: str = optim.PLACEMENTS[0]  # where the rule acts (optim.clip_at)

    @property
    def name(self) -> str:
        clip = "none" if self.rule == "none" else f"{self.rule}_{self.strength}"
        lr = "" if self.learning_rate is None else f"-lr{self.learning_rate:g}"
        at = "" if self.clip_at == optim.PLACEMENTS[0] else f"-at_{self.clip_at}"
        return f"{self.cell}-{self.optimizer}{lr}-seed{self.seed}-{clip}{at}"

    @property
    def group(self) -> tuple:
        """Runs of one group share one compiled program: their seeds, strengths, learning
        rates and clipping rules are runtime values; the cell (the parameters' shapes),
        the optimizer (its state's) and the placement are not."""
        return self.program(pack_rules=True)

    def program(self, pack_rules: bool = True) -> tuple:
        """The key of the program that trains this run; ``pack_rules=False``: the
        grouping before the rules were packed, one program per (rule, cell, optimizer).
        A placement other than ``gradient`` is a program of its own; at ``bptt`` the rule
        is too (value or norm: a static choice inside the backward pass)."""
        pack = pack_rules and self.clip_at != "bptt"
        key = (self.cell, self.optimizer) if pack else (self.rule, self.cell, self.optimizer)
        return key + (() if self.clip_at == optim.PLACEMENTS[0] else (self.clip_at,))


def parse_threshold(label: str) -> tuple[str, float]:
    """'none' -> ('none', inf); '0.5x' -> ('relative', 0.5); '2.5' -> ('absolute', 2.5)."""
    text = str(label).strip().lower()
    if text in ("none", "inf"):
        return "none", math.inf
    kind, number = ("relative", text[:-1]) if text.endswith("x") else ("absolute", text)
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise SweepError(f"bad threshold {label!r}: use 'none', a positive number, or a "
                         "positive multiple such as '0.5x'")
    return kind, value


def parse_strength(rule: str, label: str) -> tuple[str, float]:
    """A strength label of ``rule``: 'none' only for the rule none; 'Nx' only where the
    rule's strength is a global-norm threshold; else a positive number."""
    if clipping.RULES[rule].strength is None:
        if str(label).strip().lower() != "none":
            raise SweepError(f"the rule none takes no strength; its label is 'none', got {label!r}")
        return "none", math.inf
    kind, value = parse_threshold(label)
    if kind == "none":
        raise SweepError(f"strength 'none' of rule {rule}: put the rule none in sweep.rules")
    if kind == "relative" and not clipping.RULES[rule].norm_threshold:
        norm_rules = [n for n, r in clipping.RULES.items() if r.norm_threshold]
        raise SweepError(f"strength {label!r} of rule {rule}: multiples of the reference norm "
                         f"are for the norm thresholds of {', '.join(norm_rules)}")
    return kind, value


def _strength_labels(sweep_config, rule: str) -> tuple:
    if clipping.RULES[rule].strength is None:
        return ("none",)
    labels = sweep_config.strengths.get(rule) if "strengths" in sweep_config else None
    if not labels:
        raise SweepError(f"sweep.strengths has no labels for rule {rule!r}")
    return tuple(str(t) for t in labels)


def make_grid(sweep_config) -> list[Run]:
    """All runs in a fixed order (cell, optimizer, rule, seed, strength); ``--run_index``
    indexes it."""
    for cell in sweep_config.cells:
        if cell not in models.CELLS:
            raise SweepError(f"unknown cell {cell!r}; choose from {models.CELLS}")
    for name in sweep_config.optimizers:
        if name not in optim.OPTIMIZERS:
            raise SweepError(f"unknown optimizer {name!r}; choose from {optim.OPTIMIZERS}")
        learning_rates(sweep_config, name)
    for rule in sweep_config.rules:
        if rule not in clipping.RULES:
            raise SweepError(f"unknown clipping rule {rule!r} in sweep.rules; choose from "
                             f"{', '.join(clipping.RULES)}")
        for label in _strength_labels(sweep_config, rule):
            parse_strength(rule, label)
    placements = placements_of(sweep_config)
    runs = [Run(c, o, int(s), t, rule, lr, at) for c in sweep_config.cells
            for o in sweep_config.optimizers for lr in learning_rates(sweep_config, o)
            for rule in sweep_config.rules for at in placements if _applies(rule, at, placements)
            for s in sweep_config.seeds for t in _strength_labels(sweep_config, rule)]
    if not runs:
        raise SweepError("the grid is empty: give at least one cell, optimizer, rule and seed")
    return runs


def placements_of(sweep_config) -> tuple:
    """``sweep.placements`` (default: gradient only), each checked against optim.PLACEMENTS."""
    placements = tuple(sweep_config.get("placements", optim.PLACEMENTS[:1]))
    for at in placements:
        if at not in optim.PLACEMENTS:
            raise SweepError(f"unknown placement {at!r} in sweep.placements; choose from "
                             f"{', '.join(optim.PLACEMENTS)}")
    if not placements:
        raise SweepError("sweep.placements is empty: give at least one placement")
    return placements


def _applies(rule: str, clip_at: str, placements: tuple) -> bool:
    """Whether the grid runs ``rule`` at ``clip_at`` (module docstring)."""
    if clipping.RULES[rule].strength is None:
        return clip_at == placements[0]
    return clip_at != "bptt" or rule in optim.BPTT_RULES


def learning_rates(sweep_config, optimizer: str) -> tuple:
    """The learning rates the grid gives ``optimizer``: the list
    ``sweep.learning_rates.<optimizer>``, else the one ``sweep.learning_rate.<optimizer>``."""
    if "learning_rates" in sweep_config and optimizer in sweep_config.learning_rates:
        field, rates = "learning_rates", tuple(sweep_config.learning_rates[optimizer])
    elif "learning_rate" in sweep_config and optimizer in sweep_config.learning_rate:
        field, rates = "learning_rate", (sweep_config.learning_rate[optimizer],)
    else:
        raise SweepError(f"sweep.learning_rates has no entry for optimizer {optimizer!r}")
    if not rates or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                            and 0 < r < math.inf for r in rates):
        raise SweepError(f"sweep.{field}.{optimizer} must be positive numbers, got {rates!r}")
    return tuple(float(r) for r in rates)


def run_config(config, run: Run, tau: float = math.inf) -> ml_collections.ConfigDict:
    """The full training config of one run: the base config with the run's choices.

    The learning rate is the run's (or, for a run without one, the grid's one rate
    for its optimizer); the rule's strength field (``clipping.Rule.strength``) is set to τ.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = run.seed
    c.model.cell = run.cell
    c.optim.name = run.optimizer
    c.optim.learning_rate = (learning_rates(config.sweep, run.optimizer)[0]
                             if run.learning_rate is None else run.learning_rate)
    rule = clipping.RULES[run.rule]
    c.optim.clip_mode = run.rule
    c.optim.clip_at = run.clip_at
    if rule.strength is not None and not math.isinf(tau):
        c.optim[rule.strength.field] = float(tau)
    return c
