"""charrnn's command line: train, evaluate or sample a character-level RNN.

    python launch.py --workdir=DIR [--config=experiments/configs/default.py[:ARG]] [--config.FIELD=V]
    python launch.py --mode=eval --workdir=DIR [--step=N]
    python launch.py --workdir=NEW --init_from=DIR [--init_step=N] [--config.data.path=new.txt]
    python launch.py --mode=sample --workdir=DIR [--step=N] --prompt="The cat " --length=500 \
        [--temperature=0.8 --top_k=0 --top_p=1.0 --num_samples=1 --seed=0 --output=FILE]

This file only defines the flags; charrnn/cli.py runs the modes. Errors in the
input are printed as one line on stderr with exit status 1.
"""

import os

from absl import flags

from charrnn import cli

# The default config sits beside this file, wherever the command is run from.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "experiments", "configs", "default.py")
_CONFIG, _CONFIG_ERROR = cli.define_config(
    _DEFAULT_CONFIG, "Training configuration file (get_config(arg)); relative to the current "
    "directory. Default: experiments/configs/default.py beside launch.py.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.DEFINE_string("mode", "train", f"One of {cli.MODES}.")
flags.DEFINE_string(
    "init_from", None, "--mode=train: start a new run from the weights of this workdir's "
    "checkpoint (fine-tuning; the model fields must match, the optimizer starts afresh).")
flags.DEFINE_integer("init_step", None, "The checkpoint of --init_from (default: its latest).")
flags.DEFINE_integer("step", None, "--mode=eval/sample: the checkpoint (default: the latest).")
flags.DEFINE_string("weights", "auto", "--mode=eval/sample: auto (the averaged weights when the "
                    "run kept them, optim.ema_decay > 0), ema, or raw (the trained ones).")
flags.DEFINE_bool(
    "changed_text", False, "--mode=eval: evaluate on the run's text file although it changed "
    "since training (its sha256 differs from the checkpoint's; the output says so).")
flags.DEFINE_bool(
    "fresh", False, "--mode=train: move the workdir's previous run (checkpoints, metrics, "
    "config.json, tensorboard, launches.jsonl) into <workdir>/previous-<time>/ and start "
    "again from step 0.")

# Several processes (JAX's multi-controller runtime); README "Many devices and hosts".
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; the same on every process.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process: 0 … num_processes-1.")
flags.DEFINE_bool(
    "distributed", False, "Multi-process run described by the environment (TPU VM / pod slice, "
    "Slurm, Open MPI): jax.distributed.initialize() with no arguments.")

# --mode=sample only.
flags.DEFINE_string("prompt", "", "Text that primes the hidden state; empty: see README.")
flags.DEFINE_integer("length", 500, "Characters to generate after the prompt.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy argmax.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest characters; 0 = all.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 = off.")
flags.DEFINE_integer("num_samples", 1, "Samples, generated as one batch.")
flags.DEFINE_integer("seed", 0, "Seed of the sampling key; same seed, same text.")
flags.DEFINE_string("output", None, "Also write the samples to this file.")


def main(argv):
    cli.main(argv, cli.Options.from_flags(), _CONFIG, launcher=__file__)


if __name__ == "__main__":
    cli.run(main, _CONFIG_ERROR)
