"""A Markdown page of training runs' validation curves, read from their workdirs.

    python experiments/pages/quality.py --workdirs=runs/fast,runs/long [--threshold=1.5]
        [--markdown=QUALITY.md]

Per workdir (read only: config.json, metrics.jsonl, launches.jsonl): the
variant of experiments/configs/default.py the run is, with the fields its
launches set on the command line (a run that no current variant produces is
refused: see provenance.py); the model, batch, schedule and matmul dtype; where
each launch ran (hardware and software, from launches.jsonl); the first val
record at or below --threshold (nats/char) with its wall time; the best val
record (of the raw weights, and of the averaged ones when the run kept them); when
val first reached 1.50, 1.45 and 1.40; the last train loss; then every val record.
``--archive``: runs whose workdirs are gone: ``runs``, their records as an earlier page
printed them, shown like the others (with the archive's word on where they came from), and
``rows``, runs measured with an older evaluation, shown apart as their page printed them.
The corpus is shown by name (a file by its base name and the sha256 of its bytes), never
by a machine's path. Wall times are the ``wall_s`` of the eval records (seconds
since the run's process began its training loop, compilation included), summed
over launches: a resumed or extended run's clock restarts at 0, so its records
get the wall time of the last eval record before the restart added (the time
between that record and the checkpoint, if any, is not counted). Numbers come
from the files only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

from absl import app, flags

from charrnn import metrics
from experiments import cli
from experiments.pages import provenance

def summarize(workdir: str, threshold: float) -> dict:
    """What the page shows of one run; :class:`provenance.ProvenanceError` if it is not one.

    Everything :func:`page` shows is in the result, which is plain JSON: the ``runs`` of an
    ``--archive`` are such results (less what :func:`from_records` derives)."""
    for name in ("metrics.jsonl", "config.json"):
        if not os.path.exists(os.path.join(workdir, name)):
            raise provenance.ProvenanceError(f"not a training workdir (no {name})")
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            config = json.load(f)
    except ValueError as e:
        raise provenance.ProvenanceError(f"config.json is not JSON ({e})") from None
    launch_records = provenance.read_launches(workdir)
    origin = provenance.match_variant(config, launch_records)
    records, launches = _summed_wall(metrics.read_metrics(workdir))
    train = [r for r in records if r["split"] == "train"]
    return from_records({
        "workdir": workdir, "config": config, "origin": origin, "launch_records": launch_records,
        "val": [r for r in records if r["split"] == "val"], "launches": launches,
        "last_train": train[-1] if train else None,
        "corpus_sha256": _file_sha256(config["data"].get("path", ""))}, threshold)


def from_records(run: dict, threshold: float) -> dict:
    """``run`` (its val records, wall times summed) with what the page derives from them:
    the first val at or below ``threshold``, the best raw and averaged vals, the milestones."""
    val = run["val"]
    if not val:
        raise provenance.ProvenanceError("no val records yet")
    averaged = [r for r in val if "ema_loss" in r]
    return {**run, "reached": next((r for r in val if r["loss"] <= threshold), None),
            "best": min(val, key=lambda r: r["loss"]),
            "best_ema": min(averaged, key=lambda r: r["ema_loss"]) if averaged else None,
            "milestones": milestones(val)}


def _file_sha256(path: str) -> str | None:
    """sha256 of a file's bytes (for a UTF-8 text, the run's text_sha256); None if unreadable."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


MILESTONES = (1.50, 1.45, 1.40)


def milestones(val: list[dict]) -> dict:
    """level -> the first val record whose loss (raw or averaged weights) is at or below it."""
    best = lambda r: min(r["loss"], r.get("ema_loss", r["loss"]))
    return {level: next((r for r in val if best(r) <= level), None) for level in MILESTONES}


def _summed_wall(records: list[dict]) -> tuple[list[dict], int]:
    """Copies of ``records`` with ``wall_s`` summed over launches, and the number of launches."""
    out, offset, previous, launches = [], 0.0, 0.0, 1
    for r in records:
        if "wall_s" in r:
            if r["wall_s"] < previous:  # a new process: its clock started again
                offset += previous
                launches += 1
            previous = r["wall_s"]
            r = dict(r, wall_s=r["wall_s"] + offset)
        out.append(r)
    return out, launches


