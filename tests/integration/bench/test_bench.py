"""``python -m bench`` against real daemons that it starts itself: routing
keys reach the router, batching on against off, the rate sweep, the plot.

Bounded: about a dozen seconds of load in all, on the compute-bound model
of bench/models.py with an A/B experiment on it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO, shm_segments

CONFIG = """
[server]
host = "127.0.0.1"

[[models]]
name = "encoder"
factory = "bench.models:encoder"
input = { dtype = "int64", shape = [32] }
threads = 1
max_batch = 8

[[experiments]]
id = "e1"
model = "encoder"
salt = "e1-salt"
arms = [{ name = "control", split = 0.5 }, { name = "treat", split = 0.5 }]
"""


def test_keys_batching_sweep_and_plot(tmp_path):
    cfg = tmp_path / "bench.toml"
    cfg.write_text(CONFIG)
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--config", str(cfg), "--connections", "8",
         "--duration", "1.5", "--warmup", "0.3", "--keys", "500", "--key-dist", "zipf",
         "--exp", "e1", "--compare-batching", "--sweep-rates", "100,300",
         "--sweep-duration", "0.7", "--json", str(out), "--plot", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())

    on, off = doc["ringserve"], doc["batching_off"]
    for run in (on, off):
        assert run["answers"] > 0 and set(run["statuses"]) == {"0"} and run["unanswered"] == 0
        assert "_timeline" not in run
        # Zipf keys over the experiment: both arms, each about half of the users.
        assert set(run["routes"]) == {"stable/control", "stable/treat"}, run["routes"]
    assert max(int(k) for k in doc["server_stats"]["batch_sizes"]) > 1
    assert set(off["server_stats"]["batch_sizes"]) == {"1"}
    b = doc["batching"]
    assert b["throughput_on_over_off"] > 0 and b["mean_batch_off"] == 1.0
    assert "batching on / off" in proc.stdout and "lane/arm" in proc.stdout

    sweep = doc["sweep"]
    assert [p["offered_rps"] for p in sweep["points"]] == [100, 300]
    for p in sweep["points"]:
        assert p["throughput_rps"] > 0 and p["p99_us"] >= p["p50_us"] > 0 and p["not_ok"] == 0
    assert "rate sweep" in proc.stdout

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The batching-off variant was written beside the config, and is gone.
    # bench.state.json: the daemon's own state beside its config (request-id blocks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.png",
                                                          "bench.state.json", "bench.toml"]
    # Both daemons took their shared memory and their workers with them:
    # conftest's leak_check saw every process bench started (the daemons are
    # its grandchildren) and checks exactly their segments, where a look at
    # /dev/shm here would also see other tests' daemons on a shared machine.


def test_front_only_benchmark_answers_every_request_and_cleans_up():
    """``python -m bench.front``: the daemon's request path in-process, with a
    real ring and no worker; every request it sends is answered OK, in
    batches of the requests that arrived meanwhile, and the ring is gone."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.front", "--requests", "4200",
                             "--arrivals", "21"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"over 4,200 requests \(mean batch ([\d.]+)\); answers OK 24,213 of 24,213 "
                  r"sent", p.stdout)   # 20,000 warm-up requests, rounded up to whole rounds
    assert m, p.stdout
    # Exactly the 21 that arrive per round, however slow the machine: a round
    # is synchronous (no window timer can fire inside it), its requests queue
    # while the previous batch is out, and finishing that batch hands them
    # all over to the idle worker at once.
    assert float(m.group(1)) == 21.0
    # its ring is gone (segments of other processes on the machine come and go)
    assert not {s for s in shm_segments() if s.startswith(f"ringserve-{proc.pid}-")}
