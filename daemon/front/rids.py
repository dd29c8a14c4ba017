"""Server-side request ids (``rid``): unique across restarts, fronts and nodes,
and below 2**53 so that a client whose numbers are doubles (JavaScript's
msgpack decoders by default) holds every rid exactly.

Bit layout of a rid (docs/protocol.md, "Request ids"), high to low::

    52..45   node   8 bits   [server] node_id: which daemon of a fleet
    44..40   front  5 bits   which front process of the daemon (0 today)
    39..24   block 16 bits   a counter kept in the state file
    23..0    seq   24 bits   counts the answers of one block (from 1)

A block is taken, and the next block number written to the state file
(atomically, fsynced) *before* any rid of it is handed out: at start, and
whenever a block's 2**24 - 1 rids are used up (about every 3 minutes at
100k answers/s). So after a crash the next start takes a block no earlier
start could have used, without coordinating with anything. The block
counter wraps after 65,536 blocks (2**40 rids per node and front: over four
months at 100k answers/s without a pause), so rids repeat only that far
apart, far beyond the feedback join's window.

Anyone may decode a rid (``decode``): the fleet's feedback join and the
multi-front supervisor route an outcome by its node and front.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

log = logging.getLogger("ringserve.rids")

NODE_BITS, FRONT_BITS, BLOCK_BITS, SEQ_BITS = 8, 5, 16, 24
SEQ_SHIFT = 0
BLOCK_SHIFT = SEQ_BITS
FRONT_SHIFT = BLOCK_SHIFT + BLOCK_BITS
NODE_SHIFT = FRONT_SHIFT + FRONT_BITS
RID_BITS = NODE_SHIFT + NODE_BITS
assert RID_BITS == 53
MAX_NODE = (1 << NODE_BITS) - 1
MAX_FRONT = (1 << FRONT_BITS) - 1
BLOCKS = 1 << BLOCK_BITS
BLOCK_SIZE = 1 << SEQ_BITS


class Rid(NamedTuple):
    node: int
    front: int
    block: int
    seq: int


def decode(rid: int) -> Rid:
    return Rid(rid >> NODE_SHIFT, (rid >> FRONT_SHIFT) & MAX_FRONT,
               (rid >> BLOCK_SHIFT) & (BLOCKS - 1), rid & (BLOCK_SIZE - 1))


class RidAllocator:
    """Hands out the rids of one front: ``next()`` per answer.

    ``save(next_block)`` persists the first block number not yet used; it is
    called before a block's first rid is handed out."""

    __slots__ = ("prefix", "block", "_next", "_end", "_save")

    def __init__(self, node: int, front: int, next_block: int, save: Callable[[int], None]):
        if not 0 <= node <= MAX_NODE or not 0 <= front <= MAX_FRONT:
            raise ValueError(f"node must be 0..{MAX_NODE} and front 0..{MAX_FRONT}, "
                             f"got {node} and {front}")
        self.prefix = (node << NODE_SHIFT) | (front << FRONT_SHIFT)
        self._save = save
        self.block = -1
        self._next = self._end = 0
        self._take(next_block)

    def _take(self, block: int) -> None:
        if block >= BLOCKS or block < 0:
            log.warning("request-id blocks wrapped around: rids now repeat those of 2**40 "
                        "answers ago", extra={"block": block})
            block %= BLOCKS
        self._save(block + 1)
        self.block = block
        base = self.prefix | (block << BLOCK_SHIFT)
        self._next = base + 1  # seq 0 is never used: no rid is 0
        self._end = base + BLOCK_SIZE

    def next(self) -> int:
        r = self._next
        if r == self._end:
            self._take(self.block + 1)
            r = self._next
        self._next = r + 1
        return r
