"""Every bad input answered with one clear line on stderr, exit status 1, no traceback.

Each case runs launch.py for real, with its own argv, in a child forked from a
process that has imported JAX once (tests/launch_forks.py): 30 cases cost
seconds, not minutes. A trained workdir goes through the cases that concern
it and must come out unchanged; then --fresh sets it aside and starts again.
"""

import hashlib
import os
import re
import shutil

import pytest

from charrnn import config as config_lib, data, metrics, models, optim, train
from conftest import REPO, _SPEECH
from launch_forks import launch_many

SMOKE = os.path.join(REPO, "experiments", "configs", "default.py") + ":smoke"


def _smoke_config(corpus):
    from experiments.configs import default
    config = default.get_config("smoke")
    config.data.path = corpus
    return config


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_every_choice_of_the_schema_builds(smoke_config):
    """The schema's lists of optimizers and schedules name only what optim can build
    (the one list: optim reads it from charrnn.config)."""
    for name in config_lib.CHOICES["optim.name"]:
        for schedule in config_lib.CHOICES["optim.schedule"]:
            smoke_config.optim.name, smoke_config.optim.schedule = name, schedule
            optim.Optimizer.from_config(smoke_config)
    assert data.BUILTIN_CORPORA is config_lib.CHOICES["data.name"]


def test_a_bad_config_fails_before_the_workdir_is_touched(smoke_config, tmp_path):
    workdir = str(tmp_path / "run")
    smoke_config.train.seq_len = 0
    with pytest.raises(config_lib.ConfigError, match="train.seq_len must be a positive integer"):
        train.train_and_evaluate(smoke_config, workdir)
    assert not os.path.exists(workdir)


def test_every_config_variant_validates():
    from experiments.configs import default
    assert "tinyshakespeare_xl" in default._VARIANTS
    for name in [None, *default._VARIANTS]:
        config_lib.validate(default.get_config(name))


def test_fields_added_later_may_be_missing_but_not_wrong(smoke_config):
    # A config saved before these fields existed still validates (their defaults apply) ...
    for group, name in [("model", "embed_init_std"), ("model", "weight_drop"),
                        ("model", "matmul_dtype"), ("optim", "weight_decay")]:
        del smoke_config[group][name]
    smoke_config.optim.name = "adamw"
    config_lib.validate(smoke_config)
    # ... and a present one is still checked.
    smoke_config.model.weight_drop = -0.5
    with pytest.raises(config_lib.ConfigError, match=r"model.weight_drop must be in \[0, 1\)"):
        config_lib.validate(smoke_config)


def test_too_short_a_text_fails_before_the_workdir_is_touched(smoke_config, tmp_path):
    workdir, corpus = str(tmp_path / "run"), tmp_path / "short.txt"
    corpus.write_text("To be, or not to be: that is the question.\n")  # 43 chars < 4*16+1
    smoke_config.data.path = str(corpus)
    with pytest.raises(data.DataError, match="the training split has 35 of the text's 43 "
                                                  "characters"):  # 43 - 4 - 4
        train.train_and_evaluate(smoke_config, workdir)
    assert not os.path.exists(workdir)


