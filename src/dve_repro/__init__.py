"""dve: reproduce data value embeddings (Wang et al., ICLR 2025) and check them against retraining.

The public door for a model and training loop of your own (see :mod:`dve_repro.api`):
:class:`Recorder` wraps your loop and writes a run directory; :func:`embed` runs Algorithm 1
over it; :func:`features` projects query gradients the same way; :func:`score` scores them.
"""

__version__ = "0.1.0"

__all__ = ["Embedding", "Recorder", "__version__", "embed", "features", "score"]


def __getattr__(name: str):
    # Imported on first use, so that `dve --help` and the error module stay free of torch.
    if name in __all__:
        from dve_repro import api

        return getattr(api, name)
    raise AttributeError(f"module 'dve_repro' has no attribute {name!r}")
