"""The header a training run prints: what it trains, and how it optimizes and clips."""

import numpy as np
import pytest

from charrnn import clipping, optim, runinfo
from experiments.configs import default


def _header(config) -> list[str]:
    return runinfo.header(config, "runs/x", params={"w": np.zeros(3)}, text_chars=10,
                          vocab_size=3, splits=([1], [2], [3]), start_step=0,
                          checkpoints="").splitlines()


def _line(lines, name) -> str:
    (line,) = [x for x in lines if x.startswith(f"  {name} ")]
    return line


@pytest.mark.parametrize("rule", list(clipping.RULES))
def test_the_header_names_the_clipping_rule_its_strength_and_settings(rule):
    config = default.get_config("smoke")
    config.optim.clip_mode = rule
    r = clipping.RULES[rule]
    for i, setting in enumerate(((r.strength,) if r.strength else ()) + r.settings):
        # A value of its own per field, so that a header printing another field's fails.
        config.optim[setting.field] = 7 + i if setting.integer else 0.25 + i / 100
    clip = _line(_header(config), "clipping")
    if r.strength is None:
        assert clip == f"  clipping {rule} (no clipping)"
        return
    expected = f"{r.strength.field}={config.optim[r.strength.field]:g}"
    # where it acts: the default placement, and another (a rule bptt takes: bptt)
    config.optim.clip_at = "bptt" if rule in optim.BPTT_RULES else "example"
    assert clip.startswith(f"  clipping {rule}, {expected}") and clip.endswith(
        ", clip_at=gradient")
    assert _line(_header(config), "clipping").endswith(f", clip_at={config.optim.clip_at}")
    for setting in r.settings:
        assert f"{setting.field}={config.optim[setting.field]:g}" in clip


def test_the_header_names_the_optimizer_schedule_and_averaged_weights():
    config = default.get_config("smoke")
    lines = _header(config)
    assert _line(lines, "optim") == "  optim    adam, learning rate 0.002, constant schedule"
    assert not [x for x in lines if "averaged" in x]  # ema_decay 0: off, not named
    config.optim.update(name="adamw", weight_decay=0.05, learning_rate=3e-4, schedule="cosine",
                        warmup_steps=40, final_lr_fraction=0.2, ema_decay=0.995)
    lines = _header(config)
    assert _line(lines, "optim") == ("  optim    adamw (weight decay 0.05), learning rate "
                                     "0.0003, cosine schedule (warm-up 40 steps, decay to 0.2 x "
                                     "the learning rate)")
    assert _line(lines, "ema") == ("  ema      averaged weights, decay 0.995 (eval and "
                                   "sampling use them)")
    config.optim.update(name="sgd", momentum=0.9)
    assert _line(_header(config), "optim").startswith("  optim    sgd (momentum 0.9), ")


@pytest.mark.parametrize("installed", [True, False])
def test_the_tensorboard_command_runs_through_this_interpreter(installed, monkeypatch):
    """The printed viewer command needs no ``tensorboard`` on PATH: the run's own python
    runs it, installing the pinned viewer extra first where it is missing."""
    import importlib.util
    import shlex
    import sys
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if installed else None) if name == "tensorboard" else find_spec(name, *a)))
    line = runinfo.next_commands("runs/x", "launch.py").splitlines()[-1]
    python = shlex.quote(runinfo._short(sys.executable))
    view = f"{python} -m tensorboard.main --logdir runs/x/tensorboard"
    install = f"{python} -m pip install 'tensorboard<3,>=2.16' && "
    assert line == "  TensorBoard:  " + ("" if installed else install) + view
    assert runinfo.viewer_requirement() == "tensorboard<3,>=2.16"  # setup.cfg's viewer extra