# The text of the workdir "edited" when it was trained, and after it was edited.
EDITED = (_SPEECH * 15, _SPEECH * 15 + _SPEECH[:100])


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def _catalogue(d, corpus, trained):
    """(case id, launch.py arguments, a piece of the expected error line)."""
    smoke = [f"--config={SMOKE}", f"--config.data.path={corpus}"]
    work = [f"--workdir={d}/new"]
    data_path = lambda p: [f"--workdir={d}/new", f"--config={SMOKE}", f"--config.data.path={p}"]
    return [
        ("missing data file", data_path(f"{d}/nope.txt"), f"data file {d}/nope.txt does not exist"),
        ("directory as data file", data_path(d), f"data path {d} is a directory"),
        ("empty file", data_path(f"{d}/empty.txt"), f"data file {d}/empty.txt is empty"),
        ("shorter than a window", data_path(f"{d}/short.txt"),
         "the training split has 9 of the text's 11 characters but batch_size*seq_len+1 = 65 "
         "are needed"),
        ("not utf-8", data_path(f"{d}/latin1.txt"),
         f"data file {d}/latin1.txt is not valid utf-8 at byte offset 3; pass its encoding "
         "with --config.data.encoding=..."),
        ("unknown encoding", data_path(f"{d}/latin1.txt") + ["--config.data.encoding=latin-9x"],
         "unknown text encoding data.encoding 'latin-9x'"),
        ("unknown corpus", work + ["--config.data.name=tolstoy"],
         "unknown corpus data.name 'tolstoy'; known names: shakespeare, tinyshakespeare"),
        ("unknown field", work + ["--config.train.num_step=5"],
         "unknown config field 'train.num_step' (--config.train.num_step); did you mean "
         "train.num_steps?"),
        ("unknown field, --config given", work + smoke + ["--config.foo=1"],
         "unknown config field 'foo' (--config.foo)"),
        ("not a number", work + ["--config.train.num_steps=ten"],
         "flag --config.train.num_steps=ten: invalid literal for int()"),
        ("zero size", work + ["--config.model.hidden_size=0"],
         "model.hidden_size must be a positive integer, got 0"),
        ("negative size", work + ["--config.train.batch_size=-4"],
         "train.batch_size must be a positive integer, got -4"),
        ("unknown dropout mask", work + ["--config.model.dropout_mask=fixed"],
         "unknown model.dropout_mask 'fixed'; choose from step, locked"),
        ("cpu devices not a count", work + ["--config.train.cpu_devices=two"],
         "train.cpu_devices must be 'auto' or a positive integer, got 'two'"),
        ("zero cpu devices", work + ["--config.train.cpu_devices=0"],
         "train.cpu_devices must be 'auto' or a positive integer, got '0'"),
        ("zero learning rate", work + ["--config.optim.learning_rate=0"],
         "optim.learning_rate must be a positive number, got 0.0"),
        ("clip_norm <= 0", work + ["--config.optim.clip_norm=-1"],
         "optim.clip_norm must be a positive number with optim.clip_mode=global_norm"),
        ("unknown cell", work + ["--config.model.cell=transformer"],
         "unknown model.cell 'transformer'; choose from gru, irnn, lstm, mgu, rnn or name your "
         "own cell as package.module:Class"),
        ("unknown optimizer", work + ["--config.optim.name=lion"],
         "unknown optim.name 'lion'; choose from adam, adamw, sgd"),
        ("negative weight decay", work + ["--config.optim.name=adamw",
                                          "--config.optim.weight_decay=-0.1"],
         "optim.weight_decay must be in [0, inf), got -0.1"),
        ("unknown clip mode", work + ["--config.optim.clip_mode=norm"],
         "unknown optim.clip_mode 'norm'; choose from none, global_norm, value, agc, block_rms, "
         "autoclip, zclip"),
        ("unknown placement", work + ["--config.optim.clip_at=weights"],
         "unknown optim.clip_at 'weights'; choose from gradient, update, bptt, example, device"),
        ("bptt with a rule it cannot apply", work + ["--config.optim.clip_at=bptt",
                                                     "--config.optim.clip_mode=agc"],
         "optim.clip_at=bptt takes optim.clip_mode value or global_norm, got 'agc' (the other "
         "placements take every rule)"),
        ("unknown schedule", work + ["--config.optim.schedule=linear"],
         "unknown optim.schedule 'linear'; choose from constant, cosine"),
        ("dropout 1", work + ["--config.model.dropout=1.0"], "model.dropout must be in [0, 1)"),
        ("weight drop 1", work + ["--config.model.weight_drop=1.0"],
         "model.weight_drop must be in [0, 1), got 1.0"),
        ("embedding std 0", work + ["--config.model.embed_init_std=0.0"],
         "model.embed_init_std must be a positive number, got 0.0"),
        ("unknown matmul dtype", work + ["--config.model.matmul_dtype=float16"],
         "unknown model.matmul_dtype 'float16'; choose from float32, bfloat16"),
        ("unknown start state", work + ["--config.model.start_state=random"],
         "unknown model.start_state 'random'; choose from zero, learned"),
        ("reset_prob 1", work + ["--config.train.reset_prob=1.0"],
         "train.reset_prob must be in [0, 1), got 1.0"),
        ("no training text", work + ["--config.data.val_fraction=0.5",
                                     "--config.data.test_fraction=0.5"],
         "data.val_fraction + data.test_fraction = 1 leave no training text"),
        ("workdir is a file", [f"--workdir={d}/empty.txt"] + smoke,
         f"workdir {d}/empty.txt exists and is not a directory"),
        ("workdir not creatable", [f"--workdir={d}/empty.txt/run"] + smoke,
         f"cannot create workdir {d}/empty.txt/run: Not a directory"),
        ("incompatible checkpoint", [f"--workdir={trained}"] + smoke
         + ["--config.model.cell=gru", "--config.model.hidden_size=64"],
         "the workdir's checkpoint was trained with a different config: model.cell 'lstm' -> "
         "'gru', model.hidden_size 32 -> 64 (use another --workdir, --fresh to set the old run "
         "aside and start afresh, or --init_from=WORKDIR to start a new run from its weights)"),
        ("resume on another text file", [f"--workdir={trained}", f"--config={SMOKE}",
                                         f"--config.data.path={d}/other.txt"],
         f"a different config: data.path '{corpus}' -> '{d}/other.txt' (use another"),
        ("resume with another seq_len", [f"--workdir={trained}"] + smoke
         + ["--config.train.seq_len=8"], "a different config: train.seq_len 16 -> 8 ("),
        ("resume with another seed and split", [f"--workdir={trained}"] + smoke
         + ["--config.seed=1", "--config.data.val_fraction=0.2"],
         "a different config: seed 0 -> 1, data.val_fraction 0.05 -> 0.2 ("),
        ("resume on a changed text", [f"--workdir={d}/edited", f"--config={SMOKE}",
                                      f"--config.data.path={d}/edited.txt"],
         f"a different config: the text of {d}/edited.txt (sha256 "),
        ("eval on a changed text", [f"--workdir={d}/edited", "--mode=eval"],
         f"the text of {d}/edited.txt changed since checkpoint 10 was trained on it (sha256 "
         f"{_sha(EDITED[0])[:12]}… when trained, {_sha(EDITED[1])[:12]}… now); put the original "
         "text back, or pass --changed_text to evaluate on the new one"),
        ("--changed_text with sample", [f"--workdir={d}/edited", "--mode=sample",
                                        "--changed_text"],
         "--changed_text lets --mode=eval read a changed text; it means nothing with "
         "--mode=sample"),
        *_records_without_checkpoint_cases(d, smoke),
        ("fine-tune another model", [f"--workdir={d}/new", f"--init_from={trained}"] + smoke
         + ["--config.model.hidden_size=64"],
         f"--init_from={trained}: its model differs from this config's: model.hidden_size "
         "32 -> 64 (set these --config.model fields to the checkpoint's)"),
        ("fine-tune on unknown characters", [f"--workdir={d}/new", f"--init_from={trained}",
                                             f"--config={SMOKE}", f"--config.data.path={d}/other.txt"],
         f"--init_from={trained}: text has characters not in the vocabulary: 'Z' (the model "),
        ("fine-tune from nothing", [f"--workdir={d}/new", f"--init_from={d}/nothing"] + smoke,
         f"--init_from={d}/nothing: no checkpoint in {d}/nothing/checkpoints"),
        ("fine-tune from an unknown step", [f"--workdir={d}/new", f"--init_from={trained}",
                                            "--init_step=7"] + smoke,
         f"no checkpoint at step 7 in {trained}/checkpoints; steps present: 5, 10"),
        ("fine-tune into a trained workdir", [f"--workdir={trained}", f"--init_from={d}/edited"]
         + smoke, f"--init_from starts a new run, but {trained}/checkpoints already holds one "
         "(checkpoint 10); use another --workdir, or --fresh"),
        ("--init_step alone", work + ["--init_step=5"], "--init_step=N picks the checkpoint of"),
        ("--init_from with eval", [f"--workdir={trained}", "--mode=eval", f"--init_from={trained}"],
         "--init_from starts a training run; it means nothing with --mode=eval"),
        ("--step with train", work + ["--step=5"], "--step=N picks the checkpoint to evaluate"),
        ("--weights with train", work + ["--weights=raw"],
         "--weights=raw picks the weights to evaluate or sample; training keeps both"),
        ("eval with unknown weights", [f"--workdir={trained}", "--mode=eval", "--weights=best"],
         "unknown --weights='best'; choose from auto, ema, raw"),
        ("sample averaged weights never kept", [f"--workdir={trained}", "--mode=sample",
                                                "--weights=ema"],
         f"--weights=ema: the run in {trained} kept no averaged weights (optim.ema_decay was 0)"),
        ("averaged weights switched on at resume", [f"--workdir={trained}"] + smoke
         + ["--config.optim.ema_decay=0.99"], "different config: optim.ema_decay (on/off)"),
        ("an average that never moves", work + ["--config.optim.ema_decay=1.0"],
         "optim.ema_decay must be in [0, 1)"),
        ("eval of an unknown step", [f"--workdir={trained}", "--mode=eval", "--step=7"],
         f"no checkpoint at step 7 in {trained}/checkpoints; steps present: 5, 10"),
        ("sample of an unknown step", [f"--workdir={trained}", "--mode=sample", "--step=70"],
         f"no checkpoint at step 70 in {trained}/checkpoints; steps present: 5, 10"),
        ("eval of a checkpoint of random bytes", [f"--workdir={d}/random", "--mode=eval"],
         f"checkpoint 10 in {d}/random/checkpoints is damaged or does not fit this config ("),
        ("sample of a checkpoint of random bytes", [f"--workdir={d}/random", "--mode=sample"],
         f"checkpoint 10 in {d}/random/checkpoints is damaged"),
        ("train on a checkpoint of random bytes", [f"--workdir={d}/random"] + smoke,
         f"checkpoint 10 in {d}/random/checkpoints is damaged"),
        ("eval of a truncated checkpoint", [f"--workdir={d}/truncated", "--mode=eval"],
         f"checkpoint 10 in {d}/truncated/checkpoints is damaged or does not fit this config ("),
        ("sample of a truncated checkpoint", [f"--workdir={d}/truncated", "--mode=sample"],
         "; earlier steps present: 5; move "),
        ("train on a truncated checkpoint", [f"--workdir={d}/truncated"] + smoke,
         f"aside to resume from step 5, or pass --step=5 to --mode=eval or --mode=sample"),
        ("eval without checkpoint", [f"--workdir={d}/new", "--mode=eval"],
         f"no checkpoint in {d}/new/checkpoints; train one first"),
        ("sample without checkpoint", [f"--workdir={d}/new", "--mode=sample"],
         f"no checkpoint in {d}/new/checkpoints; train one first"),
        ("unknown mode", work + ["--mode=serve"], "unknown --mode='serve'"),
        ("unknown variant", [f"--workdir={d}/new", f"--config={SMOKE[:-6]}:bogus"],
         "unknown config variant 'bogus'"),
        ("missing config file", [f"--workdir={d}/new", f"--config={d}/nope.py"],
         f"cannot load --config={d}/nope.py: [Errno 2] No such file or directory"),
        ("config file not Python", [f"--workdir={d}/new", f"--config={d}/config.yaml"],
         f"cannot run --config={d}/config.yaml: NameError: name 'world' is not defined (line 1); "
         "a config file is Python that defines get_config()"),
        ("config file that raises", [f"--workdir={d}/new", f"--config={d}/raising.py:small"],
         f"cannot run --config={d}/raising.py:small: RuntimeError: no variant 'small' (line 2)"),
        ("config file without get_config", [f"--workdir={d}/new", f"--config={d}/noget.py"],
         f"cannot run --config={d}/noget.py: it defines no get_config()"),
        ("sample longer than memory", [f"--workdir={trained}", "--mode=sample",
                                       f"--length={10**12}"],
         "sampling --length=1000000000000 --num_samples=1 needs at least 28,000.0 GB but "),
        ("more samples than memory", [f"--workdir={trained}", "--mode=sample",
                                      f"--num_samples={10**9}"],
         "sampling --length=500 --num_samples=1000000000 needs at least 10,000.0 GB but "),
        ("model wider than memory", work + smoke + ["--config.model.hidden_size=100000"],
         "training with model.cell=lstm, model.hidden_size=100000, model.num_layers=1, "
         "model.embed_dim=16, train.batch_size=4, train.seq_len=16 (parameters, gradients and "
         "optimizer state) needs at least 640.2 GB but "),
        ("model deeper than memory", work + smoke + [f"--config.model.num_layers={10**7}"],
         "model.num_layers=10000000, model.embed_dim=16, train.batch_size=4, train.seq_len=16 "
         "(parameters, gradients and optimizer state) needs at least 1,331.2 GB but "),
        ("--fresh with eval", [f"--workdir={trained}", "--mode=eval", "--fresh"],
         "--fresh starts a training run again"),
        *_clipping_cases(d, trained, smoke, work),
    ]


