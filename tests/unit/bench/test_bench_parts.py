"""The benchmark's pure parts: keys and frames, config variants, the sweep's
knee, the plots' series, and the compute-bound model of bench/models.py."""

from __future__ import annotations

import tomllib
from collections import Counter

import numpy as np
import pytest
import torch

from bench import report, variants
from bench.keys import Frames, Keys
from bench.models import encoder
from bench.plot import cdf, over_time
from bench.servers import REPO
from daemon.config import load_config
from ipc.framing import FrameDecoder, encode_frame

REQUEST = {"model": "demo", "inputs": {"dtype": "float32", "shape": [2], "data": bytes(8)}}


def draws(keys: Keys, n: int) -> Counter:
    return Counter(next(keys.indices) for _ in range(n))


def test_uniform_keys_cover_the_population():
    c = draws(Keys(100, "uniform", seed=1), 20000)
    assert set(c) == set(range(100))
    assert max(c.values()) < 2 * min(c.values())


def test_zipf_keys_are_skewed_and_seeded():
    c = draws(Keys(1000, "zipf", s=1.1, seed=1), 20000)
    assert c.most_common(1)[0][0] == 0                       # user-0 is the heaviest
    top = sum(n for i, n in c.items() if i < 100)
    assert top > 0.6 * 20000                                  # 10% of users, most of the traffic
    assert draws(Keys(1000, "zipf", seed=7), 500) == draws(Keys(1000, "zipf", seed=7), 500)
    assert draws(Keys(1000, "zipf", seed=7), 500) != draws(Keys(1000, "zipf", seed=8), 500)


@pytest.mark.parametrize("args", [(0,), (10, "pareto"), (10, "zipf", 0.0)])
def test_bad_key_settings(args):
    with pytest.raises(ValueError):
        Keys(*args)


def test_frames_without_keys_are_the_plain_encoding():
    f = Frames(REQUEST)
    assert f.get(3) == encode_frame({"id": 3, **REQUEST})
    assert f.get(3) is f.get(3)   # packed once


def test_keyed_frames_decode_to_the_request_with_id_and_key():
    f = Frames(dict(REQUEST, exp="e1"), Keys(5, seed=3))
    msgs = FrameDecoder().feed(b"".join(f.get(i) for i in (1, 2, 1, 40)))
    assert [m["id"] for m in msgs] == [1, 2, 1, 40]
    for m in msgs:
        assert list(m)[0] == "id" and m["key"] in {f"user-{i}" for i in range(5)}
        assert {k: v for k, v in m.items() if k not in ("id", "key")} == dict(REQUEST, exp="e1")
    assert len({m["key"] for m in FrameDecoder().feed(b"".join(f.get(1) for _ in range(50)))}) > 1
    with pytest.raises(ValueError):
        Frames(dict(REQUEST, key="fixed"))


CONFIG_WITH_EVERYTHING = """
title = "top-level scalars come before the tables"

[server]
host = "127.0.0.1"
deadline_ms = 250
ratio = 0.5
neg_inf = -inf

[[models]]
name = "demo"
factory = "daemon.workers.zoo:mlp_scorer"
inputs = { ids = { dtype = "int64", shape = [4] }, "odd key" = { dtype = "float32", shape = [] } }
devices = ["cpu", "cpu"]
max_batch = 16
buckets = [1, 4, 16]
note = "quotes \\" and unicode \u00fc and a\\ttab"

[[experiments]]
id = "e1"
model = "demo"
salt = "s"
arms = [{ name = "a", split = 0.5 }, { name = "b", split = 0.5, on = true }]
"""


def test_toml_dumps_reads_back_as_read():
    doc = tomllib.loads(CONFIG_WITH_EVERYTHING)
    assert tomllib.loads(variants.dumps(doc)) == doc
    for path in ("configs/default.toml", "bench/configs/encoder.toml"):
        with open(REPO / path, "rb") as f:
            doc = tomllib.load(f)
        assert tomllib.loads(variants.dumps(doc)) == doc


def test_batching_off_variant_is_beside_the_original_and_removed(tmp_path):
    src = tmp_path / "my.toml"
    src.write_text((REPO / "configs/default.toml").read_text().replace(
        "max_batch = 64", "max_batch = 64\nbuckets = [1, 8, 64]"))
    with variants.variant(src, variants.without_batching, "max_batch-1") as path:
        assert str(tmp_path) in path
        (tmp_path / (path.rsplit("/", 1)[1][:-5] + ".state.json")).write_text("{}")  # a side file
        cfg = load_config(path)
        (m,) = cfg.models
        assert (m.max_batch, tuple(m.buckets), m.factory) == (1, (1,), "daemon.zoo:mlp_scorer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.toml"]
    assert load_config(src).models[0].max_batch == 64


def point(offered, answered, p99, not_ok=0):
    return {"offered_rps": offered, "throughput_rps": answered, "p99_us": p99, "not_ok": not_ok}


def test_knee_is_the_last_rate_before_latency_or_delivery_breaks():
    pts = [point(100, 100, 300), point(200, 199, 400), point(400, 398, 590), point(800, 700, 5000)]
    assert report.knee(pts)["offered_rps"] == 400
    assert report.knee(pts[:2] + [point(400, 398, 650)])["offered_rps"] == 200   # p99 > 2x
    assert report.knee(pts[:2] + [point(400, 400, 300, not_ok=3)])["offered_rps"] == 200
    assert report.knee([point(100, 50, 300)]) is None
    assert report.knee(list(reversed(pts)))["offered_rps"] == 400                # order-free


