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
from ipc.framing import encode_frame
from tests.conftest import REPO, segment_creator, shm_segments
from tests.faults import OK, UNAVAILABLE, X4, decisions, model, poll, server, sighup, slow_model
from tests.integration.rollout.test_rollouts import GUARDED
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


def gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped between the two questions
        return True


def front_of(c: WireClient, i: int) -> int:
    # health: never rate limited (a test with [rate_limit] spreads its connections too)
    return c.call({"id": 10_000 + i, "op": "health"})["front"]


def spread(d, n: int, both: bool = True) -> tuple[list[WireClient], dict[int, list[WireClient]]]:
    """``n`` connections by the front that took each; ``both``: more, until
    each front has one (the kernel picks by the 4-tuple: 8 connections all
    on one front happen once in 128 tries)."""
    conns = [d.client() for _ in range(n)]
    by: dict[int, list[WireClient]] = {}
    for i, c in enumerate(conns):
        by.setdefault(front_of(c, i), []).append(c)
    while both and len(by) < 2 and len(conns) < n + 40:
        c = d.client()
        conns.append(c)
        by.setdefault(front_of(c, len(conns)), []).append(c)
    return conns, by


def test_two_fronts_share_the_port_and_answer_exactly(daemon_factory):
    d = daemon_factory(two_fronts())
    assert len(fronts_of(d)) == 2
    conns, by = spread(d, 64, both=False)
    try:
        assert set(by) == {0, 1}, {k: len(v) for k, v in by.items()}
        for cs in by.values():
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
        for c in by[0]:
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
        ours = {d.proc.pid} | {p.pid for p in d.tree()}
        assert {s for s in shm_segments() if segment_creator(s) in ours} == set()
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
        assert all(map(gone, procs))
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
    poll(lambda: all(map(gone, children)), "children gone")
    poll(lambda: refused(d.port), "nobody listens on the port", timeout=10)


def refused(port: int) -> bool:
    import socket
    s = socket.socket()
    try:
        return s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        s.close()


def test_fronts_with_parts_one_front_decides_are_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(two_fronts(model().replace("threads = 1", "threads = 1\ndrift = true")))
    p = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "--port", "0"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "server.fronts = 2, but this config uses models.drift" in p.stderr


# -- machine-wide decisions ---------------------------------------------------------------

def test_a_faulty_canary_spread_over_two_fronts_is_rolled_back_once(daemon_factory):
    # version 2 raises on 777: the canary fails every request it gets
    d = daemon_factory(server(TWO) + GUARDED)
    conns, by = spread(d, 8)
    try:
        assert set(by) == {0, 1}
        # Every front's answers count: the canary fails (777 raises in version 2).
        sent = [0]

        def rolled_back() -> bool:
            if machine_stats(d)["rollouts"][0]["status"] == "rolled_back":
                return True
            for c in conns:
                sent[0] += 1
                c.call({"id": sent[0], "model": "m", "inputs": [777.0, 1.0, 2.0],
                        "key": f"u{sent[0]}"})
            return False

        poll(rolled_back, "rollback", log=d.log)
        backs = [r for r in decisions(d) if r["event"] == "rollback"]
        assert len(backs) == 1 and backs[0]["model"] == "m", backs
        # The guard counted both fronts' answers.
        assert backs[0]["measured"]["window"]["canary"]["errors"] >= 20
        for slot, cs in by.items():
            for k in range(40):
                a = cs[0].call({"id": 100 + k, "model": "m", "inputs": [1.0, 2.0, 3.0],
                                "key": f"k{k}"})
                assert (a["status"], a["version"], a["lane"]) == (OK, "1", "stable"), (slot, a)
    finally:
        for c in conns:
            c.close()


def test_feedback_sent_to_one_front_joins_answers_of_the_other(daemon_factory):
    d = daemon_factory(two_fronts())
    conns, by = spread(d, 16)
    try:
        a0, a1 = by[0][0], by[1][0]
        ans = a0.call({"id": 1, "model": "m", "inputs": X4, "key": "user-7"})
        assert ans["status"] == OK
        # by rid, on the other front
        fb = a1.call({"id": 2, "op": "feedback", "ref": ans["rid"], "outcome": 1.0})
        assert fb["status"] == OK and fb["joined"] is True, fb
        assert (fb["model"], fb["version"], fb["lane"]) == ("m", "1", "stable")
        # by routing key, on the other front
        fb = a1.call({"id": 3, "op": "feedback", "ref": "user-7", "outcome": 0.5})
        assert fb["joined"] is True, fb
        # an unknown rid is unjoined, counted once for the machine
        fb = a1.call({"id": 4, "op": "feedback", "ref": 12345, "outcome": 1.0})
        assert fb["joined"] is False
        s = machine_stats(d)
        assert s["feedback"] == {"joined": 2, "unjoined": 1}, s["feedback"]
        (kpi,) = s["kpis"]
        assert (kpi["n"], kpi["mean"]) == (2, 0.75)
    finally:
        for c in conns:
            c.close()


