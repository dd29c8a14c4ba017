"""Named POSIX shared-memory segments: create, attach, close, unlink.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that
*attaches* registers the segment with its own resource tracker, which unlinks
it when that process exits, so a restarted worker would pull the ring out
from under the front. Here ownership is explicit, as in CPython's module
documentation recommends: the creator unlinks exactly once, every
process closes its own mapping.

Named segments live in ``/dev/shm`` under ``ringserve-<pid>-...`` where
``<pid>`` is the creating process (the offline batch job). That naming lets a
later process remove the segments of a creator that was killed with SIGKILL
(``sweep_stale``), the one exit path on which it cannot clean up after itself.

The daemon's rings are *anonymous* instead (``Segment.anonymous``: a memfd,
never in ``/dev/shm``): the supervisor creates each one and hands its file
descriptor to the front and the worker over their control sockets
(``ipc/control.py``, SCM_RIGHTS). The memory then lives exactly as long as
some process maps it or holds the descriptor, so no exit path, kill -9 of any
process included, can leave a segment behind.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re

SHM_DIR = "/dev/shm"
PREFIX = "ringserve-"
_STALE_RE = re.compile(r"^ringserve-(\d+)-")


class Segment:
    """One mapped segment. ``buf`` is a writable memoryview over all of it."""

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool):
        self.name = name
        self.size = size
        self.owner = owner
        self._mm: mmap.mmap | None = mm
        self.buf: memoryview | None = memoryview(mm)

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"segment name {name!r} must start with {PREFIX!r} and hold no '/'")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(name, size, mm, owner=True)

    @classmethod
    def anonymous(cls, name: str, size: int) -> tuple["Segment", int]:
        """A segment with no name in the file system (memfd); returns it
        and its descriptor, to be passed to the processes that attach it
        with ``from_fd``. The caller closes the descriptor once it is sent."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, size, mm, owner=True), fd

    @classmethod
    def from_fd(cls, fd: int, name: str) -> "Segment":
        """Map a segment received as a descriptor; the descriptor is closed
        (the mapping keeps the memory)."""
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        return cls.from_fd(os.open(os.path.join(SHM_DIR, name), os.O_RDWR), name)

    def address(self) -> int:
        """Start address of the mapping (for cudaHostRegister)."""
        if self._mm is None:
            raise ValueError(f"segment {self.name!r} is closed")
        return ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    def close(self) -> None:
        """Release this process's mapping. Safe to call twice and after a
        failed init. Views taken from ``buf`` must be released first; a view
        still alive is reported rather than crashing the caller's shutdown."""
        if self.buf is not None:
            try:
                self.buf.release()
            except BufferError:
                pass
            self.buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # A tensor view still points into the mapping (a worker that is
                # exiting anyway); the OS unmaps it at process exit.
                pass
            self._mm = None

    def unlink(self) -> None:
        """Remove the name (creator only). The memory lives until every
        process has closed its mapping."""
        if not self.name.startswith(PREFIX):
            return  # anonymous: nothing to remove
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass


def unlink_name(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def segments() -> set[str]:
    """The names of every ringserve segment on this machine, any process's."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith("ringserve-")}
    except FileNotFoundError:
        return set()


def creator(name: str) -> int | None:
    """The pid of the front that made segment ``name`` (``ringserve-<pid>-...``)."""
    m = _STALE_RE.match(name)
    return int(m.group(1)) if m else None


def sweep_stale() -> list[str]:
    """Unlink segments left by ringserve fronts that no longer run."""
    removed = []
    for name in sorted(segments()):
        pid = creator(name)
        if pid is not None and not _pid_alive(pid):
            unlink_name(name)
            removed.append(name)
    return removed
