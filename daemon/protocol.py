"""One client connection: bytes in, frames out, nothing awaited.

``data_received`` only feeds the sans-IO decoder and hands each decoded map to
the app, which answers later through ``send``. Write backpressure follows
aiohttp: when the transport's buffer passes its high-water mark (the peer is
not reading its answers) reading is paused, so a client cannot make the
daemon buffer answers without bound; reading resumes as the buffer drains.
"""

from __future__ import annotations

import asyncio

from ipc.framing import FrameDecoder, encode_frame


class Connection(asyncio.Protocol):
    __slots__ = ("app", "decoder", "transport", "closed", "peer", "host", "client", "cred",
                 "reauth", "close_after_answer")

    def __init__(self, app):
        self.app = app
        self.decoder = FrameDecoder(app.cfg.server.max_frame_bytes)
        self.transport = None
        self.closed = False
        self.peer = None
        self.host = "?"
        self.client = None   # the client name once a valid token was presented (daemon/access.py)
        self.cred = None     # that token, so a reload that revokes it can tell
        self.reauth = False  # a reload changed [auth] under it (daemon/access.py)
        self.close_after_answer = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        if self.peer:
            self.host = str(self.peer[0])
        self.app.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        handle = self.app.handle
        for item in self.decoder.feed(data):
            if self.closed:  # refused and closed by an earlier frame: the rest is not served
                return
            if type(item) is dict:
                handle(self, item)
            else:  # a ProtocolError from the codec
                self.app.count_rejected(int(item.status))
                self.send(item.answer())
                if item.fatal:
                    self.close()
                    return

    def send(self, msg: dict) -> None:
        if not self.closed:
            self.transport.write(encode_frame(msg))

    def close(self) -> None:
        """Close after what is already written has been flushed."""
        if not self.closed:
            self.closed = True
            self.transport.close()

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.app.connection_closed(self)
