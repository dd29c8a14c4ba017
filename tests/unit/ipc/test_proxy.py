"""The PROXY protocol parser: v1 and v2, whole, byte by byte and with what
follows; every refusal; the trusted-peer predicate."""

from __future__ import annotations

import random
import struct

import pytest

from ipc.framing import encode_frame
from ipc.proxy import DEFAULT_MAX_BYTES, ProxyHeaderParser, ProxyResult, parse_trusted
from ipc.status import InvalidArgument, Status
from tests.proxyhdr import SIGNATURE, tlv, v1, v2

FRAME = encode_frame({"id": 1, "op": "health"})

GOOD = [
    # (header, source, dest, version)
    (v1("192.168.0.1", 56324, "192.168.0.11", 443),
     ("192.168.0.1", 56324), ("192.168.0.11", 443), 1),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ("255.255.255.255", 65535), ("255.255.255.255", 65535), 1),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", ("0.0.0.0", 0), ("10.0.0.1", 0), 1),
    (v1("2001:db8::1", 1234, "2001:db8::2", 80), ("2001:db8::1", 1234), ("2001:db8::2", 80), 1),
    (b"PROXY TCP6 FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF 0000:0000:0000:0000:0000:0000:0000:0001 "
     b"65535 1\r\n", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("::1", 1), 1),
    (b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 6\r\n", ("::ffff:10.1.2.3", 5), ("::1", 6), 1),
    (b"PROXY UNKNOWN\r\n", None, None, 1),
    (b"PROXY UNKNOWN ffff:f::f ffff:f::f 65535 65535\r\n", None, None, 1),
    (b"PROXY UNKNOWN \xff\x00 anything\r\n", None, None, 1),
    (v2("10.0.0.7", 40000, "10.0.0.1", 9000), ("10.0.0.7", 40000), ("10.0.0.1", 9000), 2),
    (v2("2001:db8::7", 1, "2001:db8::1", 65535), ("2001:db8::7", 1), ("2001:db8::1", 65535), 2),
    (v2("::ffff:1.2.3.4", 1, "::ffff:5.6.7.8", 2), ("::ffff:1.2.3.4", 1), ("::ffff:5.6.7.8", 2), 2),
    (v2("10.0.0.7", 40000, "10.0.0.1", 9000, tlvs=tlv(0x01, b"h2") + tlv(0x04, b"") +
        tlv(0x05, b"u" * 128) + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))),
     ("10.0.0.7", 40000), ("10.0.0.1", 9000), 2),
    (v2(None), None, None, 2),
    (v2(None, tlvs=b"\x00junk that LOCAL ignores"), None, None, 2),
    # LOCAL with an address block: "must not assume zero is presented for LOCAL"
    (SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), None, None, 2),
    # PROXY with UNSPEC family or protocol, and UNIX: the spec's fallback to the socket peer
    (SIGNATURE + b"\x21\x00\x00\x00", None, None, 2),
    (SIGNATURE + b"\x21\x00\x00\x05" + b"12345", None, None, 2),
    (SIGNATURE + b"\x21\x10\x00\x00", None, None, 2),
    (SIGNATURE + b"\x21\x31" + struct.pack(">H", 216) + b"/tmp/s".ljust(108, b"\0") * 2,
     None, None, 2),
    (SIGNATURE + b"\x21\x31" + struct.pack(">H", 219) + b"\0" * 216 + tlv(4, b""), None, None, 2),
]
GOOD_IDS = [f"v{g[3]}-{i}" for i, g in enumerate(GOOD)]


def check(result, source, dest, version, rest=b""):
    assert result == ProxyResult(source, dest, version, rest)
    assert type(result.rest) is bytes


@pytest.mark.parametrize("header,source,dest,version", GOOD, ids=GOOD_IDS)
def test_whole(header, source, dest, version):
    check(ProxyHeaderParser().feed(header), source, dest, version)


@pytest.mark.parametrize("header,source,dest,version", GOOD, ids=GOOD_IDS)
def test_byte_by_byte_then_trailing(header, source, dest, version):
    p = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert p.feed(header[i:i + 1]) is None
    check(p.feed(header[-1:] + FRAME), source, dest, version, FRAME)


