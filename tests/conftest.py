"""Shared test fixtures. Tests run on the CPU."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One XLA compilation cache per session, inherited by the launch.py subprocesses that
    # tests start: the same program (e.g. the smoke config's train step) compiles once.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="charrnn-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# Cache every program, not only those that took over a second to compile (JAX's default):
# the tests' tiny programs each compile in well under a second, dozens of times over.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SPEECH = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

"""


@pytest.fixture
def text_file(tmp_path):
    """A small UTF-8 corpus (about 2 KB) in a temporary file."""
    path = tmp_path / "corpus.txt"
    path.write_text(_SPEECH * 15)
    return str(path)


@pytest.fixture
def smoke_config(text_file):
    """The smoke config (tiny model, few steps) on the small corpus."""
    from experiments.configs import default
    config = default.get_config("smoke")
    config.data.path = text_file
    config.data.val_fraction = config.data.test_fraction = 0.1
    return config


def _fast_and_one_autodiff():
    """(cell, fast_vjp) cases: the scan path of every built-in cell, and the plain autodiff
    path (``fast_vjp=False``, the same for every cell: autodiff of the Flax module that
    steps the cell's update) once, on the LSTM."""
    from charrnn import cells
    return [(cell, True) for cell in cells.names()] + [("lstm", False)]


FAST_AND_ONE_AUTODIFF = _fast_and_one_autodiff()
