"""The states of a worker, defined once.

A ``StrEnum``: each state is its own name as a string, so the ``state`` of
``health`` and ``stats`` answers, the JSON log and the control messages
carry the same words as before, and the supervisor's state reaches the
fronts unchanged. The transitions (daemon/supervisor/children.py)::

    starting -> loading -> warming -> ready
    loading | warming -> failed         (cannot load, or not ready in time: not restarted)
    any -> restarting -> loading        (it died: restarted after the backoff)
    any -> stopped                      (stopped on purpose: drain, reload)

A front's port (daemon/workers/port.py) shows ``warming`` while the worker is
ready but this front's ring is not mapped yet.
"""

from __future__ import annotations

import enum


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
