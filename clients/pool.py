"""Several connections behind one client, used in turn.

One connection already carries many requests at once (they pipeline), so a
pool is for spreading load over more server-side read loops and socket
buffers, or for keeping one slow frame (a big tensor being written) from
delaying the small ones behind it. Each call goes to the next connection in
round-robin order; a broken connection is replaced at its next turn.
"""

from __future__ import annotations

from typing import Any

from .aio import AsyncClient
from .sync import Client

__all__ = ["AsyncClientPool", "ClientPool", "DEFAULT_SIZE"]

DEFAULT_SIZE = 4


class ClientPool(Client):
    """``Client`` over ``size`` connections (``Client(..., connections=size)``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *, size: int = DEFAULT_SIZE,
                 **options: Any):
        super().__init__(host, port, connections=size, **options)


class AsyncClientPool(AsyncClient):
    """``AsyncClient`` over ``size`` connections; open it with
    ``await AsyncClientPool.connect(...)`` or ``async with``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7070, *, size: int = DEFAULT_SIZE,
                 **options: Any):
        super().__init__(host, port, connections=size, **options)