def test_a_client_spread_over_two_fronts_has_one_rate_budget(daemon_factory):
    rate, burst = 40, 10
    d = daemon_factory(two_fronts(lines="") + f"\n[rate_limit]\nrequests_per_s = {rate}\n"
                       f"burst = {burst}\n")
    conns, by = spread(d, 12)
    try:
        c0, c1 = by[0][0], by[1][0]
        t0 = time.monotonic()
        ok = 0
        i = 0
        while time.monotonic() - t0 < 2.0:
            for c in (c0, c1):
                i += 1
                if c.call({"id": i, "model": "m", "inputs": X4})["status"] == OK:
                    ok += 1
        spent = time.monotonic() - t0
        # one budget: rate x time + burst, plus the documented slack (each
        # other front may let through what it spends in one sync, 50 ms)
        assert ok <= rate * spent * 1.15 + burst + 2 * (rate * 0.05 + burst), (ok, spent)
        assert ok >= rate * spent * 0.7, (ok, spent)
    finally:
        for c in conns:
            c.close()


def six_over_both_fronts(d) -> list[WireClient]:
    """Six open connections of this test, spanning both fronts."""
    conns = [d.client()]
    # the fixture's own health checks have closed their connections
    poll(lambda: conns[0].call({"id": 1, "op": "stats"})["connections"] == 1,
         "only this connection open", log=d.log)
    for _ in range(5):
        conns.append(d.client())
    # The kernel picks the front by the 4-tuple, so reconnect the last one
    # until they span both.
    for _ in range(40):
        if {front_of(c, i) for i, c in enumerate(conns)} == {0, 1}:
            return conns
        conns.pop().close()
        poll(lambda: conns[0].call({"id": 2, "op": "stats"})["connections"] == len(conns),
             "the close counted", log=d.log)
        conns.append(d.client())
    raise AssertionError("six connections never spanned both fronts")


def refused_of(d, n: int, limit: str) -> list[WireClient]:
    """Open ``n`` more connections; each must be refused at once, naming ``limit``."""
    extra = []
    for _ in range(n):
        c = d.client()
        extra.append(c)
        a = c.recv()
        assert (a["id"], a["status"]) == (0, 8) and limit in a["error"], a
    return extra


def test_max_connections_counts_every_front(daemon_factory):
    d = daemon_factory(two_fronts(lines="max_connections = 6\nmax_connections_per_client = 100\n"))
    conns = six_over_both_fronts(d)
    try:
        for c in refused_of(d, 6, "server.max_connections ="):
            c.close()
    finally:
        for c in conns:
            c.close()


def test_max_connections_per_client_counts_every_front(daemon_factory):
    """One client (one address) spread over both fronts has one allowance;
    a connection it closes on either front gives its place back."""
    d = daemon_factory(two_fronts(lines="max_connections = 100\nmax_connections_per_client = 6\n"))
    conns = six_over_both_fronts(d)
    try:
        for c in refused_of(d, 6, "server.max_connections_per_client = 6, all fronts"):
            c.close()
        for i in (0, 5):  # one of each front, in turn: the other front sees the place free
            gone_front = front_of(conns[i], 50 + i)
            conns[i].close()
            poll(lambda: conns[3].call({"id": 3, "op": "stats"})["connections"] == 5,
                 "the close counted", log=d.log)
            for _ in range(40):  # a new connection that lands on the other front
                c = d.client()
                if front_of(c, 60 + i) != gone_front:
                    break
                c.close()
                poll(lambda: conns[3].call({"id": 4, "op": "stats"})["connections"] == 5,
                     "the close counted", log=d.log)
            else:
                raise AssertionError("no connection landed on the other front")
            conns[i] = c
        for c in refused_of(d, 2, "max_connections_per_client"):
            c.close()
        stats = conns[1].call({"id": 5, "op": "stats"})
        assert stats["limits"]["closed"]["per_client"] == 8, stats["limits"]
    finally:
        for c in conns:
            c.close()


