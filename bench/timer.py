"""A one-shot event-loop timer with microsecond precision, for the open
loop's arrivals.

uvloop's ``call_later`` fires on whole milliseconds (libuv keeps time in
ms), so Poisson arrivals at 1,000/s left on average 0.57 ms late (measured
against the echo server on the 2-core dev machine), and the open loop
charges that lateness to the server's latency. A Linux ``timerfd`` armed at
the arrival's absolute CLOCK_MONOTONIC time (the clock of
``time.perf_counter_ns``) and watched by the loop as a readable fd wakes it
within the kernel's timer slack (50 us by default) instead.

Python 3.11 has no ``os.timerfd_*``, so the two calls go through ctypes.
Where there is no timerfd (not Linux) it falls back to ``call_later``.
"""

from __future__ import annotations

import ctypes
import os
import time

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create, libc.timerfd_settime   # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class PreciseTimer:
    """Calls ``callback()`` once at the time given to ``at`` (perf_counter ns)."""

    def __init__(self, loop, callback):
        self.loop, self.callback = loop, callback
        self.fd = -1
        self._handle = None
        self._due = 0
        if _LIBC is not None:
            fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self.fd = fd
                loop.add_reader(fd, self._fired)

    @property
    def precise(self) -> bool:
        return self.fd >= 0

    def at(self, t_ns: int) -> None:
        """Fire at ``t_ns`` (at once if it has passed), replacing any earlier setting."""
        if self.fd < 0:
            self._due = t_ns
            self._call_later()
            return
        t_ns = max(t_ns, 1)   # an it_value of zero would disarm the timer
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(t_ns // 1_000_000_000, t_ns % 1_000_000_000))
        if _LIBC.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _call_later(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = max(0.0, (self._due - time.perf_counter_ns()) / 1e9)
        self._handle = self.loop.call_later(delay, self._called)

    def _called(self) -> None:
        # The loop's cached clock can make call_later fire a little early:
        # an arrival must never leave before its time, so wait again.
        self._handle = None
        if time.perf_counter_ns() < self._due:
            self._call_later()
        else:
            self.callback()

    def _fired(self) -> None:
        try:
            os.read(self.fd, 8)   # the expiry count; reading it re-arms readability
        except BlockingIOError:   # disarmed or re-armed since: not due yet
            return
        self.callback()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
