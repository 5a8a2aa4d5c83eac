"""calq: calibration-driven post-training compression of language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # The API pulls in torch and transformers; keep `import calq` (and `calq --help`) fast.
    if name in ("compress", "evaluate", "load", "inspect"):
        from calq import api

        return getattr(api, name)
    raise AttributeError(name)
