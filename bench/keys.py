"""What the load generator sends: request frames, and the routing keys in them.

Routing (canary lanes, A/B arms) depends on the request's ``key``, so a
benchmark with one key, or none, routes every request the same way and
tests nothing of it. ``Keys`` draws keys from a population of ``n`` users,
uniformly or Zipf-distributed (a few heavy users and a long tail, as real
traffic has); the keys are ``user-0`` .. ``user-{n-1}``, ``user-0`` the most
frequent under Zipf.

``Frames`` makes the frames of one request map that differ only in ``id``
and ``key``, without packing the map per request: the map is packed once
(a msgpack fixmap: a header byte 0x80 | count, then its entries); a frame is
a new header byte, the ``id`` entry (first, where the server's salvage of a
bad frame looks for it), the ``key`` entry, and the kept entries. Without
keys a frame per id is packed once and reused.
"""

from __future__ import annotations

import msgpack
import numpy as np

from ipc.framing import HEADER, encode_body, encode_frame

DISTRIBUTIONS = ("uniform", "zipf")
_BLOCK = 8192   # draws per numpy call: one call per 8192 requests, not per request
_packb = msgpack.packb


class Blocks:
    """An endless stream of numbers that ``draw(n)`` (-> array) makes in blocks."""

    def __init__(self, draw):
        self.draw = draw
        self.it = iter(())

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.draw(_BLOCK).tolist())
            return next(self.it)


class Keys:
    """Routing keys drawn from ``n`` users; Zipf weights 1 / rank ** ``s``."""

    def __init__(self, n: int, dist: str = "uniform", s: float = 1.1, seed: int = 0):
        if n < 1:
            raise ValueError(f"the key population must be >= 1, got {n}")
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"key distribution must be one of {DISTRIBUTIONS}, got {dist!r}")
        if dist == "zipf" and not s > 0:
            raise ValueError(f"the Zipf exponent must be > 0, got {s}")
        rng = np.random.default_rng(seed)
        if dist == "uniform":
            draw = lambda k: rng.integers(0, n, k)   # noqa: E731
        else:
            p = 1.0 / np.arange(1, n + 1) ** s
            draw = lambda k: rng.choice(n, size=k, p=p / p.sum())   # noqa: E731
        self.indices = Blocks(draw)
        self.entries: dict[int, bytes] = {}   # packed as drawn: a population may be large

    def next_entry(self) -> bytes:
        """The packed ``key`` entry of the next draw."""
        i = next(self.indices)
        entry = self.entries.get(i)
        if entry is None:
            entry = self.entries[i] = _packb("key") + _packb(f"user-{i}")
        return entry


class Frames:
    """Frames of ``request`` (a map without ``id``/``key``) by id, keyed if ``keys``."""

    def __init__(self, request: dict, keys: Keys | None = None):
        if "id" in request or "key" in request:
            raise ValueError("id and key are added per request")
        self.request = request
        self.keys = keys
        body = encode_body(request)
        if body[0] & 0xF0 != 0x80:   # pragma: no cover - requests have a handful of keys
            raise ValueError(f"a request map must have fewer than 15 keys, got {len(request)}")
        self.head = bytes((0x80 | ((body[0] & 0x0F) + 2),))
        self.rest = body[1:]
        self.by_id: list[bytes] = [b""]   # id i: its frame (no keys) or its packed id entry

    def get(self, rid: int) -> bytes:
        """The frame for id ``rid`` (ids count up from 1, with no gaps)."""
        by_id = self.by_id
        while len(by_id) <= rid:
            i = len(by_id)
            by_id.append(encode_frame({"id": i, **self.request}) if self.keys is None
                         else _packb("id") + _packb(i))
        if self.keys is None:
            return by_id[rid]
        body = b"".join((self.head, by_id[rid], self.keys.next_entry(), self.rest))
        return HEADER.pack(len(body)) + body
