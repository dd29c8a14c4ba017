"""Several fronts on one port (docs/architecture.md, "Processes"): the
kernel spreads connections over both, a front killed -9 is restarted while
the other keeps serving, a worker killed under both fronts leaves no request
unanswered, reload and drain reach both, a second daemon on the port is
refused, and nothing outlives the supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

from clients.sync import Client
from tests.conftest import REPO, shm_segments
from tests.faults import OK, UNAVAILABLE, X4, model, poll, server, sighup, slow_model
from tests.wire import WireClient, out_array

TWO = 'fronts = 2\n'
NO_METRICS = '\n[metrics]\nenabled = false\n'
INFER = {"model": "m", "inputs": X4}


def two_fronts(models: str = model(), lines: str = "") -> str:
    return server(TWO + lines) + NO_METRICS + models


def fronts_of(d) -> dict[int, psutil.Process]:
    """pid -> process of each live front of ``d``."""
    root = psutil.Process(d.proc.pid)
    return {p.pid: p for p in root.children() if "daemon.front" in " ".join(p.cmdline())}


def front_of(c: WireClient, i: int) -> int:
    return c.call({"id": 10_000 + i, "op": "stats"})["front"]


def spread(d, n: int) -> tuple[list[WireClient], dict[int, list[WireClient]]]:
    conns = [d.client() for _ in range(n)]
    by: dict[int, list[WireClient]] = {}
    for i, c in enumerate(conns):
        by.setdefault(front_of(c, i), []).append(c)
    return conns, by


def test_two_fronts_share_the_port_and_answer_exactly(daemon_factory):
    d = daemon_factory(two_fronts())
    assert len(fronts_of(d)) == 2
    conns, by = spread(d, 64)
    try:
        assert set(by) == {0, 1}, {k: len(v) for k, v in by.items()}
        for slot, cs in by.items():
            assert 0.3 * 64 <= len(cs) <= 0.7 * 64, {k: len(v) for k, v in by.items()}
        rng = np.random.default_rng(1)
        xs = rng.standard_normal((64, 4)).astype(np.float32)
        for i, c in enumerate(conns):
            c.send({"id": i + 1, "model": "m", "inputs": xs[i].tolist()})
        for i, c in enumerate(conns):
            a = c.recv()
            assert a["status"] == OK and a["id"] == i + 1, a
            np.testing.assert_array_equal(out_array(a), xs[i] * 2)  # two_x: exact in any batch
        assert len({c.call({"id": 99, "op": "health"})["front"] for c in conns}) == 2
    finally:
        for c in conns:
            c.close()


def test_kill_9_of_a_front_restarts_it_and_the_other_keeps_serving(daemon_factory):
    d = daemon_factory(two_fronts(slow_model(max_batch=4, window_ms=2.0)),
                       env={"RINGSERVE_TEST_SLOW_MS": "20"})
    conns, by = spread(d, 16)
    try:
        assert set(by) == {0, 1}
        pids = {front_pid(c) for c in by[1]}
        (victim,) = pids
        # Requests in flight on both fronts when front 1 dies.
        for i, c in enumerate(conns):
            c.send({"id": i + 1, "model": "slow", "inputs": X4})
        os.kill(victim, signal.SIGKILL)
        for i, c in enumerate(by[0]):
            a = c.recv()
            assert a["status"] == OK, a
        for c in by[1]:
            assert c.closed_by_peer()
        # The supervisor restarts it: two fronts again, a new pid.
        poll(lambda: any(f["slot"] == 1 and f["listening"] and f["pid"] != victim
                         for f in machine_stats(d)["fronts"]), "front 1 restarted", log=d.log)
        assert victim not in fronts_of(d) and len(fronts_of(d)) == 2
        # A client with retries whose connection dies still gets its answer.
        with Client("127.0.0.1", d.port, timeout=30) as cl:
            assert cl.infer("slow", np.array(X4, dtype=np.float32)).outputs.shape == (2,)
        assert {s for s in shm_segments() if s.startswith("ringserve-")} == set()
        # Both fronts serve again.
        c2, by2 = spread(d, 16)
        for c in c2:
            c.close()
        assert set(by2) == {0, 1}
    finally:
        for c in conns:
            c.close()


def machine_stats(d) -> dict:
    with d.client() as c:
        return c.call({"id": 1, "op": "stats"})


def front_pid(c: WireClient) -> int:
    s = c.call({"id": 20_000, "op": "stats"})
    return next(f["pid"] for f in s["fronts"] if f["slot"] == s["front"])


def test_client_retries_infer_when_its_front_dies_mid_request(daemon_factory):
    d = daemon_factory(two_fronts(slow_model(max_batch=1)), env={"RINGSERVE_TEST_SLOW_MS": "300"})
    with Client("127.0.0.1", d.port, timeout=30, connections=4) as cl:
        results, errors = [], []

        def call():
            try:
                results.append(cl.infer("slow", np.array(X4, dtype=np.float32)))
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        victim = next(iter(fronts_of(d)))
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert errors == [] and len(results) == 8, errors


def test_kill_9_of_a_worker_under_both_fronts_answers_every_request_once(daemon_factory):
    d = daemon_factory(two_fronts(slow_model(max_batch=2, window_ms=5.0)),
                       env={"RINGSERVE_TEST_SLOW_MS": "150"})
    conns, by = spread(d, 8)
    try:
        assert set(by) == {0, 1}
        (pid,) = d.worker_pids()
        n = 6
        for c in conns:
            for i in range(n):
                c.send({"id": i + 1, "model": "slow", "inputs": X4})
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        statuses = []
        for c in conns:
            got = {}
            for _ in range(n):
                a = c.recv()
                assert a["id"] not in got, a  # exactly one answer per request
                got[a["id"]] = a["status"]
            assert set(got) == set(range(1, n + 1))
            statuses += got.values()
        assert set(statuses) <= {OK, UNAVAILABLE} and UNAVAILABLE in statuses, statuses
        h = d.wait_ready(60)
        assert h["models"][0]["pid"] != pid and h["models"][0]["restarts"] == 1
    finally:
        for c in conns:
            c.close()


def test_sighup_under_load_across_two_fronts_loses_nothing(daemon_factory, tmp_path):
    cfg = two_fronts(model())
    d = daemon_factory(cfg)
    conns, by = spread(d, 8)
    stop = threading.Event()
    bad: list = []
    counts = [0]

    def load(c):
        i = 0
        while not stop.is_set():
            i += 1
            a = c.call({"id": i, "model": "m", "inputs": X4})
            if a["status"] != OK:
                bad.append(a)
            counts[0] += 1

    threads = [threading.Thread(target=load, args=(c,)) for c in conns]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        # A new version beside the old: started, warmed, switched on both fronts.
        sighup(d, cfg + model(version="2"))
        poll(lambda: {m["version"] for m in d.health()["models"]} == {"1", "2"}
             and d.health()["ready"], "version 2 served", log=d.log)
        sighup(d, cfg.replace("[[models]]", "[[models]]\nbogus_key = 1", 1))  # invalid
        time.sleep(0.5)
        checks, seen = spread(d, 8)
        for c in checks:
            assert {m["version"] for m in c.call({"id": 7, "op": "health"})["models"]} == \
                {"1", "2"}
            c.close()
        assert set(seen) == {0, 1}
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for c in conns:
            c.close()
    assert bad == [] and counts[0] > 0


def test_sigterm_answers_what_both_fronts_hold_and_leaves_nothing(daemon_factory):
    d = daemon_factory(two_fronts(slow_model(max_batch=2)), env={"RINGSERVE_TEST_SLOW_MS": "100"})
    conns, by = spread(d, 8)
    procs = set(fronts_of(d).values()) | {psutil.Process(p) for p in d.worker_pids()}
    try:
        assert set(by) == {0, 1}
        for c in conns:
            for i in range(3):
                c.send({"id": i + 1, "model": "slow", "inputs": X4})
        time.sleep(0.1)
        d.proc.send_signal(signal.SIGTERM)
        for c in conns:
            answers = [c.recv() for _ in range(3)]
            assert [a["status"] for a in answers] == [OK] * 3, answers
        assert d.proc.wait(60) == 0
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)
    finally:
        for c in conns:
            c.close()


def test_a_second_daemon_on_the_same_port_is_refused(daemon_factory, tmp_path):
    d = daemon_factory(two_fronts())
    cfg = tmp_path / "second.toml"
    cfg.write_text(two_fronts())
    p = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "--port",
                        str(d.port)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert f"another ringserve daemon (pid {d.proc.pid}) serves 127.0.0.1:{d.port}" in p.stderr
    assert d.health()["ready"]


def test_every_child_exits_when_the_supervisor_is_killed(daemon_factory):
    d = daemon_factory(two_fronts())
    children = list(fronts_of(d).values()) + [psutil.Process(p) for p in d.worker_pids()]
    assert len(children) == 3
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(30)
    poll(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                         for p in children), "children gone")
    with socket_refused(d.port):
        pass


class socket_refused:
    def __init__(self, port: int):
        self.port = port

    def __enter__(self):
        import socket
        s = socket.socket()
        try:
            assert s.connect_ex(("127.0.0.1", self.port)) != 0, "someone still listens"
        finally:
            s.close()

    def __exit__(self, *exc):
        return False


def test_fronts_with_parts_one_front_decides_are_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(server(TWO) + model())  # [metrics] is on by default
    p = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "server.fronts = 2, but this config uses [metrics] enabled" in p.stderr
