"""Shared fixtures: a real daemon on an ephemeral port, always stopped.

``daemon_factory(config_toml)`` writes the config, starts ``python -m
daemon`` as a subprocess with ``--port 0 --port-file``, waits until it
listens and (by default) until ``health`` says ready, and stops it with
SIGTERM at the end of the test (SIGKILL if it does not exit), then checks
that every process of its tree and every shared-memory segment it made are
gone. A teardown that finds a problem with one daemon still stops and checks
every other one, and reports them all.

Leak checks, for every test (``leak_check``), module and the whole session:

- Processes. A sampler thread (``WATCH``) walks this process's descendants
  every ``SAMPLE_S`` seconds, and again whenever a ``Daemon`` is started,
  asked for health or stopped, and remembers each process it ever saw (by
  pid and start time) under the child of this process it descends from. So
  workers started after a daemon became ready (reloads, restarts), workers
  of a daemon started without waiting for ready, and processes that a
  daemon, a CLI run or the benchmark orphaned are all known. At the end of
  a test, every process first seen during it, under a child of this
  process that the test started, must be gone (exited or a zombie).
  Processes of wider-scoped fixtures (a module's daemon, started before the
  test) are checked when their module or the session ends.
- Shared memory. At the end of a test, no ``ringserve-<pid>-`` segment that
  appeared during it may remain whose creator ``<pid>`` is one of the test's
  processes (or this process). This runs at the test's own teardown, before
  the next test's daemon starts: a daemon's start-up sweep
  (``ipc.shm.sweep_stale``) removes the segments of fronts that died, so a
  check at the end of the session alone would see nothing. The sampler also
  lists ``/dev/shm``: a segment of ours that disappears after every process
  of its tree had exited was unlinked by none of them but by someone else (a
  second daemon of the same test, or of another test run on the machine,
  sweeping it), and counts as left behind too. Once none of a test's
  processes runs, the check does not wait: waiting would only give a sweep
  the time to hide a leak. A test that leaves segments on purpose says so
  with ``left_on_purpose(names)``.

A test that fails a check has its leftovers killed and unlinked after the
report, so that one leak is reported once, by the test that made it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ipc import shm
from tests.wire import WireClient

REPO = Path(__file__).resolve().parent.parent
STARTED_PIDS: set[int] = set()  # every daemon this test session started
SAMPLE_S = 0.1                  # how often the process tree is walked
# How long exiting processes and their unlinks get before what is left counts
# as leaked (tests/integration/test_harness.py shortens it for its inner run).
LEAK_GRACE_S = float(os.environ.get("RINGSERVE_TEST_LEAK_GRACE_S", "10"))
# Processes that the standard library or torch start once and keep for the
# life of the process that started them (this one): not leaks of one test.
HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver",
           "_inductor/compile_worker", "_inductor.compile_worker")


shm_segments = shm.segments       # every ringserve segment on the machine
segment_creator = shm.creator     # the pid in ringserve-<pid>-..., or None


def alive(p: psutil.Process) -> bool:
    """Still running: not exited, and not a zombie waiting to be reaped."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        cmd = "?"
    return f"{p.pid} ({cmd[:120]})"


def is_helper(p: psutil.Process) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return any(h in cmd for h in HELPERS)


class Segment:
    """A segment of one of our processes, as the sampler saw it."""

    __slots__ = ("name", "creator", "root", "tree_alive", "vanished", "swept")

    def __init__(self, name: str, creator: psutil.Process, root: psutil.Process):
        self.name, self.creator, self.root = name, creator, root
        self.tree_alive = True   # at the last sample: some process of its root's tree ran
        self.vanished = False
        # Vanished after every process of its tree had exited: none of ours
        # unlinked it, so someone else did (another daemon's start-up sweep).
        self.swept = False