def _records_without_checkpoint_cases(d, smoke):
    """Workdirs whose records would be lost or whose run files are not what a run writes."""
    lost = ("holds the records of a run (metrics.jsonl up to step 20, config.json, "
            "launches.jsonl, tensorboard/) but no checkpoint in {w}/checkpoints, and its records "
            "reach step 20, past its first checkpoints (every 5 steps): starting at step 0 would "
            "overwrite them; put the checkpoints back to resume, --fresh to set the records "
            "aside, or use another --workdir")
    return [
        ("checkpoints deleted", [f"--workdir={d}/emptied"] + smoke,
         f"error: workdir {d}/emptied " + lost.format(w=f"{d}/emptied")),
        ("checkpoints directory missing", [f"--workdir={d}/unmounted"] + smoke,
         f"error: workdir {d}/unmounted " + lost.format(w=f"{d}/unmounted")),
        ("checkpoints a file", [f"--workdir={d}/ckptfile"] + smoke,
         f"error: {d}/ckptfile/checkpoints is not a directory; move it away, or --fresh to set "
         "the run aside"),
        ("checkpoints a dangling link", [f"--workdir={d}/ckptlink"] + smoke,
         f"error: {d}/ckptlink/checkpoints is a broken symbolic link (to {d}/gone); restore its "
         "target, or --fresh to set the run aside"),
        ("eval where checkpoints is a dangling link", [f"--workdir={d}/ckptlink", "--mode=eval"],
         f"error: no checkpoint in {d}/ckptlink/checkpoints; train one first"),
        ("another run where one stopped before its first save",
         [f"--workdir={d}/early"] + smoke + ["--config.model.hidden_size=64"],
         "but no checkpoint in {d}/early/checkpoints, and its config.json is another run's "
         "(model.hidden_size 32 -> 64): starting at step 0".format(d=d)),
        ("metrics.jsonl a directory", [f"--workdir={d}/metricsdir"] + smoke,
         f"error: {d}/metricsdir/metrics.jsonl is not a regular file; move it away"),
        ("launches.jsonl a directory", [f"--workdir={d}/launchesdir"] + smoke,
         f"error: {d}/launchesdir/launches.jsonl is not a regular file; move it away"),
        ("a stray file named like a step", [f"--workdir={d}/stray"] + smoke,
         f"error: {d}/stray/checkpoints/15 is not a checkpoint (those are directories) and a "
         f"save at step 15 would delete it; move it out of {d}/stray/checkpoints"),
    ]


