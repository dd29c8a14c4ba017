"""Python clients for ringserve (docs/clients.md).

    from clients import Client
    with Client("127.0.0.1", 7070) as c:
        r = c.infer("demo", x)          # x: numpy array, torch tensor, list, or {name: ...}
        r.outputs, r.version, r.timing

``Client`` blocks (and is thread-safe; ``submit`` returns futures);
``AsyncClient`` is its asyncio twin. Both pipeline many requests on one
connection, retry RESOURCE_EXHAUSTED and UNAVAILABLE with jittered backoff
(``RetryPolicy``) within the caller's deadline, and raise one exception class
per wire status (``clients.errors``).
"""

from . import errors
from ._core import InferResult, RetryPolicy
from .aio import AsyncClient
from .errors import (
    ClientError,
    ClientTimeout,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RingserveError,
    Unauthenticated,
    Unavailable,
)
from .pool import AsyncClientPool, ClientPool
from .sync import Client

__all__ = [
    "AsyncClient", "AsyncClientPool", "Client", "ClientPool", "InferResult", "RetryPolicy",
    "errors",
    "RingserveError", "InvalidArgument", "DeadlineExceeded", "NotFound", "ResourceExhausted",
    "Internal", "Unavailable", "Unauthenticated",
    "ClientError", "ConnectFailed", "ConnectionLost", "ClientTimeout",
]
