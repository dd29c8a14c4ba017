"""The pure parts of [auth] and [rate_limit]: the tokens file, the token
check and the token bucket (daemon/front/access.py)."""

from __future__ import annotations

import os

import pytest

from daemon.config import ConfigError, parse_config
from daemon.front.access import PRUNE_ABOVE, Access
from ipc.status import ResourceExhausted, Unauthenticated, Unavailable

MODEL = {"name": "m", "factory": "pkg.mod:build", "input": {"dtype": "float32", "shape": [4]}}
A, B = "a" * 16, "b" * 20


def config(tmp_path, text: str | None = None, mode: int = 0o600, **sections):
    data = {"models": [MODEL], **sections}
    if text is not None:
        f = tmp_path / "tokens"
        f.write_text(text)
        os.chmod(f, mode)
        data.setdefault("auth", {})["tokens_file"] = str(f)
    return parse_config(data, "t.toml")


def error(tmp_path, text, mode=0o600) -> str:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, text, mode)
    return str(e.value)


class Conn:
    """What Access uses of daemon.front.connection.Connection."""

    def __init__(self, host="10.0.0.1"):
        self.host, self.client, self.cred = host, None, None
        self.ident = ("ip", host)
        self.reauth = self.close_after_answer = False

    def set_client(self, name, cred):
        self.client, self.cred = name, cred
        self.ident = ("client", name) if name is not None else ("ip", self.host)


def test_tokens_file_lines(tmp_path):
    c = config(tmp_path, f"# comment\n\n alice : {A}\nbob:{B}\n")
    assert c.auth.enabled and c.auth.tokens == (("alice", A), ("bob", B))
    assert A not in repr(c) and A not in repr(c.auth)   # secrets stay out of logs
    assert not config(tmp_path).auth.enabled
    assert Access.from_config(config(tmp_path)) is None


@pytest.mark.parametrize("text, expect", [
    (f"{A}\n", "line 1: must be NAME:TOKEN"),
    ("alice:short\n", "line 1: the token of 'alice' must be at least 16 characters"),
    (f"alice:{A}\nalice:{B}\n", "line 2: client name 'alice' is listed twice"),
    (f"alice:{A}\nbob:{A}\n", "line 2: this token is listed twice"),
    ("# nothing\n", "lists no NAME:TOKEN line"),
    (f"al ice:{A}\n", "line 1: must be NAME:TOKEN"),
])
def test_tokens_file_errors(tmp_path, text, expect):
    msg = error(tmp_path, text)
    assert msg.startswith("t.toml: auth.tokens_file: ") and expect in msg, msg


def test_tokens_file_must_be_private(tmp_path):
    msg = error(tmp_path, f"alice:{A}\n", mode=0o640)
    assert "readable by others (mode 640)" in msg and "chmod 600" in msg
    assert A not in msg


def test_exempt_ops_and_rate_defaults(tmp_path):
    c = config(tmp_path, auth={"exempt_ops": ["health", "health", "models"]},
               rate_limit={"requests_per_s": 2.5})
    assert c.auth.exempt_ops == ("health", "models") and not c.auth.enabled
    assert c.rate_limit.burst == 3   # rounded up
    with pytest.raises(ConfigError, match='auth.exempt_ops: unknown op "infr"'):
        config(tmp_path, auth={"exempt_ops": ["infr"]})
    with pytest.raises(ConfigError, match="rate_limit.requests_per_s: must be a number"):
        config(tmp_path, rate_limit={"requests_per_s": -1})