@pytest.mark.parametrize("header,source,dest,version", GOOD, ids=GOOD_IDS)
def test_split_anywhere_with_trailing(header, source, dest, version):
    stream = header + FRAME + b"more"
    for cut in range(1, len(header) + 1):
        p = ProxyHeaderParser()
        first = p.feed(stream[:cut])
        if cut < len(header):
            assert first is None
            check(p.feed(stream[cut:]), source, dest, version, FRAME + b"more")
        else:
            check(first, source, dest, version, b"")


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like(kind):
    hdr = v2("10.0.0.7", 1, "10.0.0.1", 2)
    check(ProxyHeaderParser().feed(kind(hdr + b"x")), ("10.0.0.7", 1), ("10.0.0.1", 2), 2, b"x")


def test_empty_feeds_wait():
    p = ProxyHeaderParser()
    assert p.feed(b"") is None
    assert p.feed(b"PROXY ") is None
    assert p.feed(b"") is None
    check(p.feed(b"UNKNOWN\r\n"), None, None, 1)


def test_large_trailing_data_is_not_buffered():
    big = bytes(1 << 20)
    res = ProxyHeaderParser().feed(v1("1.2.3.4", 1, "5.6.7.8", 2) + big)
    assert res.rest == big


def test_v2_header_at_the_limit():
    pad = tlv(4, bytes(DEFAULT_MAX_BYTES - 16 - 12 - 3))
    hdr = v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=pad)
    assert len(hdr) == DEFAULT_MAX_BYTES
    check(ProxyHeaderParser().feed(hdr + b"z"), ("1.2.3.4", 1), ("5.6.7.8", 2), 2, b"z")
    big = v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=tlv(4, bytes(1000)))
    check(ProxyHeaderParser(max_bytes=2048).feed(big), ("1.2.3.4", 1), ("5.6.7.8", 2), 2)


# -- refusals ----------------------------------------------------------------

BAD = {
    # not a PROXY header at all
    "msgpack-frame": (FRAME, "expected a PROXY protocol header"),
    "http": (b"GET / HTTP/1.1\r\n\r\n", "expected a PROXY protocol header"),
    "lowercase": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "upper-case PROXY"),
    "mixed-case": (b"Proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "upper-case PROXY"),
    "PROXY-no-space": (b"PROXY\r\n", "expected a PROXY protocol header"),
    "PROXYX": (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "expected a PROXY protocol header"),
    "bad-signature": (SIGNATURE[:7] + b"X" + SIGNATURE[8:] + b"\x21\x11\x00\x0c" + bytes(12),
                      "expected a PROXY protocol header"),
    "crlf-only": (b"\r\n\r\n\r\n", "expected a PROXY protocol header"),
    # v1
    "v1-udp": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "'UDP4' is not TCP4, TCP6 or UNKNOWN"),
    "v1-lower-proto": (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "is not TCP4, TCP6 or UNKNOWN"),
    "v1-tcp4-alone": (b"PROXY TCP4\r\n", "TCP4 must be followed by one space"),
    "v1-unknownx": (b"PROXY UNKNOWNX\r\n", "is not TCP4, TCP6 or UNKNOWN"),
    "v1-bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    "v1-bare-lf-unknown": (b"PROXY UNKNOWN\n", "bare LF"),
    "v1-bare-cr": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "bare CR"),
    "v1-cr-inside": (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "bare CR"),
    "v1-no-crlf": (b"PROXY UNKNOWN " + b"f" * 200, "no CRLF within the first 107 bytes"),
    "v1-crlf-at-108": (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "no CRLF within"),
    "v1-double-space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "has 7 fields"),
    "v1-trailing-space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "has 7 fields"),
    "v1-missing-port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "has 5 fields"),
    "v1-tab": (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "has 5 fields"),
    "v1-non-ascii": (b"PROXY TCP4 1.2.3.\xc44 5.6.7.8 1 2\r\n", "is not ASCII"),
    "v1-v6-in-tcp4": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "source address '::1' is not an IPv4"),
    "v1-v4-in-tcp6": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
                      "destination address '5.6.7.8' is not an IPv6"),
    "v1-leading-zero-ip": (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "is not an IPv4"),
    "v1-short-ip": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "is not an IPv4"),
    "v1-octet-256": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "is not an IPv4"),
    "v1-hostname": (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "is not an IPv4"),
    "v1-scope-id": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not an IPv6"),
    "v1-v6-too-long": (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "is not an IPv6"),
    "v1-port-65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "source port '65536'"),
    "v1-port-plus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port '+1'"),
    "v1-port-minus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "destination port '-2'"),
    "v1-port-leading-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "source port '01'"),
    "v1-port-hex": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x1\r\n", "destination port '0x1'"),
    "v1-port-long": (b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n", "source port"),
    "v1-port-unicode-digit": ("PROXY TCP4 1.2.3.4 5.6.7.8 ١ 2\r\n".encode(), "is not ASCII"),
    # v2
    "v2-version-1": (SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version 1"),
    "v2-version-3": (SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
    "v2-command-2": (SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "command 2"),
    "v2-family-4": (SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "byte 0x41"),
    "v2-protocol-3": (SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12), "byte 0x13"),
    "v2-udp4": (SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "DGRAM"),
    "v2-udp6": (SIGNATURE + b"\x21\x22\x00\x24" + bytes(36), "DGRAM"),
    "v2-unix-dgram": (SIGNATURE + b"\x21\x32\x00\xd8" + bytes(216), "DGRAM"),
    "v2-inet-short": (SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "too short for the INET"),
    "v2-inet-zero": (SIGNATURE + b"\x21\x11\x00\x00", "too short for the INET"),
    "v2-inet6-as-inet": (SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "too short for the INET6"),
    "v2-unix-short": (SIGNATURE + b"\x21\x31\x00\x24" + bytes(36), "too short for the UNIX"),
    "v2-oversize": (SIGNATURE + b"\x21\x11\x02\x09" + bytes(521), "exceeds the limit of 536"),
    "v2-oversize-max": (SIGNATURE + b"\x21\x11\xff\xff", "exceeds the limit"),
    "v2-local-oversize": (SIGNATURE + b"\x20\x00\x02\x09", "exceeds the limit"),
    "v2-tlv-overrun": (v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=b"\x01\x00\x05ab"), "claims 5 bytes"),
    "v2-tlv-stub": (v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=tlv(1, b"h2") + b"\x01\x00"),
                    "too few for a TLV"),
    "v2-inet6-tlv-overrun": (v2("::1", 1, "::2", 2, tlvs=b"\x20\xff\xff"), "claims 65535 bytes"),
}


