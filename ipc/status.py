"""Status codes of the wire protocol and the exceptions that carry them.

The codes are gRPC's (protocol.md, "Answers"), so that people and tools that
know gRPC read them without a table. Two families of exception:

- ``ProtocolError`` and its subclasses: the *peer* sent something wrong, or
  the server refuses it. They carry the status to put on the wire and a
  message meant for the person at the other end.
- Local misuse (calling an API wrongly in-process) raises the ordinary Python
  exceptions (``ValueError``, ``TypeError``), never a ``ProtocolError``.
"""

from __future__ import annotations

import enum
import reprlib
from typing import Any


class Status(enum.IntEnum):
    OK = 0
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ProtocolError(Exception):
    """An error to be answered on the wire with ``status`` and ``message``.

    ``req_id`` is the id of the request it answers (0 when none could be
    read). ``fatal`` means the byte stream can no longer be trusted and the
    connection must be closed after the answer is sent.
    """

    status: Status = Status.INTERNAL

    def __init__(self, message: str, *, req_id: int = 0, fatal: bool = False,
                 status: Status | None = None):
        super().__init__(message)
        self.message = message
        self.req_id = req_id
        self.fatal = fatal
        if status is not None:
            self.status = status

    def answer(self) -> dict[str, Any]:
        """The answer map for this error (protocol.md, "Answers")."""
        return {"id": self.req_id, "status": int(self.status), "error": self.message}


class InvalidArgument(ProtocolError):
    status = Status.INVALID_ARGUMENT


class DeadlineExceeded(ProtocolError):
    status = Status.DEADLINE_EXCEEDED


class NotFound(ProtocolError):
    status = Status.NOT_FOUND


class ResourceExhausted(ProtocolError):
    status = Status.RESOURCE_EXHAUSTED


class Internal(ProtocolError):
    status = Status.INTERNAL


class Unavailable(ProtocolError):
    status = Status.UNAVAILABLE


class Unauthenticated(ProtocolError):
    status = Status.UNAUTHENTICATED


# Messages quote what they name, but never more than a short prefix of it: a
# 7 MiB model name must not become a 7 MiB answer (or log line). reprlib
# cuts strings, nesting and long containers before it builds the text, so
# quoting a huge value costs no more than quoting a small one.
BRIEF_LIMIT = 64
_repr = reprlib.Repr()  # Python 3.11's Repr takes no arguments
for _name, _value in (("maxlevel", 3), ("maxdict", 4), ("maxlist", 6), ("maxtuple", 6),
                      ("maxset", 4), ("maxfrozenset", 4), ("maxdeque", 4), ("maxarray", 4),
                      ("maxstring", BRIEF_LIMIT), ("maxlong", 40), ("maxother", BRIEF_LIMIT)):
    setattr(_repr, _name, _value)


def brief(value: object, limit: int = BRIEF_LIMIT) -> str:
    """A short repr of ``value`` for an error message: at most about ``limit``
    characters, with the length of a cut string or bytes value."""
    try:
        text = _repr.repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        return f"<int of {value.bit_length()} bits>" if type(value) is int else "<unprintable>"
    # Three "is" tests rather than "in (str, bytes, bytearray)": mypy narrows these.
    if ((type(value) is str or type(value) is bytes or type(value) is bytearray)
            and len(value) > limit):
        unit = "characters" if type(value) is str else "bytes"
        return f"{text[:limit]}... ({len(value)} {unit})"
    return text if len(text) <= limit + 16 else text[:limit] + "..."
