"""A child of the supervisor dies with it.

Fronts and workers ask the kernel for SIGKILL when their parent exits
(``PR_SET_PDEATHSIG``), so no orphaned front keeps serving an old config on
the port and no worker keeps a GPU. Their control channel ending is the
second line: both exit on its EOF too. The parent's pid travels in
``RINGSERVE_SUPERVISOR_PID`` because the parent may already be gone when the
child asks (the signal would then never come): the child checks
``getppid()`` after the request.
"""

from __future__ import annotations

import ctypes
import os
import signal

PARENT_ENV = "RINGSERVE_SUPERVISOR_PID"
EXIT_BOOT_FAILED = 4  # a front that cannot serve (it cannot bind): not restarted
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)  # the parent died before we asked
