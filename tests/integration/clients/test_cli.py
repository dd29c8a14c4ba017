"""The command lines a newcomer types."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import REPO, shm_segments
from tests.wire import WireClient, tensor

RINGSERVE = Path(sys.executable).parent / "ringserve"


def test_check_config_good_and_bad(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "daemon", "--check-config", "configs/default.toml"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "m"\nfactory = "a:b"\n'
                   'input = {dtype="float32", shape=[4]}\nmax_bach = 3\n')
    r = subprocess.run([str(RINGSERVE), "check", str(bad)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "max_bach" in r.stderr and "did you mean 'max_batch'" in r.stderr


def test_invalid_config_refuses_to_start(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 99999\n")
    r = subprocess.run([sys.executable, "-m", "daemon", "--config", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "port" in r.stderr and "99999" in r.stderr


def test_default_config_serves_the_demo_model(tmp_path):
    """`python -m daemon` with no config, as the README's first command
    (port overridden so the test never collides with a real daemon)."""
    port_file = tmp_path / "port"
    log = open(tmp_path / "log", "wb")
    p = subprocess.Popen([str(RINGSERVE), "serve", "--port", "0", "--port-file", str(port_file)],
                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        t_end = time.monotonic() + 60
        while not port_file.exists():
            assert p.poll() is None and time.monotonic() < t_end, (tmp_path / "log").read_text()
            time.sleep(0.02)
        port = int(port_file.read_text())
        with WireClient("127.0.0.1", port) as c:
            while not c.call({"op": "health"})["ready"]:
                assert time.monotonic() < t_end
                time.sleep(0.05)
            ans = c.call({"model": "demo", "inputs": tensor(np.zeros(128, np.float32))})
            assert ans["status"] == 0 and len(ans["outputs"]["data"]) == 8
    finally:
        p.send_signal(signal.SIGINT)  # Ctrl-C drains like SIGTERM
        assert p.wait(60) == 0
        log.close()
    assert not port_file.exists()
    assert not [s for s in shm_segments() if s.startswith(f"ringserve-{p.pid}-")]
    lines = (tmp_path / "log").read_text().splitlines()
    import json
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert any(r["msg"] == "stopped" for r in records)


def test_host_on_the_command_line_overrides_the_file(daemon_factory):
    """`--host` beats `[server] host`: the file says 127.0.0.2, the command
    line 127.0.0.1, and only the latter listens (both are loopback)."""
    import socket

    from tests.conftest import demo_config
    d = daemon_factory(demo_config().replace('host = "127.0.0.1"', 'host = "127.0.0.2"'),
                       args=("--host", "127.0.0.1"))
    assert d.health()["ready"]
    try:
        socket.create_connection(("127.0.0.2", d.port), timeout=5).close()
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("the daemon listens on the file's host despite --host")
