"""The shared-memory ring: layout, wrap-around, full, and two real processes."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ipc import shm
from ipc.ring import HEADER_BYTES, PAGE, Ring, RingLayout


def _name() -> str:
    return f"ringserve-{os.getpid()}-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ring():
    r = Ring.create(_name(), RingLayout(depth=3, max_batch=4, input_nbytes=[8, 12],
                                        output_nbytes=[4]))
    yield r
    r.close()
    r.unlink()
    assert not os.path.exists(f"/dev/shm/{r.name}")


def test_layout_offsets_aligned_and_disjoint():
    lay = RingLayout(depth=2, max_batch=5, input_nbytes=[512, 12], output_nbytes=[8, 3])
    assert lay.slot_bytes % PAGE == 0
    assert lay.total_bytes == HEADER_BYTES + 2 * lay.slot_bytes
    regions = sorted(
        [(o, o + 5 * n) for o, n in zip(lay.input_offsets, lay.input_nbytes, strict=True)] +
        [(o, o + 5 * n) for o, n in zip(lay.output_offsets, lay.output_nbytes, strict=True)] +
        [(lay.err_offset, lay.err_offset + lay.err_bytes)])
    for (_a0, a1), (b0, _b1) in zip(regions, regions[1:], strict=False):
        assert a1 <= b0
    assert all(o % 64 == 0 for o in lay.input_offsets + lay.output_offsets)
    assert regions[-1][1] <= lay.slot_bytes


def test_attach_reads_layout_from_header(ring):
    other = Ring.attach(ring.name)
    try:
        assert other.layout.input_nbytes == (8, 12)
        assert other.layout.output_nbytes == (4,)
        assert other.layout.depth == 3 and other.layout.max_batch == 4
    finally:
        other.close()


def test_attach_refuses_foreign_segment():
    seg = shm.Segment.create(_name(), 8192)
    try:
        with pytest.raises(ValueError, match="not a ringserve ring"):
            Ring.attach(seg.name)
    finally:
        seg.close()
        seg.unlink()


def test_full_and_wrap_around(ring):
    worker = Ring.attach(ring.name)
    try:
        done = 0
        for batch in range(10):  # 10 batches through 3 slots: wraps three times
            slot = ring.next_slot()
            assert slot == batch % 3
            ring.input_view(slot, 0)[:8] = batch.to_bytes(8, "little")
            ring.submit(batch + 100, 1, 1, 0)
            if ring.free() == 0:
                with pytest.raises(RuntimeError, match="ring full"):
                    ring.submit(0, 1, 1, 0)
            # worker side: drain what is submitted
            while done < worker.submitted():
                s = done % 3
                seq, n, bucket, _ = worker.request(s)
                value = int.from_bytes(worker.input_view(s, 0)[:8], "little")
                worker.output_view(s, 0)[:4] = (value * 2).to_bytes(4, "little")
                worker.complete(s, seq, n, 0, 1234)
                done += 1
            while ring.consumed < ring.completed():
                s = ring.consumed % 3
                seq, n, status, compute_ns, err = ring.result(s)
                assert (seq, n, status, compute_ns, err) == (batch + 100, 1, 0, 1234, "")
                assert int.from_bytes(ring.output_view(s, 0)[:4], "little") == batch * 2
                ring.release()
        assert ring.free() == 3 and ring.in_flight == 0
    finally:
        worker.close()


def test_error_message_travels(ring):
    worker = Ring.attach(ring.name)
    try:
        ring.submit(1, 2, 2, 0)
        worker.complete(0, 1, 2, 13, 0, "the model raised ValueError: ü" * 100)
        seq, n, status, _, err = ring.result(0)
        assert status == 13 and err.startswith("the model raised ValueError: ü")
        assert len(err.encode()) <= ring.layout.err_bytes
    finally:
        worker.close()


def test_two_processes_with_eventfd_wakeups(ring):
    """A real second process attaches by name and answers 200 batches,
    woken by eventfd, one write per batch each way."""
    wake = os.eventfd(0)
    done = os.eventfd(0)
    child = textwrap.dedent(f"""
        import os, sys
        from ipc.ring import Ring
        r = Ring.attach({ring.name!r})
        pos = 0
        while pos < 200:
            if r.submitted() == pos:
                os.read({wake}, 8)
                continue
            s = pos % r.layout.depth
            seq, n, bucket, _ = r.request(s)
            iv = r.input_view(s, 1)
            total = sum(iv[:12 * n])
            r.output_view(s, 0)[:4] = total.to_bytes(4, "little")
            r.complete(s, seq, n, 0, 0)
            pos += 1
            os.write({done}, (1).to_bytes(8, "little"))
        r.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", child], pass_fds=(wake, done),
                         cwd=str(Path(__file__).resolve().parents[3]))
    try:
        sent = got = 0
        t_end = time.monotonic() + 30
        while got < 200:
            assert time.monotonic() < t_end, "the child did not answer in time"
            while sent < 200 and ring.free():
                slot = ring.next_slot()
                n = sent % 4 + 1
                ring.input_view(slot, 1)[:12 * n] = bytes([sent % 7]) * (12 * n)
                ring.submit(sent, n, n, 0)
                os.write(wake, (1).to_bytes(8, "little"))
                sent += 1
            # bounded: a child that died never writes, and os.read would block for good
            ready, _, _ = select.select([done], [], [], max(0.0, t_end - time.monotonic()))
            assert ready, "the child did not answer in time"
            os.read(done, 8)
            while ring.consumed < ring.completed():
                s = ring.consumed % ring.layout.depth
                seq, n, status, _, _ = ring.result(s)
                assert seq == got and n == got % 4 + 1
                assert int.from_bytes(ring.output_view(s, 0)[:4], "little") == (got % 7) * 12 * n
                ring.release()
                got += 1
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(wake)
        os.close(done)


def test_sweep_stale_removes_dead_fronts_only():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(60)
    stale = shm.Segment.create(f"ringserve-{dead.pid}-x-{uuid.uuid4().hex[:6]}", 4096)
    mine = shm.Segment.create(_name(), 4096)
    stale.close()
    try:
        removed = shm.sweep_stale()
        assert stale.name in removed
        assert not os.path.exists(f"/dev/shm/{stale.name}")
        assert os.path.exists(f"/dev/shm/{mine.name}")
    finally:
        mine.close()
        mine.unlink()
        shm.unlink_name(stale.name)
