"""The PROXY protocol header (HAProxy's doc/proxy-protocol.txt), sans-IO.

A proxy in ``server.trusted_proxies`` starts each connection with one header
that names the real client; the first msgpack frame follows it directly.
``ProxyHeaderParser.feed`` takes the connection's first bytes as they arrive
and returns a ``ProxyResult`` once the header is complete, with the bytes
that followed it in ``rest`` (hand them to the frame decoder).

Version 1, one line of US-ASCII, CRLF included at most 107 bytes::

    "PROXY" SP "TCP4" SP src SP dst SP sport SP dport CRLF    dotted IPv4
    "PROXY" SP "TCP6" SP src SP dst SP sport SP dport CRLF    IPv6 text
    "PROXY" SP "UNKNOWN" [anything but CR or LF] CRLF          use the socket peer

    exactly one space between fields; ports decimal 0..65535 with no sign and
    no leading zero; "PROXY" upper-case.

Version 2, 16 bytes and then ``len`` more::

    0   12s      signature 0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    12  u8       version << 4 | command: version 2; command 0 LOCAL, 1 PROXY
    13  u8       family << 4 | protocol: family 0 UNSPEC, 1 INET, 2 INET6,
                 3 UNIX; protocol 0 UNSPEC, 1 STREAM, 2 DGRAM
    14  u16 BE   len: the bytes of the header after these 16
    16  the address block, by family (multi-byte fields big-endian):
            INET   4s src, 4s dst, u16 sport, u16 dport      12 bytes
            INET6  16s src, 16s dst, u16 sport, u16 dport    36 bytes
            UNIX   108s src, 108s dst                        216 bytes
        then TLVs up to 16 + len, each u8 type, u16 BE length, value

What is accepted, and what the result says:

- v1 TCP4/TCP6 and v2 PROXY over INET/INET6 STREAM: ``source`` and ``dest``
  are (host, port), the host in Python's canonical text (an IPv4-mapped IPv6
  address as "::ffff:a.b.c.d", the way the socket peer of a dual-stack
  listener reads).
- v1 UNKNOWN, v2 LOCAL (whatever its family), and v2 PROXY with family or
  protocol UNSPEC or family UNIX: ``source`` and ``dest`` are None and the
  daemon uses the socket's own endpoints. This is the spec's UNSPEC
  fallback and what HAProxy itself does: the client was a local process of
  the proxy (or unknown to it), so the proxy is the best address there is.
- v2 TLVs are skipped, but their lengths must tile the rest of the header
  exactly. CRC32C (type 0x03) is not verified (the spec leaves it to
  receivers that support it).

What is refused, always with ``InvalidArgument`` (fatal: the stream cannot be
trusted, close the connection after answering):

- bytes that cannot start either header, as soon as one arrives: "PROXY " and
  the v2 signature differ from their first byte, so a client that sent a
  frame straight away, or a lower-case "proxy", is refused at byte 1, and any
  other stranger within 14 bytes (the v1 protocol word, v2's version,
  command and family);
- v1: a protocol other than TCP4, TCP6, UNKNOWN; no CRLF within 107 bytes; a
  CR or LF on its own (refused at once, even after UNKNOWN, where HAProxy
  would skip a lone LF: a line ended by a bare LF is the usual mistake and is
  better told than timed out); other than six fields split by single
  spaces; a non-ASCII byte; an address that is not of the family the line
  names (IPv6 scope ids "%eth0" included); a bad port;
- v2: a version other than 2; a command other than LOCAL and PROXY; a family
  or protocol value the spec does not assign; a header longer than
  ``max_bytes`` (known from its 16th byte, so refused then, not buffered);
  an address block shorter than its family needs (also refused at the 16th
  byte); DGRAM with PROXY: the client spoke UDP to the proxy and ringserve's
  frames need a stream; a TLV that runs past the header's end.

A header cut short is not an error ``feed`` can see (more bytes may come);
``eof()`` turns it into one when the peer closes or the daemon's header
timeout runs out.

Nothing here does I/O; the caller owns the socket and the event loop.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ipc.status import InvalidArgument, brief

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer is Python 3.12+

__all__ = ["DEFAULT_MAX_BYTES", "V1_MAX_LINE", "V2_SIGNATURE", "V2_HEADER", "V2_INET", "V2_INET6",
           "V2_UNIX_LEN", "TLV_HEADER", "ProxyHeaderParser", "ProxyResult", "parse_trusted"]

# 536 = 576 - 40, the smallest TCP segment every host must accept: the spec
# sizes both headers to fit one. 16 + 36 address bytes leave 484 for TLVs;
# raise it for a proxy that sends long ones (SSL certificate names).
DEFAULT_MAX_BYTES = 536

V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107   # "PROXY UNKNOWN " + two full IPv6 + two 5-digit ports + CRLF
# What may follow "PROXY ": a v1 line is told apart from garbage by these.
_V1_WORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V1_WORD_SPAN = max(map(len, _V1_WORDS))

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct(">12sBBH")    # signature, version|command, family|protocol, len
V2_INET = struct.Struct(">4s4sHH")      # src, dst, sport, dport
V2_INET6 = struct.Struct(">16s16sHH")
V2_UNIX_LEN = 2 * 108
TLV_HEADER = struct.Struct(">BH")       # type, length of the value
_V2_SIZE = V2_HEADER.size               # 16
_MAX_TOTAL = _V2_SIZE + 0xFFFF

_VERSION_2 = 2
_LOCAL, _PROXY = 0, 1
_UNSPEC, _INET, _INET6, _UNIX = 0, 1, 2, 3
_STREAM, _DGRAM = 1, 2
_FAMILY_NAMES = ("UNSPEC", "INET", "INET6", "UNIX")
_ADDR_LEN = {_INET: V2_INET.size, _INET6: V2_INET6.size, _UNIX: V2_UNIX_LEN}

_FIX = ("have the proxy send a PROXY header (HAProxy: send-proxy or send-proxy-v2; nginx: "
        "proxy_protocol on) or take its address out of server.trusted_proxies")


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """What the header said, and the bytes that came after it."""

    source: tuple[str, int] | None   # the real client; None: use the socket peer
    dest: tuple[str, int] | None     # the address the client connected to; None likewise
    version: int                     # 1 or 2
    rest: bytes                      # what followed the header in the last feed


class ProxyHeaderParser:
    """Feed the first bytes of a connection; learns the client's address.

    Only the header is ever buffered (at most ``max_bytes``): a feed that
    brings the header and frames after it keeps the frames out of the buffer
    and hands them back, copied once, in ``ProxyResult.rest``.
    """

    __slots__ = ("max_bytes", "_buf", "_error", "_done")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        """``max_bytes`` caps a v2 header, TLVs included (v1 lines are capped at
        107 by the spec). At least 16 + 216, so that every address family fits."""
        low = _V2_SIZE + V2_UNIX_LEN
        if type(max_bytes) is not int or not low <= max_bytes <= _MAX_TOTAL:
            raise ValueError(f"max_bytes must be an integer in {low}..{_MAX_TOTAL}, "
                             f"got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._error: InvalidArgument | None = None
        self._done = False

    def feed(self, data: Buffer) -> ProxyResult | None:
        """None: need more bytes. Else a ProxyResult. Raises ipc.status.InvalidArgument
        (with a message a person can act on, e.g. naming what was expected) for a
        malformed or missing header; never another exception.

        After a refusal every feed raises the same error again. Feeding after
        the result was returned is a bug in the caller (RuntimeError): the
        bytes belong to the frame decoder by then.
        """
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("ProxyHeaderParser.feed after the header was parsed; "
                               "feed the frame decoder instead")
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        buf = self._buf
        had = len(buf)
        buf += view[:self.max_bytes - had]
        try:
            end = self._header_end(buf)
            if end is None:
                return None
            # The header did not end inside what was buffered before (feed
            # would have returned it then), so it ends inside `view`.
            rest = bytes(view[end - had:])
            result = _decode_v2(buf, end, rest) if buf[0] == 0x0D else _decode_v1(buf, end, rest)
        except InvalidArgument as e:
            self._error = e
            self._buf = bytearray()
            raise
        self._done = True
        self._buf = bytearray()
        return result

    def eof(self) -> None:
        """Call when no more header bytes will come: the peer closed, or the
        daemon's time for the header ran out. Raises InvalidArgument unless a
        header was parsed."""
        if self._done:
            return
        if self._error is None:
            self._error = _incomplete(self._buf)
            self._buf = bytearray()
        raise self._error

    # -- finding the end of the header, refusing as early as possible -----

    def _header_end(self, buf: bytearray) -> int | None:
        """The header's length once all of it is in ``buf``; None while it may
        still be one; InvalidArgument as soon as it cannot be."""
        if not buf:
            return None
        if buf[0] == 0x0D:
            return self._v2_end(buf)
        if buf[0] == 0x50:  # "P"
            return _v1_end(buf)
        raise _not_proxy(buf)

    def _v2_end(self, buf: bytearray) -> int | None:
        n = len(buf)
        k = min(n, len(V2_SIGNATURE))
        if buf[:k] != V2_SIGNATURE[:k]:
            raise _not_proxy(buf)
        if n <= 12:
            return None
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != _VERSION_2:
            raise _v2_error(f"version {version} (byte 13 is 0x{buf[12]:02x}); the binary header "
                            "is version 2, the only one this signature starts")
        if command > _PROXY:
            raise _v2_error(f"command {command} (byte 13 is 0x{buf[12]:02x}); expected 0 LOCAL "
                            "or 1 PROXY")
        if n == 13:
            return None
        family, protocol = buf[13] >> 4, buf[13] & 0x0F
        if family > _UNIX or protocol > _DGRAM:
            raise _v2_error(f"address family/protocol byte 0x{buf[13]:02x} (byte 14) is not "
                            "one the spec assigns: family 0-3 in the high nibble, protocol 0-2 "
                            "in the low")
        if command == _PROXY and protocol == _DGRAM:
            raise _v2_error(f"protocol DGRAM ({_FAMILY_NAMES[family]} over UDP): ringserve "
                            "frames need a stream, so the proxy must relay TCP")
        if n < _V2_SIZE:
            return None
        length = (buf[14] << 8) | buf[15]
        total = _V2_SIZE + length
        if total > self.max_bytes:
            raise _v2_error(f"header of {total} bytes (16 + len {length}) exceeds the limit of "
                            f"{self.max_bytes}; have the proxy send fewer or smaller TLVs (without "
                            "them a TCP header takes at most 52 bytes)")
        need = _ADDR_LEN.get(family, 0) if command == _PROXY and protocol == _STREAM else 0
        if length < need:
            raise _v2_error(f"len {length} is too short for the {_FAMILY_NAMES[family]} address "
                            f"block, which takes {need} bytes")
        return total if n >= total else None


def _v1_end(buf: bytearray) -> int | None:
    n = len(buf)
    k = min(n, len(V1_PREFIX))
    if buf[:k] != V1_PREFIX[:k]:
        raise _not_proxy(buf)
    crlf = buf.find(b"\r\n", 0, V1_MAX_LINE)
    seen = crlf if crlf != -1 else min(n, V1_MAX_LINE)
    lf = buf.find(b"\n", 0, seen)
    if lf != -1:
        raise _v1_error(f"bare LF at byte {lf + 1}; the line must end in CRLF (\\r\\n), "
                        "not LF alone")
    cr = buf.find(b"\r", 0, seen)
    if cr != -1 and cr + 1 < min(n, V1_MAX_LINE):
        raise _v1_error(f"bare CR at byte {cr + 1} is not followed by LF; the line must end in "
                        "CRLF (\\r\\n)")
    if n > len(V1_PREFIX):
        word = buf[len(V1_PREFIX):len(V1_PREFIX) + _V1_WORD_SPAN]
        if not any(w[:len(word)] == word[:len(w)] for w in _V1_WORDS):
            shown = bytes(word).split(b" ")[0].split(b"\r")[0].split(b"\n")[0]
            if shown in (b"TCP4", b"TCP6"):
                raise _v1_error(f"{shown.decode()} must be followed by one space and the "
                                "addresses and ports")
            raise _v1_error(f"protocol {brief(shown)} is not TCP4, TCP6 or UNKNOWN "
                            "(upper-case; UNKNOWN is followed by a space or CRLF)")
    if crlf != -1:
        return crlf + 2
    if n >= V1_MAX_LINE:
        raise _v1_error(f"no CRLF within the first {V1_MAX_LINE} bytes (the longest a v1 line can "
                        f"be); got {brief(bytes(buf[:V1_MAX_LINE]))}")
    return None


# -- decoding a complete header ---------------------------------------------

def _decode_v1(buf: bytearray, end: int, rest: bytes) -> ProxyResult:
    if buf.startswith(b"PROXY UNKNOWN"):
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyResult(None, None, 1, rest)
    raw = bytes(buf[:end - 2])
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise _v1_error(f"byte {e.start + 1} is not ASCII in {brief(raw)}") from None
    fields = line.split(" ")
    if len(fields) != 6:
        raise _v1_error(f"{brief(line)} has {len(fields)} fields; expected six separated by single "
                        "spaces: PROXY TCP4|TCP6 <src> <dst> <sport> <dport>")
    _, proto, src, dst, sport, dport = fields
    family = 4 if proto == "TCP4" else 6
    return ProxyResult((_v1_host(src, "source", family), _v1_port(sport, "source")),
                       (_v1_host(dst, "destination", family), _v1_port(dport, "destination")),
                       1, rest)


def _v1_host(text: str, which: str, family: int) -> str:
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    try:
        if "%" in text:
            raise ValueError("scope id")
        return _host(cls(text))
    except ValueError:
        what = ("four decimal numbers 0-255 without leading zeros" if family == 4
                else "IPv6 text without a scope id")
        raise _v1_error(f"{which} address {brief(text)} is not an IPv{family} address ({what}), "
                        f"which TCP{family} needs") from None


def _v1_port(text: str, which: str) -> int:
    if (not text.isascii() or not text.isdigit() or len(text) > 5
            or (text[0] == "0" and len(text) > 1) or int(text) > 0xFFFF):
        raise _v1_error(f"{which} port {brief(text)} is not a decimal number 0-65535 (no sign, "
                        "no leading zeros)")
    return int(text)


def _decode_v2(buf: bytearray, total: int, rest: bytes) -> ProxyResult:
    command = buf[12] & 0x0F
    family, protocol = buf[13] >> 4, buf[13] & 0x0F
    if command == _LOCAL:
        # "the receiver ... must use the real connection endpoints and
        # discard the protocol block including the family"
        return ProxyResult(None, None, 2, rest)
    if family == _UNSPEC or protocol != _STREAM:  # UNSPEC: DGRAM was refused in _v2_end
        return ProxyResult(None, None, 2, rest)
    addr_end = _V2_SIZE + _ADDR_LEN[family]
    _check_tlvs(buf, addr_end, total)
    if family == _UNIX:
        return ProxyResult(None, None, 2, rest)
    src_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _INET:
        src, dst, sport, dport = V2_INET.unpack_from(buf, _V2_SIZE)
        src_ip, dst_ip = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    else:
        src, dst, sport, dport = V2_INET6.unpack_from(buf, _V2_SIZE)
        src_ip, dst_ip = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    return ProxyResult((_host(src_ip), sport), (_host(dst_ip), dport), 2, rest)


def _check_tlvs(buf: bytearray, pos: int, end: int) -> None:
    while pos < end:
        if end - pos < TLV_HEADER.size:
            raise _v2_error(f"{end - pos} bytes left at offset {pos} are too few for a TLV "
                            "(type, 2-byte length); len does not match the TLVs sent")
        kind, length = TLV_HEADER.unpack_from(buf, pos)
        if pos + TLV_HEADER.size + length > end:
            raise _v2_error(f"TLV type 0x{kind:02x} at offset {pos} claims {length} bytes but "
                            f"only {end - pos - TLV_HEADER.size} are left in the header")
        pos += TLV_HEADER.size + length


def _host(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(ip, "ipv4_mapped", None)
    # Python before 3.13 writes ::ffff:1.2.3.4 as ::ffff:102:304.
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


# -- messages ---------------------------------------------------------------

def _not_proxy(buf: bytearray) -> InvalidArgument:
    head = bytes(buf[:16])
    lower = head[:5].upper() == b"PROXY"[:len(head)] and head != head.upper()
    hint = " (the v1 keyword is upper-case PROXY)" if lower else ""
    return InvalidArgument(
        f"expected a PROXY protocol header first on a connection from a trusted proxy "
        f"(v1 \"PROXY TCP4 ...\\r\\n\" or the v2 signature \\r\\n\\r\\n\\0\\r\\nQUIT\\n), got "
        f"{brief(head)}{hint}; {_FIX}", fatal=True)


def _v1_error(problem: str) -> InvalidArgument:
    return InvalidArgument(f"bad PROXY protocol v1 header: {problem}", fatal=True)


def _v2_error(problem: str) -> InvalidArgument:
    return InvalidArgument(f"bad PROXY protocol v2 header: {problem}", fatal=True)


def _incomplete(buf: bytearray) -> InvalidArgument:
    n = len(buf)
    if n == 0:
        what = "no byte of it arrived"
    elif buf[0] == 0x0D and n >= _V2_SIZE:
        what = f"{n} of the {_V2_SIZE + ((buf[14] << 8) | buf[15])} bytes of a v2 header arrived"
    elif buf[0] == 0x0D:
        what = f"{n} of the first {_V2_SIZE} bytes of a v2 header arrived"
    else:
        what = f"{n} bytes of a v1 line arrived without its CRLF: {brief(bytes(buf))}"
    return InvalidArgument(f"the PROXY protocol header is incomplete: {what}; the proxy must send "
                           "the whole header at once, before any other byte", fatal=True)


# -- which peers must send a header -----------------------------------------

def parse_trusted(cidrs: Iterable[str]) -> Callable[[str], bool]:
    """From config strings like "127.0.0.1", "10.0.0.0/8", "::1": a predicate on a
    peer host string (ipaddress module; IPv4-mapped IPv6 handled).

    Host bits in a network are masked, as server.trusted_proxies' check does
    ("10.0.0.1/8" is 10.0.0.0/8). A peer is trusted when its address, in
    either spelling (1.2.3.4 or ::ffff:1.2.3.4), lies in a listed network;
    a host that is not an IP address (a Unix socket's peer) is not. A bad
    entry raises ValueError naming it.
    """
    if isinstance(cidrs, (str, bytes)):
        raise TypeError(f"parse_trusted takes a list of addresses or networks, not one string; "
                        f"write [{cidrs!r}]")
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for entry in cidrs:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"{entry!r} is not an IP address or CIDR network "
                             "(e.g. \"10.0.0.0/8\", \"::1\")") from None
        if isinstance(net, ipaddress.IPv4Network):   # net.version == 4
            v4.append(net)
        else:
            v6.append(net)
    nets4, nets6 = tuple(v4), tuple(v6)

    def is_trusted(host: str) -> bool:
        if type(host) is not str:  # ip_address would read bytes and ints as packed addresses
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6:
            mapped = ip.ipv4_mapped
            if mapped is not None and any(mapped in n for n in nets4):
                return True
            return any(ip in n for n in nets6)
        if any(ip in n for n in nets4):
            return True
        if nets6:
            as6 = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
            return any(as6 in n for n in nets6)
        return False

    return is_trusted
