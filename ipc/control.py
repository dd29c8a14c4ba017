"""The control channel between the daemon's own processes.

The supervisor talks to each front and each worker over one
``socketpair(AF_UNIX, SOCK_SEQPACKET)``: a message is one packet, so there is
no framing to get wrong, and a packet may carry file descriptors
(SCM_RIGHTS): the eventfds and the memfd of a ring travel this way, so the
rings need no names and nothing can be left in ``/dev/shm``.

This is the slow path (start, attach, ready, reload, stop, figures a few
times a second), never the request path: requests travel through the rings
(``ipc/ring.py``) and are never pickled. Both ends are processes of one
daemon, connected by a socketpair made before either was started, so the
messages are pickled dicts: the config travels as the frozen dataclasses the
supervisor validated, not as text each process would parse again.

A message larger than ``MAX_MESSAGE`` is a bug of ours and raises at the
sender (the figures a front sends are bounded by the number of models).
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any

MAX_MESSAGE = 4 << 20   # one packet; a config with hundreds of models fits
MAX_FDS = 8
_SNDBUF = MAX_MESSAGE + 65536


class ChannelClosed(Exception):
    """The other end is gone (EOF or a reset): the process it was died."""


class BadMessage(ValueError):
    """A message arrived that cannot be read (its descriptors are closed):
    the two ends run different code, say a child restarted after the files
    were upgraded under a running daemon. The channel stays usable."""


def pair() -> tuple[socket.socket, socket.socket]:
    """Two connected ends; the caller keeps one and passes the other's
    fileno to the child (``pass_fds``)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SNDBUF)
    return a, b


class Channel:
    """One end. ``send`` blocks only while the peer's receive buffer is full
    (a few MiB of unread messages: a wedged peer, which its heartbeat
    reveals); ``recv`` returns ``(message, fds)`` or raises ChannelClosed,
    and in non-blocking mode returns None when nothing is waiting."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict[str, Any], fds: tuple[int, ...] | list[int] = ()) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"control message {msg.get('cmd') or msg.get('event')!r} is "
                             f"{len(data)} bytes, over {MAX_MESSAGE}")
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed(str(e)) from None

    def recv(self) -> tuple[dict[str, Any], list[int]] | None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return None
        except (ConnectionResetError, OSError) as e:
            if isinstance(e, BlockingIOError):
                return None
            raise ChannelClosed(str(e)) from None
        if not data and not fds:
            raise ChannelClosed("end of the control channel")
        if flags & socket.MSG_CTRUNC:  # pragma: no cover - more fds than we ever send
            for fd in fds:
                os.close(fd)
            raise ValueError("a control message carried more descriptors than MAX_FDS")
        try:
            msg = pickle.loads(data)
        except Exception as e:  # noqa: BLE001 - whatever unpickling raises, the channel goes on
            for fd in fds:
                os.close(fd)
            raise BadMessage(f"a control message could not be read ({type(e).__name__}: {e}); "
                             "do both processes run the same ringserve? restart the daemon "
                             "after an upgrade") from None
        if not isinstance(msg, dict):
            for fd in fds:
                os.close(fd)
            raise BadMessage(f"a control message is a {type(msg).__name__}, not a dict")
        return msg, fds

    def close(self) -> None:
        self.sock.close()
