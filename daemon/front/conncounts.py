"""The machine's open connections, in one page every front shares.

``server.max_connections`` and ``server.max_connections_per_client`` count
all fronts together (a client that opens connections to two fronts has one
allowance). The supervisor makes the page (a memfd, so nothing is named in
/dev/shm) and hands it to every front; each front writes only its own
region and reads the others'. No lock: a front admits a connection from
what the others last wrote, so two fronts admitting at the same instant may
each go over a limit by one, never further.

Layout (native-endian, offsets in bytes)::

    0                   u64[MAX_FRONTS]  open connections of each front slot
    TOTALS_BYTES        per front slot: u32[ROWS][BUCKETS], its connections
                        per client, as a count-min sketch

A client's connections on the other fronts are read from the sketch: each
front adds its connections of client c at bucket h_r(c) of each row r (two
independent crc32 hashes, the same in every process, unlike ``hash()``);
the estimate is the least of the rows' sums over the other fronts. It is
never below the true count (a collision only adds), so the limit is never
passed by more than the race above; it is above the true count only when
another client with many connections shares c's bucket in *both* rows
(about 1 in BUCKETS**2 per pair of clients). This front's own connections
per client are counted exactly.

With one front there is no page: the front's own exact counts are the
machine's.
"""

from __future__ import annotations

import collections
import mmap
import os
import zlib

from ..config import MAX_FRONTS

ROWS = 2
BUCKETS = 2048
TOTALS_BYTES = 4096
REGION_BYTES = ROWS * BUCKETS * 4
PAGE_BYTES = TOTALS_BYTES + MAX_FRONTS * REGION_BYTES
_SEEDS = (b"ringserve-conn-0\x1f", b"ringserve-conn-1\x1f")


def buckets(ident: str) -> tuple[int, ...]:
    """The sketch bucket of ``ident`` in each row (as the flat index of a region)."""
    b = ident.encode("utf-8", "surrogatepass")
    return tuple(r * BUCKETS + zlib.crc32(seed + b) % BUCKETS for r, seed in enumerate(_SEEDS))


class ConnCounts:
    """One front's view of the machine's connection counts."""

    def __init__(self, slot: int, page: memoryview | None = None):
        self.slot = slot
        self.open = 0                                   # this front's, exact
        self.per_client: collections.Counter[str] = collections.Counter()  # this front's
        self._totals = self._sketch = None
        if page is not None:
            self._totals = page[:TOTALS_BYTES].cast("Q")[:MAX_FRONTS]
            self._sketch = page[TOTALS_BYTES:PAGE_BYTES].cast("I")

    @classmethod
    def from_fd(cls, slot: int, fd: int) -> ConnCounts:
        """Map the supervisor's page (and close ``fd``: the mapping holds it)."""
        try:
            page = memoryview(mmap.mmap(fd, PAGE_BYTES))
        finally:
            os.close(fd)
        return cls(slot, page)

    def machine_open(self) -> int:
        t = self._totals
        if t is None:
            return self.open
        t[self.slot] = self.open
        return sum(t)

    def opened(self, n: int) -> None:
        """This front's open connections are now ``n``."""
        self.open = n
        if self._totals is not None:
            self._totals[self.slot] = n

    def client_count(self, ident: str) -> int:
        """``ident``'s connections on the whole machine (see the module docstring)."""
        mine = self.per_client.get(ident, 0)
        s = self._sketch
        if s is None:
            return mine
        own = self.slot * REGION_BYTES // 4
        others = min(sum(s[f * REGION_BYTES // 4 + b] for f in range(MAX_FRONTS))
                     - s[own + b] for b in buckets(ident))
        return mine + others

    def add_client(self, ident: str, delta: int) -> None:
        n = self.per_client[ident] + delta
        if n > 0:
            self.per_client[ident] = n
        else:
            del self.per_client[ident]
        s = self._sketch
        if s is not None:
            own = self.slot * REGION_BYTES // 4
            for b in buckets(ident):
                s[own + b] += delta

    def forget(self, slot: int) -> None:
        """Front ``slot`` died (the supervisor's view): its connections are gone with it."""
        if self._totals is None or self._sketch is None:
            return
        self._totals[slot] = 0
        n = REGION_BYTES // 4
        self._sketch[slot * n:(slot + 1) * n] = memoryview(bytes(REGION_BYTES)).cast("I")