class ProcessWatch:
    """Every process this one has had below it, and every segment they
    made, sampled over time.

    ``root_of`` maps each process ever seen (psutil.Process: pid and start
    time, so a reused pid is a different entry) to its ancestor among this
    process's children, as it was when first seen: a daemon's workers map to
    the daemon even after it died and they were re-parented.

    ``segments`` holds each ``ringserve-<pid>-`` segment first seen while
    ``<pid>`` was a running process of ours. One that disappears after its
    creator's whole tree has exited (seen so at an earlier sample) was not
    unlinked by any of them: a leak that someone else cleaned up."""

    def __init__(self):
        self.me = os.getpid()
        self.root_of: dict[psutil.Process, psutil.Process] = {}
        self.segments: dict[str, Segment] = {}
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="leak-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(SAMPLE_S)
            try:
                self.sample()
            except Exception:   # a process went away mid-walk: the next walk sees the rest
                pass

    def sample(self) -> None:
        kids: dict[int, list[psutil.Process]] = {}
        for p in psutil.process_iter(["ppid"]):
            kids.setdefault(p.info["ppid"], []).append(p)
        segs = shm_segments()
        with self.lock:
            running: dict[int, psutil.Process] = {}
            stack = [(c, c) for c in kids.get(self.me, ())]
            while stack:
                p, root = stack.pop()
                self.root_of.setdefault(p, root)
                running[p.pid] = p
                stack.extend((c, root) for c in kids.get(p.pid, ()))
            for name in segs:
                if name not in self.segments:
                    creator = running.get(segment_creator(name))
                    if creator is not None and alive(creator):
                        self.segments[name] = Segment(name, creator, self.root_of[creator])
            trees: dict[psutil.Process, bool] = {}
            for s in self.segments.values():
                if s.vanished:
                    continue
                if s.name not in segs:
                    s.vanished = True
                    s.swept = not s.tree_alive
                    continue
                if s.root not in trees:
                    trees[s.root] = any(alive(p) for p, r in self.root_of.items() if r == s.root)
                s.tree_alive = trees[s.root]

    def seen(self) -> dict[psutil.Process, psutil.Process]:
        with self.lock:
            return dict(self.root_of)

    def swept(self, creators) -> set[str]:
        """Segments of the processes ``creators`` that someone else removed."""
        with self.lock:
            return {s.name for s in self.segments.values() if s.swept and s.creator in creators}

    def tree(self, root: psutil.Process) -> set[psutil.Process]:
        """Every process ever seen under ``root`` (a child of this process), itself included."""
        return {p for p, r in self.seen().items() if r == root} | {root}


WATCH = ProcessWatch()


def _leak_report(what: str, procs, segs, swept) -> str:
    parts = [f"{what} left behind: processes {[describe(p) for p in procs] or 'none'}, "
             f"segments {sorted(segs) or 'none'}"]
    if swept:
        parts.append(f"; and segments that it never unlinked, removed by another process "
                     f"(a daemon's start-up sweep) after it exited: {sorted(swept)}")
    return "".join(parts)


class LeakScope:
    """What one test (module, session) started: checked when it ends."""

    def __init__(self, name: str):
        WATCH.start()
        WATCH.sample()
        self.name = name
        seen = WATCH.seen()
        self.seen_before = set(seen)
        self.roots_before = {r for r in seen.values() if alive(r)}
        self.segments_before = shm_segments()

    def processes(self) -> set[psutil.Process]:
        """Processes first seen in this scope, under a root it started."""
        return {p for p, r in WATCH.seen().items()
                if p not in self.seen_before and r not in self.roots_before}

    def leftovers(self) -> tuple[list[psutil.Process], set[str], set[str]]:
        """(processes still running, segments still there, segments swept by others)."""
        procs = self.processes()
        pids = {p.pid for p in procs} | {os.getpid()}
        segs = {s for s in shm_segments() - self.segments_before if segment_creator(s) in pids}
        swept = WATCH.swept(procs)
        judged = lambda names: names - ON_PURPOSE - REPORTED  # noqa: E731
        return [p for p in procs if alive(p) and not is_helper(p)], judged(segs), judged(swept)

    def check(self, timeout: float | None = None) -> None:
        """Raise AssertionError naming what is left. Running processes get
        ``timeout`` (default LEAK_GRACE_S) to exit and unlink what they made;
        once none runs, what is left is left (waiting longer would only let
        another daemon's sweep hide it). Then kill and unlink it, so the
        next test starts clean."""
        t_end = time.monotonic() + (LEAK_GRACE_S if timeout is None else timeout)
        while True:
            WATCH.sample()
            procs, segs, swept = self.leftovers()
            if not procs and not segs and not swept:
                return
            if not procs or time.monotonic() > t_end:
                break
            time.sleep(0.1)
        report = _leak_report(self.name, procs, segs, swept)
        REPORTED.update(segs | swept)
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        for s in segs:
            try:
                os.unlink(os.path.join("/dev/shm", s))
            except FileNotFoundError:
                pass
        raise AssertionError(report)


ON_PURPOSE: set[str] = set()   # segments a test leaves behind on purpose (see left_on_purpose)
REPORTED: set[str] = set()     # leaks already reported by the scope that made them


