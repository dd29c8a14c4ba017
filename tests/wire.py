"""A deliberately small blocking client for the tests: a socket, the codec
of ``ipc.framing`` and nothing else, so the tests see exactly the bytes the
daemon sends."""

from __future__ import annotations

import socket

import numpy as np

from ipc.framing import FrameDecoder, encode_frame


class WireClient:
    def __init__(self, host: str, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(1 << 30)
        self.pending: list = []
        self.next_id = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: dict) -> int:
        if "id" not in msg:
            msg = dict(msg, id=self.next_id)
            self.next_id += 1
        self.sock.sendall(encode_frame(msg))
        return msg["id"]

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.pending.extend(self.decoder.feed(data))
        item = self.pending.pop(0)
        if not isinstance(item, dict):
            raise item
        return item

    def recv_n(self, n: int) -> list[dict]:
        return [self.recv() for _ in range(n)]

    def call(self, msg: dict) -> dict:
        self.send(msg)
        return self.recv()

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def tensor(arr: np.ndarray) -> dict:
    arr = np.ascontiguousarray(arr)
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "data": arr.tobytes()}


def out_array(ans: dict, name: str | None = None) -> np.ndarray:
    t = ans["outputs"] if name is None else ans["outputs"][name]
    return np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"])
