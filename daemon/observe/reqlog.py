"""The request log: one JSON line per (sampled) answer and per feedback.

Records (the formats ``ringserve report`` reads, docs/operations.md)::

    {"ts", "type": "answer", "rid", "key", "exp", "arm", "lane", "model", "version",
     "data_version", "status", "latency_us", "queue_us", "compute_us", "batch", "cache", "score",
     "features"}
    {"ts", "type": "feedback", "rid", "outcome", "joined", "model", "version", "lane", "arm"}

``key`` is a keyed hash (BLAKE2b with ``key_secret``) of the routing key:
the raw key never reaches the disk, and nodes that share the secret log the
same hash for the same user. ``features`` is a hash of the input bytes (to
find repeated inputs and join with offline data without storing features).
``score`` is the first element of the first (or ``score_output``) output.

The event loop never waits for the disk: the serving code appends a tuple of
references to a bounded deque (O(1), no formatting, no hashing); a writer
thread wakes every ``FLUSH_S``, turns the tuples into JSON lines and writes
them with one ``write`` per batch of whole lines. When the deque is full the
record is dropped and counted (``dropped``, in ``stats`` and metrics), never
silently. A file is closed past ``max_file_bytes`` and a new one started; the
oldest files beyond ``max_files`` are deleted. On SIGTERM ``close`` drains
what is buffered. A crash can at worst cut the last line of the current
file, which readers skip: a record is whole or absent.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ipc.tensors import DTYPES, to_numpy

from ..serving.cache import inputs_digest

if TYPE_CHECKING:
    from ..config import RequestLogConfig
    from ..serving.request import Pending
    from .feedback import Group

log = logging.getLogger("ringserve.reqlog")
FLUSH_S = 0.05


def features_hash(data: Iterable[bytes]) -> str:
    """Hash of a request's input bytes, taken when the request arrives (the
    bytes are not kept for the writer: the buffer holds small records only)."""
    return inputs_digest(data, 8).hex()


def _score(data: bytes, dtype: str) -> float | None:
    n = DTYPES[dtype].itemsize
    if len(data) < n:
        return None
    v = float(to_numpy({"dtype": dtype, "shape": [1], "data": data[:n]})[0])
    return v if v == v else None  # NaN is not JSON


class RequestLog:
    def __init__(self, cfg: RequestLogConfig, directory: str) -> None:
        self.cfg = cfg
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        if cfg.key_secret:
            self.secret = hashlib.blake2b(cfg.key_secret.encode()).digest()
        else:
            self.secret = os.urandom(32)
            log.warning("request_log.key_secret is not set: key hashes change at every start "
                        "and differ between nodes; set it to join logs across them")
        self.rate = cfg.sample_rate
        self.limit = cfg.buffer
        self.buf: collections.deque[tuple[Any, ...]] = collections.deque()
        self.dropped = 0
        self.written = 0
        self._rand = random.random
        self._stop = threading.Event()
        self._f: int | None = None  # the current file's descriptor
        self._size = 0
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    # -- the serving side (event loop thread) ----------------------------------
    def sampled(self) -> bool:
        return self.rate >= 1.0 or self._rand() < self.rate

    def _put(self, item: tuple[Any, ...]) -> None:
        if len(self.buf) >= self.limit:
            self.dropped += 1
            return
        self.buf.append(item)

    def answer(self, req: Pending, status: int, answer: dict[str, Any], latency_us: int, model: str,
               version: str, score_name: str | None,
               fallback: tuple[str, str] | None = None) -> None:
        """``answer["outputs"]`` may view shared memory: only the score's
        bytes are copied, now. ``fallback``: (reason, the version the router
        chose) of a fallback's answer (daemon/serving/fallback.py)."""
        score = None
        out = answer.get("outputs")
        if out is not None:
            if "data" not in out:
                out = out.get(score_name) or next(iter(out.values()))
            score = (bytes(out["data"][:8]), out["dtype"])
        assert req.log is not None  # the callers log sampled requests only (req.log set)
        data, exp = req.log
        self._put(("a", time.time(), req.rid, req.key, exp, req.arm, req.lane, model, version,
                   # (a fallback's answer: what answered; a constant has none)
                   answer.get("data_version") if fallback is not None else req.queue.data_version,
                   status, latency_us, answer.get("timing"), score, data,
                   fallback))

    def feedback(self, rid: int | None, outcome: float, group: Group | None) -> None:
        self._put(("f", time.time(), rid, outcome, group))

    # -- the writer thread ------------------------------------------------------
    def _key(self, key: str | None) -> str | None:
        if key is None:
            return None
        return hashlib.blake2b(key.encode("utf-8"), key=self.secret, digest_size=16).hexdigest()

    def _format(self, item: tuple[Any, ...]) -> str:
        if item[0] == "f":
            _, ts, rid, outcome, group = item
            model, version, lane, arm = group if group is not None else (None,) * 4
            rec = {"ts": ts, "type": "feedback", "rid": rid, "outcome": outcome,
                   "joined": group is not None, "model": model, "version": version,
                   "lane": lane, "arm": arm}
        else:
            (_, ts, rid, key, exp, arm, lane, model, version, data_version, status, latency_us,
             timing, score, data, fallback) = item
            timing = timing or {}
            features = data
            rec = {"ts": ts, "type": "answer", "rid": rid, "key": self._key(key), "exp": exp,
                   "arm": arm, "lane": lane, "model": model, "version": version,
                   "data_version": data_version, "status": status, "latency_us": latency_us,
                   "queue_us": timing.get("queue_us"), "compute_us": timing.get("compute_us"),
                   "batch": timing.get("batch"), "cache": bool(timing.get("cache")),
                   "score": _score(*score) if score is not None else None,
                   "features": features}
            if fallback is not None:  # answered by the fallback of the routed version
                rec["fallback"], rec["routed"] = fallback
        return json.dumps(rec, separators=(",", ":"))

    def _open(self) -> None:
        self._seq += 1
        name = time.strftime("requests-%Y%m%dT%H%M%S", time.gmtime())
        path = os.path.join(self.dir, f"{name}-{os.getpid()}-{self._seq:04d}.jsonl")
        self._f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self._size = 0
        files = sorted(f for f in os.listdir(self.dir) if f.startswith("requests-"))
        for old in files[:max(0, len(files) - self.cfg.max_files)]:
            try:
                os.unlink(os.path.join(self.dir, old))
            except OSError:
                pass

    def _drain(self) -> None:
        buf, limit = self.buf, self.cfg.max_file_bytes
        chunk: list[bytes]
        while buf:
            chunk, size = [], 0
            while buf and len(chunk) < 4096:
                line = (self._format(buf.popleft()) + "\n").encode()
                if self._f is None or self._size + size + len(line) > limit:
                    self._write(chunk, size)  # whole lines only, then a new file
                    chunk, size = [], 0
                    if self._f is not None:
                        os.close(self._f)
                    self._open()
                chunk.append(line)
                size += len(line)
            self._write(chunk, size)

    def _write(self, lines: list[bytes], size: int) -> None:
        if lines:
            assert self._f is not None  # _drain gathers lines only once a file is open
            os.write(self._f, b"".join(lines))
            self._size += size
            self.written += len(lines)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self._drain()
            except Exception:  # disk full, permissions: say so, keep serving
                log.exception("request log write failed; the records of this write are lost")
        self._drain()

    def close(self) -> None:
        """Write what is buffered and stop (SIGTERM: nothing accepted is lost)."""
        self._stop.set()
        self._thread.join(30)
        if self._f is not None:
            os.close(self._f)
            self._f = None

    def snapshot(self) -> dict[str, Any]:
        return {"dir": self.dir, "written": self.written, "dropped": self.dropped,
                "buffered": len(self.buf), "sample_rate": self.rate}
