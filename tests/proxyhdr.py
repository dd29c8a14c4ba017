"""PROXY protocol headers for the tests, built from the spec's layout (see
``ipc/proxy.py``), to send ahead of the first frame from a raw socket.

``src=None`` builds the header of a connection that carries no address:
``PROXY UNKNOWN\\r\\n`` for v1, the LOCAL command for v2.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _pair(src: str, dst: str):
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version != b.version:
        raise ValueError(f"source {src} and destination {dst} are of different IP versions")
    return a, b


def v1(src: str | None, sport: int = 0, dst: str | None = None, dport: int = 0) -> bytes:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` (the family from the addresses)."""
    if src is None:
        return b"PROXY UNKNOWN\r\n"
    a, b = _pair(src, dst)
    return f"PROXY TCP{a.version} {a} {b} {sport} {dport}\r\n".encode("ascii")


def tlv(kind: int, value: bytes) -> bytes:
    """One v2 TLV: type, 2-byte big-endian length, value."""
    return struct.pack(">BH", kind, len(value)) + value


def v2(src: str | None, sport: int = 0, dst: str | None = None, dport: int = 0,
       tlvs: bytes = b"") -> bytes:
    """A v2 PROXY header over TCP (INET or INET6 from the addresses), then ``tlvs``."""
    if src is None:
        return SIGNATURE + struct.pack(">BBH", 0x20, 0x00, len(tlvs)) + tlvs
    a, b = _pair(src, dst)
    block = a.packed + b.packed + struct.pack(">HH", sport, dport) + tlvs
    fam = 0x11 if a.version == 4 else 0x21
    return SIGNATURE + struct.pack(">BBH", 0x21, fam, len(block)) + block