def test_latency_over_time_bins_and_cdf():
    at = np.array([0.01, 0.05, 0.12, 0.31, 0.32, 0.33])
    lat = np.array([10.0, 30.0, 5.0, 1.0, 2.0, 100.0])
    s = over_time(at, lat)
    assert s["t"] == pytest.approx([0.0, 0.1, 0.3])
    assert s["max"] == [30.0, 5.0, 100.0] and s["p50"][0] == 20.0
    x, y = cdf(np.arange(1.0, 101.0), points=5)
    assert x[0] == 1.0 and x[-1] == 100.0 and list(y) == [0, 0.25, 0.5, 0.75, 1.0]
    assert over_time(np.array([]), np.array([]))["t"] == []


def test_encoder_is_deterministic_and_batch_independent():
    a, b = encoder(), encoder()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                             strict=True))
    ids = torch.randint(0, 1024, (5, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batch = a(ids)
        alone = torch.cat([a(ids[i:i + 1]) for i in range(5)])
        padded = a(torch.cat([ids, torch.zeros(3, 32, dtype=torch.int64)]))[:5]
    assert batch.shape == (5, 2) and torch.allclose(batch.sum(1), torch.ones(5))
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, batch, rtol=0, atol=1e-5)
    m = load_config(REPO / "bench/configs/encoder.toml").model("encoder")
    assert m.factory == "bench.models:encoder" and m.max_batch == 32


class _RecordingLibc:
    """bench.timer's libc, with every timerfd_settime call recorded."""

    def __init__(self, libc):
        self.libc = libc
        self.settime: list[tuple[int, int]] = []   # (flags, absolute time in ns)

    def timerfd_create(self, *args):
        return self.libc.timerfd_create(*args)

    def timerfd_settime(self, fd, flags, spec_ref, old):
        v = spec_ref._obj.it_value
        self.settime.append((flags, v.tv_sec * 1_000_000_000 + v.tv_nsec))
        return self.libc.timerfd_settime(fd, flags, spec_ref, old)


@pytest.mark.parametrize("precise", [True, False])
def test_precise_timer_fires_once_at_its_time_and_can_be_moved(monkeypatch, precise):
    """The open loop's arrival timer: never early, once, and re-arming
    replaces the earlier time. Its precision is a property of what it asks
    the kernel for, checked without a clock: the timerfd is armed at the
    arrival's own nanosecond (absolute), not a whole millisecond as
    uvloop's timers are. How late it fires in practice is the benchmark's
    business (bench/timer.py's docstring has the figures)."""
    import asyncio
    import time

    import uvloop

    from bench import timer as timer_mod
    if not precise:
        monkeypatch.setattr(timer_mod, "_LIBC", None)
    elif timer_mod._LIBC is not None:
        monkeypatch.setattr(timer_mod, "_LIBC", _RecordingLibc(timer_mod._LIBC))

    async def main():
        loop = asyncio.get_running_loop()
        fired = []
        t = timer_mod.PreciseTimer(loop, lambda: fired.append(time.perf_counter_ns()))
        assert t.precise is (precise and timer_mod._LIBC is not None)
        armed = []
        for k in range(20):
            fired.clear()
            due = time.perf_counter_ns() + 300_000 + k * 1_001   # not on a millisecond
            t.at(due + 10_000_000)   # replaced before it is due
            t.at(due)
            armed.append(due)
            t_end = time.monotonic() + 30
            while not fired:   # until it fires: a poll, not a guess at how long that takes
                assert time.monotonic() < t_end, "the timer never fired"
                await asyncio.sleep(0.001)
            # past the replaced time too: it must not fire a second time
            while time.perf_counter_ns() < due + 10_000_000 + 2_000_000:
                await asyncio.sleep(0.005)
            assert len(fired) == 1 and fired[0] >= due
        t.close()
        return armed

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        armed = runner.run(main())
    if precise and isinstance(timer_mod._LIBC, _RecordingLibc):
        calls = timer_mod._LIBC.settime
        assert all(flags == timer_mod._TFD_TIMER_ABSTIME for flags, _ in calls)
        assert [ns for _, ns in calls[1::2]] == armed   # every second call: the time that stayed


def test_the_load_generator_counts_fallback_answers_apart():
    """An OK answer marked ``fallback`` is a fallback's, not the model's:
    its status is ``fallback:<reason>`` in the figures, not 0."""
    import asyncio

    from bench.load import _Conn, _Run
    loop = asyncio.new_event_loop()
    try:
        run = _Run(loop, grace=1.0)
        run.t0, run.t1 = 0, 10**18
        conn = _Conn(run)
        conn.sent = [0, 5, 5, 5]
        conn.inflight = 3
        data = b"".join(encode_frame(a) for a in (
            {"id": 1, "status": 0, "lane": "stable", "arm": None},
            {"id": 2, "status": 0, "fallback": "queue_full", "lane": "stable", "arm": None},
            {"id": 3, "status": 8, "error": "busy", "lane": None, "arm": None}))
        assert conn.answered(data, now=100) == [1, 2, 3]
    finally:
        loop.close()
    assert run.statuses == {0: 1, "fallback:queue_full": 1, 8: 1}
