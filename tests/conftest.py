"""Shared fixtures: a real daemon on an ephemeral port, always stopped.

``daemon_factory(config_toml)`` writes the config, starts ``python -m
daemon`` as a subprocess with ``--port 0 --port-file``, waits until it
listens and (by default) until ``health`` says ready, and stops it with
SIGTERM at the end of the test (SIGKILL if it does not exit). Every test
that starts a daemon also checks that ``/dev/shm`` holds no segment of it
afterwards and that its worker processes are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.wire import WireClient

REPO = Path(__file__).resolve().parent.parent
STARTED_PIDS: set[int] = set()  # every daemon this test session started


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("ringserve-")}


class Daemon:
    def __init__(self, tmp_path: Path, config: str, env: dict | None = None,
                 args: tuple[str, ...] = (), token: str | None = None):
        self.token = token  # sent with health checks when the config has [auth]
        self.dir = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp_path / "ringserve.toml"
        self.config_path.write_text(config)
        self.port_file = tmp_path / "port"
        self.log_path = tmp_path / "daemon.log"
        self.env = dict(os.environ, **(env or {}))
        self.args = tuple(args)
        self.proc = None
        self.port = None
        self.children: list[psutil.Process] = []

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "Daemon":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config_path), "--port", "0",
             "--port-file", str(self.port_file), *self.args],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        STARTED_PIDS.add(self.proc.pid)
        t_end = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > t_end:
                raise AssertionError(f"daemon did not listen in {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        if wait_ready:
            self.wait_ready(t_end - time.monotonic())
        return self

    def client(self, timeout: float = 30.0) -> WireClient:
        return WireClient("127.0.0.1", self.port, timeout=timeout)

    def health(self) -> dict:
        msg = {"op": "health"} if self.token is None else {"op": "health", "token": self.token}
        with self.client() as c:
            return c.call(msg)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        t_end = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["ready"]:
                self.children = psutil.Process(self.proc.pid).children(recursive=True)
                return h
            if time.monotonic() > t_end:
                raise AssertionError(f"daemon not ready in {timeout} s: {h}\n{self.log()}")
            time.sleep(0.05)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> dict:
        t_end = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > t_end:
                raise AssertionError(f"{what} not reached in {timeout} s: {h}\n{self.log()}")
            time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        return [m["pid"] for m in self.health()["models"]]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log()}")
        rc = self.proc.returncode
        self._log.close()
        return rc

    def assert_clean(self, timeout: float = 10.0) -> None:
        """No worker process and no shared-memory segment of this daemon left."""
        t_end = time.monotonic() + timeout
        pid = self.proc.pid
        while True:
            alive = [p.pid for p in self.children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            segs = {s for s in shm_segments() if s.startswith(f"ringserve-{pid}-")}
            if not alive and not segs:
                return
            if time.monotonic() > t_end:
                raise AssertionError(f"left behind: processes {alive}, segments {segs}\n{self.log()}")
            time.sleep(0.05)


@pytest.fixture
def daemon_factory(tmp_path):
    started: list[Daemon] = []

    def make(config: str, *, env: dict | None = None, wait_ready: bool = True,
             sub: str | None = None, args: tuple[str, ...] = (),
             token: str | None = None) -> Daemon:
        d = Daemon(tmp_path / (sub or f"d{len(started)}"), config, env, args, token)
        started.append(d)
        return d.start(wait_ready=wait_ready)

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            rc = d.stop()
            assert rc == 0, f"daemon exited {rc} on SIGTERM:\n{d.log()}"
        d.assert_clean()


DEMO_MODEL = """
[[models]]
name = "demo"
version = "1"
factory = "daemon.zoo:mlp_scorer"
input = {{ dtype = "float32", shape = [128] }}
devices = ["cpu"]
threads = 1
max_batch = {max_batch}
window_ms = {window_ms}
queue_limit = {queue_limit}
"""


def demo_config(max_batch=16, window_ms=2.0, queue_limit=1024, server="") -> str:
    return ("[server]\nhost = \"127.0.0.1\"\n" + server + "\n" +
            DEMO_MODEL.format(max_batch=max_batch, window_ms=window_ms, queue_limit=queue_limit))


@pytest.fixture(scope="session", autouse=True)
def dev_shm_left_as_found():
    """The whole suite leaves /dev/shm as it found it: no segment of any
    daemon it started (nor of the test process itself) remains. Segments of
    other processes on the machine are not ours to judge."""
    yield
    ours = lambda: {s for s in shm_segments()  # noqa: E731
                    if int(s.split("-")[1]) in STARTED_PIDS | {os.getpid()}}
    t_end = time.monotonic() + 10
    while ours() and time.monotonic() < t_end:
        time.sleep(0.1)
    assert ours() == set(), "tests leaked shared-memory segments"
