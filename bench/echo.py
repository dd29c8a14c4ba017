"""The transport ceiling: a bare server that speaks ringserve's framing and
does nothing else.

Each request frame is decoded with ``ipc.framing.FrameDecoder`` (the
daemon's own codec) and answered with one fixed-shape answer map encoded by
``ipc.framing.encode_frame``: the per-request work any server on this wire
must do, with no validation, queueing, batching or model. The load
generator measured against it shows what Python + uvloop + msgpack cost per
answer on this machine; the daemon can approach that, not beat it.

Run as its own process (``python -m bench.echo --port-file F``) so that its
CPU is measured the same way as the daemon's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket

from ipc.framing import FrameDecoder, encode_frame

# The demo model's answer shape: float32[2]. Built once; only the id changes.
_OUTPUTS = {"dtype": "float32", "shape": [2], "data": bytes(8)}
_TIMING = {"queue_us": 0, "compute_us": 0, "batch": 1}


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.decoder = FrameDecoder()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        out = []
        for msg in self.decoder.feed(data):
            if type(msg) is dict:
                out.append(encode_frame({"id": msg.get("id", 0), "status": 0,
                                         "outputs": _OUTPUTS, "timing": _TIMING}))
            else:   # a ProtocolError: answer it as the daemon would
                out.append(encode_frame(msg.answer()))
        if out:
            # One write per received chunk: a pipelining client gets its
            # answers in as few syscalls as it sent its requests.
            self.transport.write(b"".join(out))
        if self.decoder.dead:
            self.transport.close()


async def serve(host: str, port: int, port_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port, backlog=1024)
    if port_file:
        # Written whole, then renamed: a reader never sees a partial number.
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
        os.replace(tmp, port_file)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    a = p.parse_args(argv)
    import uvloop
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(a.host, a.port, a.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
