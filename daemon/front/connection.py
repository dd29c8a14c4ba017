"""One client connection: bytes in, frames out, nothing awaited.

``data_received`` only feeds the sans-IO decoder and hands each decoded map to
the intake (daemon/front/intake.py), which answers later through ``send``. What
the connection reports about itself (opened, closed, its unfinished frames,
why the server closed it) goes to the gate (daemon/front/gate.py), which holds
the limits. Those two, and the loop, are all a connection is given. Write backpressure follows
aiohttp: when the transport's buffer passes its high-water mark (the peer is
not reading its answers) reading is paused, so a client cannot make the
daemon buffer answers without bound; reading resumes as the buffer drains.

Fairness between connections: one read may carry thousands of pipelined
frames, and handling them all in one callback would stall every other
connection for as long as they take. At most ``FRAMES_PER_TURN`` frames are
decoded and handled per event-loop turn; the rest of the read waits,
undecoded, in the decoder (reading is paused meanwhile, so it is at most one
read) and is taken up by a ``call_soon`` after the other ready callbacks.

Time limits (``Gate.sweep`` checks them about four times per limit, so a
limit may be passed by a quarter of itself):

- a started frame: its header within ``header_timeout_s``, then an average
  of at least ``min_frame_bytes_per_s`` (a slow link finishes a big frame; a
  trickle does not hold a slot);
- idle: nothing read and nothing in flight for ``idle_timeout_s`` (a request
  waiting on a long deadline is not idle);
- with ``[auth]``: a valid token within ``auth.timeout_s`` of the connect;
- behind a trusted proxy: the PROXY header within ``header_timeout_s``.

Every close the server starts sends one answer with id 0 first, saying why
(``refuse``); protocol.md tells clients to treat what they had in flight as
not received.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, cast

from ipc.framing import FrameDecoder, encode_frame
from ipc.proxy import ProxyHeaderParser
from ipc.status import ProtocolError

from .gate import Closed

if TYPE_CHECKING:
    from .gate import Gate
    from .intake import Intake

# Frames handled per connection per event-loop turn. Large enough that a
# pipelining client's burst costs few extra turns (each ~1-2 us), small
# enough that a turn of the costliest op (`stats`, a few hundred us with
# many models) times this stays within a few milliseconds for the others.
FRAMES_PER_TURN = 32

# A closed connection whose peer does not read its last answers is aborted
# this long after the close, so it cannot hold its buffers and descriptor.
CLOSE_GRACE_S = 10.0
# How long a refused connection is read (and discarded) after its closing
# answer, so that the answer is not lost to a reset (``refuse``).
LINGER_S = 1.0

_monotonic = time.monotonic


class Connection(asyncio.Protocol):
    __slots__ = ("gate", "intake", "loop", "decoder", "transport", "closed", "peer", "host",
                 "client", "cred", "reauth", "close_after_answer", "inflight", "opened",
                 "last_active", "frame_started", "proxy", "counted", "read_paused", "write_paused",
                 "turn_scheduled", "ident", "eof")

    transport: asyncio.Transport  # from connection_made on, before any other call

    def __init__(self, gate: Gate, intake: Intake, loop: asyncio.AbstractEventLoop) -> None:
        self.gate = gate
        self.intake = intake
        self.loop = loop
        self.decoder = FrameDecoder(gate.max_frame_bytes, gate.frame_limits)
        self.closed = False
        self.peer: Any = None  # the transport's peername
        self.host = "?"
        # the client name once a valid token was presented (daemon/front/access.py)
        self.client: str | None = None
        self.cred: bytes | None = None  # that token, so a reload that revokes it can tell
        self.reauth = False  # a reload changed [auth] under it (daemon/front/access.py)
        self.close_after_answer = False
        self.inflight = 0    # infer requests accepted and not yet answered
        self.opened = self.last_active = _monotonic()
        self.frame_started = 0.0  # when the unfinished frame's first byte came
        self.proxy: ProxyHeaderParser | None = None  # waiting for a PROXY header
        self.counted = False  # in the gate's per-address connection counts
        self.read_paused = False   # for our own backlog
        self.write_paused = False  # the peer does not read its answers
        self.turn_scheduled = False
        self.eof = False  # the peer half-closed: answer what it sent, then close
        # Who this client is, for limits and fair shares: its token's name,
        # or its address (a client may not be named like an address). Kept
        # up to date by set_client and set_host, read per request.
        self.ident: tuple[str, str] = ("ip", "?")

    def set_host(self, host: str) -> None:
        self.host = host
        if self.client is None:
            self.ident = ("ip", host)

    def set_client(self, name: str | None, cred: bytes | None) -> None:
        self.client, self.cred = name, cred
        self.ident = ("client", name) if name is not None else ("ip", self.host)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream's (asyncio's or uvloop's)
        self.peer = transport.get_extra_info("peername")
        if self.peer:
            self.set_host(str(self.peer[0]))
        if self.gate.expects_proxy_header(self.host):
            self.proxy = ProxyHeaderParser()
            self.gate.pending(self)
        else:
            self.gate.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:  # refused, lingering: what the peer still sends is dropped
            return
        self.last_active = now = _monotonic()
        if self.proxy is not None:
            data = self._proxy_header(data)
            if not data:
                return
        dec = self.decoder
        before = dec.buffered
        partial_before = dec.partial if before else 0
        items = dec.feed(data, FRAMES_PER_TURN)
        after = dec.buffered
        if after or before:  # (the common read holds whole frames: nothing to account)
            if dec.partial and (not partial_before or items):
                self.frame_started = now  # a new unfinished frame began in this read
            if self.gate.frame_bytes_changed(self, after - before):
                return  # over the budget: refused and closed
            self._handle(items)
            if dec.backlog and not self.closed:
                self._later()
        else:
            self._handle(items)

    def _proxy_header(self, data: bytes) -> bytes:
        """Feed the PROXY header parser; the bytes after the header, if any."""
        try:
            proxy = self.proxy
            assert proxy is not None  # only while a PROXY header is awaited
            res = proxy.feed(data)
        except ProtocolError as e:
            self.proxy = None
            self.gate.opened(self, proxy_failed=True)
            self.refuse(e, Closed.PROXY_HEADER)
            return b""
        if res is None:
            return b""
        self.proxy = None
        if res.source is not None:
            self.set_host(res.source[0])
        self.gate.opened(self)
        return b"" if self.closed else res.rest

    def _handle(self, items: list) -> None:
        handle = self.intake.handle
        for item in items:
            if self.closed:  # refused and closed by an earlier frame: the rest is not served
                return
            if type(item) is dict:
                handle(self, item)
            else:  # a ProtocolError from the codec
                self.intake.serving.count_rejected(int(item.status))
                if item.fatal:  # its answer (id 0) is the closing one
                    self.refuse(item, Closed.FRAME_TOO_LARGE)
                    return
                self.send(item.answer())

    def _later(self) -> None:
        """Leave the rest of this read to a later turn, and read no more
        until it is handled."""
        if not self.read_paused:
            self.read_paused = True
            if not self.write_paused:
                self.transport.pause_reading()
        if not self.turn_scheduled:
            self.turn_scheduled = True
            self.loop.call_soon(self._turn)

    def _turn(self) -> None:
        self.turn_scheduled = False
        if self.closed or self.write_paused:
            return  # resume_writing takes the backlog up again
        dec = self.decoder
        before = dec.buffered
        items = dec.feed(b"", FRAMES_PER_TURN)
        if dec.partial and items:
            self.frame_started = _monotonic()
        if self.gate.frame_bytes_changed(self, dec.buffered - before):
            return
        self._handle(items)
        if self.closed:
            return
        if dec.backlog:
            self._later()
        else:
            self.read_paused = False
            if self.eof:
                self._finish_eof()
            elif not self.write_paused:
                self.transport.resume_reading()

    def send(self, msg: dict) -> None:
        if not self.closed:
            self.transport.write(encode_frame(msg))
            if self.eof:
                self._finish_eof()

    def eof_received(self) -> bool:
        """The peer shut down its side (``shutdown(SHUT_WR)``): it may still
        read. Its requests are answered, then the connection is closed; True
        keeps the transport open for those answers (asyncio would close it)."""
        self.eof = True
        self._finish_eof()
        return True

    def _finish_eof(self) -> None:
        # Checked after the current callback: an answer sent while frames of
        # the same read are still being handled must not close before them.
        if not self.closed and not self.inflight and not self.decoder.backlog:
            self.loop.call_soon(self._close_if_done)

    def _close_if_done(self) -> None:
        if not self.closed and not self.inflight and not self.decoder.backlog:
            self.close()

    def refuse(self, err: ProtocolError, reason: Closed) -> None:
        """Close on the server's initiative: one id-0 answer saying why, then
        a lingering close, counted by ``reason``.

        Lingering (nginx's lingering_close): closing a socket whose receive
        queue still holds unread requests makes the kernel send a reset, and
        a reset can make the peer drop the answer we just wrote. So we send
        the answer, shut down our side (the peer reads it, then EOF), and
        read and discard whatever the peer still sends until it closes or
        LINGER_S has passed."""
        if self.closed:
            return
        err.req_id = 0
        self.gate.count_closed(reason)
        self.send(err.answer())
        t = self.transport
        self.closed = True
        # Out of the gate's counts now, not at connection_lost: a lingering
        # refused connection must not hold a place under max_connections.
        self.gate.closed(self)
        if not t.can_write_eof():
            t.close()
            return
        try:
            t.write_eof()
        except (OSError, RuntimeError):
            t.close()
            return
        if self.read_paused or self.write_paused:
            self.read_paused = self.write_paused = False
            t.resume_reading()
        self.loop.call_later(LINGER_S, self._linger_over)

    def _linger_over(self) -> None:
        self.transport.abort() if self.transport.get_write_buffer_size() else \
            self.transport.close()

    def close(self) -> None:
        """Close after what is already written has been flushed, but not
        wait for a peer that never reads it: abort after CLOSE_GRACE_S."""
        if not self.closed:
            self.closed = True
            t = self.transport
            t.close()
            if t.get_write_buffer_size():
                self.loop.call_later(CLOSE_GRACE_S, t.abort)

    def pause_writing(self) -> None:
        if self.closed:
            return
        self.write_paused = True
        if not self.read_paused:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.closed:
            return
        if self.read_paused:  # a backlog waits: its turn was skipped while paused
            if not self.turn_scheduled:
                self.turn_scheduled = True
                self.loop.call_soon(self._turn)
        elif not self.eof:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gate.closed(self)
