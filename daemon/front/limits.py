"""Limits derived from the config: what one frame may hold, and descriptors.

``frame_limits``: a valid request of the served models needs a handful of
map keys, a shape array per input (or nested arrays, one per dimension, in
the plain-list form) and strings no longer than a name, key or token. The
decoder's bounds (``ipc.framing.FrameLimits``) are set from the largest such
need over the configured models, with head-room, and recomputed on reload, so
a frame of millions of tiny objects is refused after its first few thousand.

``raise_nofile``: each connection is a descriptor. The soft RLIMIT_NOFILE is
often 1024, below ``max_connections`` plus what the daemon itself holds
(rings, eventfds, pipes, logs, the listener); past it, accept() fails with
EMFILE and the event loop drops connections with no answer and no log line.
So at start the soft limit is raised toward the hard one as far as needed,
and the daemon serves at most (soft limit - its own descriptors - a reserve)
connections, refusing the rest with RESOURCE_EXHAUSTED (an accepted
connection can be answered; one the kernel could not give us cannot).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ipc.framing import FrameLimits

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config, ModelConfig

# Head-room over a valid request's needs: clients may add fields later
# (protocol.md allows it), and the cost of a few dozen objects is nothing.
_SLACK_KEYS = 32
_SLACK_ELEMENTS = 256
# Frames up to this many bytes cannot hold more objects than this, so they
# decode without counting (ipc/framing.py): every valid small request stays
# on the uncounted path, whatever the models.
MIN_ELEMENTS = 4096
# Request strings: model, version, key, exp, op, token, ref. A routing key
# or token longer than this is not a key.
MAX_STRING = 65536
# Descriptors kept free beyond the daemon's own, so that a connection
# refused for being one too many can still be accepted and answered.
FD_RESERVE = 64
# Descriptors the front holds besides connections, per worker (ring memory,
# eventfds, pipes) and in all (listener, metrics, logs, epoll, stdio...).
FDS_PER_WORKER = 8
FDS_BASE = 64



def _input_needs(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(elements, longest array, depth below the inputs map) of one input in
    its costlier form: the plain nested list (a list per dimension) or the
    tensor map (3 keys and a shape array)."""
    listed, span = 0, 1
    for d in shape:
        span *= d
        listed += span
    longest = max(shape, default=1)
    return max(listed, 3 + len(shape)), max(longest, len(shape)), max(len(shape), 2)


def frame_limits(models: Iterable[ModelConfig]) -> FrameLimits:
    elements, array, depth, keys = 0, 16, 4, 16
    for m in models:
        need = 16 + len(m.inputs)  # the request map and the inputs map
        for _, spec in m.inputs:
            e, a, d = _input_needs(tuple(spec.shape))
            need += e
            array = max(array, a)
            depth = max(depth, 2 + d)
        elements = max(elements, need)
        keys = max(keys, len(m.inputs))
    return FrameLimits(max_str=MAX_STRING, max_array=array, max_map=keys + _SLACK_KEYS,
                       max_elements=max(MIN_ELEMENTS, elements + _SLACK_ELEMENTS),
                       max_depth=depth + 2)


def own_fds(cfg: Config) -> int:
    workers = sum(len(m.devices) for m in cfg.models)
    return FDS_BASE + FDS_PER_WORKER * workers


def raise_nofile(cfg: Config) -> tuple[int, str | None]:
    """Raise the soft descriptor limit as far as ``max_connections`` needs
    (never above the hard limit). Returns (connections the daemon can
    serve, a warning for the log or None)."""
    want = cfg.server.max_connections + own_fds(cfg) + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return cfg.server.max_connections, None
    room = max(1, soft - own_fds(cfg) - FD_RESERVE)
    return room, (f"the open-files limit (RLIMIT_NOFILE soft {soft}, hard {hard}) allows "
                  f"only {room} connections, not server.max_connections = "
                  f"{cfg.server.max_connections}; raise it (`ulimit -n {want}` before "
                  f"starting, LimitNOFILE={want} in a systemd unit, or the container's "
                  f"nofile ulimit) or lower max_connections")


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


__all__ = ["FD_RESERVE", "MAX_STRING", "MIN_ELEMENTS", "frame_limits", "own_fds",
           "raise_nofile", "open_fds"]
