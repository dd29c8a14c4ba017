"""A front's connections: who may connect, how much they may hold, and
their time limits (docs/operations.md, "Limits and abuse").

The Gate is what a Connection (daemon/front/connection.py) reports to: it
opened (or waits for its PROXY header), it closed, its unfinished frames
grew or shrank, it was closed for a reason. The Gate refuses what is over a
limit: ``max_connections`` and ``max_connections_per_client`` for the
whole machine (daemon/front/conncounts.py), the memory every connection's
unfinished frames hold together (``frame_buffer_budget_bytes``), and
the time limits that ``sweep`` checks a few times per limit over every
connection.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from ipc.framing import FrameLimits
from ipc.proxy import parse_trusted
from ipc.status import ResourceExhausted, Unauthenticated, Unavailable, brief

from .conncounts import ConnCounts
from .limits import frame_limits, raise_nofile

if TYPE_CHECKING:
    from ..config import Config
    from .connection import Connection
    from .state import Serving

class Closed(StrEnum):
    """Why the server closed a connection: the ``reason`` label of
    ringserve_connections_closed_total (docs/operations.md)."""
    IDLE = "idle"
    HEADER_TIMEOUT = "header_timeout"
    SLOW_FRAME = "slow_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    FRAME_BUDGET = "frame_budget"
    AUTH_TIMEOUT = "auth_timeout"
    AUTH = "auth"
    PER_CLIENT = "per_client"
    MAX_CONNECTIONS = "max_connections"
    PROXY_HEADER = "proxy_header"
    DRAINING = "draining"


class Gate:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, serving: Serving,
                 counts: ConnCounts, log_warning: Callable[[str, int], None]) -> None:
        self.loop = loop
        self.serving = serving
        self.counts = counts
        self.conns: set[Connection] = set()
        self.frame_bytes = 0  # held for unfinished frames, all connections together
        self.closed_by: collections.Counter[Closed] = collections.Counter()
        self._warn = log_warning
        self._sweeper: asyncio.TimerHandle | None = None
        self.stopped = False
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Start and reload: the frame bounds follow the models, for open
        connections too; counts and buffers carry over."""
        s = cfg.server
        self.server_cfg, self.auth_timeout_s = s, cfg.auth.timeout_s
        self.max_frame_bytes = s.max_frame_bytes
        self.frame_limits: FrameLimits = frame_limits(cfg.models)
        for c in self.conns:
            c.decoder.limits = self.frame_limits
        self._trusted = parse_trusted(s.trusted_proxies)
        self.max_conns, warning = raise_nofile(cfg)  # lowered by the descriptor limit
        if warning:
            self._warn(warning, self.max_conns)

    # -- what a connection reports ---------------------------------------------------
    def expects_proxy_header(self, host: str) -> bool:
        return self.server_cfg.proxy_protocol and self._trusted(host)

    def pending(self, conn: Connection) -> None:
        """Accepted from a trusted proxy: waiting for its PROXY header, which
        names the client that the per-client limits are for."""
        self.conns.add(conn)
        self.counts.opened(len(self.conns))
        if self.counts.machine_open() > self.max_conns:
            self._too_many(conn)

    def opened(self, conn: Connection, proxy_failed: bool = False) -> None:
        self.conns.add(conn)
        self.counts.opened(len(self.conns))
        if proxy_failed:
            return
        if self.counts.machine_open() > self.max_conns:
            self._too_many(conn)
            return
        most = self.server_cfg.max_connections_per_client
        if self.counts.client_count(conn.host) >= most:
            conn.refuse(ResourceExhausted(
                f"too many connections from {brief(conn.host)} (server.max_connections_per_"
                f"client = {most}, all fronts together); reuse a connection (requests "
                "pipeline) or close some"), Closed.PER_CLIENT)
            return
        self.counts.add_client(conn.host, 1)
        conn.counted = True
        if self.serving.draining:
            conn.refuse(Unavailable("server is draining (shutting down); connect to another "
                                    "instance"), Closed.DRAINING)

    def _too_many(self, conn: Connection) -> None:
        conn.refuse(ResourceExhausted(
            f"too many connections (server.max_connections = {self.max_conns}, all fronts "
            "together); reuse a connection (requests pipeline) or retry later"),
            Closed.MAX_CONNECTIONS)

    def closed(self, conn: Connection) -> None:
        self.conns.discard(conn)
        self.counts.opened(len(self.conns))
        self.frame_bytes -= conn.decoder.buffered
        conn.decoder.drop()
        if conn.counted:
            conn.counted = False
            self.counts.add_client(conn.host, -1)

    def frame_bytes_changed(self, conn: Connection, delta: int) -> bool:
        """Account ``conn``'s change in buffered bytes; True when that put the
        unfinished-frame budget over and ``conn`` was refused for it."""
        self.frame_bytes += delta
        budget = self.server_cfg.frame_buffer_budget_bytes
        if delta > 0 and self.frame_bytes > budget and conn.decoder.partial:
            self.frame_bytes -= conn.decoder.drop()
            conn.refuse(ResourceExhausted(
                "the server's memory for unfinished frames is used up (server.frame_buffer_"
                f"budget_bytes = {budget}); retry later, or send smaller requests"),
                Closed.FRAME_BUDGET)
            return True
        return False

    def count_closed(self, reason: Closed) -> None:
        self.closed_by[reason] += 1

    # -- time limits -------------------------------------------------------------------
    def start(self) -> None:
        self._sweep_soon()

    def stop(self) -> None:
        self.stopped = True
        if self._sweeper is not None:
            self._sweeper.cancel()

    def _sweep_soon(self) -> None:
        s = self.server_cfg
        shortest = min(s.idle_timeout_s, s.header_timeout_s, self.auth_timeout_s)
        every = min(1.0, max(0.02, shortest / 4))
        self._sweeper = self.loop.call_later(every, self.sweep)

    def sweep(self) -> None:
        """The connections' time limits (daemon/front/connection.py): a few times per
        limit, over every connection; O(connections) a second at most."""
        now = time.monotonic()
        s = self.server_cfg
        header_s, rate = s.header_timeout_s, s.min_frame_bytes_per_s
        idle_s = s.idle_timeout_s
        access = self.serving.access
        auth_s = self.auth_timeout_s if access is not None and access.auth else 0
        for c in list(self.conns):
            if c.closed:
                continue
            if c.proxy is not None:
                if now - c.opened > header_s:
                    c.refuse(ResourceExhausted(
                        f"no PROXY protocol header within {header_s:g} s (server.header_"
                        "timeout_s); this port expects one from trusted proxies"),
                        Closed.PROXY_HEADER)
                continue
            partial = c.decoder.partial
            if partial:
                took = now - c.frame_started
                if partial < 4 and took > header_s:
                    c.refuse(ResourceExhausted(
                        f"frame header not completed within {header_s:g} s of its first byte "
                        "(server.header_timeout_s); send whole frames"),
                        Closed.HEADER_TIMEOUT)
                    continue
                if took > header_s and partial < rate * (took - header_s):
                    c.refuse(ResourceExhausted(
                        f"frame arriving too slowly: {partial} bytes in {took:.1f} s, below "
                        f"server.min_frame_bytes_per_s = {rate} after {header_s:g} s of grace; "
                        "check the link, or send smaller frames"), Closed.SLOW_FRAME)
                    continue
            elif c.inflight or c.decoder.backlog:
                c.last_active = now  # waiting for answers is not idle
            elif now - c.last_active > idle_s:
                c.refuse(ResourceExhausted(
                    f"idle timeout: nothing received and nothing in flight for {idle_s:g} s "
                    "(server.idle_timeout_s); reconnect when there is work"), Closed.IDLE)
                continue
            if auth_s and c.client is None and now - c.opened > auth_s:
                c.refuse(Unauthenticated(
                    f"no valid token within {auth_s:g} s of connecting (auth.timeout_s); open "
                    "each connection with op 'auth' and your token"), Closed.AUTH_TIMEOUT)
        if not self.stopped:
            self._sweep_soon()
