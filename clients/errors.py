"""What a client call can raise.

Two families, kept apart (STYLE.md, "Exceptions carry their wire status"):

- ``RingserveError`` and its subclasses: the *server* answered with a status
  other than OK. One class per status of protocol.md ("Answers"); each
  carries ``status``, the server's ``message`` and the whole ``answer`` map
  (``rid`` included, for log joins). ``attempts`` says how many tries the
  call made before giving up (retries, see ``RetryPolicy``).
- ``ClientError`` and its subclasses: a *local* transport problem, with no
  answer from the server: the connection could not be made, was lost with the
  request in flight, or no answer came within the client's ``timeout``.

Calling the API wrongly (a bad argument, a closed client) raises the
ordinary ``TypeError``/``ValueError``, never one of these.
"""

from __future__ import annotations

from typing import Any

from ipc.status import Status

__all__ = [
    "RingserveError", "InvalidArgument", "DeadlineExceeded", "NotFound", "ResourceExhausted",
    "Internal", "Unavailable", "Unauthenticated",
    "ClientError", "ConnectFailed", "ConnectionLost", "ClientTimeout",
    "error_class",
]


class RingserveError(Exception):
    """The server answered ``status`` (not OK) with ``message``."""

    status: Status | int = Status.INTERNAL

    def __init__(self, status: Status | int, message: str, answer: dict[str, Any] | None = None):
        super().__init__(message)
        try:
            status = Status(status)
        except ValueError:   # a status newer than this client: keep the number
            pass
        self.status = status
        self.message = message
        self.answer = answer if answer is not None else {}
        self.attempts = 1

    @property
    def rid(self) -> Any:
        """The server's request id, when the request was accepted (else None)."""
        return self.answer.get("rid")

    def __str__(self) -> str:
        name = self.status.name if isinstance(self.status, Status) else f"status {self.status}"
        return f"{name}: {self.message}"

    # picklable, e.g. across a process pool
    def __reduce__(self) -> tuple[type[RingserveError], tuple[Status | int, str, dict[str, Any]]]:
        return (type(self), (self.status, self.message, self.answer))


class InvalidArgument(RingserveError):
    status = Status.INVALID_ARGUMENT


class DeadlineExceeded(RingserveError):
    status = Status.DEADLINE_EXCEEDED


class NotFound(RingserveError):
    status = Status.NOT_FOUND


class ResourceExhausted(RingserveError):
    """The model's queue is full (or a server limit was hit): retry with backoff."""

    status = Status.RESOURCE_EXHAUSTED


class Internal(RingserveError):
    status = Status.INTERNAL


class Unavailable(RingserveError):
    """No ready worker, the worker died, or the server is draining: retry later."""

    status = Status.UNAVAILABLE


class Unauthenticated(RingserveError):
    status = Status.UNAUTHENTICATED


_BY_STATUS: dict[int, type[RingserveError]] = {
    int(c.status): c for c in (InvalidArgument, DeadlineExceeded, NotFound, ResourceExhausted,
                               Internal, Unavailable, Unauthenticated)}


def error_class(status: int) -> type[RingserveError]:
    """The exception class for a wire status; ``RingserveError`` for an unknown one."""
    return _BY_STATUS.get(status, RingserveError)


class ClientError(Exception):
    """A local transport problem: no answer was received for the request."""


class ConnectFailed(ClientError, ConnectionError):
    """The TCP connection could not be made (refused, unreachable, timed out)."""


class ConnectionLost(ClientError, ConnectionError):
    """The connection closed (or was closed) while the request awaited its answer.

    The request may or may not have run on the server.
    """


class ClientTimeout(ClientError, TimeoutError):
    """No answer within the client's ``timeout`` (the server missed its own
    deadline, or the network is stuck)."""
