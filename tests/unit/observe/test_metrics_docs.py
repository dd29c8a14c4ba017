"""The metrics table of docs/operations.md against what the exporter writes,
both ways, as docs/config.md is held against SETTINGS: every documented
family is exported with the documented type, and every exported family is
documented. The exporter runs in-process on the figures of a real
(unstarted) front App, merged as the supervisor merges them
(daemon/observe/figures.py), so families appear whether or not they have
samples yet; that each one gets samples from a real daemon is
tests/integration/observe/test_metrics.py's part."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from daemon.config import load_config
from daemon.front.app import App
from daemon.observe.figures import Figures, MachineView
from daemon.rollout.controller import Rollouts
from daemon.supervisor.metrics import MetricsServer

DOCS = Path(__file__).resolve().parents[3] / "docs" / "operations.md"

CONFIG = """
[server]
host = "127.0.0.1"

[request_log]
enabled = true

[[models]]
name = "demo"
version = "1"
factory = "daemon.workers.zoo:mlp_scorer"
input = { dtype = "float32", shape = [128] }
devices = ["cpu"]
"""


def documented() -> dict[str, tuple[str, list[str]]]:
    """{exposed name: (type, labels)} from the table under "## Metrics"."""
    section = DOCS.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `ringserve_")]
    assert rows, "no metrics table under '## Metrics' in docs/operations.md"
    out = {}
    for row in rows:
        names, mtype, labels, _what = [c.strip() for c in row.strip().strip("|").split("|", 3)]
        for name in re.findall(r"`([^`]+)`", names):
            assert name not in out, f"{name} is documented twice"
            out[name] = (mtype, [x.strip() for x in labels.split(",") if x.strip()])
    return out


def exported(tmp_path) -> dict[str, str]:
    """{exposed name: type} of every family /metrics writes, as Prometheus
    reads it (a counter family ``x`` is exposed as ``x_total``)."""
    (tmp_path / "ringserve.toml").write_text(CONFIG)
    cfg = load_config(str(tmp_path / "ringserve.toml"))
    loop = asyncio.new_event_loop()
    try:
        app = App(cfg, loop, chan=None, workers={("demo", "1"): [1]})
        for m in cfg.models:
            app.add_model(m, (1,))
        figures = Figures()
        figures.update(0, app.figures())
        view = MachineView(figures.merged(), {}, Rollouts(None), cfg, True, False, 0.0)
        status, _, body = MetricsServer(None).render("/metrics", view)
    finally:
        loop.close()
    assert status == 200
    return {f.name + ("_total" if f.type == "counter" else ""): f.type
            for f in text_string_to_metric_families(body.decode())}


def test_every_documented_family_is_exported_and_every_exported_one_documented(tmp_path):
    docs, code = documented(), exported(tmp_path)
    undocumented = sorted(set(code) - set(docs))
    missing = sorted(set(docs) - set(code))
    assert not undocumented, (f"exported but not in docs/operations.md's metrics table: "
                              f"{undocumented}")
    assert not missing, f"in docs/operations.md's metrics table but not exported: {missing}"
    wrong = {n: (docs[n][0], t) for n, t in code.items() if docs[n][0] != t}
    assert not wrong, f"documented type != exported type: {wrong}"


def test_the_table_parses_into_names_types_and_labels():
    docs = documented()
    assert docs["ringserve_requests_total"] == (
        "counter", ["model", "version", "lane", "arm", "status"])
    assert docs["ringserve_rollout_rolled_back"] == ("gauge", ["model"])
    assert docs["ringserve_connections"] == ("gauge", [])
    assert all(t in ("counter", "gauge", "histogram") for t, _ in docs.values())