def _damaged_workdirs(d, trained, config):
    """The workdirs of :func:`_records_without_checkpoint_cases`, from ``trained`` (10 steps)
    and a 20-step run of ``config``; all saved every 5 steps."""
    config.train.num_steps = 20
    train.train_and_evaluate(config, f"{d}/long")
    for name in ("emptied", "unmounted", "ckptfile", "ckptlink"):
        shutil.copytree(f"{d}/long", f"{d}/{name}")
        shutil.rmtree(f"{d}/{name}/checkpoints")
    os.makedirs(f"{d}/emptied/checkpoints")
    with open(f"{d}/ckptfile/checkpoints", "w") as f:
        f.write("not a directory")
    os.symlink(f"{d}/gone", f"{d}/ckptlink/checkpoints")
    for name in ("early", "metricsdir", "launchesdir", "stray"):
        shutil.copytree(trained, f"{d}/{name}")
    shutil.rmtree(f"{d}/early/checkpoints")  # as if killed before its first save: no
    os.makedirs(f"{d}/early/checkpoints")    # record is past step 10 (2 x checkpoint_every)
    for name in ("metrics.jsonl", "launches.jsonl"):
        os.remove(f"{d}/{name[:-6]}dir/{name}")
        os.makedirs(f"{d}/{name[:-6]}dir/{name}")
    with open(f"{d}/stray/checkpoints/15", "w") as f:
        f.write("a file someone left here")
    return ["emptied", "unmounted", "ckptfile", "ckptlink", "early", "metricsdir",
            "launchesdir", "stray"]


