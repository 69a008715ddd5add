"""The stability map: the clip ablation's model and base run, with the learning rate as an axis.

    python experiments/science/stability.py --outdir=DIR [--smoke]
    python experiments/science/stability.py --outdir=DIR --config.sweep.seeds="(0,)"

Every field is the clip ablation's (experiments/configs/clip_ablation.py: the model,
B, T, the corpus, the reference norm of relative thresholds) but the grid and the
length of the runs. Variant: smoke (tiny, seconds).
"""

import ml_collections

from experiments.configs import clip_ablation


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = clip_ablation.get_config()
    # Shorter than the ablation's 3000 steps: the map asks where training survives, not
    # where it plateaus. The 480 runs × 600 steps take about 22 minutes on 2 idle CPU
    # cores (docs/design-notes.md, "The stability map's grid").
    config.train.num_steps = 600
    s = config.sweep
    s.cells = ("rnn", "lstm")
    s.optimizers = ("sgd", "adam")
    s.seeds = (0, 1, 2)
    # No clipping, global-norm clipping at three multiples of the reference norm, and the
    # adaptive setting with the lowest mean final val bpc over the tanh RNN and LSTM panels
    # of REPORT.md §2.2 (ablation of 2026-11-30: zclip 1.5, 2.553 bpc averaged over
    # rnn/lstm × sgd/adam, against 2.558-2.561 for zclip 2.5 and autoclip 10, 50).
    s.rules = ("none", "global_norm", "zclip")
    s.strengths.global_norm = ("0.25x", "1x", "4x")
    s.strengths.zclip = ("1.5",)
    # Half-decade grids over 3.5 decades, from rates that train slowly to rates at which no
    # clipping diverges: in 400-step probes of seed 0 without clipping, SGD diverged from
    # 3 (tanh RNN) and 30 (LSTM) on, Adam from 0.3 (tanh RNN) and 1 (LSTM) on (the same
    # note).
    s.learning_rates = ml_collections.ConfigDict({
        "sgd": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0),
        "adam": (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)})
    s.eval_every = 100
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
    # two programs (none, global_norm); at 1000 the runs diverge
    c.sweep.cells, c.sweep.optimizers = ("lstm",), ("sgd",)
    c.sweep.rules = ("none", "global_norm")
    c.sweep.strengths.global_norm = ("1x",)
    c.sweep.learning_rates.sgd = (0.1, 10.0, 1000.0)


_VARIANTS = {"smoke": _smoke}