def _minutes(record) -> str:
    return f"{record['wall_s'] / 60:.1f} min" if record and "wall_s" in record else "—"


def _corpus(data_config, sha256: str | None) -> str:
    """A built-in corpus's name, or the file's base name and the sha256 of its bytes."""
    if not data_config.get("path"):
        return data_config["name"]
    name = os.path.basename(data_config["path"])
    return f"{name} with sha256 {sha256[:12]}…" if sha256 else name


def _model(config, sha256: str | None = None) -> str:
    d, m, t, o = config["data"], config["model"], config["train"], config["optim"]
    corpus = _corpus(d, sha256)
    weight_drop = f", weight drop {m['weight_drop']}" if m.get("weight_drop") else ""
    decay = f" weight decay {o['weight_decay']:g}," if o["name"] == "adamw" else ""
    return (f"{corpus} (val {d['val_fraction']:.0%}); {m['cell'].upper()} {m['num_layers']}×{m['hidden_size']}, embed {m['embed_dim']}, "
            f"dropout {m['dropout']}{weight_drop}, {m.get('matmul_dtype', 'float32')} products; "
            f"B={t['batch_size']}, T={t['seq_len']}, {t['num_steps']} steps; {o['name']} "
            f"lr {o['learning_rate']:g} {o['schedule']},{decay} clip {o['clip_mode']} {o['clip_norm']:g}")


def _origin(origin) -> str:
    """`default.py:VARIANT` and the fields the command lines set."""
    label = f"`{provenance.variant_label(origin['variant'])}`"
    shown = lambda k, v: os.path.basename(v) if k == "data.path" else v  # no machine paths
    sets = ", ".join(f"`{k}={shown(k, v)}`" for k, v in origin["overrides"].items())
    return label + (f" with {sets}" if sets else "")


def _name(run) -> str:
    return os.path.basename(os.path.normpath(run["workdir"]))


def _best(record, key="loss") -> str:
    if record is None:
        return "—"
    return f"{record[key]:.4f} at step {record['step']}, {_minutes(record)}"


def read_archive(path: str | None) -> dict:
    """The ``--archive`` JSON: ``runs`` (records of runs whose workdirs are gone, each as
    :func:`summarize` keeps them, plus ``archived``: where the records came from) and
    ``source``, ``note``, ``rows`` (runs of an older evaluation, as their page printed them)."""
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def archived_runs(archive: dict, threshold: float) -> list[dict]:
    return [from_records(run, threshold) for run in archive.get("runs", [])]


def archived(archive: dict) -> list[str]:
    """Lines of the section on earlier runs of an older evaluation: the rows of an earlier
    generated page, kept as that page printed them."""
    if not archive.get("rows"):
        return []
    lines = ["", "## Earlier runs, measured with the old evaluation", "",
             f"{archive['note']} Source: {archive['source']}.", "",
             "| run | config | val ≤ 1.5 first | best val | last train loss |",
             "|---|---|---|---|---|"]
    lines += [f"| `{r['run']}` | {r['config']} | {r['first']} | {r['best']} | {r['last_train']} |"
              for r in archive["rows"]]
    return lines


