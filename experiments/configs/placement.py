"""Where clipping sits: the clip ablation's model and base run, one grid per cell.

    python experiments/science/placement.py --outdir=DIR [--smoke]

Every field is the clip ablation's (experiments/configs/clip_ablation.py: the model,
B, T, the corpus) but the grid and the length of the runs. In this study a strength
label is a multiple of the placement's reference (experiments/science/placement.py:
the threshold at which the rule changes half the units it acts on at initialization),
so "1" means the same thing at every placement. Variant: smoke (tiny, seconds).
"""

import ml_collections

from experiments.configs import clip_ablation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = clip_ablation.get_config()
    config.train.num_steps = 600  # the stability map's length (experiments/configs/stability.py)
    s = config.sweep
    s.cells = ("rnn", "lstm", "irnn")
    s.optimizers = ("sgd", "adam")
    s.seeds = (0, 1, 2)
    s.rules = ("none", "global_norm", "value")
    s.strengths.global_norm, s.strengths.value = ("1",), ("1",)
    # device is gradient on one device (optim.clip_at): not a placement of this study.
    s.placements = ("gradient", "update", "bptt", "example")
    s.eval_every = 100
    # Per cell and optimizer: the largest learning rate at which no seed of the unclipped
    # runs diverged, and twice it, where clipping has something to do. rnn and lstm: the
    # stability map (REPORT.md §2.4, 600 steps, 3 seeds). irnn, which the map does not
    # cover, in probes of seed 0 on this model (docs/design-notes.md, "Where clipping
    # sits"): Adam without clipping trained at 0.01 and diverged from 0.03 on; SGD without
    # clipping diverged at every rate from 1e-4 to 1 (its initial gradient norm is about
    # 1.6e4), and with global_norm 1x trained at 1e-3 and diverged from 1e-2 on: its
    # rates are 1e-3 and twice it, where only clipping can train.
    s.learning_rates_by_cell = ml_collections.ConfigDict({
        "rnn": {"sgd": (1.0, 2.0), "adam": (0.1, 0.2)},
        "lstm": {"sgd": (10.0, 20.0), "adam": (0.3, 0.6)},
        "irnn": {"sgd": (0.001, 0.002), "adam": (0.01, 0.02)}})
    if arg:
        apply_variant(config, arg)
    return config


def apply_variant(config: ml_collections.ConfigDict, name: str) -> None:
    """Change ``config`` in place to the named variant."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown config variant {name!r}; choose from {sorted(_VARIANTS)}")
    _VARIANTS[name](config)


def _smoke(c):
    clip_ablation.apply_variant(c, "smoke")  # the ablation's tiny model and run
    c.sweep.cells, c.sweep.optimizers, c.sweep.seeds = ("lstm",), ("sgd",), (0,)
    c.sweep.rules = ("none", "global_norm", "value")
    c.sweep.strengths.global_norm, c.sweep.strengths.value = ("1",), ("1",)
    c.sweep.warmup_steps = 2
    c.sweep.learning_rates_by_cell = ml_collections.ConfigDict({"lstm": {"sgd": (1.0,)}})


_VARIANTS = {"smoke": _smoke}
