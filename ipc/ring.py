"""The shared-memory ring between one front process and one worker.

One segment per (front, worker) pair holds a *request ring* and a *result
ring* of the same depth: result slot ``i`` answers request slot ``i``. The
front is the only writer of request slots and of ``submitted``; the worker is
the only writer of result slots and of ``completed``. Each side only ever
reads the other's counter, so no lock is needed (single producer, single
consumer in each direction).

A request slot carries a whole *batch*: the front copies each request's
tensor bytes (already validated) straight from the decoded frame into row
``r`` of the slot's input regions, once; the worker reads the region as a
``[bucket, *shape]`` tensor view of the shared memory, with no copy and no
pickling. The worker zeroes padding rows ``n..bucket`` so that a padded batch
is deterministic.

Byte layout (all integers little-endian; offsets in bytes)::

    header (HEADER_BYTES = 4096, so slots start page-aligned)
      0   u32 magic  b"RSRG"
      4   u32 layout version (LAYOUT_VERSION)
      8   u32 depth           number of slots
      12  u32 max_batch       rows per slot
      16  u32 n_inputs
      20  u32 n_outputs
      24  u64 slot_bytes
      32  u64 err_bytes       bytes of the error message area per slot
      64  u64 submitted       batches handed over by the front (front writes)
      128 u64 completed       batches finished by the worker (worker writes)
      192 u64 heartbeat_ns    worker's CLOCK_MONOTONIC at its last batch
      256 u64[n_inputs]       bytes of one sample of each input
          u64[n_outputs]      bytes of one sample of each output
    slot i at HEADER_BYTES + i * slot_bytes
      0   request header  (REQ: u64 seq, u32 n, u32 bucket, u64 submit_ns)
      64  result header   (RES: u64 seq, u32 n, u32 status, u64 compute_ns, u32 err_len,
                           u32 ran, u32 ran_bucket, u8 lead: the forward pass it ran in)
      128 input k region:  max_batch * input_nbytes[k], each 64-aligned
          output k region: max_batch * output_nbytes[k], each 64-aligned
          error area:      err_bytes (UTF-8 message when status != 0)
      slot_bytes is rounded up to 4096.

The counters live on separate 64-byte cache lines so the two processes do not
false-share. Batch ``b`` (0-based) lives in slot ``b % depth``; the front may
have at most ``depth`` batches not yet consumed. Publishing order: the payload
and header are written before the counter is bumped, and every bump is
followed by an eventfd write (a syscall, hence a full barrier) on the
writer's side, and read after an eventfd read or a poll on the reader's side.
x86's store ordering also makes a spinning reader safe; other architectures
must only read after a wake-up.

Wake-ups cost one syscall per batch each way, never one per request. The
eventfds are not this module's: the daemon's supervisor makes one wake
eventfd per worker, which every front writes, and one done eventfd per ring,
which the worker writes (daemon/supervisor/children.py). In the daemon a
ring lives in a memfd (``create_anonymous`` / ``from_fd``), never named in
/dev/shm.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

from .shm import Segment

MAGIC = b"RSRG"
LAYOUT_VERSION = 2
HEADER_BYTES = 4096
ALIGN = 64
PAGE = 4096
DEFAULT_ERR_BYTES = 1024

_FIXED = struct.Struct("<4sIIIIIQQ")  # magic .. err_bytes, at offset 0
REQ = struct.Struct("<QIIQ")  # seq, n, bucket, submit_ns
RES = struct.Struct("<QIIQI")  # seq, n, status, compute_ns, err_len
RAN = struct.Struct("<IIB")    # ran, ran_bucket, lead: right after RES
REQ_OFF = 0
RES_OFF = 64
DATA_OFF = 128
SCHEMA_OFF = 256
# u64 indices of the counters in the header
_SUBMITTED = 64 // 8
_COMPLETED = 128 // 8
_HEARTBEAT = 192 // 8
MAX_TENSORS = (HEADER_BYTES - SCHEMA_OFF) // 8

# What a closed Ring's views become: any use of a released memoryview raises
# ValueError, and releasing it again is a no-op, so close() may run twice.
_CLOSED = memoryview(b"")
_CLOSED.release()


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _open_buf(seg: Segment) -> memoryview:
    """The segment's view; a closed segment (``buf`` None) cannot hold a ring."""
    if seg.buf is None:
        raise ValueError(f"segment {seg.name!r} is closed")
    return seg.buf


