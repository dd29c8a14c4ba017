"""supervisor: the process you start (arbiter.py), its children, /metrics."""

from .arbiter import serve

__all__ = ["serve"]