def page(runs: list[dict], threshold: float, command: str, archive: str | None = None,
         notes: dict | None = None) -> str:
    """The Markdown page; ``notes``: run name -> a sentence printed under its launches
    (what ran beside it, what its records cannot say)."""
    lines = ["# Quality runs", "",
             "Generated by `experiments/pages/quality.py` from the runs' workdirs (config.json, "
             "metrics.jsonl, launches.jsonl) and, for runs whose workdirs are gone, the "
             "archive it names; do not edit by hand. Regenerate with", "",
             "```", command, "```", "",
             "Each run is a variant of `experiments/configs/default.py` (plus the fields its "
             "command lines set). Loss in nats/char on the val split of each run's config; "
             "wall time from the start of the training loop (compilation included). Where "
             "each launch ran: below the table.", "",
             f"| run | variant | config | val ≤ {threshold:g} first | best val | "
             "best val, averaged weights | last train loss |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        reached = (f"{r['reached']['loss']:.4f} at step {r['reached']['step']}, "
                   f"{_minutes(r['reached'])}" if r["reached"] else "not reached")
        best = _best(r["best"])
        best_ema = _best(r["best_ema"], "ema_loss")
        last = r["last_train"]
        train = f"{last['loss']:.4f} (step {last['step']})" if last else "—"
        launches = f" ({r['launches']} launches, wall times summed)" if r["launches"] > 1 else ""
        lines.append(f"| `{_name(r)}` | {_origin(r['origin'])} | "
                     f"{_model(r['config'], r.get('corpus_sha256'))}{launches} | {reached} | "
                     f"{best} | {best_ema} | {train} |")
    lines += ["", "Val first at or below each level (raw or averaged weights, whichever is lower):",
              "", "| run | " + " | ".join(f"≤ {m:.2f}" for m in MILESTONES) + " |",
              "|---|" + "---|" * len(MILESTONES)]
    for r in runs:
        lines.append(f"| `{_name(r)}` | " + " | ".join(
            f"step {v['step']}, {_minutes(v)}" if v else "not reached"
            for v in r["milestones"].values()) + " |")
    lines += ["", "## Where each run ran", ""]
    for r in runs:
        lines += [f"- `{_name(r)}`" + ("" if r["launch_records"] else
                                       ": hardware and software not recorded (no launches.jsonl)")]
        lines += [f"  - {provenance.launch_line(launch)}" for launch in r["launch_records"]]
        if r.get("archived"):
            lines += [f"  - archived: {r['archived']}"]
        if (notes or {}).get(_name(r)):
            lines += [f"  - note: {notes[_name(r)]}"]
    for r in runs:
        has_ema = r["best_ema"] is not None
        lines += ["", f"## `{_name(r)}`: val curve", "",
                  "| step | val loss | val bpc | " + ("averaged weights: loss | " if has_ema else "")
                  + "wall |", "|---|---|---|" + ("---|" if has_ema else "") + "---|"]
        lines += [f"| {v['step']} | {v['loss']:.4f} | {v['bpc']:.3f} | "
                  + (f"{v['ema_loss']:.4f} | " if has_ema else "") + f"{_minutes(v)} |"
                  for v in r["val"]]
    lines += archived(read_archive(archive))
    return "\n".join(lines) + "\n"


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PATH_FLAGS = ("--workdirs=", "--archive=", "--markdown=")


def _repo_paths(arg: str) -> str:
    """A path flag as the page prints it: each path relative to the repository, or by its
    base name where it lies outside (a machine's path says nothing to a reader)."""
    flag = next((f for f in _PATH_FLAGS if arg.startswith(f)), None)
    if flag is None:
        return arg
    def shown(path):
        rel = os.path.relpath(os.path.abspath(path), _REPO)
        return os.path.basename(os.path.normpath(path)) if rel.startswith(os.pardir) else rel
    return flag + ",".join(shown(p) for p in arg[len(flag):].split(","))


def main(argv):
    cli.start(argv)
    if not _WORKDIRS.value and not _ARCHIVE.value:
        raise app.UsageError("--workdirs (or an --archive) is required")
    runs = []
    for w in _WORKDIRS.value or []:
        try:
            runs.append(summarize(w, _THRESHOLD.value))
        except provenance.ProvenanceError as e:
            print(f"error: {w}: {e}", file=sys.stderr)
            sys.exit(1)
    runs += archived_runs(read_archive(_ARCHIVE.value), _THRESHOLD.value)
    command = "python experiments/pages/quality.py " + " ".join(
        shlex.quote(_repo_paths(a)) for a in sys.argv[1:])
    notes = dict(n.split("=", 1) for n in _NOTES.value if "=" in n)
    text = page(runs, _THRESHOLD.value, command, _ARCHIVE.value, notes)
    if _MARKDOWN.value:
        with open(_MARKDOWN.value, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":  # flags only here: tests import summarize and page beside other scripts
    _WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs, comma-separated.")
    _THRESHOLD = flags.DEFINE_float("threshold", 1.5,
                                    "Val loss (nats/char) to report the time to.")
    _MARKDOWN = flags.DEFINE_string("markdown", None, "Write the page here (default: stdout).")
    _NOTES = flags.DEFINE_multi_string("note", [], "RUN=TEXT: a note under that run's launches "
                                       "(RUN: the workdir's base name).")
    _ARCHIVE = flags.DEFINE_string("archive", None, "JSON of earlier runs whose workdirs are "
                                   "gone (rows of an earlier page), shown apart, marked.")
    app.run(main)
