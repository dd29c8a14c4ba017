"""Input drift through the real daemon: a reference profile made with
`ringserve profile`, served traffic with two shifted features, and exactly
those two flagged in stats, metrics and the decision log."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import REPO
from tests.integration.observe.test_metrics import sample, scrape

DRIFTED = """
[[models]]
name = "m"
factory = "tests.models:two_x"
input = { dtype = "float32", shape = [8] }
threads = 1
drift = true
%s
drift_sample_rate = 1.0
drift_threshold = 0.1
"""


def send(d, x: np.ndarray) -> None:
    with d.client() as c:
        for i in range(0, len(x), 200):
            for row in x[i:i + 200]:
                c.send({"model": "m", "inputs": {"dtype": "float32", "shape": [8],
                                                 "data": row.tobytes()}})
            assert all(a["status"] == 0 for a in c.recv_n(len(x[i:i + 200])))


def test_shifted_features_are_flagged_and_only_those(daemon_factory, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.normal(size=(20_000, 8)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "daemon", "profile", "--input",
                        str(tmp_path / "train.npy"), "--output", str(tmp_path / "profile.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = daemon_factory(DRIFTED % f'drift_profile = "{tmp_path / "profile.json"}"')
    served = rng.normal(size=(2500, 8)).astype(np.float32)
    served[:, 2] += 1.0   # one standard deviation
    served[:, 5] *= 3.0   # a spread change: the mean stays
    send(d, served)
    with d.client() as c:
        drift = c.call({"op": "stats"})["models"][0]["drift"]
    assert sorted(f["feature"] for f in drift["flagged"]) == [2, 5]
    ks = drift["ks"]
    assert ks[2] > 0.3 and ks[5] > 0.2 and max(ks[i] for i in (0, 1, 3, 4, 6, 7)) < 0.1
    m = scrape(d.health()["metrics_port"])
    assert abs(sample(m, "ringserve_drift_ks_distance", model="m", feature="2") - ks[2]) < 1e-3
    d.wait_for(lambda h: any(json.loads(line).get("event") == "drift" for line in
                             (d.dir / "ringserve.decisions.jsonl").read_text().splitlines())
               if (d.dir / "ringserve.decisions.jsonl").exists() else False,
               timeout=10, what="drift decision record")
    records = [json.loads(line) for line in
               (d.dir / "ringserve.decisions.jsonl").read_text().splitlines()]
    (rec,) = [r for r in records if r["event"] == "drift"]
    assert sorted(f["feature"] for f in rec["flagged"]) == [2, 5]


def test_without_a_profile_the_first_rows_become_the_reference_and_persist(daemon_factory):
    rng = np.random.default_rng(1)
    d = daemon_factory(DRIFTED % "drift_freeze_after = 1000", sub="a")
    send(d, rng.normal(size=(1000, 8)).astype(np.float32))
    with d.client() as c:
        drift = c.call({"op": "stats"})["models"][0]["drift"]
    assert drift["state"] == "monitoring" and drift["reference"].endswith(".drift-m-1.json")
    assert (d.dir / "ringserve.drift-m-1.json").exists()
    assert d.stop() == 0
    d = daemon_factory(DRIFTED % "drift_freeze_after = 1000", sub="a")
    with d.client() as c:
        drift = c.call({"op": "stats"})["models"][0]["drift"]
    assert drift["state"] == "monitoring"  # the saved reference, not a new one from traffic