def left_on_purpose(names) -> None:
    """Exempt these segment names from every leak check: for a test that
    leaves a front's segments behind deliberately (SIGKILL of the front and
    its workers) to see a later start sweep them, and asserts on that itself."""
    ON_PURPOSE.update(names)


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
        self.root: psutil.Process | None = None
        self.port = None
        self._extra: set[psutil.Process] = set()

    @property
    def children(self) -> list[psutil.Process]:
        """Every process ever seen in this daemon's tree, the front excluded."""
        return sorted(self.tree() - {self.root}, key=lambda p: p.pid)

    @children.setter
    def children(self, procs) -> None:
        # Older tests hand over what they sampled themselves: added, never replacing.
        self._extra |= set(procs)

    def tree(self) -> set[psutil.Process]:
        if self.root is None:
            return set(self._extra)
        WATCH.sample()
        return WATCH.tree(self.root) | self._extra

    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "Daemon":
        WATCH.start()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config_path), "--port", "0",
             "--port-file", str(self.port_file), *self.args],
            cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        STARTED_PIDS.add(self.proc.pid)
        try:
            self.root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:   # exited at once: poll() below says how
            pass
        WATCH.sample()
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
        WATCH.sample()
        with self.client() as c:
            return c.call(msg)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        return self.wait_for(lambda h: h["ready"], timeout, "ready")

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> dict:
        t_end = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > t_end:
                raise AssertionError(f"{what} not reached in {timeout:g} s: {h}\n{self.log()}")
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
        WATCH.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                self._log.close()
                raise AssertionError(
                    f"daemon did not stop within {timeout} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> tuple[list[psutil.Process], set[str], set[str]]:
        """(processes still running, segments still there, segments swept by
        others) of this daemon's tree."""
        tree = self.tree()
        pids = {p.pid for p in tree} | {self.proc.pid}
        running = sorted((p for p in tree if alive(p)), key=lambda p: p.pid)
        segs = {s for s in shm_segments() if segment_creator(s) in pids} - ON_PURPOSE
        return running, segs, WATCH.swept(tree) - ON_PURPOSE

    def assert_clean(self, timeout: float | None = None) -> None:
        """No process of this daemon's tree (every one ever seen: workers
        restarted or added by a reload included) is left running, no
        shared-memory segment that one of them made is left, and none was
        removed by someone else (another daemon's start-up sweep) after they
        had all exited. Processes still running get ``timeout`` (default
        LEAK_GRACE_S) to exit and unlink their segments; once none runs,
        what is left is left."""
        t_end = time.monotonic() + (LEAK_GRACE_S if timeout is None else timeout)
        while True:
            running, segs, swept = self.leftovers()
            if not running and not segs and not swept:
                return
            if not running or time.monotonic() > t_end:
                break
            time.sleep(0.05)
        raise AssertionError(_leak_report(f"daemon {self.dir.name} (pid {self.proc.pid})",
                                          running, segs, swept) + f"\n{self.log()}")

    def finish(self) -> None:
        """Stop (if still running: exit code 0 expected), then check that
        nothing is left; every problem found is reported, none stops the rest."""
        if self.proc is None:
            return
        problems = []
        if self.proc.poll() is None:
            try:
                rc = self.stop()
            except AssertionError as e:
                problems.append(str(e).split("\n", 1)[0])
            else:
                if rc != 0:
                    problems.append(f"exited {rc} on SIGTERM")
        try:
            self.assert_clean()
        except AssertionError as e:
            problems.append(str(e).split("\n", 1)[0])
        if problems:
            raise AssertionError(f"daemon {self.dir.name} (pid {self.proc.pid}): "
                                 + "; ".join(problems) + f"\n{self.log()}")


def finish_all(daemons) -> None:
    """``finish`` every daemon, even after one fails; raise once with every failure."""
    failures = []
    for d in daemons:
        try:
            d.finish()
        except Exception as e:   # noqa: BLE001 - each is reported below
            failures.append(str(e))
    if failures:
        raise AssertionError(f"{len(failures)} of {len(daemons)} daemons failed their "
                             "teardown checks:\n\n" + "\n\n".join(failures))


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
    finish_all(started)


DEMO_MODEL = """
[[models]]
name = "demo"
version = "1"
factory = "daemon.workers.zoo:mlp_scorer"
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
    process it started (nor of the test process itself) remains, and none of
    those processes runs. Segments of other processes on the machine are not
    ours to judge."""
    scope = LeakScope("the test session")
    yield
    scope.check()
    ours = lambda: {s for s in shm_segments()  # noqa: E731
                    if segment_creator(s) in STARTED_PIDS | {os.getpid()}}
    t_end = time.monotonic() + 10
    while ours() and time.monotonic() < t_end:
        time.sleep(0.1)
    assert ours() == set(), "tests leaked shared-memory segments"


@pytest.fixture(scope="module", autouse=True)
def module_leak_check(request):
    """What a module's wider-scoped fixtures (a shared daemon) started is
    gone when the module ends, before the next module starts its own."""
    scope = LeakScope(f"module {request.module.__name__}")
    yield
    scope.check()


@pytest.fixture(autouse=True)
def leak_check(request):
    """Every process a test started has exited, and every shared-memory
    segment one of them (or this process) created during it is unlinked,
    at the test's own teardown. Set up before the test's other fixtures, so
    it checks after their teardown (``daemon_factory`` stops its daemons)."""
    scope = LeakScope(request.node.nodeid)
    yield
    scope.check()
