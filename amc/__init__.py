"""amc-search: AutoML for Model Compression (AMC) with a Gymnasium env and a stable-baselines3 agent."""

from amc.checkpoint import load_pruned

__version__ = "0.1.0"
__all__ = ["load_pruned", "__version__"]
