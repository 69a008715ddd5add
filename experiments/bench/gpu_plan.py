"""What experiments/bench/gpu.py times: the models, sizes and contenders, as data.

Kept apart from gpu.py (which defines absl flags at import) so that tests and
other scripts can read the plan.
"""

TRAIN_CONFIGS = {"lstm_1x128": ("lstm", 128, 1), "lstm_2x512": ("lstm", 512, 2),
                 "lstm_3x768": ("lstm", 768, 3), "rnn_1x512": ("rnn", 512, 1),
                 "gru_1x512": ("gru", 512, 1)}
BATCHES = (32, 128)
SEQ_LEN = 128
SWEEP_RUNS = (8, 64)
SWEEP_MODEL, SAMPLE_MODELS, MEMORY_MODEL = "lstm_1x128", ("lstm_1x128", "lstm_3x768"), \
    "lstm_3x768"
SAMPLE_BATCHES, SAMPLE_LENGTH = (1, 64), 1000


def sizes(tiny: bool) -> dict:
    """The run's sizes; tiny (--allow_cpu) keeps the names and shrinks every size."""
    if tiny:
        return {"hidden": lambda h: 8, "batch": lambda b: {32: 2, 128: 3}[b], "seq_len": 8,
                "length": 20, "units_per_call": 1}
    return {"hidden": lambda h: h, "batch": lambda b: b, "seq_len": SEQ_LEN,
            "length": SAMPLE_LENGTH, "units_per_call": 4}


def plan(tiny: bool, device: str) -> dict:
    """Every group to time: {section: {key: {label: (framework, spec)}}}; ``device``
    is PyTorch's (``cuda`` or ``cpu``)."""
    size = sizes(tiny)
    per_call = {"units_per_call": size["units_per_call"]}

    def train_spec(name, batch):
        cell, hidden, layers = TRAIN_CONFIGS[name]
        return {"kind": "train", "cell": cell, "hidden": size["hidden"](hidden), "layers": layers,
                "batch": size["batch"](batch), "seq_len": size["seq_len"], **per_call}

    train = {}
    for batch in BATCHES:
        for name, (cell, _, _) in TRAIN_CONFIGS.items():
            spec = train_spec(name, batch)
            bf16 = {**spec, "matmul_dtype": "bfloat16"}
            group = {"charrnn": ("jax", spec), "charrnn_bf16": ("jax", bf16)}
            if cell == "lstm":
                group["jax_cudnn"] = ("jax", {**spec, "kind": "train_cudnn"})
            group["pytorch"] = ("torch", {**spec, "device": device})
            group["pytorch_bf16"] = ("torch", {**bf16, "device": device})
            train[f"{name}/B{batch}"] = group
    sweep = {f"{SWEEP_MODEL}/B{BATCHES[0]}/runs{runs}": {f"charrnn_sweep{runs}": (
        "jax", {**train_spec(SWEEP_MODEL, BATCHES[0]), "kind": "sweep", "runs": runs})}
        for runs in SWEEP_RUNS}
    sample = {}
    for name in SAMPLE_MODELS:
        _, hidden, layers = TRAIN_CONFIGS[name]
        for batch in SAMPLE_BATCHES:
            spec = {"hidden": size["hidden"](hidden), "layers": layers, "batch": batch,
                    "length": size["length"]}
            sample[f"{name}/batch{batch}"] = {
                "charrnn_scan": ("jax", {**spec, "kind": "sample_scan"}),
                "charrnn_loop": ("jax", {**spec, "kind": "sample_loop"}),
                "pytorch": ("torch", {**spec, "kind": "sample", "device": device})}
    return {"train": train, "sweep": sweep, "sample": sample}


def memory_plan(tiny: bool, device: str) -> dict:
    """{label: bench_memory spec} of the memory section: MEMORY_MODEL at the larger batch."""
    size = sizes(tiny)
    cell, hidden, layers = TRAIN_CONFIGS[MEMORY_MODEL]
    spec = {"cell": cell, "hidden": size["hidden"](hidden), "layers": layers,
            "batch": size["batch"](BATCHES[-1]), "seq_len": size["seq_len"]}
    bf16 = {**spec, "matmul_dtype": "bfloat16"}
    return {"charrnn": spec, "charrnn_bf16": bf16, "jax_cudnn": {**spec, "cudnn": True},
            "pytorch": {**spec, "torch": True, "device": device},
            "pytorch_bf16": {**bf16, "torch": True, "device": device}}
