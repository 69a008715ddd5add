"""Run configs as ``get_config(arg)`` files: ``default.py`` (variants after a colon), ``clip_ablation.py``."""
