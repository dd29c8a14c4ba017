"""The wire framing (protocol.md, "Frames"), sans-IO: bytes in, maps out.

Byte layout of one frame::

    0   u32 big-endian   N, the length of the body
    4   N bytes          the body: exactly one msgpack map

``FrameDecoder.feed`` takes whatever the socket delivered and returns the
items it completed, in order: a ``dict`` per good frame, or a
``ProtocolError`` to answer on the wire:

- N larger than the limit: ``ResourceExhausted``, fatal. The stream is then
  untrustworthy (the sender may keep streaming a body we refuse to buffer),
  so the decoder goes dead and drops everything fed to it afterwards.
- a body that is not exactly one msgpack map: ``InvalidArgument``, not fatal.
  The length prefix was honoured, so the next frame starts where expected.
- a body that holds more than ``FrameLimits`` allows (longer strings or
  containers, more elements in all, deeper nesting than a valid request of
  the served models can need): ``InvalidArgument``, not fatal, found while
  decoding, so a frame of millions of tiny objects costs what its first
  few thousand do, not seconds of the event loop.

``feed(data, max_items)`` decodes at most ``max_items`` frames and keeps the
rest of ``data`` undecoded (``backlog``) for the next call, so the caller can
bound the work one connection gets per event-loop turn.

Why the element count is only taken for frames longer than the element
budget: every msgpack object takes at least one byte, so a shorter frame
cannot exceed it, and the common small request pays nothing. Longer frames
are decoded with ``object_hook``/``list_hook``, which msgpack calls as each
container completes: the hooks add up container lengths (and nesting) and
stop the decode as soon as the budget is spent.

Nothing here does I/O; the caller owns the socket and the event loop.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import msgpack

from ipc.status import InvalidArgument, ProtocolError, ResourceExhausted

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Buffer  # collections.abc.Buffer is Python 3.12+

__all__ = ["DEFAULT_MAX_FRAME_BYTES", "HEADER", "FrameDecoder", "FrameLimits", "encode_body",
           "encode_frame"]

DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024

HEADER = struct.Struct(">I")
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_MAX_BODY = 2**32 - 1

_unpackb = msgpack.unpackb


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    # The protocol has no ext types; turning them into an error here keeps
    # ExtType objects from travelling into code that expects plain values.
    # Timestamps (ext -1) are decoded inside msgpack without calling this
    # hook: they come out as msgpack.Timestamp values, which no field of the
    # protocol accepts, so the request checks refuse them.
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


class FrameLimits:
    """What one frame's body may hold (msgpack's own per-object limits, plus
    a total): derived from the served models by the daemon
    (``daemon.front.limits.frame_limits``), shared by every connection's decoder
    and replaced whole on reload.

    - ``max_str``: longest string (names, keys, tokens, errors).
    - ``max_array``: longest array (a shape, one level of a nested list input).
    - ``max_map``: most keys of one map (the request, its inputs, a tensor).
    - ``max_elements``: elements of all containers together.
    - ``max_depth``: nesting of containers (the request map is depth 1).
    """

    __slots__ = ("max_str", "max_array", "max_map", "max_elements", "max_depth")

    def __init__(self, max_str: int = 65536, max_array: int = 1 << 20, max_map: int = 64,
                 max_elements: int = 1 << 20, max_depth: int = 32):
        self.max_str = max_str
        self.max_array = max_array
        self.max_map = max_map
        self.max_elements = max_elements
        self.max_depth = max_depth

    def __repr__(self) -> str:
        return ("FrameLimits(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)
                + ")")


class _Budget(Exception):
    """Raised inside a hook to stop msgpack: the frame holds too much."""


class _Counter:
    """The hooks of one decode: sums container lengths, tracks nesting.

    Nesting: a container completes after everything inside it, so when a
    hook runs its children already have their depth in ``depth`` (by id; they
    are all alive until the decode ends)."""

    __slots__ = ("left", "max_depth", "depth")

    def __init__(self, limits: FrameLimits):
        self.left = limits.max_elements
        self.max_depth = limits.max_depth
        self.depth: dict[int, int] = {}

    def _seen(self, obj: list[Any] | dict[Any, Any], children: Iterable[object]) -> None:
        self.left -= len(obj)
        if self.left < 0:
            raise _Budget("more elements in all than any valid request of the served "
                          "models needs")
        d = 1
        depth = self.depth
        for x in children:
            t = type(x)
            if t is list or t is dict:
                dx = depth.get(id(x), 1) + 1
                if dx > d:
                    d = dx
        if d > self.max_depth:
            raise _Budget(f"containers nested deeper than {self.max_depth} levels, more "
                          "than any valid request of the served models needs")
        if d > 1:
            depth[id(obj)] = d

    def on_list(self, lst: list[Any]) -> list[Any]:
        self._seen(lst, lst)
        return lst

    def on_map(self, d: dict[Any, Any]) -> dict[Any, Any]:
        self._seen(d, d.values())
        return d


_DEFAULT_LIMITS = FrameLimits()


class FrameDecoder:
    """Splits a byte stream into frames and decodes each body.

    Whole frames are decoded straight out of the caller's buffer through
    memoryview slices; only an incomplete tail is copied and kept.
    """

    __slots__ = ("max_frame_bytes", "limits", "_buf", "_need", "_dead", "_backlog", "buffered")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 limits: FrameLimits | None = None):
        if max_frame_bytes < 1 or max_frame_bytes > _MAX_BODY:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_BODY}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.limits = limits or _DEFAULT_LIMITS
        self._buf = bytearray()   # the incomplete frame, header included
        self._need = 0            # its total size once its header is known, else 0
        self._dead = False
        self._backlog = b""       # received but not yet decoded (feed's max_items)
        # Bytes held: the unfinished frame and the input not yet decoded
        # (len(_buf) + len(_backlog)), kept as they change: the front reads it
        # around every feed for its memory budget. Read it, never set it.
        self.buffered = 0

    @property
    def partial(self) -> int:
        """Bytes of the unfinished frame (0: the stream is between frames)."""
        return len(self._buf)

    @property
    def backlog(self) -> bool:
        """True when input is waiting to be decoded (call ``feed(b"")``)."""
        return bool(self._backlog)

    @property
    def dead(self) -> bool:
        """True after a fatal error: the connection must be closed."""
        return self._dead

    def feed(self, data: Buffer, max_items: int = 0) -> list[dict[str, Any] | ProtocolError]:
        """Consume ``data`` (bytes-like); return the dicts and errors it completed.

        With ``max_items``, stop after that many and keep the rest for the
        next call (``backlog``)."""
        if self._dead:
            return []
        out: list[dict[str, Any] | ProtocolError] = []
        if self._backlog:
            data = self._backlog + bytes(data)
            self._backlog = b""
        view = memoryview(data)
        if type(data) is not bytes and (view.itemsize != 1 or view.ndim != 1):
            view = view.cast("B")
        if self._buf:
            rest = self._complete(view, out)
            if rest is None:
                self.buffered = len(self._buf)
                return out
            view = rest

        # Fast path: frames that lie wholly inside `data` are decoded in place.
        pos, end = 0, len(view)
        limit = self.max_frame_bytes
        lim = self.limits
        small = lim.max_elements
        while end - pos >= _HEADER_SIZE:
            if max_items and len(out) >= max_items:
                self._backlog = bytes(view[pos:])
                self.buffered = len(self._backlog)
                return out
            (n,) = _unpack_header(view, pos)
            if n > limit:
                out.append(self._oversize(n))
                self.buffered = 0
                return out
            start = pos + _HEADER_SIZE
            if end - start < n:
                self._need = _HEADER_SIZE + n
                break
            pos = start + n
            body = view[start:pos]
            if n > small:
                out.append(_decode_body(body, lim))
                continue
            # _decode_body inlined for short bodies: this is the per-request hot path.
            try:
                obj = _unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                               max_str_len=lim.max_str, max_bin_len=n,
                               max_array_len=lim.max_array, max_map_len=lim.max_map,
                               max_ext_len=n)
            except Exception as e:
                obj = _undecodable(body, e)
            else:
                if type(obj) is not dict:
                    obj = _not_a_map(obj)
            out.append(obj)
        if pos < end:
            self._buf = bytearray(view[pos:])
            self.buffered = end - pos
        elif self.buffered:
            self.buffered = 0
        return out

    def drop(self) -> int:
        """Give up this stream (the connection is being closed): free what is
        buffered and decode nothing more. Returns the bytes freed."""
        n = self.buffered
        self._dead = True
        self._buf = bytearray()
        self._backlog = b""
        self._need = 0
        self.buffered = 0
        return n

    def _complete(self, view: memoryview,
                  out: list[dict[str, Any] | ProtocolError]) -> memoryview | None:
        """Top up the pending frame from ``view``; return what is left of it.

        Returns None when ``view`` was used up (or the frame was refused)
        before any byte of a following frame.
        """
        buf = self._buf
        if not self._need:
            # Only part of the header so far: take just enough to read it.
            take = _HEADER_SIZE - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < _HEADER_SIZE:
                return None
            (n,) = _unpack_header(buf)
            if n > self.max_frame_bytes:
                out.append(self._oversize(n))
                return None
            self._need = _HEADER_SIZE + n
        missing = self._need - len(buf)
        if len(view) < missing:
            buf += view
            return None
        buf += view[:missing]
        # A fresh bytearray rather than clearing in place: a view of the old
        # one may still be alive in an exception, and resizing it would fail.
        self._buf = bytearray()
        self._need = 0
        out.append(_decode_body(memoryview(buf)[_HEADER_SIZE:], self.limits))
        return view[missing:]

    def _oversize(self, n: int) -> ResourceExhausted:
        self._dead = True
        self._buf = bytearray()
        self._need = 0
        self.buffered = 0
        return ResourceExhausted(
            f"frame of {n} bytes exceeds the server's limit of {self.max_frame_bytes} bytes "
            "(server.max_frame_bytes); send smaller requests or raise the limit",
            fatal=True)


def _decode_body(body: memoryview,
                 lim: FrameLimits = _DEFAULT_LIMITS) -> dict[str, Any] | ProtocolError:
    n = len(body)
    # The per-object limits stop a 10-byte header claiming a 4 GiB string
    # (or a billion-entry array) from allocating it; the hooks bound the total.
    counter = _Counter(lim) if n > lim.max_elements else None
    try:
        obj = _unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                       max_str_len=lim.max_str, max_bin_len=n, max_array_len=lim.max_array,
                       max_map_len=lim.max_map, max_ext_len=n,
                       object_hook=counter.on_map if counter else None,
                       list_hook=counter.on_list if counter else None)
    except _Budget as e:
        return InvalidArgument(f"frame body of {n} bytes holds {e}; each frame must hold "
                               "one request map", req_id=_salvage_id(body))
    except Exception as e:  # msgpack raises ValueError, TypeError, UnicodeDecodeError...
        return _undecodable(body, e)
    if type(obj) is not dict:
        return _not_a_map(obj)
    return obj


def _undecodable(body: memoryview, e: Exception) -> InvalidArgument:
    n = len(body)
    if n == 0:
        return InvalidArgument("frame body is empty; each frame must hold exactly one msgpack map")
    if isinstance(e, msgpack.ExtraData):
        problem = "holds bytes after the end of the first msgpack object"
    else:
        # msgpack's own wording, minus its option names; FormatError has none.
        detail = str(e).replace(" when strict_map_key=True", "; keys must be strings")
        problem = f"is not valid msgpack for this protocol ({detail or type(e).__name__})"
    return InvalidArgument(
        f"frame body of {n} bytes {problem}; each frame must hold exactly one msgpack map",
        req_id=_salvage_id(body))


def _not_a_map(obj: object) -> InvalidArgument:
    return InvalidArgument(
        f"frame body is a msgpack {_kind(obj)}, not a map; each frame must hold exactly "
        "one msgpack map like {\"id\": 1, \"model\": ..., \"inputs\": ...}")


def _kind(obj: object) -> str:
    if obj is None:
        return "nil"
    return {list: "array", str: "string", bytes: "bin", bool: "boolean",
            int: "integer", float: "float"}.get(type(obj), type(obj).__name__)


def _salvage_id(body: memoryview) -> int:
    """The request id of a body that failed to decode, or 0.

    Reads the map entry by entry, so an id that comes before the bad part
    (clients put it first) is still found and the error reaches its caller.
    Only the first entries are looked at, and keys are read with the
    default limits' bounds, so a hostile body costs no more here than it did
    to refuse.
    """
    lim = _DEFAULT_LIMITS
    try:
        u = msgpack.Unpacker(raw=False, strict_map_key=False, ext_hook=_refuse_ext,
                             max_buffer_size=max(len(body), 1), max_str_len=lim.max_str,
                             max_array_len=16, max_map_len=16, max_bin_len=lim.max_str)
        u.feed(body)
        for _ in range(min(u.read_map_header(), 16)):
            if u.unpack() == "id":
                rid = u.unpack()
                return rid if type(rid) is int and 0 <= rid < 2**53 else 0
            u.skip()
    except Exception:
        pass
    return 0


# One Packer per thread: reusing it saves ~0.25 us a call over packb, but its
# buffer is shared state, so threads must not share one.
_local = threading.local()


def _packer() -> msgpack.Packer:
    p = _local.__dict__.get("packer")
    if p is None:
        p = _local.packer = msgpack.Packer(use_bin_type=True)
    return p


def encode_body(msg: dict[str, Any]) -> bytes:
    """The msgpack body of ``msg``; bytes, bytearray and memoryview pack as bin.

    A memoryview must be C-contiguous (BufferError otherwise).
    """
    try:
        pk: msgpack.Packer = _local.packer
    except AttributeError:
        pk = _packer()
    return pk.pack(msg)


def encode_frame(msg: dict[str, Any]) -> bytes:
    """Header + body of ``msg``, ready to write.

    To skip the concatenation copy of a large body, write
    ``(HEADER.pack(len(body)), body)`` with ``writelines`` instead.
    """
    try:
        pk: msgpack.Packer = _local.packer
    except AttributeError:
        pk = _packer()
    body = pk.pack(msg)
    if len(body) > _MAX_BODY:
        raise ValueError(f"message of {len(body)} bytes does not fit a frame (max {_MAX_BODY})")
    return _pack_header(len(body)) + body