def _clipping_cases(d, trained, smoke, work):
    """Bad settings of the clipping rules (charrnn.clipping's registry checks them)."""
    rule = lambda name, *fields: work + [f"--config.optim.clip_mode={name}"] + [
        f"--config.optim.{f}" for f in fields]
    return [
        ("autoclip percentile 0", rule("autoclip", "autoclip_percentile=0"),
         "optim.autoclip_percentile must be in (0, 100] with optim.clip_mode=autoclip, got 0.0"),
        ("autoclip percentile 101", rule("autoclip", "autoclip_percentile=101"),
         "optim.autoclip_percentile must be in (0, 100]"),
        ("autoclip history 0", rule("autoclip", "autoclip_history=0"),
         "optim.autoclip_history must be an integer >= 1 with optim.clip_mode=autoclip, got 0"),
        ("zclip z_thr 0", rule("zclip", "zclip_z=0"),
         "optim.zclip_z must be a positive number with optim.clip_mode=zclip, got 0.0"),
        ("zclip alpha 1", rule("zclip", "zclip_alpha=1"),
         "optim.zclip_alpha must be in (0, 1) with optim.clip_mode=zclip, got 1.0"),
        ("zclip alpha 0", rule("zclip", "zclip_alpha=0"), "optim.zclip_alpha must be in (0, 1)"),
        ("agc lambda 0", rule("agc", "clip_norm=0"),
         "optim.clip_norm must be a positive number with optim.clip_mode=agc, got 0.0"),
        ("value bound < 0", rule("value", "clip_norm=-0.5"),
         "optim.clip_norm must be a positive number with optim.clip_mode=value, got -0.5"),
        ("block_rms bound 0", rule("block_rms", "clip_norm=0"),
         "optim.clip_norm must be a positive number with optim.clip_mode=block_rms"),
        ("changed clip rule on resume", [f"--workdir={trained}"] + smoke
         + ["--config.optim.clip_mode=zclip"],
         "the workdir's checkpoint was trained with a different config: optim.clip_mode "
         "'global_norm' -> 'zclip' (use another --workdir, --fresh"),
    ]


