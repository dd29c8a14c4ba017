"""Response cache of one model version: input bytes -> the answer's outputs.

For models that score the same inputs again and again (recommendation
candidates): a hit is answered by the front without a worker. One cache per
model *version* (it lives on that version's queue), and its key is a hash of
the input bytes, so a new version, or a reload that changes the entry,
starts with an empty cache and never serves an older model's answer.

Bounded by bytes (outputs plus key and bookkeeping), least recently used out
first; an entry older than ``ttl_s`` is a miss and is dropped. The key is
BLAKE2b-128 of every input's bytes in order; a collision would need 2^64
distinct inputs.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Any

ENTRY_OVERHEAD = 200  # bytes of Python objects per entry, counted against the bound


def inputs_digest(data: Iterable[bytes | memoryview], digest_size: int) -> bytes:
    """BLAKE2b of a request's input bytes, every input in order: the cache
    key here, the ``features`` field of the request log."""
    h = hashlib.blake2b(digest_size=digest_size)
    for part in data:
        h.update(part)
    return h.digest()


def outputs_nbytes(outputs: dict[str, Any]) -> int:
    if "data" in outputs:
        return len(outputs["data"])
    return sum(len(t["data"]) for t in outputs.values())


class ResponseCache:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: collections.OrderedDict[bytes, tuple[float, dict, int]] = \
            collections.OrderedDict()
        self.nbytes = 0

    @staticmethod
    def key(data: Iterable[bytes | memoryview]) -> bytes:
        return inputs_digest(data, 16)

    def get(self, key: bytes) -> dict | None:
        e = self.entries.get(key)
        if e is None:
            return None
        if e[0] < self.clock():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return e[1]

    def put(self, key: bytes, outputs: dict) -> None:
        """``outputs`` must own its bytes (not view shared memory)."""
        size = outputs_nbytes(outputs) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (self.clock() + self.ttl_s, outputs, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: bytes) -> None:
        self.nbytes -= self.entries.pop(key)[2]

    def snapshot(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "ttl_s": self.ttl_s}