def refused(data: bytes, **kw) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        ProxyHeaderParser(**kw).feed(data)
    return info.value


@pytest.mark.parametrize("name", BAD)
def test_refused_whole(name):
    data, words = BAD[name]
    e = refused(data)
    assert words in e.message
    assert e.fatal and e.status == Status.INVALID_ARGUMENT and e.req_id == 0
    assert len(e.message) < 600


@pytest.mark.parametrize("name", BAD)
def test_refused_byte_by_byte(name):
    # The same refusal, at the latest on the byte that completes the header,
    # and never waiting for bytes after it.
    data, words = BAD[name]
    p = ProxyHeaderParser()
    with pytest.raises(InvalidArgument) as info:
        for i in range(len(data)):
            p.feed(data[i:i + 1])
    assert words.split("'")[0] in info.value.message
    # a refused parser stays refused
    with pytest.raises(InvalidArgument) as again:
        p.feed(b"PROXY UNKNOWN\r\n")
    assert again.value is info.value


def refused_after(data: bytes) -> int:
    """How many bytes, fed one at a time, it takes to refuse ``data``."""
    p = ProxyHeaderParser()
    for i in range(len(data)):
        try:
            p.feed(data[i:i + 1])
        except InvalidArgument:
            return i + 1
    raise AssertionError("not refused")


@pytest.mark.parametrize("data,at", [
    (FRAME, 1),                                   # a client that skipped the header
    (b"\x16\x03\x01\x02\x00", 1),                 # TLS ClientHello
    (b"GET / HTTP/1.1\r\n", 1),
    (b"proxy TCP4", 1),
    (b"PROXI", 5),
    (b"PROXY UDP4 ", 8),                           # "PROXY U" may be UNKNOWN
    (b"PROXY TCP4\r\n", 11),
    (SIGNATURE[:5] + b"\x01", 6),
    (SIGNATURE + b"\x11", 13),                    # version 1
    (SIGNATURE + b"\x21\x12", 14),                # DGRAM
    (SIGNATURE + b"\x21\x11\x00\x08", 16),        # address block too short: known at once
    (SIGNATURE + b"\x21\x11\x40\x00", 16),        # oversize: not buffered first
    (b"PROXY TCP4 1.2.3.4\n", 19),                # bare LF: not waited out
])
def test_refused_as_soon_as_possible(data, at):
    assert refused_after(data) == at


def test_anything_else_refused_within_16_bytes():
    rng = random.Random(7)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(16))
        if data[:1] in (b"P", b"\r"):
            continue
        assert refused_after(data) == 1


