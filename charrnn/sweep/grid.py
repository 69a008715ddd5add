"""A sweep's grid, written as data: cells × optimizers × clipping rules × seeds ×
each rule's strengths, and the full run config of each point.

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
    """One point of the grid. ``threshold``: the rule's strength label: 'none' (rule
    none), '0.5x' (relative, norm-type rules) or '2.5' (absolute)."""
    cell: str
    optimizer: str
    seed: int
    threshold: str
    rule: str = "global_norm"

    @property
    def name(self) -> str:
        clip = "none" if self.rule == "none" else f"{self.rule}_{self.threshold}"
        return f"{self.cell}-{self.optimizer}-seed{self.seed}-{clip}"

    @property
    def group(self) -> tuple:
        """Runs of one group share one compiled program."""
        return (self.rule, self.cell, self.optimizer)


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
        if name not in sweep_config.learning_rate:
            raise SweepError(f"sweep.learning_rate has no entry for optimizer {name!r}")
    for rule in sweep_config.rules:
        if rule not in clipping.RULES:
            raise SweepError(f"unknown clipping rule {rule!r} in sweep.rules; choose from "
                             f"{', '.join(clipping.RULES)}")
        for label in _strength_labels(sweep_config, rule):
            parse_strength(rule, label)
    runs = [Run(c, o, int(s), t, rule) for c in sweep_config.cells
            for o in sweep_config.optimizers for rule in sweep_config.rules
            for s in sweep_config.seeds for t in _strength_labels(sweep_config, rule)]
    if not runs:
        raise SweepError("the grid is empty: give at least one cell, optimizer, rule and seed")
    return runs


def run_config(config, run: Run, tau: float = math.inf) -> ml_collections.ConfigDict:
    """The full training config of one run: the base config with the run's choices.

    The learning rate comes from ``config.sweep.learning_rate[optimizer]``; the
    rule's strength field (``clipping.Rule.strength``) is set to τ.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    c.seed = run.seed
    c.model.cell = run.cell
    c.optim.name = run.optimizer
    c.optim.learning_rate = float(config.sweep.learning_rate[run.optimizer])
    rule = clipping.RULES[run.rule]
    c.optim.clip_mode = run.rule
    if rule.strength is not None and not math.isinf(tau):
        c.optim[rule.strength.field] = float(tau)
    return c