def test_metrics_sum_both_fronts_and_never_drop_when_a_front_dies(daemon_factory):
    import re
    import urllib.request
    d = daemon_factory(server(TWO) + model())
    conns, by = spread(d, 12)
    port = conns[0].call({"id": 5, "op": "health"})["metrics_port"]

    def requests_ok() -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        m = re.search(rb'ringserve_requests_total\{[^}]*status="OK"[^}]*\} ([0-9.e+]+)', body)
        return float(m.group(1)) if m else 0.0

    try:
        for cs in by.values():
            for k in range(10):
                assert cs[0].call({"id": 10 + k, "model": "m", "inputs": X4})["status"] == OK
        assert requests_ok() == 20.0
        time.sleep(1.5)  # front 1's figures of these answers have been sent unasked
        victim = front_pid(by[1][0])
        os.kill(victim, signal.SIGKILL)
        assert requests_ok() == 20.0  # nothing went down
        for k in range(5):
            assert by[0][0].call({"id": 30 + k, "model": "m", "inputs": X4})["status"] == OK
        assert requests_ok() == 25.0
    finally:
        for c in conns:
            c.close()


def test_batches_of_two_fronts_run_as_one_forward_pass(daemon_factory):
    slow = model(name="s", factory="slow_two_x").replace("threads = 1", "threads = 1\n"
                                                          "max_batch = 8\nwindow_ms = 1.0")
    d = daemon_factory(two_fronts(slow), env={"RINGSERVE_TEST_SLOW_MS": "300"})
    conns, by = spread(d, 12)
    try:
        c0, c1 = by[0][0], by[1][0]
        c0.send({"id": 1, "model": "s", "inputs": [9.0, 9.0, 9.0, 9.0]})  # the worker is busy
        time.sleep(0.1)
        xs = {c0: [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]],
              c1: [[-1.0, -2.0, -3.0, -4.0], [0.5, 0.25, 0.125, 2.0], [3.0, 3.0, 3.0, 3.0]]}
        for c, rows in xs.items():
            c.send_raw(b"".join(encode_frame({"id": 10 + i, "model": "s", "inputs": x})
                                for i, x in enumerate(rows)))
        passes: dict[int, list] = {}  # a forward pass's compute_us is the same for all its rows
        for c, rows in [(c0, [[9.0, 9.0, 9.0, 9.0]] + xs[c0]), (c1, xs[c1])]:
            got = sorted((c.recv() for _ in rows), key=lambda a: a["id"])
            for a, x in zip(got, rows, strict=True):
                assert a["status"] == OK, a
                np.testing.assert_array_equal(out_array(a), np.array(x, np.float32) * 2)
                passes.setdefault(a["timing"]["compute_us"], []).append((c, a))
        # The worker ran the two fronts' waiting batches as one pass, and
        # every answer's timing names the pass it ran in.
        assert any({c for c, _ in p} == {c0, c1} for p in passes.values()), passes
        for p in passes.values():
            assert {a["timing"]["batch"] for _, a in p} == {len(p)}, p
        s = machine_stats(d)["models"][0]  # a merged pass is counted once, by one front
        assert s["batches"] == len(passes), (s, passes)
        assert sum(int(k) * v for k, v in s["batch_sizes"].items()) == 6, s
    finally:
        for c in conns:
            c.close()


def test_a_flood_of_stats_requests_is_answered_without_starving_infer(daemon_factory):
    d = daemon_factory(two_fronts())
    conns, by = spread(d, 8)
    try:
        flood = by[0][:2] + by[1][:1]
        for c in flood:  # each stats request makes the supervisor ask every front
            c.send_raw(b"".join(encode_frame({"id": i + 1, "op": "stats"}) for i in range(200)))
        other = by[1][1] if len(by[1]) > 1 else by[0][2]
        for k in range(20):
            assert other.call({"id": 1000 + k, "model": "m", "inputs": X4})["status"] == OK
        for c in flood:
            got = [c.recv() for _ in range(200)]
            assert sorted(a["id"] for a in got) == list(range(1, 201))
            assert all(a["status"] == OK and len(a["fronts"]) == 2 for a in got)
    finally:
        for c in conns:
            c.close()
