"""The servers under test: starting and stopping them, asking them things,
and sampling their CPU.

A server is a subprocess on an ephemeral port (``--port 0 --port-file F``),
always stopped with SIGTERM (SIGKILL if it hangs) when the ``with`` block
ends. Its CPU is sampled over the whole process tree: the daemon
(``python -m daemon``) is a supervisor that touches no request, its fronts
(``python -m daemon.front``, ``[server] fronts`` of them) do the networking
and batching, and its workers (``python -m daemon.workers.child``) run the model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ipc.framing import FrameDecoder, encode_frame

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.toml"


def call(host: str, port: int, msg: dict, timeout: float = 10.0,
         token: str | None = None) -> dict:
    """One request on a fresh connection, blocking; for control ops, not load.
    ``token``, for a server with [auth], rides in the request itself."""
    if token is not None:
        msg = {**msg, "token": token}
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(encode_frame({"id": 1, **msg}))
        dec = FrameDecoder(1 << 30)
        while True:
            data = s.recv(1 << 20)
            if not data:
                raise ConnectionError(f"{host}:{port} closed the connection")
            items = dec.feed(data)
            if items:
                if not isinstance(items[0], dict):
                    raise items[0]
                return items[0]


class Server:
    """A server subprocess; ``role`` names its root process in CPU breakdowns."""

    def __init__(self, argv: list[str], role: str):
        self.argv = argv
        self.role = role
        self.dir = tempfile.TemporaryDirectory(prefix="ringserve-bench-")
        self.port_file = Path(self.dir.name) / "port"
        self.log_path = Path(self.dir.name) / "server.log"
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv + ["--port-file", str(self.port_file)], cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        t_end = time.monotonic() + timeout
        while not self.port_file.exists():
            self._check(t_end, timeout, "listen")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until ``health`` says ready: every worker loaded and warmed up."""
        t_end = time.monotonic() + timeout
        while not call(self.host, self.port, {"op": "health"}).get("ready"):
            self._check(t_end, timeout, "become ready")
            time.sleep(0.05)

    def _check(self, t_end: float, timeout: float, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.role} exited with {self.proc.returncode}:\n{self.log()}")
        if time.monotonic() > t_end:
            raise RuntimeError(f"{self.role} did not {what} in {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.proc is not None:
            self._log.close()
        self.dir.cleanup()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def daemon(config: str | os.PathLike, timeout: float = 300.0) -> Server:
    s = Server([sys.executable, "-m", "daemon", "--config", str(config), "--port", "0"],
               "supervisor")
    try:
        s.start(timeout)
        s.wait_ready(timeout)
    except BaseException:
        s.stop()
        raise
    return s


def echo(timeout: float = 60.0) -> Server:
    s = Server([sys.executable, "-m", "bench.echo", "--port", "0"], "echo")
    try:
        s.start(timeout)
    except BaseException:
        s.stop()
        raise
    return s


# -- CPU -----------------------------------------------------------------------------------

# A child's role from its command line (``python -m daemon.front ...``).
_ROLES = {"daemon.front": "front", "daemon.workers.child": "worker"}


def role_of(cmdline: list[str]) -> str | None:
    """"front" or "worker" for a daemon child's command line, else None."""
    for i, arg in enumerate(cmdline):
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in _ROLES:
            return _ROLES[cmdline[i + 1]]
        if arg.startswith("-m") and arg[2:] in _ROLES:   # python -mdaemon.front
            return _ROLES[arg[2:]]
    return None


def _role(p: psutil.Process) -> str:
    try:
        return role_of(p.cmdline()) or p.name()
    except psutil.Error:
        return "?"


def fronts(pid: int) -> int:
    """How many front processes serve under ``pid`` (a supervisor); 0 for a
    server without fronts (the echo server, or a daemon that is its own
    front, as before the supervisor split)."""
    try:
        return sum(1 for c in psutil.Process(pid).children(recursive=True) if _role(c) == "front")
    except psutil.Error:
        return 0


def cpu_sample(pid: int, root_role: str = "server") -> dict:
    """User+system CPU seconds of ``pid`` and each of its descendants.

    ``reaped`` is what descendants that already exited used (the kernel adds
    it to the parent once waited for), so a worker that died and was
    restarted inside the window still counts.
    """
    root = psutil.Process(pid)
    t = root.cpu_times()
    procs = {pid: (root_role, t.user + t.system)}
    for c in root.children(recursive=True):
        try:
            ct = c.cpu_times()
            procs[c.pid] = (_role(c), ct.user + ct.system)
        except psutil.NoSuchProcess:
            pass
    return {"t": time.perf_counter(), "procs": procs, "reaped": t.children_user + t.children_system}


def cpu_delta(a: dict, b: dict) -> dict:
    """CPU used between two samples: in total, and per process as % of one core."""
    wall = b["t"] - a["t"]
    by = []
    for pid, (role, s) in b["procs"].items():
        used = s - a["procs"].get(pid, (role, 0.0))[1]   # a process born in the window: all of it
        by.append({"pid": pid, "role": role, "cpu_s": round(used, 3),
                   "cpu_pct": round(100 * used / wall, 1)})
    total = sum(p["cpu_s"] for p in by) + (b["reaped"] - a["reaped"])
    roles: dict[str, dict] = {}
    for p in by:
        r = roles.setdefault(p["role"], {"procs": 0, "cpu_s": 0.0})
        r["procs"] += 1
        r["cpu_s"] += p["cpu_s"]
    for r in roles.values():
        r["cpu_s"] = round(r["cpu_s"], 3)
        r["cpu_pct"] = round(100 * r["cpu_s"] / wall, 1)
    return {"cpu_s": round(total, 3), "cpu_pct": round(100 * total / wall, 1), "by_process": by,
            "by_role": roles}


def machine_sample() -> dict:
    return {"t": time.perf_counter(), "cpu": psutil.cpu_times()}


def machine_delta(a: dict, b: dict) -> dict:
    """Whole-machine CPU between two samples, as % of one core (so 2 busy
    cores read 200): on a small box the server, its workers and the load
    generator share the cores, and this shows whether they ran out.

    Busy = cores x wall - idle: the kernel keeps idle time exactly (tickless
    idle), while its user/system/softirq counters are tick samples that
    undercount a machine full of short sleeps (measured here: the fields
    summed to ~175% of 2 cores' wall time).
    """
    wall = b["t"] - a["t"]
    cores = psutil.cpu_count() or 1
    idle = sum(getattr(b["cpu"], k) - getattr(a["cpu"], k) for k in ("idle", "iowait")
               if hasattr(b["cpu"], k))
    return {"cores": cores, "busy_pct": round(100 * (cores * wall - idle) / wall, 1)}
