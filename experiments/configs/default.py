"""Default configuration of a charrnn run, with variants after a colon.

    python launch.py --workdir=W                                   # default
    python launch.py --workdir=W --config=experiments/configs/default.py:gru
    python launch.py --workdir=W --config.model.hidden_size=512    # any field

Variants: smoke (tiny and fast, for tests), rnn, gru, lstm, tinyshakespeare,
tinyshakespeare_fast (10-minute budget), tinyshakespeare_long, tinyshakespeare_wide,
tinyshakespeare_xl, tinyshakespeare_ema (QUALITY.md has their runs; docs/design-notes.md the measurements
that chose them). ``variant_names()`` lists them, for the pages that check which
variant a run is.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # every random stream (init, data offsets, dropout) derives from it

    config.data = ml_collections.ConfigDict()
    config.data.name = "shakespeare"  # built-in corpus: shakespeare (offline) or tinyshakespeare
    config.data.path = ""  # a UTF-8 text file; wins over data.name when set
    config.data.encoding = "utf-8"  # how to decode data.path
    config.data.val_fraction = 0.05  # contiguous held-out tail fractions
    config.data.test_fraction = 0.05

    config.model = ml_collections.ConfigDict()
    config.model.cell = "lstm"  # rnn (tanh Elman), irnn, gru, mgu, lstm, or package.module:Class
    config.model.hidden_size = 256
    config.model.num_layers = 2
    config.model.embed_dim = 64
    # N(0, std²) initial embeddings. 1 (PyTorch's nn.Embedding default): smaller embeddings
    # shrink layer 0's pre-activations and slow the escape from the unigram plateau
    # (docs/design-notes.md, "Embedding initialisation").
    config.model.embed_init_std = 1.0
    config.model.dropout = 0.0  # on every layer's output, training only
    # "step": a new dropout mask every time step; "locked": one mask per sequence and layer
    # for the whole window (variational dropout, Gal & Ghahramani 2016; AWD-LSTM)
    config.model.dropout_mask = "step"
    config.model.weight_drop = 0.0  # DropConnect on each W_hh (one mask per window), training only
    config.model.fast_vjp = True  # scan backward derived from the cell (charrnn.scan); False: autodiff
    config.model.remat = False  # recompute activations in the backward pass: memory ~√T, not T
    # time steps per iteration of the scan's loop: "auto" (8 on a GPU/TPU, where it measured
    # 1.7-1.8x faster; 1 on a CPU, where unrolling was slower) or a count, e.g. "4"
    config.model.unroll = "auto"
    # operand type of the matmuls (float32 accumulation, float32 parameters):
    # bfloat16 is faster on GPUs, TPUs and CPUs with AMX/AVX512-BF16
    config.model.matmul_dtype = "float32"
    # The state every text starts from (sampling, evaluation, restarts in training): "zero",
    # or "learned", a trained carry per layer (charrnn/start.py measures how well the first
    # characters after a line start are predicted from it: start_loss)
    config.model.start_state = "zero"

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # B parallel streams
    config.train.seq_len = 128  # T steps of truncated BPTT per window
    config.train.num_steps = 2000
    config.train.log_every = 50  # steps between progress lines / metrics records
    config.train.eval_every = 500  # steps between val evaluations (and at the end)
    config.train.checkpoint_every = 500  # steps between checkpoints (and at the end)
    config.train.eval_batch_size = 64  # streams used to sweep the whole val/test split
    # Probability per stream per window that training restarts the stream from the start
    # state (besides every stream at an epoch's start). 0 carries the state across windows
    # until the epoch ends: a default run stopped before its first epoch (~1,050 steps) met
    # the start state only at step 0 and began its samples with random symbols. 0.02 had the
    # lowest start_loss and val loss of zero / learned / restarts / both at 1000 steps
    # (docs/design-notes.md, "The start state")
    config.train.reset_prob = 0.02
    config.train.max_consecutive_nonfinite = 20  # stop after this many skipped steps in a row
    config.train.keep_checkpoints = 3  # how many recent checkpoints to keep
    # CPU devices the host is split into: "auto" (one per core for small models, see
    # charrnn/cpu_devices.py) or a count; XLA_FLAGS naming a count wins. No effect on GPU/TPU.
    config.train.cpu_devices = "auto"

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"  # adam, adamw (adam + decoupled weight decay) or sgd
    config.optim.learning_rate = 2e-3
    config.optim.schedule = "constant"  # constant, or cosine (linear warmup then cosine decay)
    config.optim.warmup_steps = 100  # cosine schedule only
    config.optim.final_lr_fraction = 0.1  # cosine schedule: final lr = this × learning_rate
    config.optim.b1 = 0.9  # adam
    config.optim.b2 = 0.999  # adam
    config.optim.weight_decay = 0.1  # adamw: λ, applied to the matrices (not biases)
    config.optim.momentum = 0.0  # sgd (0 = plain SGD)
    # Averaged weights (Polyak averaging): after every step ema <- d*ema + (1-d)*params,
    # from ema = the initial params. 0 = off. Kept in the train state and checkpoints;
    # val/test records add ema_loss/ema_bpc; eval and sample use them (--weights=raw: not).
    config.optim.ema_decay = 0.0
    # A rule of charrnn/clipping.py: none, global_norm, value, agc, block_rms, autoclip, zclip.
    config.optim.clip_mode = "global_norm"
    config.optim.clip_norm = 1.0  # τ of global_norm; the bound of value, λ of agc, RMS of block_rms
    # Where the rule acts: gradient (the batch gradient, before the update rule), update
    # (the update the optimizer computed), bptt (each time step's cotangent; value or
    # global_norm), example (each sequence's gradient), device (before the all-reduce).
    config.optim.clip_at = "gradient"
    config.optim.autoclip_percentile = 10.0  # autoclip: p in (0, 100] of the norm history
    config.optim.autoclip_history = 1000  # autoclip: norms kept (ring buffer)
    config.optim.zclip_z = 2.5  # zclip: z-score above which a norm is a spike
    config.optim.zclip_alpha = 0.97  # zclip: EMA factor of the norm's mean and variance
    config.optim.zclip_warmup = 25  # zclip: first steps that only gather statistics

    if arg:
        if arg not in _VARIANTS:
            raise ValueError(f"unknown config variant {arg!r}; choose from {sorted(_VARIANTS)}")
        _VARIANTS[arg](config)
    return config


def variant_names() -> tuple[str, ...]:
    """The names ``get_config`` accepts after the colon (``None`` is the default itself)."""
    return tuple(_VARIANTS)


def _smoke(c):
    c.model.hidden_size, c.model.num_layers, c.model.embed_dim = 32, 1, 16
    c.train.batch_size, c.train.seq_len, c.train.num_steps = 4, 16, 20
    c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 5, 10, 10
    c.train.eval_batch_size = 256


def _rnn(c):
    c.model.cell, c.model.hidden_size, c.model.num_layers = "rnn", 512, 1
    c.optim.learning_rate = 1e-3


def _gru(c):
    c.model.cell = "gru"


def _lstm(c):
    c.model.cell = "lstm"


def _tinyshakespeare(c):
    # nanoGPT's split: the last 10% of tiny shakespeare is validation, no test.
    c.data.name = "tinyshakespeare"
    c.data.val_fraction, c.data.test_fraction = 0.1, 0.0
    c.model.cell, c.model.hidden_size, c.model.num_layers = "lstm", 512, 2
    # Sized for a 30-minute budget on 2 CPU cores: ~15 passes over the 1 MB of training
    # text in steps of B*T = 4096 characters. A PyTorch LSTM 2x512 with dropout 0.25
    # overfit within that budget: more dropout, and the cosine schedule ends with the
    # budget. Val every 250 steps to catch the best point. The measurements behind every
    # tinyshakespeare variant: docs/design-notes.md, "Tiny-shakespeare recipes".
    c.model.dropout = 0.35
    c.train.num_steps = 4000
    c.train.eval_every = 250
    c.optim.schedule = "cosine"


def _tinyshakespeare_fast(c):
    # Lowest val loss within 10 minutes on a 2-core Xeon with AMX: bfloat16 products
    # (faster than float32 there), the cosine schedule ending with the budget, dropout as
    # in the PyTorch reference (0.25).
    _tinyshakespeare(c)
    c.model.matmul_dtype = "bfloat16"
    c.model.dropout = 0.25
    c.optim.warmup_steps = 50
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 1600, 100, 800


def _tinyshakespeare_long(c):
    # More capacity per step (3 layers) and ~27 passes over the training text. With
    # dropout 0.4 alone this overfit, so the recurrence is regularised too: DropConnect
    # on W_hh and decoupled weight decay.
    _tinyshakespeare_fast(c)
    c.model.num_layers = 3
    c.model.dropout = 0.4
    c.model.weight_drop = 0.25
    c.optim.name, c.optim.weight_decay = "adamw", 0.1
    c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 6000, 250, 1000


def _tinyshakespeare_wide(c):
    # The 3x512 recipe above no longer overfit but its val loss went flat, so more width
    # (1.5x, ~2.2x the compute per step) and a little more dropout.
    _tinyshakespeare_long(c)
    c.model.hidden_size = 768
    c.model.dropout = 0.45
    c.train.num_steps = 5000


def _tinyshakespeare_xl(c):
    # The wide recipe gained little from a second cosine cycle and then overfit, so 4/3
    # the width again (~1.8x the compute per step) with more dropout between layers and
    # on W_hh, in one shorter cosine cycle.
    _tinyshakespeare_wide(c)
    c.model.hidden_size = 1024
    c.model.dropout, c.model.weight_drop = 0.5, 0.3
    c.train.num_steps = 4500


def _tinyshakespeare_ema(c):
    # The wide recipe's best val came from its second cosine cycle (7500 steps in all), so
    # one cycle of that length, evaluated with averaged weights (Polyak averaging) beside
    # the raw ones: sized for about 2 hours on 2 cores.
    _tinyshakespeare_wide(c)
    c.optim.ema_decay = 0.999
    c.train.num_steps = 7500


_VARIANTS = {"smoke": _smoke, "rnn": _rnn, "gru": _gru, "lstm": _lstm,
             "tinyshakespeare": _tinyshakespeare, "tinyshakespeare_fast": _tinyshakespeare_fast,
             "tinyshakespeare_long": _tinyshakespeare_long, "tinyshakespeare_wide": _tinyshakespeare_wide,
             "tinyshakespeare_xl": _tinyshakespeare_xl, "tinyshakespeare_ema": _tinyshakespeare_ema}
