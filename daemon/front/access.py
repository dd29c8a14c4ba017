"""Who may send requests, and how fast: shared-token auth and per-client rate limits.

Authentication is per connection. A request may carry ``token``; a valid one
marks its connection as that client's (until a reload changes the tokens), so a client
sends it once (the bundled clients open each connection with an ``auth`` op)
and its hot path pays one attribute test. A request on a connection that has
not authenticated gets UNAUTHENTICATED and the connection stays open (the
client may still send its token); a wrong token gets UNAUTHENTICATED and the
connection is closed, so guessing costs a TCP handshake a try. Tokens are
compared in constant time (``hmac.compare_digest``) against every configured
token, so the time taken does not tell which prefix was right.

A reload that changes the tokens (or turns auth on) marks every connection
not authenticated by a token still listed: its next request is answered
UNAVAILABLE and the connection closed, so a client retries on a new
connection that opens with its token (see ``revoke_stale``).

Rate limits (every op but ``health``, which load balancers poll, and
``auth``) are a token bucket per client identity: ("client", the token's
name), or ("ip", the peer's address) for a connection without a token,
shared by all of that client's connections (opening more connections does
not raise the limit). Buckets of clients that have gone quiet are pruned
once full again: a full bucket is the same as no bucket, so pruning never
changes an answer.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ipc.status import ResourceExhausted, Unauthenticated, Unavailable, brief

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AuthConfig, Config, RateLimitConfig
    from .connection import Connection

PRUNE_ABOVE = 4096  # buckets kept before quiet clients are pruned


class Access:
    """The [auth] and [rate_limit] sections, applied to one request at a time."""

    def __init__(self, auth_cfg: AuthConfig, rate_cfg: RateLimitConfig):
        self.tokens = tuple((n, t.encode()) for n, t in auth_cfg.tokens)
        self.auth = auth_cfg.enabled
        self.exempt = frozenset(auth_cfg.exempt_ops)
        self.rate = rate_cfg.requests_per_s
        self.burst = float(rate_cfg.burst)
        self.buckets: dict[tuple, list[float]] = {}  # identity -> [tokens, last refill (s)]
        self._prune_at = PRUNE_ABOVE
        self.refused = {"unauthenticated": 0, "bad_token": 0, "reauthenticate": 0,
                        "rate_limited": 0}
        # With several fronts: what this front's clients spent since the last
        # report, which the supervisor passes on to every other front (debit).
        self.spent: dict[tuple, float] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Access | None:
        """None when neither auth nor a rate limit is configured: the hot path skips it."""
        if not cfg.auth.enabled and not cfg.rate_limit.requests_per_s:
            return None
        return cls(cfg.auth, cfg.rate_limit)

    def client_of(self, token: Any) -> str | None:
        """The client name whose token this is, or None."""
        if type(token) is not str:
            return None
        given = token.encode()
        found = None
        for name, t in self.tokens:  # no early exit: the same work for every token
            if hmac.compare_digest(given, t):
                found = name
        return found

    def revoke_stale(self, conns: Iterable[Connection]) -> int:
        """After a reload: connections that are not authenticated by a token
        still listed (their token was removed, or auth was off when they
        connected) must authenticate again. Their next request is answered
        UNAVAILABLE and the connection closed: a client retries on a new
        connection, which opens with its token (the bundled clients do both),
        instead of being refused for good on a connection that stays open.
        Returns how many were marked."""
        valid = set(self.tokens)
        n = 0
        for c in conns:
            if (c.client, c.cred) not in valid and not c.reauth:
                c.set_client(None, None)
                c.reauth = True
                n += 1
        return n

    def check(self, conn: Connection, msg: dict[str, Any], op: str) -> None:
        """Raise the ProtocolError that answers ``msg`` instead, if any."""
        if self.auth:
            token = msg.get("token")
            if token is not None:
                # Guessing costs the address's rate budget: a wrong token
                # spends one request of it, and an empty bucket is not checked.
                ip = ("ip", conn.host)
                if self.rate and self._bucket(ip, time.monotonic())[0] < 1.0:
                    self.refused["rate_limited"] += 1
                    conn.close_after_answer = True
                    raise ResourceExhausted(f"too many requests from {brief(conn.host)} "
                                            "(rate_limit); retry later with a valid token")
                name = self.client_of(token)
                if name is None:
                    if self.rate:
                        self.buckets[ip][0] -= 1.0
                        if self.spent is not None:
                            self.spent[ip] = self.spent.get(ip, 0.0) + 1.0
                    self.refused["bad_token"] += 1
                    conn.close_after_answer = True
                    raise Unauthenticated("the token is not valid here; check the token "
                                          "your client sends (this connection is closed)")
                conn.set_client(name, token.encode())
                conn.reauth = False
            elif conn.client is None and (type(op) is not str or op not in self.exempt):
                if conn.reauth:
                    self.refused["reauthenticate"] += 1
                    conn.close_after_answer = True
                    raise Unavailable("the server's [auth] changed in a config reload and this "
                                      "connection must authenticate again: reconnect and send "
                                      "your token (this connection is closed; retry)")
                if self.rate:  # an address without a token is still limited
                    self.take(conn.ident)
                self.refused["unauthenticated"] += 1
                raise Unauthenticated("this server requires a token: send 'token' in a "
                                      "request (op 'auth' opens a connection with it), e.g. "
                                      "Client(..., token=...) or RINGSERVE_TOKEN")
        # Probes must never be limited into "down", and the auth op opens
        # every connection of a well-behaved client.
        if self.rate and op != "health" and op != "auth":
            self.take(conn.ident)

    def take(self, ident: tuple[str, str], now: float | None = None) -> None:
        """One request of ``ident`` (("client", name) or ("ip", address): a
        client may not be named like an address and share its bucket)
        against its bucket."""
        now = time.monotonic() if now is None else now
        b = self._bucket(ident, now)
        if b[0] < 1.0:
            self.refused["rate_limited"] += 1
            wait_ms = max(1, round((1.0 - b[0]) / self.rate * 1000))
            raise ResourceExhausted(f"{ident[0]} {ident[1]!r} is over its rate limit of "
                                    f"{self.rate:g} requests/s (burst {self.burst:g}); "
                                    f"retry in {wait_ms} ms or slow down")
        b[0] -= 1.0
        if self.spent is not None:
            self.spent[ident] = self.spent.get(ident, 0.0) + 1.0

    def take_spent(self) -> dict[tuple, float]:
        out, self.spent = self.spent or {}, {}
        return out

    def debit(self, spent: dict[tuple, float], now: float | None = None) -> None:
        """What the same clients spent on other fronts: taken from their
        buckets here too (which may go below zero: they then wait for the
        refill), so a client has one budget on the machine (docs/operations.md,
        "Authentication and rate limits")."""
        now = time.monotonic() if now is None else now
        for ident, n in spent.items():
            self._bucket(ident, now)[0] -= n

    def _bucket(self, ident: tuple[str, str], now: float) -> list[float]:
        """``ident``'s bucket, refilled to ``now``."""
        b = self.buckets.get(ident)
        if b is None:
            if len(self.buckets) >= self._prune_at:
                self._prune(now)
            b = self.buckets[ident] = [self.burst, now]
        else:
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        return b

    def _prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        self.buckets = {k: b for k, b in self.buckets.items()
                        if b[0] + (now - b[1]) * rate < burst}
        # Many busy clients: prune again only once as many more have come,
        # so a new client costs O(1) amortised, not a scan each.
        self._prune_at = max(PRUNE_ABOVE, 2 * len(self.buckets))

    def snapshot(self) -> dict:
        return {"auth": self.auth, "rate_per_client": self.rate or None,
                "clients_limited": len(self.buckets), "refused": dict(self.refused)}
