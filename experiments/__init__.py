"""charrnn's experiments: scripts on top of the library, never imported by it.

    experiments/configs/   get_config(arg) files: default.py (runs), clip_ablation.py (grid)
    experiments/science/   studies: exploding_gradients, clip_ablation (+ its figures)
    experiments/bench/     speed and memory: benchmark (+ its workers, the NumPy reference),
                           bench_sample, bench_sweep, bench_memory
    experiments/pages/     the generated pages: report (REPORT.md), quality (QUALITY.md)
    experiments/cli.py     what the scripts' ``main`` functions share

Installed with the project (``pip install -e .``), so a script runs both as
``python experiments/science/clip_ablation.py`` and as
``python -m experiments.science.clip_ablation``, and imports its neighbours by
their full name (``from experiments.configs import default``).
"""