class RingLayout:
    """Offsets of every region, computed once from the schema."""

    def __init__(self, depth: int, max_batch: int, input_nbytes: Iterable[int],
                 output_nbytes: Iterable[int], err_bytes: int = DEFAULT_ERR_BYTES):
        ins = tuple(int(x) for x in input_nbytes)
        outs = tuple(int(x) for x in output_nbytes)
        if depth < 1 or max_batch < 1:
            raise ValueError("depth and max_batch must be at least 1")
        if not ins or not outs:
            raise ValueError("a ring needs at least one input and one output")
        if len(ins) + len(outs) > MAX_TENSORS:
            raise ValueError(f"at most {MAX_TENSORS} inputs and outputs together")
        self.depth = depth
        self.max_batch = max_batch
        self.input_nbytes = ins
        self.output_nbytes = outs
        self.err_bytes = err_bytes
        off = DATA_OFF
        self.input_offsets: list[int] = []
        for nb in ins:
            self.input_offsets.append(off)
            off = _align(off + max_batch * nb, ALIGN)
        self.output_offsets: list[int] = []
        for nb in outs:
            self.output_offsets.append(off)
            off = _align(off + max_batch * nb, ALIGN)
        self.err_offset = off
        self.slot_bytes = _align(off + err_bytes, PAGE)
        self.total_bytes = HEADER_BYTES + depth * self.slot_bytes

    def slot_base(self, slot: int) -> int:
        return HEADER_BYTES + slot * self.slot_bytes

    def write_header(self, buf: memoryview) -> None:
        _FIXED.pack_into(buf, 0, MAGIC, LAYOUT_VERSION, self.depth, self.max_batch,
                         len(self.input_nbytes), len(self.output_nbytes),
                         self.slot_bytes, self.err_bytes)
        struct.pack_into(f"<{len(self.input_nbytes) + len(self.output_nbytes)}Q", buf,
                         SCHEMA_OFF, *self.input_nbytes, *self.output_nbytes)

    @classmethod
    def read_header(cls, buf: memoryview) -> "RingLayout":
        (magic, ver, depth, max_batch, n_in, n_out, slot_bytes,
         err_bytes) = _FIXED.unpack_from(buf, 0)
        if magic != MAGIC or ver != LAYOUT_VERSION:
            raise ValueError(f"not a ringserve ring (magic {magic!r}, layout version {ver})")
        sizes = struct.unpack_from(f"<{n_in + n_out}Q", buf, SCHEMA_OFF)
        layout = cls(depth, max_batch, sizes[:n_in], sizes[n_in:], err_bytes)
        if layout.slot_bytes != slot_bytes:
            raise ValueError("ring header disagrees with its own layout")
        return layout


