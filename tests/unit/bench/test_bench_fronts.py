"""The benchmark's multi-front parts, pure: the ``[server] fronts = N``
config variant (``python -m bench --fronts N``, ``python -m bench.scale``),
the process roles of a daemon's tree, and the fronts' stats summed."""

from __future__ import annotations

import tomllib

import pytest

from bench import report, variants
from bench.__main__ import _args, config_change
from bench.fronts import front_of, merge
from bench.servers import REPO, role_of
from daemon.config import load_config


def test_fronts_variant_is_beside_the_original_and_removed(tmp_path):
    src = tmp_path / "my.toml"
    text = (REPO / "configs/default.toml").read_text()
    src.write_text(text)
    with variants.variant(src, variants.with_fronts(4), "fronts-4") as path:
        assert str(tmp_path) in path
        cfg = load_config(path)   # what the daemon reads: valid, and 4 fronts
        assert cfg.server.fronts == 4
        assert cfg.metrics.enabled is False   # still one front's: refused with fronts > 1
        orig = load_config(src)
        assert [(m.name, m.factory, m.max_batch) for m in cfg.models] == \
            [(m.name, m.factory, m.max_batch) for m in orig.models]
        assert ((cfg.server.host, cfg.server.deadline_ms)
                == (orig.server.host, orig.server.deadline_ms))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my.toml"]
    assert src.read_text() == text   # the user's file is never written


def test_fronts_change_keeps_every_other_key():
    doc = tomllib.loads((REPO / "configs/default.toml").read_text())
    out = variants.with_fronts(2)(doc)
    assert out["server"] == {**doc["server"], "fronts": 2}
    assert out["metrics"] == {"enabled": False}
    assert {k: v for k, v in out.items() if k not in ("server", "metrics")} == \
        {k: v for k, v in doc.items() if k != "server"}
    assert "fronts" not in doc["server"]   # the input is not changed in place
    assert tomllib.loads(variants.dumps(out)) == out
    # One front keeps metrics as they were; metrics= decides either way.
    assert "metrics" not in variants.with_fronts(1)(doc)
    assert variants.with_fronts(1, metrics=False)(doc)["metrics"] == {"enabled": False}
    assert "metrics" not in variants.with_fronts(8, metrics=True)(doc)
    assert variants.with_fronts("auto")({})["server"] == {"fronts": "auto"}


@pytest.mark.parametrize("bad", [0, 33, -1, "2", 2.0, True, None])
def test_fronts_out_of_range(bad):
    with pytest.raises(ValueError):
        variants.with_fronts(bad)


def test_fronts_and_batching_off_compose():
    doc = tomllib.loads((REPO / "configs/default.toml").read_text())
    assert config_change(None) == (None, None)
    change, tag = config_change(3, batching=False)
    assert tag == "fronts-3.max_batch-1"
    out = change(doc)
    assert out["server"]["fronts"] == 3 and [m["max_batch"] for m in out["models"]] == [1]
    assert _args(["--fronts", "auto"]).fronts == "auto" and _args(["--fronts", "4"]).fronts == 4
    for bad in (["--fronts", "0"], ["--fronts", "x"], ["--fronts", "2", "--target", "h:1"]):
        with pytest.raises(SystemExit):
            _args(bad)


def test_roles_of_the_daemon_tree():
    py = "/venv/bin/python"
    assert role_of([py, "-m", "daemon.front", "--ctrl-fd", "5"]) == "front"
    child = [py, "-m", "daemon.workers.child", "--ctrl-fd", "7", "--wake-fd", "8"]
    assert role_of(child) == "worker"
    assert role_of([py, "-mdaemon.front"]) == "front"
    assert role_of([py, "-m", "daemon", "--config", "x.toml"]) is None   # the supervisor: the root
    assert role_of([py, "-m", "bench.front"]) is None
    assert role_of([]) is None


def entry(sizes: dict, queue: int = 0) -> dict:
    return {"name": "demo", "batch_sizes": {str(k): v for k, v in sizes.items()}, "counts": {},
            "queue_depth": queue, "in_flight_batches": 0, "workers": [{"busy": 0.5}],
            "padded_rows": 0}


def test_front_stats_are_summed_over_fronts():
    start = merge({0: {"connections": 3, "models": [entry({1: 10})]},
                   1: {"connections": 2, "models": [entry({1: 5})]}})
    end = merge({0: {"connections": 3, "models": [entry({1: 10, 4: 10}, queue=2)]},
                 1: {"connections": 2, "models": [entry({1: 5, 8: 5}, queue=1)]}})
    assert start["fronts"] == [0, 1] and start["connections"] == 5
    s = report.server_stats({"start": {"stats": start}, "mid": {"stats": end},
                             "end": {"stats": end}}, end, "demo")
    # 10 batches of 4 from front 0 and 5 of 8 from front 1: 80 samples in 15
    assert s["batches"] == 15 and s["batch_sizes"] == {"4": 10, "8": 5}
    assert s["mean_batch"] == round(80 / 15, 2) and s["queue_depth_mid"] == 3


def test_fronts_note():
    assert report.fronts_note({"fronts": {"count": 1, "reached": 1, "all": True}}) is None
    assert "all 4 fronts" in report.fronts_note(
        {"fronts": {"count": 4, "reached": 4, "all": True}})
    assert "supervisor sums all 4 fronts" in report.fronts_note(
        {"fronts": {"count": 4, "reached": 4, "all": True, "machine_wide": True}})
    assert "ONE of 4 fronts" in report.fronts_note(
        {"fronts": {"count": 4, "reached": 1, "all": False, "why_not_all": "x"}})
    assert "3 of 4 fronts" in report.fronts_note(
        {"fronts": {"count": 4, "reached": 3, "all": False, "why_not_all": "x"}})
    assert "unknown" in report.fronts_note(
        {"fronts": {"count": None, "reached": 1, "all": False, "why_not_all": "x"}})


def test_front_of_a_rid():
    assert front_of((7 << 45) | (5 << 40) | (3 << 24) | 9) == 5
    assert front_of(None) is None and front_of(-1) is None
