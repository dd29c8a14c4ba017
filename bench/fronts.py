"""The ``stats`` of every front of a multi-front daemon, summed.

A daemon with ``[server] fronts = N`` has N front processes on one port
(SO_REUSEPORT): the kernel gives each new connection to one of them. Where
a front answers ``stats`` for itself only (its own connections, queues and
batches: the daemon as first split, before its supervisor answered
``stats`` for the whole machine, listing the ``fronts``), one ``stats`` call
sees 1/N of the batches. bench/__main__.py uses this module only for such
a daemon; one whose answer lists ``fronts`` is asked once.

``FrontStats`` opens connections until it holds one to each front, and asks
each of them at every mark. A connection's front is the ``front`` its
``health`` answer names; from a daemon whose answers do not name it, the
``rid`` of one request sent on the connection (bits 44..40 are the front's
slot: daemon/front/rids.py). Either is done before the measured window, so the
probes add nothing to it. ``merge`` puts
the fronts' per-model entries side by side in one document, and
bench/report.py sums entries of the same model: the batch-size histograms
of all fronts together, hence the daemon's mean batch.

When a front cannot be reached (the kernel kept choosing the others, or its
answers carry no ``rid``), what was reached is used and ``describe`` says
so; the report prints it.
"""

from __future__ import annotations

import socket
import time

from ipc.framing import FrameDecoder, encode_frame

FRONT_SHIFT, FRONT_MASK = 40, 0x1F   # daemon/front/rids.py: 5 bits of front slot at bit 40


def front_of(rid) -> int | None:
    return (rid >> FRONT_SHIFT) & FRONT_MASK if isinstance(rid, int) and rid >= 0 else None


class _Conn:
    def __init__(self, host: str, port: int, timeout: float, token: str | None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.dec = FrameDecoder(1 << 30)
        self.token = token
        self.next_id = 1
        self.pending: list = []

    def call(self, msg: dict) -> dict:
        if self.token is not None:
            msg = {**msg, "token": self.token}
        req_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(encode_frame({"id": req_id, **msg}))
        while True:
            while self.pending:
                item = self.pending.pop(0)
                if not isinstance(item, dict):
                    raise item
                if item.get("id") == req_id:
                    return item
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.pending += self.dec.feed(data)

    def close(self) -> None:
        self.sock.close()


def merge(by_front: dict[int, dict]) -> dict:
    """One ``stats`` document from several fronts': every front's model
    entries (report.server_stats sums the entries of a model), and the
    counters that add up, summed."""
    docs = [by_front[k] for k in sorted(by_front)]
    return {"status": 0, "fronts": sorted(by_front),
            "connections": sum(d.get("connections") or 0 for d in docs),
            "models": [dict(m, front=k) for k in sorted(by_front)
                       for m in by_front[k].get("models", [])]}


class FrontStats:
    """One persistent connection to each of ``expected`` fronts."""

    def __init__(self, host: str, port: int, expected: int, probe: dict,
                 token: str | None = None, timeout: float = 10.0, tries: int | None = None):
        self.host, self.port, self.expected = host, port, expected
        self.conns: dict[int, _Conn] = {}
        self.why: str | None = None
        self._open(probe, token, timeout, tries if tries is not None else 20 * expected + 20)

    def _open(self, probe: dict, token, timeout: float, tries: int) -> None:
        for _ in range(tries):
            if len(self.conns) >= self.expected:
                return
            c = _Conn(self.host, self.port, timeout, token)
            keep = False
            try:
                t_end = time.monotonic() + timeout
                while not (health := c.call({"op": "health"})).get("ready"):   # its workers
                    if time.monotonic() > t_end:
                        raise TimeoutError("a front did not become ready")
                    time.sleep(0.05)
                slot = health.get("front")
                if not isinstance(slot, int):
                    slot = front_of(c.call({"op": "infer", **probe}).get("rid"))
                if slot is None:
                    self.why = "its answers name no front, so a connection's front is unknown"
                    return
                if slot not in self.conns:
                    self.conns[slot], keep = c, True
            finally:
                if not keep:
                    c.close()
        self.why = f"{tries} connections reached only these fronts"

    def stats(self) -> dict | None:
        by = {}
        for slot, c in list(self.conns.items()):
            try:
                by[slot] = c.call({"op": "stats"})
            except (OSError, ValueError):
                c.close()
                del self.conns[slot]
        return merge(by) if by else None

    def describe(self) -> dict:
        n = len(self.conns)
        return {"count": self.expected, "reached": n, "slots": sorted(self.conns),
                "summed": n > 1, "all": n >= self.expected,
                "why_not_all": None if n >= self.expected else self.why}

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def __enter__(self) -> "FrontStats":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
