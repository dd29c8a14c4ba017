"""Moved to daemon/front/rids.py. Kept for ``daemon.rids.decode(rid)``, which
docs/protocol.md used to tell clients to call."""

from .front.rids import Rid, decode

__all__ = ["Rid", "decode"]
