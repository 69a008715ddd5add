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
# On the CPU, compile without LLVM's optimization passes (JAX's switch for programs that
# take longer to compile than to run): the suite's time is mostly XLA compiling hundreds of
# small programs once each, and this cuts the suite's CPU time by about a quarter
# (docs/design-notes.md, "The test suite's time"). Every program computes what it computed,
# to rounding; a test may ask one program for the same bits twice (a resumed run), not two
# different programs. An environment variable, so the subprocesses that tests start (launch.py, the 4-device
# children, report.py's steps) compile the same way.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    # XLA's older CPU code generator for fusions compiles the same programs in about two
    # thirds of the time (the suite on 2 idle cores: 277 -> 186 s); only on the jaxlib it was
    # measured with, since XLA aborts on a flag it no longer knows.
    from importlib import metadata
    if metadata.version("jaxlib").startswith("0.10."):
        os.environ["XLA_FLAGS"] = " ".join(filter(None, (
            os.environ.get("XLA_FLAGS"), "--xla_cpu_use_fusion_emitters=false")))

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


def sweep_on_small_corpus(config, text_file):
    """A sweep study's config (its smoke variant) reading the small corpus, in place."""
    config.data.path = text_file
    config.data.val_fraction = config.data.test_fraction = 0.1
    config.sweep.eval_chars = 200
    return config


@pytest.fixture
def ablation_config(text_file):
    """The clip ablation's smoke config on the small corpus (a sweep's grid in seconds)."""
    from experiments.configs import clip_ablation
    return sweep_on_small_corpus(clip_ablation.get_config("smoke"), text_file)


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


class ReportSmoke:
    """The report's smoke workdir, shared by the test session's workers.

    ``step(name)`` runs ``report.py --smoke --steps=NAME`` into it once, on whichever worker
    asks first (the others wait for it), and returns the step's directory: each experiment's
    own test module checks its outputs, and test_report_smoke.py renders the page from all of
    them (``--reuse``), so every step runs once per session and the workers share them.
    """

    def __init__(self, root):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.corpus = root / "corpus.txt"
        if not self.corpus.exists():  # the same bytes from every worker: a race is harmless
            tmp = root / f"corpus.{os.getpid()}"
            tmp.write_text(_SPEECH * 15)
            os.replace(tmp, self.corpus)

    def step(self, name: str, timeout: float = 1200.0):
        import subprocess
        import sys
        import time
        done, failed = self.root / f"{name}.done", self.root / f"{name}.failed"
        try:
            os.close(os.open(self.root / f"{name}.lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # another worker runs it: wait for its verdict
            deadline = time.monotonic() + timeout
            while not (done.exists() or failed.exists()) and time.monotonic() < deadline:
                time.sleep(0.5)
        else:
            ok, message = False, "interrupted"
            try:
                r = subprocess.run(
                    [sys.executable, "experiments/pages/report.py", "--smoke",
                     f"--workdir={self.root}", f"--data_path={self.corpus}", f"--steps={name}"],
                    cwd=REPO, capture_output=True, text=True)
                ok, message = r.returncode == 0, r.stderr[-3000:]
            finally:  # a verdict even when interrupted: the other workers wait for one
                (done if ok else failed).write_text(message)
        if failed.exists():
            pytest.fail(f"report.py --smoke --steps={name} failed:\n{failed.read_text()}")
        assert done.exists(), f"report.py --smoke --steps={name} did not finish in {timeout} s"
        return self.root / name  # report.py's subdirectory of the step


@pytest.fixture(scope="session")
def report_smoke(tmp_path_factory, request):
    """:class:`ReportSmoke` in a directory every worker of this session sees (pytest-xdist's
    workers' base temporary directories share a parent; without xdist, the session's own)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if hasattr(request.config, "workerinput") else base
    return ReportSmoke(shared / "report_smoke")
