"""Helpers for the fault-path integration tests (tests/integration/supervisor/test_drain.py,
test_worker_faults.py, ...): configs of the test models, the daemon's JSON
log, an HTTP probe, and bounded polls. Nothing here mocks ringserve: the
tests drive real daemons over real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

OK, INVALID, DEADLINE, NOT_FOUND, EXHAUSTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = \
    0, 3, 4, 5, 8, 13, 14, 16

# a long default deadline: the slow model's queues must not expire by themselves
SERVER = '[server]\nhost = "127.0.0.1"\ndeadline_ms = 60000\n{server}\n'

SLOW_MODEL = """
[[models]]
name = "{name}"
version = "{version}"
factory = "tests.models:slow"
input = {{ dtype = "float32", shape = [4] }}
devices = {devices}
threads = 1
max_batch = {max_batch}
window_ms = {window_ms}
queue_limit = {queue_limit}
inflight_batches = {inflight}
"""

TWO_X_MODEL = """
[[models]]
name = "{name}"
version = "{version}"
factory = "tests.models:{factory}"
input = {{ dtype = "float32", shape = [4] }}
devices = {devices}
threads = 1
"""

X4 = [1.0, 2.0, 3.0, 4.0]


def slow_model(name="slow", version="1", devices='["cpu"]', max_batch=1, window_ms=2.0,
               queue_limit=1000, inflight=2) -> str:
    return SLOW_MODEL.format(name=name, version=version, devices=devices, max_batch=max_batch,
                             window_ms=window_ms, queue_limit=queue_limit, inflight=inflight)


def model(name="m", version="1", factory="two_x", devices='["cpu"]') -> str:
    return TWO_X_MODEL.format(name=name, version=version, factory=factory, devices=devices)


def server(lines: str = "") -> str:
    return SERVER.format(server=lines)


def log_records(d) -> list[dict]:
    """The daemon's own JSON-lines log (front and workers), whole lines only."""
    out = []
    for line in d.log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def records(d, msg: str) -> list[dict]:
    return [r for r in log_records(d) if r.get("msg") == msg]


def decisions(d) -> list[dict]:
    path = d.dir / "ringserve.decisions.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def poll(fn, what: str, timeout: float = 60.0, every: float = 0.05, log=None):
    """Call ``fn`` until it returns something truthy; that value. Bounded."""
    t_end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > t_end:
            raise AssertionError(f"{what} not reached in {timeout} s" +
                                 (f"\n{log()}" if log is not None else ""))
        time.sleep(every)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def sighup(d, config: str | None = None) -> None:
    if config is not None:
        d.config_path.write_text(config)
    os.kill(d.proc.pid, signal.SIGHUP)


def call_until(c, msg: dict, req_id: int, seen: dict) -> dict:
    """Send ``msg`` with ``req_id`` on a pipelined connection and read until
    its answer comes; other answers read on the way go into ``seen`` (by id,
    and each id must come once)."""
    c.send(dict(msg, id=req_id))
    while True:
        a = c.recv()
        if a["id"] == req_id:
            return a
        assert a["id"] not in seen, f"answered twice: {a} and {seen[a['id']]}"
        seen[a["id"]] = a


# ringserve batch's output (--progress json): its start event and its summary line


def start_note(p: subprocess.CompletedProcess) -> str:
    for line in p.stderr.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "start":
            return rec.get("message", "")
    raise AssertionError(f"no start event:\n{p.stderr}")


def summary(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])