def test_check_authenticates_the_connection(tmp_path):
    acc = Access.from_config(config(tmp_path, f"alice:{A}\nbob:{B}\n",
                                    auth={"exempt_ops": ["health"]}))
    c = Conn()
    with pytest.raises(Unauthenticated, match="requires a token"):
        acc.check(c, {"op": "infer"}, "infer")
    assert not c.close_after_answer
    acc.check(c, {}, "health")   # exempt
    acc.check(c, {"token": B}, "infer")
    assert (c.client, c.cred) == ("bob", B.encode())
    acc.check(c, {}, "stats")    # the connection stays authenticated
    with pytest.raises(Unauthenticated, match="not valid"):
        acc.check(Conn(), {"token": B + "x"}, "infer")
    bad = Conn()
    with pytest.raises(Unauthenticated):
        acc.check(bad, {"token": 7}, "infer")
    assert bad.close_after_answer
    with pytest.raises(Unauthenticated):   # an op that is not a string is no crash
        acc.check(Conn(), {"op": ["x"]}, ["x"])
    assert acc.refused == {"unauthenticated": 2, "bad_token": 2, "reauthenticate": 0,
                           "rate_limited": 0}
    # a reload that drops bob's token makes his connection authenticate again:
    # UNAVAILABLE and closed, so that a client retries on a new connection
    acc2 = Access.from_config(config(tmp_path, f"alice:{A}\n"))
    anonymous, alice = Conn(), Conn()
    acc2.check(alice, {"token": A}, "infer")
    assert acc2.revoke_stale([c, anonymous, alice]) == 2 and c.client is None
    assert c.reauth and anonymous.reauth and not alice.reauth
    with pytest.raises(Unavailable, match="must authenticate again"):
        acc2.check(c, {}, "infer")
    assert c.close_after_answer
    acc2.check(anonymous, {"token": A}, "infer")   # a token clears it
    assert anonymous.client == "alice" and not anonymous.reauth


def test_token_bucket(tmp_path):
    acc = Access.from_config(config(tmp_path, rate_limit={"requests_per_s": 10, "burst": 3}))
    t, x, y = 100.0, ("client", "x"), ("ip", "x")
    for _ in range(3):
        acc.take(x, t)
    with pytest.raises(ResourceExhausted, match=r"client 'x' is over its rate limit of 10 "
                                                 r"requests/s \(burst 3\); retry in 100 ms"):
        acc.take(x, t)
    acc.take(y, t)            # an address that reads like a client name has its own bucket
    acc.take(x, t + 0.11)     # 0.11 s at 10/s: one token back
    with pytest.raises(ResourceExhausted):
        acc.take(x, t + 0.11)
    for _ in range(3):        # refills never exceed the burst
        acc.take(x, t + 60)
    with pytest.raises(ResourceExhausted):
        acc.take(x, t + 60)
    assert acc.refused["rate_limited"] == 3
    c = Conn("10.0.0.9")
    acc.check(c, {}, "health")   # never limited, nor is the auth op
    acc.check(c, {}, "auth")
    assert ("ip", "10.0.0.9") not in acc.buckets


def test_quiet_clients_are_pruned_without_changing_answers(tmp_path):
    acc = Access.from_config(config(tmp_path, rate_limit={"requests_per_s": 1, "burst": 2}))
    acc.take(("ip", "busy"), 0.0)
    acc.take(("ip", "busy"), 0.0)
    for i in range(PRUNE_ABOVE - 1):
        acc.take(("ip", f"c{i}"), 0.0)
    assert len(acc.buckets) == PRUNE_ABOVE
    acc.take(("ip", "new"), 1.5)   # every 1-request client is full again at 1.5 s; "busy" is not
    assert set(acc.buckets) == {("ip", "busy"), ("ip", "new")}
    acc.take(("ip", "busy"), 1.5)   # 1.5 tokens back: it still has its own history
    with pytest.raises(ResourceExhausted):
        acc.take(("ip", "busy"), 1.5)


def test_many_busy_clients_do_not_make_every_new_one_a_scan(tmp_path):
    acc = Access.from_config(config(tmp_path, rate_limit={"requests_per_s": 1, "burst": 2}))
    for i in range(3 * PRUNE_ABOVE):   # all busy (not full): none can be pruned
        acc.take(("ip", f"c{i}"), 0.0)
    assert len(acc.buckets) == 3 * PRUNE_ABOVE
    assert acc._prune_at == 4 * PRUNE_ABOVE   # the next scan waits for as many again
