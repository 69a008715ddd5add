"""Run ``launch.py`` many times cheaply: import its dependencies once, fork per run.

    python tests/launch_forks.py < cases.json > results.json

stdin: a JSON list of argument lists (what follows ``python launch.py``).
stdout: a JSON list of ``{"args", "returncode", "stdout", "stderr"}``.

A fresh interpreter spends seconds importing JAX, Flax, optax and orbax
before launch.py can even report a missing file. Here they are imported once;
each run is a child forked from this process that executes launch.py as
``__main__`` with its own ``sys.argv``, exactly as ``python launch.py ARGS``
would: the same flag definitions and parsing (launch.py itself is imported in
the child, never here), the same error handling, its own exit status. JAX's
runtime is not started before the fork (nothing here computes), so the
children start from a clean, single-threaded state.
"""

import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")


def _preimport():
    """What launch.py pulls in, minus launch.py (it reads sys.argv while importing)."""
    import absl.app  # noqa: F401
    import ml_collections.config_flags  # noqa: F401
    import charrnn.train  # noqa: F401  (jax, flax, optax, orbax, numpy)
    import charrnn.cli  # noqa: F401
    import charrnn.sampling  # noqa: F401


def _child(args: list[str], out, err) -> None:
    """In the forked child: launch.py with ``args``; never returns."""
    code = 1
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.argv = [LAUNCH] + args
        runpy.run_path(LAUNCH, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what the interpreter would do with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(args: list[str]) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            _child(args, out, err)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"args": args, "returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace")}


def launch_many(cases: list[list[str]], timeout: float = 600) -> list[dict]:
    """From a test: ``cases`` through this script in one subprocess; its list of results."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(cases),
                         capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def main():
    cases = json.load(sys.stdin)
    _preimport()
    # Not the repository: launch.py finds its default config beside itself, from anywhere.
    with tempfile.TemporaryDirectory(prefix="charrnn-launch-") as cwd:
        os.chdir(cwd)
        results = [run(args) for args in cases]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
