"""The leak checks of tests/conftest.py catch leaks, each at the teardown of
the test that made it.

An inner pytest session runs three tests against the real conftest:

1. two daemons; the first is started without waiting for ready, and its
   worker starts a process that outlives the daemon (the kind of worker
   tree the old check, which looked at the children present at ready,
   could not see). Its teardown must fail naming that process, and still
   stop the second daemon;
2. a process that creates a ``ringserve-<its pid>-`` segment and exits
   without unlinking it, as a front killed with SIGKILL does. Its teardown
   must fail naming the segment: the next daemon's start-up sweep would
   remove it, and a check at the end of the session would see nothing;
3. the same, then a daemon whose start-up sweep removes the segment within
   the same test: the teardown must still name it (removed by another
   process after its creator exited), not take its absence for a clean exit;
4. a test that starts a daemon: it passes (a leak is reported once, by the
   test that made it, not by the next).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import psutil

from tests.conftest import REPO, shm_segments

INNER = r'''
import os
import subprocess
import sys

from tests.conftest import demo_config

PIDS = os.environ["RINGSERVE_TEST_HARNESS_PIDS"]

LEAKY_MODEL = """
import os, subprocess, sys
from daemon.workers.zoo import mlp_scorer

def build():
    # a process of the worker's that nobody stops: it outlives the daemon
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         start_new_session=True)
    with open(os.path.join(os.environ["RINGSERVE_TEST_HARNESS_PIDS"], "orphan"), "w") as f:
        f.write(str(p.pid))
    return mlp_scorer()
"""


def test_a_worker_process_outlives_its_daemon(daemon_factory, tmp_path):
    (tmp_path / "d0").mkdir()
    (tmp_path / "d0" / "leaky.py").write_text(LEAKY_MODEL)
    leaky = daemon_factory(demo_config().replace("daemon.workers.zoo:mlp_scorer", "leaky:build"),
                           wait_ready=False)
    fine = daemon_factory(demo_config())
    with open(os.path.join(PIDS, "fine"), "w") as f:
        f.write(str(fine.proc.pid))
    leaky.wait_for(lambda h: h["ready"], what="ready")


def leave_a_segment(tag):
    """A process that creates ringserve-<its pid>-<tag> and exits without unlinking it."""
    code = ("import os, sys, time\n"
            "name = f'ringserve-{os.getpid()}-' + sys.argv[1]\n"
            "open('/dev/shm/' + name, 'wb').write(b'x')\n"
            "open(os.path.join(os.environ['RINGSERVE_TEST_HARNESS_PIDS'], sys.argv[1]), 'w')"
            ".write(name)\n"
            "time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", code, tag], check=True, timeout=60)


def test_a_process_leaves_a_segment():
    leave_a_segment("left")


def test_a_daemon_of_the_same_test_sweeps_it(daemon_factory):
    leave_a_segment("swept")
    d = daemon_factory(demo_config())   # its start-up sweep removes the segment
    assert d.health()["ready"]


def test_the_next_daemon_is_not_blamed(daemon_factory):
    assert daemon_factory(demo_config()).health()["ready"]
'''


def test_each_leak_fails_the_test_that_made_it(tmp_path):
    inner = tmp_path / "inner"
    pids = tmp_path / "pids"
    inner.mkdir()
    pids.mkdir()
    (inner / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (inner / "test_inner.py").write_text(INNER)
    (inner / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=str(REPO), RINGSERVE_TEST_LEAK_GRACE_S="1",
               RINGSERVE_TEST_HARNESS_PIDS=str(pids))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-c", str(inner / "pytest.ini"), "--rootdir", str(inner),
                        f"--junitxml={junit}", str(inner / "test_inner.py")],
                       cwd=inner, env=env, capture_output=True, text=True, timeout=280)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert set(cases) == {"test_a_worker_process_outlives_its_daemon",
                          "test_a_process_leaves_a_segment",
                          "test_a_daemon_of_the_same_test_sweeps_it",
                          "test_the_next_daemon_is_not_blamed"}

    def errors(name: str) -> str:
        c = cases[name]
        assert c.find("failure") is None, f"{name} failed in its body:\n{out}"
        return "\n".join((e.get("message") or "") + (e.text or "") for e in c.iter("error"))

    orphan = int((pids / "orphan").read_text())
    fine = int((pids / "fine").read_text())
    left = (pids / "left").read_text()
    swept = (pids / "swept").read_text()

    # 1: the worker's process is named, at this test's teardown; the second
    # daemon was stopped all the same, and nothing of either is running.
    first = errors("test_a_worker_process_outlives_its_daemon")
    assert "left behind" in first and str(orphan) in first, out
    assert "1 of 2 daemons failed their teardown checks" in first, out
    assert not psutil.pid_exists(fine) or psutil.Process(fine).status() == psutil.STATUS_ZOMBIE
    assert not psutil.pid_exists(orphan) or \
        psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE, "the leak check did not kill it"
    # 2: the segment is named by the test that left it, not found later
    second = errors("test_a_process_leaves_a_segment")
    assert left in second and "left behind" in second, out
    assert left not in shm_segments()
    # 3: gone by the time of the check, but not unlinked by its creator
    third = errors("test_a_daemon_of_the_same_test_sweeps_it")
    assert swept in third and "removed by another process" in third, out
    assert swept not in shm_segments()
    # 4: and the next test passed
    assert errors("test_the_next_daemon_is_not_blamed") == "", out