def test_v1_unknown_waits_for_crlf_up_to_107_bytes():
    line = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(line) == 107
    check(ProxyHeaderParser().feed(line), None, None, 1)
    assert refused_after(b"PROXY UNKNOWN " + b"f" * 200) == 107
    assert refused_after(b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n") == 107


def test_limits_are_configurable():
    hdr = v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=tlv(4, bytes(300)))
    check(ProxyHeaderParser(max_bytes=1024).feed(hdr), ("1.2.3.4", 1), ("5.6.7.8", 2), 2)
    assert "exceeds the limit of 300" in refused(hdr, max_bytes=300).message
    for bad in (0, 231, 16 + 65536, "536", 536.0, True):
        with pytest.raises(ValueError):
            ProxyHeaderParser(max_bytes=bad)


def test_eof_reports_incomplete_headers():
    for data, words in [(b"", "no byte of it arrived"),
                        (b"PROXY TCP4 1.2", "14 bytes of a v1 line arrived"),
                        (SIGNATURE[:9], "9 of the first 16 bytes of a v2 header"),
                        (v2("1.2.3.4", 1, "5.6.7.8", 2)[:20], "20 of the 28 bytes of a v2 header")]:
        p = ProxyHeaderParser()
        assert p.feed(data) is None
        with pytest.raises(InvalidArgument, match=words) as info:
            p.eof()
        assert info.value.fatal
        with pytest.raises(InvalidArgument):
            p.feed(b"more")


def test_eof_after_a_header_is_fine_and_feeding_more_is_a_bug():
    p = ProxyHeaderParser()
    p.feed(v2(None))
    p.eof()
    with pytest.raises(RuntimeError, match="frame decoder"):
        p.feed(FRAME)


def test_mutated_headers_raise_only_invalid_argument():
    # Flip, cut and extend good headers at random: feed returns or raises
    # InvalidArgument, whether fed whole or in random pieces.
    rng = random.Random(1)
    seeds = [g[0] for g in GOOD]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(3)
            if op == 0:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif op == 1:
                del data[rng.randrange(len(data)):][:rng.randrange(1, 4)]
            else:
                data.insert(rng.randrange(len(data) + 1), rng.choice(b" \r\n:.0159afPX\x00\xff"))
        p = ProxyHeaderParser()
        pos = 0
        try:
            while pos < len(data):
                step = rng.randrange(1, 40)
                res = p.feed(bytes(data[pos:pos + step]))
                pos += step
                if res is not None:
                    assert res.version in (1, 2)
                    break
        except InvalidArgument:
            pass


# -- trusted proxies ---------------------------------------------------------

def test_trusted_predicate():
    trusted = parse_trusted(["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32", "192.168.1.7/24"])
    for host in ["127.0.0.1", "10.0.0.1", "10.255.255.255", "::1", "2001:db8::5",
                 "::ffff:127.0.0.1", "::ffff:10.9.8.7", "192.168.1.200"]:
        assert trusted(host), host
    for host in ["127.0.0.2", "11.0.0.1", "::2", "2001:db9::1", "::ffff:11.0.0.1", "",
                 "localhost", "/run/ringserve.sock", "::ffff:7f00:2", "1.2.3.4:80"]:
        assert not trusted(host), host
    assert not trusted(None) and not trusted(b"\x7f\0\0\1") and not trusted(2130706433)


def test_trusted_mapped_networks_and_scopes():
    trusted = parse_trusted(["::ffff:10.0.0.0/104", "fe80::/10"])
    assert trusted("10.1.2.3") and trusted("::ffff:10.1.2.3") and not trusted("11.0.0.1")
    assert trusted("fe80::1%eth0") and not trusted("fec0::1")
    everything6 = parse_trusted(["::/0"])
    assert everything6("::ffff:1.2.3.4") and everything6("1.2.3.4")
    assert not parse_trusted([])("127.0.0.1")


def test_trusted_bad_entries():
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP address"):
        parse_trusted(["10.0.0.0/33"])
    with pytest.raises(ValueError, match="'localhost'"):
        parse_trusted(["127.0.0.1", "localhost"])
    with pytest.raises(TypeError, match="not one string"):
        parse_trusted("10.0.0.0/8")


def test_helpers_build_what_the_spec_shows():
    assert v1("192.168.0.1", 56324, "192.168.0.11", 443) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    # what HAProxy's send-proxy-v2 sends for TCP4 172.19.0.1:42578 -> 172.19.0.3:80
    assert v2("172.19.0.1", 42578, "172.19.0.3", 80) == bytes.fromhex(
        "0d0a0d0a000d0a515549540a" "2111000c" "ac130001ac130003a6520050")
    with pytest.raises(ValueError):
        v1("1.2.3.4", 1, "::1", 2)
