"""Shared memory of a front that was killed with SIGKILL (docs/operations.md,
"Failures" and "Shared memory"): the next daemon start removes it. The
workers are frozen before the front dies and killed after, so they cannot
unlink their rings themselves (as they do when they outlive the front):
the segments are left behind exactly as after a host-wide OOM kill."""

from __future__ import annotations

import os
import signal

import psutil

from tests.conftest import shm_segments
from tests.faults import OK, X4, model, records, server


def test_segments_of_a_killed_front_are_removed_by_the_next_start(daemon_factory):
    config = server() + model(devices='["cpu", "cpu"]')
    d1 = daemon_factory(config, sub="first")
    pid = d1.proc.pid
    left = {s for s in shm_segments() if s.startswith(f"ringserve-{pid}-")}
    assert len(left) == 2  # one ring per worker
    workers = psutil.Process(pid).children()
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    assert d1.proc.wait(30) == -signal.SIGKILL
    for w in workers:
        w.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
    assert left <= shm_segments()  # nobody cleaned up: the front and its workers are dead

    d2 = daemon_factory(config, sub="second")
    assert not left & shm_segments()
    (swept,) = records(d2, "removed shared memory left by a front that died")
    assert left <= set(swept["segments"]), swept
    mine = {s for s in shm_segments() if s.startswith(f"ringserve-{d2.proc.pid}-")}
    assert len(mine) == 2  # the new daemon's own rings are untouched
    with d2.client() as c:
        assert c.call({"model": "m", "inputs": X4})["status"] == OK
    assert d1.stop() == -signal.SIGKILL
    d1.children = workers
