"""[auth] and [rate_limit] against a real daemon: who gets answered, with
which status, and that tokens rotate on SIGHUP without a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from clients import AsyncClient, Client, RetryPolicy, errors
from ipc.framing import encode_frame
from tests.conftest import REPO, demo_config
from tests.wire import WireClient, tensor

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210xyz"
X = np.linspace(-1, 1, 128, dtype=np.float32)
INFER = {"model": "demo", "inputs": tensor(X)}


def write_tokens(path, lines: str) -> None:
    path.write_text(lines)
    os.chmod(path, 0o600)


def auth_config(tmp_path, exempt='["health"]', extra="") -> str:
    write_tokens(tmp_path / "tokens", f"# clients\nalice:{ALICE}\nbob: {BOB}\n")
    return demo_config() + f'\n[auth]\ntokens_file = "{tmp_path / "tokens"}"\n' \
        f"exempt_ops = {exempt}\n" + extra


def stats(d, token=ALICE) -> dict:
    with d.client() as c:
        return c.call({"op": "stats", "token": token})


def wait_stats(d, pred, what: str, timeout: float = 60.0, token=ALICE) -> dict:
    t_end = time.monotonic() + timeout
    while True:
        s = stats(d, token)
        if pred(s):
            return s
        assert time.monotonic() < t_end, f"{what} not reached: {s}\n{d.log()}"
        time.sleep(0.05)


def test_tokens_gate_every_op_but_the_exempt_ones(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path))
    with d.client() as c:
        # No token: refused, and the connection stays usable.
        a = c.call(dict(INFER))
        assert a["status"] == 16 and "requires a token" in a["error"]
        assert "outputs" not in a
        for op in ("stats", "models"):
            assert c.call({"op": op})["status"] == 16
        assert c.call({"op": "feedback", "ref": 1, "outcome": 1.0})["status"] == 16
        assert c.call({"op": "health"})["status"] == 0   # exempt
        # A valid token authenticates the connection for every later request.
        a = c.call({"op": "auth", "token": ALICE})
        assert a == {"id": a["id"], "status": 0, "client": "alice", "auth": True}
        a = c.call(dict(INFER))
        assert a["status"] == 0 and a["outputs"]["shape"] == [2]
        assert c.call({"op": "models"})["status"] == 0
    with d.client() as c:
        # The token may ride in any request (a client that sends it every time).
        assert c.call(dict(INFER, token=BOB))["status"] == 0
    s = stats(d)
    assert s["access"]["refused"]["unauthenticated"] == 4
    assert s["access"]["auth"] is True
    assert s["rejected"]["16"] == 4


def test_a_wrong_token_is_refused_and_closes_the_connection(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path))
    with d.client() as c:
        # Pipelined behind the bad token: nothing after it is served.
        c.send_raw(b"".join(encode_frame(m) for m in (
            {"id": 0, "op": "auth", "token": ALICE + "x"}, dict(INFER, id=1), dict(INFER, id=2))))
        a = c.recv()
        assert a["id"] == 0 and a["status"] == 16 and "not valid" in a["error"]
        assert c.closed_by_peer()
    with d.client() as c:
        a = c.call(dict(INFER, token=12345))
        assert a["status"] == 16 and a["id"] != 0
        closing = c.recv()   # then the closing answer, for whatever else was in flight
        assert closing["id"] == 0 and closing["status"] == 16, closing
        assert c.closed_by_peer()
    s = stats(d)
    assert s["access"]["refused"]["bad_token"] == 2
    assert s["models"][0]["requests"] == 0   # neither pipelined infer ran
    # The token is a secret: never in the daemon's log.
    assert ALICE not in d.log() and BOB not in d.log()


def test_clients_send_their_token_once_per_connection(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path))
    with Client(port=d.port, token=ALICE, connections=2) as c:
        for _ in range(4):   # both connections
            assert c.infer("demo", X).outputs.shape == (2,)
        assert c.stats()["access"]["refused"] == {"unauthenticated": 0, "bad_token": 0,
                                                  "reauthenticate": 0, "rate_limited": 0}
    with Client(port=d.port, retry=RetryPolicy()) as c:
        e = pytest.raises(errors.Unauthenticated, c.infer, "demo", X).value
        assert e.attempts == 1 and "requires a token" in e.message   # never retried
        assert c.health()["ready"] is True   # exempt
    with Client(port=d.port, token="not-the-token-at-all") as c:
        e = pytest.raises(errors.Unauthenticated, c.infer, "demo", X).value
        assert "not valid" in e.message

    async def main():
        async with AsyncClient(port=d.port, token=BOB) as c:
            r = await asyncio.gather(*(c.infer("demo", X) for _ in range(8)))
            assert all(x.outputs.shape == (2,) for x in r)
        async with AsyncClient(port=d.port, token="wrong-wrong-wrong-wrong") as c:
            with pytest.raises(errors.Unauthenticated):
                await c.infer("demo", X)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    with pytest.raises(TypeError, match="token"):
        Client(port=d.port, token=b"bytes")


def test_cli_reads_the_token_from_the_environment_or_a_file(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path, exempt="[]"), token=ALICE)
    cmd = [sys.executable, "-m", "clients", "--port", str(d.port), "models"]
    env = {k: v for k, v in os.environ.items() if k != "RINGSERVE_TOKEN"}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "UNAUTHENTICATED" in p.stderr + p.stdout
    p = subprocess.run(cmd, cwd=REPO, env=dict(env, RINGSERVE_TOKEN=BOB), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "demo" in p.stdout, p.stderr
    (tmp_path / "mine").write_text(ALICE + "\n")
    p = subprocess.run(cmd + ["--token-file", str(tmp_path / "mine")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "demo" in p.stdout, p.stderr


def test_sighup_rotates_tokens_and_revokes_removed_ones(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path), token=ALICE)
    old = WireClient("127.0.0.1", d.port)
    keep = WireClient("127.0.0.1", d.port)
    try:
        assert old.call(dict(INFER, token=ALICE))["status"] == 0
        assert keep.call(dict(INFER, token=BOB))["status"] == 0
        alice2 = "alice-rotated-token-000000000"
        write_tokens(tmp_path / "tokens", f"alice:{alice2}\nbob:{BOB}\n")
        d.token = alice2
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_stats(d, lambda s: s["status"] == 0 and s["reloads"]["ok"] == 1, "reload",
                   token=alice2)
        # alice's old token is gone: her open connection must authenticate
        # again, on a new connection (UNAVAILABLE: retry; then closed)
        a = old.call(dict(INFER))
        assert a["status"] == 14 and "must authenticate again" in a["error"]
        assert old.recv()["id"] == 0   # the closing answer
        assert old.closed_by_peer()
        assert keep.call(dict(INFER))["status"] == 0   # bob's token did not change
    finally:
        old.close()
        keep.close()
    with d.client() as c:
        assert c.call(dict(INFER, token=ALICE))["status"] == 16
    with d.client() as c:
        assert c.call(dict(INFER, token=alice2))["status"] == 0
    assert stats(d, alice2)["access"]["refused"]["reauthenticate"] == 1


def test_turning_auth_on_by_reload_moves_clients_to_new_connections(daemon_factory, tmp_path):
    """Clients that connected while auth was off keep working once a reload
    turns it on, if they have a token: their next call is answered
    UNAVAILABLE on the old connection and retried on a new one, which opens
    with the token. Tokens apply as soon as the file validates."""
    d = daemon_factory(demo_config())
    with Client(port=d.port, token=ALICE) as c, d.client() as anonymous:
        assert c.infer("demo", X).attempts == 1
        assert anonymous.call(dict(INFER))["status"] == 0
        d.config_path.write_text(auth_config(tmp_path))
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_stats(d, lambda s: s["status"] == 0 and s["reloads"]["ok"] == 1, "reload")
        r = c.infer("demo", X)
        assert r.outputs.shape == (2,) and r.attempts == 2
        assert c.infer("demo", X).attempts == 1   # the new connection is authenticated
        a = anonymous.call(dict(INFER))
        assert a["status"] == 14 and anonymous.recv()["id"] == 0 and anonymous.closed_by_peer()
    with d.client() as c2:
        assert c2.call(dict(INFER))["status"] == 16


def test_a_readable_tokens_file_is_refused_at_start(tmp_path):
    cfg = auth_config(tmp_path)
    os.chmod(tmp_path / "tokens", 0o644)
    (tmp_path / "ringserve.toml").write_text(cfg)
    p = subprocess.run([sys.executable, "-m", "daemon", "check",
                        str(tmp_path / "ringserve.toml")], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0
    assert "auth.tokens_file" in p.stderr and "chmod 600" in p.stderr
    assert ALICE not in p.stderr + p.stdout


RATE = '\n[rate_limit]\nrequests_per_s = 2\nburst = 5\n'


def test_rate_limit_per_client_address(daemon_factory):
    d = daemon_factory(demo_config() + RATE)
    with d.client() as c:
        # One write, so the front takes the 12 together rather than as 12
        # round trips apart: no refill (one token per 0.5 s) comes between.
        ids = list(range(1, 13))
        c.send_raw(b"".join(encode_frame(dict(INFER, id=i)) for i in ids))
        got = {a["id"]: a for a in c.recv_n(12)}
        statuses = [got[i]["status"] for i in ids]
        # 5 at once (the burst), then refused at once
        assert statuses == [0] * 5 + [8] * 7
        assert "rate limit of 2 requests/s" in got[ids[-1]]["error"]
        # another connection from the same address shares the bucket
        with d.client() as c2:
            assert c2.call(dict(INFER))["status"] == 8
        time.sleep(0.6)   # one token back
        assert c.call(dict(INFER))["status"] == 0
        time.sleep(0.6)   # stats counts against the limit too
        s = c.call({"op": "stats"})
    assert s["access"]["refused"]["rate_limited"] == 8
    port = d.health()["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    fam = {f.name: f for f in text_string_to_metric_families(text)}["ringserve_access_refused"]
    got = {s.labels["reason"]: s.value for s in fam.samples if s.name.endswith("_total")}
    assert got["rate_limited"] == 8 and got["bad_token"] == 0


def test_rate_limit_follows_the_token_and_clients_retry_through_it(daemon_factory, tmp_path):
    d = daemon_factory(auth_config(tmp_path, extra=RATE))
    with d.client() as a, d.client() as b:
        assert a.call({"op": "auth", "token": ALICE})["status"] == 0   # not limited
        assert [a.call(dict(INFER))["status"] for _ in range(6)] == [0] * 5 + [8]
        # bob comes from the same address but is his own client
        assert b.call({"op": "auth", "token": BOB})["status"] == 0
        assert [b.call(dict(INFER))["status"] for _ in range(6)] == [0] * 5 + [8]
    # The retry policy backs off through RESOURCE_EXHAUSTED until a token is back.
    with Client(port=d.port, token=BOB, timeout=20,
                retry=RetryPolicy(attempts=20, base_delay=0.1, max_delay=1.0)) as c:
        r = c.infer("demo", X)
        assert r.outputs.shape == (2,) and r.attempts > 1
