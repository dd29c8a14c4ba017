"""Moved to daemon/workers/zoo.py. Kept so that configs keep saying
``factory = "daemon.zoo:mlp_scorer"`` (configs/default.toml)."""

from .workers.zoo import MLPScorer, mlp_scorer

__all__ = ["MLPScorer", "mlp_scorer"]
