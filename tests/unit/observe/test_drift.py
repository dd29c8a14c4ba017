"""Input drift: binned KS against exact KS, the flags, the window, bounded
memory, profiles on disk, freezing from traffic, ``ringserve profile``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from daemon.observe.drift import CHUNK_VALUES, DriftMonitor, Profile, profile_main

D = 20
SHIFTED = (3, 7)


def reference_like(rng, n):
    """20 features of different shapes: normal, skewed, uniform, discrete,
    binary, a constant; 3 is normal, 7 lognormal."""
    cols = []
    for j in range(D):
        kind = j % 5
        if kind == 0 or j == 3:
            cols.append(rng.normal(j, 1 + j / 10, n))
        elif kind == 1:
            cols.append(rng.exponential(2.0, n))
        elif kind == 2 or j == 7:
            cols.append(rng.lognormal(0, 1, n))
        elif kind == 3:
            cols.append(rng.poisson(3, n).astype(float))
        else:
            cols.append((rng.random(n) < 0.3).astype(float))
    x = np.column_stack(cols)
    x[:, 19] = 5.0
    return x


def served(rng, n, ref_sd, shifted=SHIFTED):
    x = reference_like(rng, n)
    for j in shifted:
        x[:, j] += ref_sd[j]
    return x


@pytest.fixture(scope="module")
def ref():
    return reference_like(np.random.default_rng(1), 20_000)


@pytest.fixture(scope="module")
def profile(ref):
    return Profile.from_array(ref, bins=64, names=[f"f{j}" for j in range(D)])


def exact_ks(a, b):
    """Two-sample KS distance on raw samples (as float32, like the monitor)."""
    a, b = np.sort(a.astype(np.float32)), np.sort(b.astype(np.float32))
    z = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, z, "right") / len(a)
                  - np.searchsorted(b, z, "right") / len(b)).max()


def feed(mon, x, batch=64):
    for i in range(0, len(x), batch):
        mon.observe_batch(x[i:i + batch])


def test_shifted_features_and_only_those_are_flagged(ref, profile):
    rng = np.random.default_rng(2)
    mon = DriftMonitor(profile, threshold=0.1, window=10_000)
    feed(mon, served(rng, 10_000, ref.std(axis=0)))
    assert {f for f, _ in mon.flagged()} == {"f3", "f7"}
    dist = mon.distances()
    assert (np.delete(dist, SHIFTED) < 0.05).all()
    assert dist[3] > 0.3 and dist[7] > 0.3
    unnamed = DriftMonitor(Profile(profile.edges, profile.counts, profile.rows), window=10_000)
    feed(unnamed, served(rng, 10_000, ref.std(axis=0)), batch=500)
    assert sorted(f for f, _ in unnamed.flagged()) == [3, 7]


def test_binned_ks_agrees_with_exact_ks_within_the_binning_error(ref, profile):
    x = served(np.random.default_rng(3), 8_000, ref.std(axis=0))
    mon = DriftMonitor(profile, window=100_000)
    mon.observe_batch(x)
    binned = mon.distances()
    for j in range(D):
        exact = exact_ks(ref[:, j], x[:, j])
        ref_mass = profile.counts[j] / profile.rows
        obs_mass = np.bincount(np.searchsorted(profile.edges[j], x[:, j].astype(np.float32)),
                               minlength=profile.bins + 2) / len(x)
        # binned KS reads both CDFs at the edges: never above the exact one,
        # below it by at most the heaviest bin
        assert binned[j] <= exact + 1e-12, j
        assert exact - binned[j] <= max(ref_mass.max(), obs_mass.max()) + 1e-12, j
        if j not in SHIFTED:
            assert abs(exact - binned[j]) < 0.02, j
    # discrete features sit on the edges: their KS is exact
    for j in (4, 8, 9, 13, 14, 18, 19):
        assert binned[j] == pytest.approx(exact_ks(ref[:, j], x[:, j]), abs=1e-12), j


def test_memory_is_bounded_whatever_the_traffic(ref, profile):
    rng = np.random.default_rng(4)
    mon = DriftMonitor(profile, window=3_000)
    mon.observe_batch(ref[:10])
    fixed = profile.counts.nbytes + profile.edges.nbytes + profile.edge_keys.nbytes + 2 * D * 66 * 8
    bound = fixed + CHUNK_VALUES * 20 + D * 16     # + the scratch, capped whatever the batch
    sizes = []
    for n in (1, 7, 64, 5_000, 20_000, 3, 64):
        mon.observe_batch(served(rng, n, ref.std(axis=0)))
        sizes.append(mon.nbytes)
        assert 0 < mon.window_rows < 2 * 3_000 + 20_000
    assert (mon._cur.shape, mon._prev.shape, profile.counts.shape) == ((D, 66),) * 3
    assert max(sizes) <= bound and sizes[-1] == sizes[-3]  # grows to the cap, then stays
    assert sizes[0] < fixed + 32 * D * 20 + 1_000        # small batches, small scratch
    assert mon.rows_seen == 10 + 1 + 7 + 64 + 5_000 + 20_000 + 3 + 64


def test_window_forgets_and_reset_clears(ref, profile):
    rng = np.random.default_rng(5)
    mon = DriftMonitor(profile, window=2_000, min_rows=500)
    feed(mon, served(rng, 4_000, ref.std(axis=0)))
    assert len(mon.flagged()) == 2
    feed(mon, served(rng, 4_000, ref.std(axis=0), shifted=()))   # two halves of clean rows
    assert mon.flagged() == [] and 2_000 <= mon.window_rows <= 4_000
    feed(mon, served(rng, 400, ref.std(axis=0)))
    mon.reset()
    assert mon.window_rows == 0 and mon.flagged() == []
    feed(mon, served(rng, 400, ref.std(axis=0)))
    assert mon.flagged() == []                  # below min_rows: no verdict yet
    assert np.isfinite(mon.distances()).all()


def test_profile_save_load_round_trip(tmp_path, ref, profile):
    path = tmp_path / "p.json"
    profile.save(path)
    back = Profile.load(path)
    assert back.names == profile.names and back.rows == profile.rows == 20_000
    assert np.array_equal(back.edges, profile.edges) and back.edges.dtype == np.float32
    assert np.array_equal(back.counts, profile.counts)
    x = served(np.random.default_rng(6), 3_000, ref.std(axis=0))
    a, b = DriftMonitor(profile), DriftMonitor(back)
    a.observe_batch(x)
    b.observe_batch(x)
    assert np.array_equal(a.distances(), b.distances())
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a drift profile"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Profile.from_array(np.array([[1.0, np.nan], [2.0, 3.0]]))


def test_freeze_from_the_first_n_rows(ref):
    rng = np.random.default_rng(7)
    mon = DriftMonitor(freeze_after=5_000, edge_rows=2_000, window=4_000, min_rows=1_000)
    assert mon.snapshot()["state"] == "learning" and mon.distances().size == 0
    states = []
    for i in range(0, 6_000, 300):          # batches cross both boundaries
        mon.observe_batch(ref[i:i + 300])
        states.append(mon.state)
    assert states[5] == "learning" and states[6] == "reference" and states[16] == "monitoring"
    prof = mon.profile
    assert prof.rows == 5_000
    # edges from the first edge_rows rows, counts over all freeze_after rows
    first = Profile.from_array(ref[:2_000])
    assert np.array_equal(prof.edges, first.edges)
    check = DriftMonitor(first, window=10**9)
    check.observe_batch(ref[:5_000])
    assert np.array_equal(prof.counts, check._cur)
    assert mon.window_rows == 1_000              # rows 5000..6000 are served rows
    feed(mon, served(rng, 4_000, ref.std(axis=0)))
    assert sorted(f for f, _ in mon.flagged()) == [3, 7]


def test_early_freeze_and_its_errors(ref):
    mon = DriftMonitor(freeze_after=10_000)
    with pytest.raises(ValueError, match="nothing to freeze"):
        mon.freeze()
    mon.observe_batch(ref[:1_500])
    prof = mon.freeze()
    assert mon.state == "monitoring" and prof.rows == 1_500 and mon.window_rows == 0
    assert mon.freeze() is prof
    with pytest.raises(ValueError, match="inputs have 3 features"):
        mon.observe_batch(np.zeros((2, 3)))


def test_features_beyond_max_features_are_ignored_and_inputs_flattened():
    rng = np.random.default_rng(8)
    mon = DriftMonitor(freeze_after=1_000, max_features=4)
    mon.observe_batch(rng.normal(size=(1_000, 2, 5)).astype(np.float32))
    x = rng.normal(size=(2_000, 2, 5))
    x[:, 0, 1] += 1                              # watched (column 1)
    x[:, 1, 4] += 1                              # ignored (column 9)
    mon.observe_batch(x)
    snap = mon.snapshot()
    assert snap["features"] == 4 and snap["features_ignored"] == 6
    assert [f for f, _ in mon.flagged()] == [1]
    assert mon.profile.counts.shape == (4, 66)


def test_odd_values_from_traffic_do_not_stop_the_freeze():
    x = np.random.default_rng(11).normal(size=(300, 3))
    x[5, 0], x[6, 1], x[:, 2] = np.inf, np.nan, np.nan
    mon = DriftMonitor(freeze_after=300)
    mon.observe_batch(x.astype(np.float32))
    mon.observe_batch(np.arange(6).reshape(2, 3))         # integers are fine too
    mon.observe_batch(np.zeros((0, 3)))
    assert mon.state == "monitoring" and mon.profile.rows == 300 and mon.window_rows == 2
    assert mon.profile.counts[0, -1] == 1 and mon.profile.counts[2, -1] == 300   # overflow bins
    assert np.isfinite(mon.profile.edges).all()


def test_signed_zero_and_binary_features_are_exact():
    ref = np.array([[0.0], [-0.0], [1.0], [0.0]] * 250)
    prof = Profile.from_array(ref, bins=8)
    mon = DriftMonitor(prof, min_rows=1)
    mon.observe_batch(np.array([[-0.0], [0.0], [1.0], [1.0]]))
    assert mon.distances()[0] == pytest.approx(0.25)     # P(0): 0.75 against 0.5


def test_snapshot_is_json_ready(ref, profile):
    mon = DriftMonitor(profile)
    mon.observe_batch(served(np.random.default_rng(9), 2_000, ref.std(axis=0)))
    snap = json.loads(json.dumps(mon.snapshot()))
    assert snap["state"] == "monitoring" and snap["reference_rows"] == 20_000
    assert [f["feature"] for f in snap["flagged"]] in (["f3", "f7"], ["f7", "f3"])
    assert len(snap["ks"]) == D and snap["max_ks"] == max(snap["ks"])
    assert 0 < snap["noise_ks99"] < 0.1


# -- ringserve profile ---------------------------------------------------------------


def test_profile_cli_csv_npy_and_errors(tmp_path, capsys):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(500, 3))
    csv = tmp_path / "train.csv"
    with open(csv, "w") as f:
        f.write("id,a,b,c\n")
        for i, row in enumerate(x):
            f.write(f"{i}," + ",".join(f"{v:.6f}" for v in row) + "\n")
    out = tmp_path / "p.json"
    assert profile_main(["--input", str(csv), "--columns", "a,c", "--output", str(out),
                         "--bins", "16"]) == 0
    assert "500 rows x 2 features" in capsys.readouterr().out
    prof = Profile.load(out)
    assert prof.names == ["a", "c"] and prof.bins == 16 and prof.rows == 500
    assert np.allclose(prof.edges[1], np.quantile(x[:, 2].astype(np.float32), np.linspace(0, 1, 17),
                                                  method="inverted_cdf"), atol=1e-6)
    np.save(tmp_path / "train.npy", x)
    assert profile_main(["--input", str(tmp_path / "train.npy"), "--output", str(out)]) == 0
    assert Profile.load(out).features == 3 and Profile.load(out).names is None
    assert profile_main(["--input", str(tmp_path / "nope.csv"), "--output", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert profile_main(["--input", str(csv), "--columns", "zz", "--output", str(out)]) == 2
    assert "no column(s) ['zz']" in capsys.readouterr().err
    assert profile_main(["--input", str(csv)]) == 2               # --output missing


def test_profile_cli_parquet(tmp_path, capsys, monkeypatch):
    pq_path = tmp_path / "t.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pa = None
    if pa is not None:
        pq.write_table(pa.table({"a": np.arange(100.0), "b": np.ones(100)}), pq_path)
        assert profile_main(["--input", str(pq_path), "--columns", "a",
                             "--output", str(tmp_path / "p.json")]) == 0
        assert Profile.load(tmp_path / "p.json").names == ["a"]
    else:
        pq_path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert profile_main(["--input", str(pq_path), "--output", str(tmp_path / "p.json")]) == 2
    assert "reading Parquet needs pyarrow" in capsys.readouterr().err