class Ring:
    """Both ends of a ring over one segment; each process uses its own half.

    The front calls ``create``, ``free``, ``input_view``, ``submit``,
    ``completed``, ``result``, ``output_view``, ``release``. The worker calls
    ``attach``, ``submitted``, ``request``, and ``complete``.
    """

    def __init__(self, seg: Segment, layout: RingLayout):
        buf = _open_buf(seg)
        self.seg = seg
        self.layout = layout
        self.name = seg.name
        self._buf = buf
        self._u64 = buf[:HEADER_BYTES].cast("Q")
        depth = layout.depth
        self._req_off = [layout.slot_base(i) + REQ_OFF for i in range(depth)]
        self._res_off = [layout.slot_base(i) + RES_OFF for i in range(depth)]
        self._views: list[memoryview] = []
        # front-only bookkeeping (the worker keeps its own position)
        self.consumed = 0
        self._submitted = 0

    # -- construction -------------------------------------------------
    @classmethod
    def create(cls, name: str, layout: RingLayout) -> "Ring":
        seg = Segment.create(name, layout.total_bytes)
        try:
            layout.write_header(_open_buf(seg))
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        return cls(seg, layout)

    @classmethod
    def create_anonymous(cls, name: str, layout: RingLayout) -> tuple["Ring", int]:
        """A ring in a memfd (``Segment.anonymous``) and its descriptor, for
        the daemon: the supervisor creates it, the front and the worker
        attach it with ``from_fd``."""
        seg, fd = Segment.anonymous(name, layout.total_bytes)
        try:
            layout.write_header(_open_buf(seg))
        except BaseException:
            seg.close()
            os.close(fd)
            raise
        return cls(seg, layout), fd

    @classmethod
    def from_fd(cls, fd: int, name: str) -> "Ring":
        return cls._over(Segment.from_fd(fd, name))

    @classmethod
    def attach(cls, name: str) -> "Ring":
        return cls._over(Segment.attach(name))

    @classmethod
    def _over(cls, seg: Segment) -> "Ring":
        """The ring in an attached segment (closed again if its header is bad)."""
        try:
            layout = RingLayout.read_header(_open_buf(seg))
        except BaseException:
            seg.close()
            raise
        return cls(seg, layout)

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views.clear()
        self._u64.release()
        self._u64 = _CLOSED
        self._buf = _CLOSED
        self.seg.close()

    def unlink(self) -> None:
        self.seg.unlink()

    # -- regions --------------------------------------------------------
    def _view(self, off: int, nbytes: int) -> memoryview:
        v = self._buf[off:off + nbytes]
        self._views.append(v)
        return v

    def input_view(self, slot: int, k: int) -> memoryview:
        lay = self.layout
        return self._view(lay.slot_base(slot) + lay.input_offsets[k],
                          lay.max_batch * lay.input_nbytes[k])

    def output_view(self, slot: int, k: int) -> memoryview:
        lay = self.layout
        return self._view(lay.slot_base(slot) + lay.output_offsets[k],
                          lay.max_batch * lay.output_nbytes[k])

    def region_offset(self, slot: int, kind: str, k: int) -> int:
        """Byte offset of a region inside the segment (for tensor views)."""
        lay = self.layout
        offs = lay.input_offsets if kind == "input" else lay.output_offsets
        return lay.slot_base(slot) + offs[k]

    # -- front side -----------------------------------------------------
    def free(self) -> int:
        """Slots the front may fill now."""
        return self.layout.depth - (self._submitted - self.consumed)

    def next_slot(self) -> int:
        return self._submitted % self.layout.depth

    def submit(self, seq: int, n: int, bucket: int, submit_ns: int) -> int:
        """Publish the batch already written into ``next_slot()``."""
        if self.free() <= 0:
            raise RuntimeError("ring full: submit() without a free slot")
        slot = self._submitted % self.layout.depth
        REQ.pack_into(self._buf, self._req_off[slot], seq, n, bucket, submit_ns)
        self._submitted += 1
        self._u64[_SUBMITTED] = self._submitted
        return slot

    def completed(self) -> int:
        return self._u64[_COMPLETED]

    def result(self, slot: int) -> tuple[int, int, int, int, str]:
        """(seq, n, status, compute_ns, error) of a finished slot."""
        seq, n, status, compute_ns, err_len = RES.unpack_from(self._buf, self._res_off[slot])
        err = ""
        if status:
            off = self.layout.slot_base(slot) + self.layout.err_offset
            end = off + min(err_len, self.layout.err_bytes)
            err = bytes(self._buf[off:end]).decode("utf-8", "replace")
        return seq, n, status, compute_ns, err

    def ran(self, slot: int) -> tuple[int, int, bool]:
        """(rows, bucket, lead) of the forward pass a finished slot ran in: a
        worker that merged the batches of several rings into one pass
        (daemon/workers/child.py) says so here; ``lead`` marks the one ring of the
        merge whose front counts the pass in its statistics."""
        ran, bucket, lead = RAN.unpack_from(self._buf, self._res_off[slot] + RES.size)
        return ran, bucket, bool(lead)

    def release(self) -> None:
        """The front has read the oldest finished slot; it may be refilled."""
        self.consumed += 1

    @property
    def in_flight(self) -> int:
        return self._submitted - self.consumed

    # -- worker side ----------------------------------------------------
    def submitted(self) -> int:
        return self._u64[_SUBMITTED]

    def request(self, slot: int) -> tuple[int, int, int, int]:
        """(seq, n, bucket, submit_ns) of a submitted slot."""
        return REQ.unpack_from(self._buf, self._req_off[slot])

    def complete(self, slot: int, seq: int, n: int, status: int, compute_ns: int,
                 error: str = "", now_ns: int = 0, ran: int = 0, ran_bucket: int = 0,
                 lead: bool = True) -> None:
        err = b""
        if status:
            err = error.encode("utf-8", "replace")[: self.layout.err_bytes]
            off = self.layout.slot_base(slot) + self.layout.err_offset
            self._buf[off:off + len(err)] = err
        RES.pack_into(self._buf, self._res_off[slot], seq, n, status, compute_ns, len(err))
        RAN.pack_into(self._buf, self._res_off[slot] + RES.size, ran or n, ran_bucket, lead)
        if now_ns:
            self._u64[_HEARTBEAT] = now_ns
        self._u64[_COMPLETED] = self._u64[_COMPLETED] + 1

    def heartbeat_ns(self) -> int:
        return self._u64[_HEARTBEAT]
