"""One daemon per address: the supervisor's lock on its host and port."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile


class PortLock:
    """One daemon per address: an flock'd file per host and port, plus a
    bound (not listening) SO_REUSEPORT socket that holds the port, so that
    ``port = 0`` is picked once for every front, and a process that is not
    ours is seen at once. Without the lock a second daemon would silently
    share the port's traffic (SO_REUSEPORT lets it bind)."""

    def __init__(self, host: str, port: int):
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lock_fd = -1
        try:
            self.sock.bind((host, port))
            self.port = self.sock.getsockname()[1]
            path = os.path.join(tempfile.gettempdir(), f"ringserve-{host}-{self.port}.lock")
            self.path = path
            self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip()
                raise OSError(f"another ringserve daemon (pid {other or '?'}) serves "
                              f"{host}:{self.port} (lock {path}); stop it or choose another "
                              "port") from None
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
