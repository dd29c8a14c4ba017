"""Worker failures (docs/operations.md, "Failures") on a real daemon: a kill -9
of a worker that holds two multi-request batches, the restart backoff and
its cap while another worker of the model keeps serving, and a worker that
does not become ready within ``start_timeout_s``."""

from __future__ import annotations

import os
import signal

import psutil

from ipc.framing import encode_frame
from tests.faults import OK, UNAVAILABLE, X4, call_until, model, poll, records, server, slow_model

INFER = {"model": "slow", "inputs": X4}


def test_kill_9_of_a_worker_holding_two_batches_answers_every_request_once(daemon_factory):
    d = daemon_factory(server() + slow_model(max_batch=4, window_ms=10.0, inflight=2),
                       env={"RINGSERVE_TEST_SLOW_MS": "400"})
    (pid,) = d.worker_pids()
    seen: dict[int, dict] = {}
    with d.client() as c:
        c.send(dict(INFER, id=1))  # alone on the idle worker: the worker is busy now
        # One write, so the front reads them at once: 2-5 fill the free slot
        # (a full batch), 6-9 wait for the next, 10-12 stay queued.
        c.send_raw(b"".join(encode_frame(dict(INFER, id=i)) for i in range(2, 13)))
        first = call_until(c, {"op": "stats"}, 1000, seen)["models"][0]
        assert first["queue_depth"] == 7 and first["in_flight_batches"] == 2, first
        # request 1 done: its slot took 6-9, so the worker holds two batches of 4
        while 1 not in seen:
            a = c.recv()
            seen[a["id"]] = a
        s = poll(lambda: (lambda m: m if m["in_flight_batches"] == 2 else None)(
                 call_until(c, {"op": "stats"}, 1001 + len(seen), seen)["models"][0]),
                 "two batches in the worker", log=d.log)
        assert s["queue_depth"] == 3 and s["workers"][0]["batches"] == 1, s
        os.kill(pid, signal.SIGKILL)
        while len([i for i in seen if i < 1000]) < 12:
            a = c.recv()
            assert a["id"] not in seen, f"answered twice: {a}"
            seen[a["id"]] = a
        # the worker comes back; nothing else arrives for the old requests
        d.wait_for(lambda h: h["ready"], what="restart")
        after = call_until(c, dict(INFER), 2000, seen)
        assert after["status"] == OK
    answers = {i: seen[i] for i in range(1, 13)}
    assert answers[1]["status"] == OK and answers[1]["timing"]["batch"] == 1
    lost = [i for i in range(2, 10) if answers[i]["status"] == UNAVAILABLE]
    # at most the first of the two batches can have finished before the kill
    assert lost in ([2, 3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9]), answers
    for i in range(2, 10):
        a = answers[i]
        if a["status"] == OK:
            assert a["timing"]["batch"] == 4
        else:
            assert f"(pid {pid}) exited with code -9" in a["error"], a
    for i in (10, 11, 12):  # queued when the model's only worker died
        a = answers[i]
        assert a["status"] == UNAVAILABLE and "has no ready worker" in a["error"], a
    (died,) = records(d, "worker died; restarting")
    assert died["code"] == -9 and died["pid"] == pid
    # the front knows what it had in the worker's ring
    (front,) = records(d, "worker died with requests of this front in flight")
    assert front["lost_requests"] == len(lost) and front["front"] == 0
    d.children = psutil.Process(d.proc.pid).children(recursive=True)


def test_restart_backoff_doubles_to_its_cap_while_the_other_worker_serves(daemon_factory):
    d = daemon_factory(server("restart_backoff_max_s = 1.0") +
                       model(devices='["cpu", "cpu"]'))
    x = {"model": "m", "inputs": X4}
    first = d.worker_pids()
    pid = first[0]
    with d.client() as c:
        for _ in range(3):
            os.kill(pid, signal.SIGKILL)
            # while worker 0 is dead, waiting or loading, worker 1 answers
            h = poll(lambda: (lambda s: s if s["models"][0]["state"] == "restarting" else None)(
                     d.health()), "restarting", log=d.log)
            assert h["models"][1]["ready"] and h["models"][1]["pid"] == first[1]
            for _ in range(5):
                a = c.call(dict(x))
                assert a["status"] == OK, a
            # kill the next generation as soon as it exists: consecutive crashes
            h = poll(lambda pid=pid: (lambda s: s if s["models"][0]["pid"] != pid else None)(
                     d.health()), "respawn", log=d.log)
            pid = h["models"][0]["pid"]
        h = d.wait_for(lambda h: h["ready"], what="ready after three crashes")
        assert h["models"][0]["restarts"] == 3 and h["models"][1]["restarts"] == 0
        assert c.call(dict(x))["status"] == OK
    delays = [r["restart_in_s"] for r in records(d, "worker died; restarting")]
    assert delays == [0.5, 1.0, 1.0]  # 0.5 s doubling, capped by restart_backoff_max_s
    d.children = psutil.Process(d.proc.pid).children(recursive=True)


def test_a_worker_not_ready_within_start_timeout_is_killed_and_marked_failed(daemon_factory):
    d = daemon_factory(server("start_timeout_s = 2.0") + model(name="hangs", factory="slow_load"),
                       wait_ready=False)
    h = d.wait_for(lambda h: h["models"][0]["state"] == "failed", what="start timeout")
    w = h["models"][0]
    assert "did not become ready within 2.0 s" in w["error"], w
    # killed, reaped (the front reaps in its exit handler, which would also
    # schedule a restart), and not restarted
    poll(lambda: not psutil.pid_exists(w["pid"]), "killed worker gone", timeout=30, log=d.log)
    h = d.health()
    assert h["ready"] is False
    assert (h["models"][0]["state"], h["models"][0]["restarts"], h["models"][0]["pid"]) == \
        ("failed", 0, w["pid"])
    with d.client() as c:
        a = c.call({"model": "hangs", "inputs": X4})
    assert a["status"] == UNAVAILABLE and "no ready worker" in a["error"], a
    assert records(d, "worker start timed out")
    assert not records(d, "worker died; restarting")
