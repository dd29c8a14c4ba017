"""A worker's status page: what every front needs to know of the worker itself.

One 4 KiB memfd per worker generation, made by the supervisor, handed to the
worker (with its ``load`` message) and to every front (with each ``port``).
The worker is its only writer. Layout (u64, native order)::

    0  busy   1 from the moment the worker takes a batch until it finds no
              ring with work and goes back to waiting; 0 while it waits

Why: a front hands a batch over at once only when the worker is idle, and
otherwise lets the batch fill for the window (daemon/serving/queue.py). With
one front, "idle" is "nothing of mine in its ring"; with several, a worker
that runs another front's batch is not idle, and treating it so makes each
front hand over tiny batches one after the other. Read from this page,
"idle" means idle for the machine, so batches fill while the worker is busy
and the worker merges what waits on several rings into one pass
(docs/architecture.md, "Batch size across fronts").
"""

from __future__ import annotations

import mmap
import os

STATUS_PAGE_BYTES = 4096
_BUSY = 0


class StatusPage:
    __slots__ = ("_mm", "_u64")

    def __init__(self, fd: int):
        """Map the page of descriptor ``fd`` (closed here: the mapping keeps it)."""
        try:
            self._mm = mmap.mmap(fd, STATUS_PAGE_BYTES)
        finally:
            os.close(fd)
        self._u64 = memoryview(self._mm).cast("Q")

    @property
    def busy(self) -> bool:
        return self._u64[_BUSY] != 0

    @busy.setter
    def busy(self, value: bool) -> None:
        self._u64[_BUSY] = 1 if value else 0

    def close(self) -> None:
        self._u64.release()
        self._mm.close()