def _tree_digest(path):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):  # links are not followed
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            if os.path.islink(full):
                digest.update(os.readlink(full).encode())
            elif name in files:
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """Every bad input run through launch.py, then --fresh on the mismatched workdir."""
    d = str(tmp_path_factory.mktemp("inputs"))
    corpus = f"{d}/corpus.txt"
    with open(corpus, "w") as f:
        f.write(_SPEECH * 15)
    trained = f"{d}/trained"  # 10 steps of the smoke config (LSTM 1x32), saved at 5 and 10
    config = _smoke_config(corpus)
    config.train.num_steps, config.train.checkpoint_every = 10, 5
    train.train_and_evaluate(config, trained)
    damaged = _damaged_workdirs(d, trained, config.copy_and_resolve_references())
    with open(f"{d}/edited.txt", "w") as f:  # a run whose text is then edited
        f.write(EDITED[0])
    config.data.path = f"{d}/edited.txt"
    train.train_and_evaluate(config, f"{d}/edited")
    with open(f"{d}/edited.txt", "w") as f:
        f.write(EDITED[1])
    for name, damage in (("random", lambda f, n: f.write(os.urandom(n))),
                         ("truncated", lambda f, n: f.truncate(n // 2))):
        shutil.copytree(trained, f"{d}/{name}")  # every file of checkpoint 10 damaged
        for root, _, files in os.walk(f"{d}/{name}/checkpoints/10"):
            for file in files:
                with open(os.path.join(root, file), "r+b") as f:
                    damage(f, os.path.getsize(os.path.join(root, file)))
    with open(f"{d}/empty.txt", "w"):
        pass
    for name, text in (("config.yaml", "hello: world\n"), ("noget.py", "x = 1\n"),
                       ("raising.py", "def get_config(arg):\n    raise RuntimeError("
                                      "f'no variant {arg!r}')\n")):
        with open(f"{d}/{name}", "w") as f:
            f.write(text)
    with open(f"{d}/short.txt", "w") as f:
        f.write("hello world")
    with open(f"{d}/latin1.txt", "wb") as f:
        f.write("Caf\u00e9 au lait\n".encode("latin-1") * 50)  # 'é' is the byte 0xE9
    with open(f"{d}/other.txt", "w") as f:
        f.write(_SPEECH.replace("a", "Z") * 15)
    before = _tree_digest(trained)
    untouched = {w: _tree_digest(w) for w in (f"{d}/edited", f"{d}/random", f"{d}/truncated",
                                               *(f"{d}/{name}" for name in damaged))}
    cases = _catalogue(d, corpus, trained)
    fresh = [f"--workdir={trained}", f"--config={SMOKE}", f"--config.data.path={corpus}",
             "--config.model.cell=gru", "--config.train.num_steps=2", "--fresh"]
    changed = [f"--workdir={d}/edited", "--mode=eval", "--changed_text"]
    results = launch_many([args for _, args, _ in cases] + [fresh, changed])
    return {"results": {case: result for (case, _, _), result in zip(cases, results)},
            "expected": {case: expected for case, _, expected in cases},
            "fresh": results[-2], "changed_text": results[-1], "d": d, "trained": trained, "before": before,
            "untouched": {w: (digest, _tree_digest(w)) for w, digest in untouched.items()}}


CASES = [case for case, _, _ in _catalogue("D", "C", "T")]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_clear_line(catalogue, case):
    result = catalogue["results"][case]
    assert result["returncode"] == 1, result
    assert result["stderr"].count("\n") == 1 and "Traceback" not in result["stderr"], result
    assert result["stderr"].startswith("error: ")
    assert "<bound method" not in result["stderr"]  # no repr of tensorstore's internals
    assert catalogue["expected"][case] in result["stderr"], result["stderr"]


def test_fresh_sets_the_old_run_aside_intact(catalogue):
    result, trained = catalogue["fresh"], catalogue["trained"]
    assert result["returncode"] == 0, result["stderr"]
    moved = re.search(r"--fresh: moved the previous run into (\S+)", result["stdout"]).group(1)
    assert os.path.dirname(moved) == trained
    # All the error cases before left the trained workdir exactly as it was; --fresh
    # moved it whole; the new run (a GRU) started from step 0.
    assert _tree_digest(moved) == catalogue["before"]
    assert _steps(trained) == [2] and _steps(moved) == [5, 10]
    assert [r["step"] for r in metrics.read_metrics(trained) if r["split"] == "train"] == [2]


def test_eval_on_a_changed_text_on_purpose_says_so(catalogue):
    result, d = catalogue["changed_text"], catalogue["d"]
    assert result["returncode"] == 0 and result["stderr"] == "", result
    lines = result["stdout"].splitlines()
    assert lines[1] == (f"step 10 | evaluating on a changed text: {d}/edited.txt (sha256 "
                        f"{_sha(EDITED[0])[:12]}… when trained, {_sha(EDITED[1])[:12]}… now)")
    assert re.fullmatch(r"step 10 \| val loss \d\.\d{4} nats/char \| val bpc \d\.\d{4}", lines[2])


def test_failed_fine_tuning_launches_leave_no_empty_checkpoints_directory(catalogue):
    """The --init_from cases above failed in --workdir=D/new after taking its lock."""
    assert os.path.isdir(f"{catalogue['d']}/new")
    assert not os.path.exists(f"{catalogue['d']}/new/checkpoints")


def test_bad_inputs_left_the_other_workdirs_unchanged(catalogue):
    for workdir, (before, after) in catalogue["untouched"].items():
        assert before == after, workdir


def test_a_bad_cell_name_gets_one_clear_line(tmp_path):
    """model.cell names that do not resolve to a usable cell (charrnn.cells)."""
    work = [f"--workdir={tmp_path}/new", f"--config={SMOKE}"]
    cases = [("no_such_module:Cell", "model.cell 'no_such_module:Cell': cannot import module "
              "'no_such_module'"),
             ("json:loads", "model.cell 'json:loads': loads is not a subclass of charrnn.cells.Cell"),
             ("charrnn.cells.base:Cell", "num_gates must be a positive integer, got 0"),
             ("charrnn:nope", "model.cell 'charrnn:nope': module 'charrnn' has no 'nope'")]
    results = launch_many([work + [f"--config.model.cell={name}"] for name, _ in cases])
    for (name, expected), result in zip(cases, results):
        assert result["returncode"] == 1, result
        assert result["stderr"].count("\n") == 1 and "Traceback" not in result["stderr"], result
        assert result["stderr"].startswith("error: ") and expected in result["stderr"], result
    assert not os.path.exists(f"{tmp_path}/new")


def test_an_allocator_failure_is_one_line_naming_the_sizes():
    """A real one: XLA asked for 4 TB on the CPU. A full disk (tensorstore also says
    RESOURCE_EXHAUSTED) and other errors pass through."""
    import jax.numpy as jnp
    from charrnn import memory
    with pytest.raises(memory.OutOfMemoryError) as raised:
        with memory.out_of_memory_is_an_error("--length=5 --num_samples=2"):
            jnp.zeros((10**12,), jnp.float32).block_until_ready()
    assert re.fullmatch(r"out of memory with --length=5 --num_samples=2 \(RESOURCE_EXHAUSTED: "
                        r".*4000000000000 bytes.*\); use smaller sizes", str(raised.value))
    with pytest.raises(ValueError, match="No space left"):
        with memory.out_of_memory_is_an_error("x"):
            raise ValueError("RESOURCE_EXHAUSTED: Error writing: No space left on device")
