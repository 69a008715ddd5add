"""Clipping sweeps: many training runs as data, run one at a time or as one program.

- :mod:`charrnn.sweep.grid`: the grid (cells × optimizers × rules × seeds ×
  strengths), its labels and each run's config;
- :mod:`charrnn.sweep.run`: the corpus, single runs, the reference norm and
  groups of runs (every rule of a cell and optimizer) vmapped in one jitted program;
- :mod:`charrnn.sweep.results`: one table row per run.

The names below are the package's interface (``from charrnn import sweep``).
"""

from charrnn.sweep.grid import (Run, SweepError, make_grid, parse_strength, parse_threshold,
                                run_config)
from charrnn.sweep.results import summarize
from charrnn.sweep.run import (STEP_METRICS, Corpus, default_runs_per_chunk, group_hypers,
                               group_mesh, group_optimizer, group_rules, init_group,
                               make_group_step, reference_norm, run_group, run_single,
                               stack_batches, strengths)

__all__ = ["Corpus", "Run", "STEP_METRICS", "SweepError", "default_runs_per_chunk",
           "group_hypers", "group_mesh", "group_optimizer", "group_rules", "init_group",
           "make_group_step", "make_grid", "parse_strength", "parse_threshold",
           "reference_norm", "run_config", "run_group", "run_single", "stack_batches",
           "strengths", "summarize"]
