"""charrnn: character-level RNN language models in JAX/Flax (see README.md).

``charrnn.sample(...)`` is :func:`charrnn.sampling.sample`. It is imported on
first use (PEP 562) so that ``import charrnn.data`` and launch.py's flag
checks do not pay for importing JAX.
"""


def __getattr__(name):
    if name == "sample":
        from charrnn.sampling import sample
        return sample
    raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
