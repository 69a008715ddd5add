"""What a run says about itself: the header, the closing commands, ``launches.jsonl``.

A training run begins by printing what it trains (:func:`header`) and ends with
the commands that use its result (:func:`next_commands`). Each launch also
appends one JSON line to ``<workdir>/launches.jsonl`` (:func:`launch_record`),
so that a page built from the workdir can say on what hardware and software
every stretch of the run was trained:

    {"start_step": int, "started": ISO-8601 UTC, "config_arg": --config as given or null,
     "argv": [...],
     "hardware": {"host", "cpu", "cpu_count", "platform" (cpu|gpu|tpu), "device_count",
                  "device_kind"},
     "software": {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "charrnn_commit" (git HEAD of the package's checkout, or null)}}
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import socket
import subprocess
import sys

import numpy as np

LAUNCHES = "launches.jsonl"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def header(config, workdir: str, *, params, text_chars: int, vocab_size: int, splits,
           start_step: int, checkpoints: str, init_from: dict | None = None) -> str:
    """The lines a training run prints before its first step.

    ``params``: the model's parameter pytree; ``splits``: the (train, val, test)
    id arrays; ``checkpoints``: the directory a resumed run continues from;
    ``init_from``: ``{"workdir", "step"}`` whose weights a fine-tuned run started from.
    """
    import jax
    from charrnn import config as config_lib
    config = config_lib.upgrade(config)  # a config saved before a field existed
    m, t = config.model, config.train
    num_params = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    devices = jax.devices()
    corpus = os.path.abspath(config.data.path) if config.data.path else config.data.name
    n_train, n_val, n_test = (len(ids) for ids in splits)
    kinds = sorted({d.device_kind for d in devices})
    lines = [
        f"charrnn: {m.cell} {m.num_layers}x{m.hidden_size} "
        f"(embedding {m.embed_dim}), {num_params:,} parameters",
        f"  corpus   {corpus}: {text_chars:,} characters, vocabulary {vocab_size}; "
        f"train/val/test {n_train:,}/{n_val:,}/{n_test:,}",
        f"  batch    B x T = {t.batch_size} x {t.seq_len}, {t.num_steps:,} steps",
        f"  optim    {_optimizer(config.optim)}",
        f"  clipping {_clipping(config.optim)}",
    ]
    if config.optim.ema_decay > 0:
        lines.append(f"  ema      averaged weights, decay {config.optim.ema_decay:g} "
                     "(eval and sampling use them)")
    lines += [
        f"  devices  {len(devices)} x {', '.join(kinds)} ({devices[0].platform})",
        f"  workdir  {os.path.abspath(workdir)}",
    ]
    if init_from:
        lines.append(f"  fine-tuning the weights of {init_from['workdir']} step {init_from['step']}")
    if start_step:
        lines.append(f"  resuming from step {start_step} ({checkpoints})")
    return "\n".join(lines)


def _optimizer(o) -> str:
    """``adamw (weight decay 0.1), learning rate 0.002, cosine schedule (...)``."""
    name = o.name + (f" (weight decay {o.weight_decay:g})" if o.name == "adamw" else "")
    name += f" (momentum {o.momentum:g})" if o.name == "sgd" and o.momentum else ""
    schedule = f"{o.schedule} schedule"
    if o.schedule == "cosine":
        schedule += (f" (warm-up {o.warmup_steps} steps, decay to "
                     f"{o.final_lr_fraction:g} x the learning rate)")
    return f"{name}, learning rate {o.learning_rate:g}, {schedule}"


def _clipping(o) -> str:
    """The rule, its strength and settings (from its registry entry), and where it acts."""
    from charrnn import clipping
    rule = clipping.get(o.clip_mode)
    if rule.strength is None:
        return f"{rule.name} (no clipping)"  # no strength, and nowhere to act
    settings = ", ".join(f"{s.field}={value:g}" for s, value in
                         zip(rule.settings, clipping.settings_of(rule, o).values()))
    strength = clipping.strength_of(rule, o)
    # where the rule acts (optim.clip_at; charrnn.optim describes each placement)
    return (f"{rule.name}, {rule.strength.field}={strength:g}"
            + (f" ({settings})" if settings else "") + f", clip_at={o.clip_at}")


def viewer_requirement() -> str:
    """TensorBoard as setup.cfg's ``viewer`` extra pins it (from the installed package's
    metadata), or plain ``tensorboard`` where charrnn is not installed."""
    try:
        requires = importlib.metadata.requires("charrnn") or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for requirement in requires:
        spec, _, marker = requirement.partition(";")
        if "extra" in marker and "viewer" in marker:
            return spec.strip()
    return "tensorboard"


def next_commands(workdir: str, launcher: str) -> str:
    """The commands to sample from, evaluate and view the run in ``workdir``.

    ``launcher``: the path of launch.py. The interpreter, launch.py and the workdir
    are written as paths that work from the current directory, in a fresh shell.
    """
    # The interpreter this run used (sys.executable, symlinks not resolved): a venv's
    # python is a symlink to the base interpreter, so a bare ``python`` on PATH can be
    # the same file and still run without the venv's packages.
    python = _short(sys.executable)
    python = python if os.sep in python else os.path.join(os.curdir, python)
    launch = f"{shlex.quote(python)} {shlex.quote(_short(launcher))}"
    work = shlex.quote(_short(workdir))
    tb = shlex.quote(os.path.join(_short(workdir), "tensorboard"))
    # TensorBoard through the same interpreter, installed first where it is missing (an
    # optional extra): a bare ``tensorboard`` is not on PATH in a fresh shell, if at all.
    view = f"{shlex.quote(python)} -m tensorboard.main --logdir {tb}"
    if importlib.util.find_spec("tensorboard") is None:
        install = shlex.quote(viewer_requirement())
        view = f"{shlex.quote(python)} -m pip install {install} && {view}"
    return "\n".join([
        f"trained model in {os.path.abspath(workdir)}; next:",
        f"  sample:       {launch} --mode=sample --workdir={work} --length=500",
        f"  evaluate:     {launch} --mode=eval --workdir={work}",
        f"  TensorBoard:  {view}",
    ])


def launch_record(start_step: int, config_arg: str | None, argv: list[str]) -> dict:
    """This launch as one ``launches.jsonl`` record (see the module docstring)."""
    import jax
    devices = jax.devices()
    return {
        "start_step": int(start_step),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config_arg": config_arg,
        "argv": list(argv),
        "hardware": {"host": socket.gethostname(), "cpu": cpu_model(),
                     "cpu_count": os.cpu_count() or 0, "platform": devices[0].platform,
                     "device_count": len(devices), "device_kind": devices[0].device_kind},
        "software": {"python": platform.python_version(),
                     **{name: _version(name) for name in _PACKAGES},
                     "charrnn_commit": package_commit()},
    }


def append_launch(workdir: str, record: dict) -> None:
    """Append ``record`` as one line of ``<workdir>/launches.jsonl``."""
    with open(os.path.join(workdir, LAUNCHES), "a") as f:
        f.write(json.dumps(record) + "\n")


def _short(path: str) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def _same_file(a: str | None, b: str) -> bool:
    try:
        return a is not None and os.path.samefile(a, b)
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_commit() -> str | None:
    """git HEAD of the checkout that holds this package; None when installed elsewhere."""
    return git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_commit(repo: str) -> str | None:
    """HEAD of the git checkout rooted at ``repo``, with ``+uncommitted`` when tracked files
    differ from it (the code that ran is then not that commit's); None if ``repo`` is not
    the root of a checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                              timeout=10)
    try:
        out = git("rev-parse", "--show-toplevel", "HEAD")
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or not _same_file(lines[0], repo):
            return None  # site-packages inside some other repository is not our commit
        changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + ("+uncommitted" if changed else "")
