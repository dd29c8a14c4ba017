"""Shared memory after kill -9 (docs/operations.md, "Failures" and "Shared
memory"). The daemon's rings are memfds: a daemon whose every process is
killed (its workers frozen first, so that nothing can clean up after itself,
as after a host-wide OOM kill) leaves nothing in /dev/shm. A named segment
that a killed process of an older ringserve left there is removed by the
next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from tests.conftest import Daemon, left_on_purpose, segment_creator, shm_segments
from tests.faults import OK, X4, model, records, server

SWEPT = "removed shared memory left by a process that died"


def test_a_daemon_killed_whole_leaves_nothing_and_an_old_segment_is_swept(daemon_factory,
                                                                          tmp_path):
    config = server() + model(devices='["cpu", "cpu"]')
    d1 = daemon_factory(config, sub="first")
    pid = d1.proc.pid
    procs = psutil.Process(pid).children()
    assert len(procs) == 3  # a front and two workers
    ours = {pid} | {p.pid for p in procs}
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    assert d1.proc.wait(30) == -signal.SIGKILL
    for p in procs:
        p.kill()
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive
    assert d1.stop() == -signal.SIGKILL  # closes its log
    d1.children = procs
    assert not {s for s in shm_segments() if segment_creator(s) in ours}

    # a segment in the old naming, its creator gone
    code = ("import os\nname = f'ringserve-{os.getpid()}-old-ring'\n"
            "open('/dev/shm/' + name, 'wb').write(b'x')\nprint(name)\n")
    name = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()
    left_on_purpose({name})
    # Started here rather than by daemon_factory, whose teardown (rightly)
    # reports a start-up sweep of a segment another process of the same test
    # left: that is how a leak would hide. This one is made on purpose.
    d2 = Daemon(tmp_path / "second", config)
    try:
        d2.start()
        assert name not in shm_segments()
        swept = {s for r in records(d2, SWEPT) for s in r["segments"]}
        # another daemon starting on a shared machine may have swept it first
        assert name in swept or not swept, swept
        with d2.client() as c:
            assert c.call({"model": "m", "inputs": X4})["status"] == OK
    finally:
        assert d2.stop() == 0
    d2.assert_clean()
