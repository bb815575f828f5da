"""amc-search: AutoML for Model Compression (AMC) with a Gymnasium env and a stable-baselines3 agent."""

from amc.checkpoint import load_pruned

__version__ = "0.1.0"
__all__ = ["compress", "CompressResult", "load_pruned", "__version__"]


def __getattr__(name: str):
    """``amc.compress`` is imported on first use: the search's dependencies stay out of ``import amc``."""
    if name in ("compress", "CompressResult"):
        from amc import api

        return getattr(api, name)
    raise AttributeError(f"module 'amc' has no attribute {name!r}")
