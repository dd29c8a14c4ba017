"""The load generator: closed loop (pipelined) or open loop (Poisson), in
one or more spawned processes.

Closed loop: each connection keeps ``depth`` requests in flight; an answer
sends the next request on its slot at once. Open loop: requests arrive as a
Poisson process at ``rate`` per second whatever the server does, and latency
counts from the *intended* send time, so a server that falls behind is
charged for the wait it causes (no coordinated omission).

The generator shares the machine with the server, so it must cost as little
as possible per request:

- uvloop Protocols, not streams: no per-read coroutine or buffer copies;
- request bytes are encoded once per id and reused: a slot always carries
  the same id, so there is no msgpack encoding per request (with routing
  keys, a frame is a join of pre-packed pieces: bench/keys.py);
- one clock read per received chunk, one write per chunk of answers;
- latencies go into an ``array('q')`` and travel to the parent as one bytes
  blob per process, not as pickled Python numbers.

Measured window [t0, t1): a request is *measured* when it was (meant to be)
sent inside it; its latency and status are recorded, and if no answer comes
it counts as unanswered. An OK answer given by a model's fallback
(``fallback`` set: docs/operations.md, "Degraded mode") is counted apart,
under the status ``fallback:<reason>``, not as ``0``. Throughput counts
answers *arriving* inside the window, the same window over which the
caller samples the server's CPU.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import multiprocessing
import socket
import time
import traceback

import numpy as np

from clients._core import auth_frame
from ipc.framing import FrameDecoder

from .keys import Blocks, Frames, Keys
from .timer import PreciseTimer

# perf_counter is CLOCK_MONOTONIC on Linux: one clock for every process, so
# the parent can hand absolute start and window times to its children.
clock = time.perf_counter_ns
_FAR = 1 << 62                # the end of a window that has none (--requests)
OPEN_MAX_INFLIGHT = 65536     # per connection, open loop; beyond it arrivals are dropped
_WATCH_S = 0.05               # how often a load process checks its end conditions


@dataclasses.dataclass
class Plan:
    host: str
    port: int
    request: dict                  # one request map, without "id"
    connections: int = 1
    depth: int = 1
    duration: float = 10.0
    warmup: float = 0.0
    requests: int | None = None    # closed loop only: a fixed count instead of a duration
    rate: float | None = None      # open loop: arrivals per second, all processes together
    procs: int = 1
    grace: float = 5.0             # how long to wait for answers once sending stopped
    seed: int = 0
    keys: int | None = None        # routing keys from this many users; None: no key
    key_dist: str = "uniform"      # or "zipf"
    zipf_s: float = 1.1
    token: str | None = None       # the server's [auth] token: sent once per connection

    def __post_init__(self):
        if self.procs < 1 or self.connections < self.procs:
            raise ValueError(f"need 1 <= procs <= connections, got procs={self.procs}, "
                             f"connections={self.connections}")
        if self.rate is not None and self.requests is not None:
            raise ValueError("--rate (open loop) runs for a duration; drop --requests")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.keys is not None:
            Keys(self.keys, self.key_dist, self.zipf_s)   # raises for bad settings, here

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def parts(self) -> list["_Part"]:
        """One share of the load per process; rate and request count follow
        the connections, so every connection sees about the same load."""
        conns = _spread(self.connections, self.procs)
        quotas = _spread(self.requests, self.connections) if self.requests is not None else None
        parts, first = [], 0
        for i, n in enumerate(conns):
            parts.append(_Part(
                self.host, self.port, self.request, n, self.depth,
                None if self.rate is None else self.rate * n / self.connections,
                None if quotas is None else quotas[first:first + n],
                self.grace, self.seed + i, self.keys, self.key_dist, self.zipf_s, self.token))
            first += n
        return parts


@dataclasses.dataclass
class _Part:
    host: str
    port: int
    request: dict
    connections: int
    depth: int
    rate: float | None
    quotas: list[int] | None
    grace: float
    seed: int
    keys: int | None
    key_dist: str
    zipf_s: float
    token: str | None

    def frames(self) -> Frames:
        """One process's frames; its connections share them (and its key draws)."""
        keys = None if self.keys is None else Keys(self.keys, self.key_dist, self.zipf_s, self.seed)
        return Frames(self.request, keys)


def _spread(total: int, n: int) -> list[int]:
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def latency_summary(us: np.ndarray) -> dict | None:
    if len(us) == 0:
        return None
    ps = np.percentile(us, [50, 90, 95, 99, 99.9])
    out = {k: round(float(v), 1)
           for k, v in zip(("p50", "p90", "p95", "p99", "p99.9"), ps, strict=True)}
    out["max"] = round(float(us.max()), 1)
    out["mean"] = round(float(us.mean()), 1)
    return out


# -- one load process ------------------------------------------------------------------

class _Run:
    """One load process's figures and end-of-run bookkeeping."""

    def __init__(self, loop, grace: float):
        self.loop = loop
        self.grace_ns = int(grace * 1e9)
        self.t0 = self.t1 = _FAR          # set when the parent says go
        self.lat = array.array("q")       # ns, measured requests
        self.lat_at = array.array("q")    # ns, their (intended) send times
        self.routes: dict = {}            # (lane, arm) -> measured answers
        self.lag = array.array("q")       # ns, open loop: actual - intended send time
        self.statuses: dict = {}
        self.in_window = 0
        self.last_answer = 0
        self.last_measured = 0
        self.dropped = 0
        self.errors: list[str] = []
        self.busy = 0                     # connections sending or awaiting answers
        self.sending = 0                  # connections still sending
        self.stopped_at: int | None = None
        self.done = loop.create_future()

    def error(self, msg: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(msg)

    def stopped_sending(self) -> None:
        self.sending -= 1
        if self.sending == 0:
            self.stopped_at = clock()

    def finished(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def watch(self) -> None:
        """Ends the run once answers have had ``grace`` to drain, or (fixed
        count, no window end) once nothing has come back for ``grace``."""
        now = clock()
        stop = self.t1 if self.t1 != _FAR else self.stopped_at
        if stop is not None and now >= stop + self.grace_ns:
            self.finish()
        elif self.t1 == _FAR and now - max(self.last_answer, self.t0) > self.grace_ns:
            self.error(f"no answer for {self.grace_ns / 1e9:g} s; giving up")
            self.finish()
        if not self.done.done():
            self.loop.call_later(_WATCH_S, self.watch)


class _Conn(asyncio.Protocol):
    """What both loops share: the socket, the decoder, the end of a connection."""

    def __init__(self, run: _Run):
        self.run = run
        self.decoder = FrameDecoder()
        self.transport = None
        self.sent = [0]       # send time per id, 0: nothing in flight on it (id 0 unused)
        self.inflight = 0
        self.sending = True
        self.closed = False
        self.done = False

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        self.closed = True
        if self.sending or self.inflight:
            self.run.error(f"connection lost: {exc or 'closed by the server'}")
            self.inflight = 0   # what was in flight stays in `sent`: unanswered
            self.stop_sending()
            self.maybe_done()

    def stop_sending(self) -> None:
        if self.sending:
            self.sending = False
            self.run.stopped_sending()
            self.maybe_done()

    def maybe_done(self) -> None:
        if not self.sending and self.inflight == 0 and not self.done:
            self.done = True
            self.run.finished()

    def unanswered(self) -> int:
        t0, t1 = self.run.t0, self.run.t1
        return sum(1 for ts in self.sent if t0 <= ts < t1)

    def answered(self, data, now: int) -> list[int]:
        """Record the answers in ``data``; the ids they free."""
        run = self.run
        t0, t1 = run.t0, run.t1
        sent, statuses, lat, lat_at = self.sent, run.statuses, run.lat, run.lat_at
        routes = run.routes
        rids = []
        for msg in self.decoder.feed(data):
            try:
                rid = msg["id"]
                if rid == 0 and msg["status"] == 0:
                    continue   # the auth op's answer
                ts = sent[rid]
            except (TypeError, KeyError, IndexError):   # a ProtocolError, or not our id
                run.error(f"unexpected answer: {msg!r:.300}")
                continue
            if not ts:
                run.error(f"answer for id {rid}, which has nothing in flight: {msg!r:.300}")
                continue
            sent[rid] = 0
            if t0 <= ts < t1:
                lat.append(now - ts)
                lat_at.append(ts)
                st = msg.get("status")
                if st == 0 and "fallback" in msg:  # a fallback's answer, not the model's:
                    st = f"fallback:{msg['fallback']}"  # reported apart from status 0
                statuses[st] = statuses.get(st, 0) + 1
                route = (msg.get("lane"), msg.get("arm"))
                routes[route] = routes.get(route, 0) + 1
                run.last_measured = now
            if t0 <= now < t1:
                run.in_window += 1
            rids.append(rid)
        if rids:
            run.last_answer = now
            self.inflight -= len(rids)
        return rids


class _Closed(_Conn):
    def __init__(self, run: _Run, frames: Frames, depth: int, quota: int | None):
        super().__init__(run)
        self.frames = frames  # slot i always carries id i
        self.sent = [0] * (depth + 1)
        self.quota = quota    # requests left to send in the window; None: until t1

    def start(self) -> None:
        self._send(list(range(1, len(self.sent))))

    def _send(self, slots: list) -> None:
        """Send the next request on each of ``slots``, as far as the window
        or the quota allows."""
        now = clock()
        n = len(slots)
        if not self.sending or self.closed or now >= self.run.t1:
            n = 0
        elif self.quota is not None and now >= self.run.t0:
            n = min(n, self.quota)
            self.quota -= n
        if n:
            sent, frame = self.sent, self.frames.get
            if n < len(slots):
                slots = slots[:n]
            for rid in slots:
                sent[rid] = now
            self.transport.write(b"".join([frame(rid) for rid in slots]))
            self.inflight += n
        if self.sending and (n == 0 or self.quota == 0):
            self.stop_sending()

    def data_received(self, data):
        slots = self.answered(data, clock())
        if slots:
            self._send(slots)
            self.maybe_done()


class _Open(_Conn):
    def __init__(self, run: _Run, frames: Frames):
        super().__init__(run)
        self.frames = frames
        self.free: list[int] = []   # ids with nothing in flight; the next new id is len(sent)
        self.arrivals: _Arrivals | None = None
        self.pending: list[bytes] = []

    def enqueue(self, intended: int) -> None:
        if self.free:
            rid = self.free.pop()
        elif len(self.sent) <= OPEN_MAX_INFLIGHT:
            rid = len(self.sent)
            self.sent.append(0)
        else:
            self.run.dropped += 1
            return
        self.sent[rid] = intended
        self.pending.append(self.frames.get(rid))
        self.inflight += 1

    def flush(self) -> None:
        if self.pending:
            if not self.closed:
                self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def data_received(self, data):
        now = clock()
        rids = self.answered(data, now)
        if rids:
            self.free.extend(rids)
            self.maybe_done()
        if self.arrivals.next <= now:
            self.arrivals.poll(now)


class _Arrivals:
    """Poisson arrivals from ``start`` to t1, dealt round-robin to the connections.

    A timer (bench/timer.py: a timerfd, since uvloop's own timers fire on
    whole milliseconds) wakes the loop for the next arrival, and arrivals
    are also sent whenever an answer comes in (``poll``: one clock
    comparison), which under load saves most of the wake-ups. Sending early
    would flatter the latency and spinning would steal a core from the
    server, so an arrival never leaves before its time, and its lateness is
    recorded (``send_lag_us``) for the reader to weigh against the latency.
    """

    def __init__(self, loop, run: _Run, conns: list[_Open], rate: float, seed: int):
        self.loop, self.run, self.conns = loop, run, conns
        rng = np.random.default_rng(seed)
        mean_ns = 1e9 / rate
        self.gaps = Blocks(lambda n: rng.exponential(mean_ns, n).astype(np.int64))
        self.next = _FAR      # intended time of the next arrival
        self.k = 0
        self.timer = PreciseTimer(loop, self._tick)
        for c in conns:
            c.arrivals = self

    def start(self, t_start: int) -> None:
        self.next = t_start + next(self.gaps)
        self._tick()

    def poll(self, now: int) -> None:
        """Send every arrival due by ``now``."""
        run, conns = self.run, self.conns
        t0, t1, n, k, nxt = run.t0, run.t1, len(conns), self.k, self.next
        while nxt <= now and nxt < t1:
            conns[k % n].enqueue(nxt)
            if nxt >= t0:
                run.lag.append(now - nxt)
            k += 1
            nxt += next(self.gaps)
        self.k = k
        for c in conns:
            c.flush()
        if nxt >= t1:
            nxt = _FAR
            for c in conns:
                c.stop_sending()
        self.next = nxt

    def _tick(self) -> None:
        self.poll(clock())
        if self.next != _FAR:
            self.timer.at(self.next)


def _delay(t_ns: int) -> float:
    return max(0.0, (t_ns - clock()) / 1e9)


async def _load_process(part: _Part, pipe) -> tuple[dict, list[bytes]]:
    loop = asyncio.get_running_loop()
    run = _Run(loop, part.grace)
    conns: list[_Conn] = []
    frames = part.frames()
    for i in range(part.connections):
        if part.rate is not None:
            proto: _Conn = _Open(run, frames)
        else:
            proto = _Closed(run, frames, part.depth, part.quotas[i] if part.quotas else None)
        await loop.create_connection(lambda p=proto: p, part.host, part.port)
        if part.token is not None:
            proto.transport.write(auth_frame(part.token))
        conns.append(proto)
    run.busy = run.sending = len(conns)
    pipe.send("ready")
    t_start, t0, t1 = pipe.recv()   # blocking is fine: nothing is in flight yet
    run.t0, run.t1 = t0, (_FAR if t1 is None else t1)

    # process_time counts every thread of this process: the loop and the
    # interpreter alike, which is what competes with the server for cores.
    cpu: dict = {}

    def cpu_mark(key):
        cpu.setdefault(key, (clock(), time.process_time()))

    loop.call_later(_delay(t0), cpu_mark, "t0")
    if t1 is not None:
        loop.call_later(_delay(t1), cpu_mark, "t1")
    if part.rate is not None:
        arrivals = _Arrivals(loop, run, conns, part.rate, part.seed)
        loop.call_later(_delay(t_start), arrivals.start, t_start)
    else:
        loop.call_later(_delay(t_start), lambda: [c.start() for c in conns])
    loop.call_later(_WATCH_S, run.watch)
    await run.done
    if part.rate is not None:
        arrivals.timer.close()
    cpu_mark("t0")
    cpu_mark("t1")
    for c in conns:
        c.transport.close()

    header = {
        "answers": run.in_window, "statuses": run.statuses,
        "unanswered": sum(c.unanswered() for c in conns), "dropped": run.dropped,
        "errors": run.errors, "last_measured": run.last_measured,
        "routes": [[lane, arm, n] for (lane, arm), n in run.routes.items()],
        "cpu_s": cpu["t1"][1] - cpu["t0"][1], "cpu_wall_s": (cpu["t1"][0] - cpu["t0"][0]) / 1e9,
    }
    lat_us = np.frombuffer(run.lat, dtype=np.int64) / 1000.0
    lag_us = np.frombuffer(run.lag, dtype=np.int64) / 1000.0
    at_s = (np.frombuffer(run.lat_at, dtype=np.int64) - t0) / 1e9
    return header, [lat_us.tobytes(), lag_us.tobytes(), at_s.tobytes()]


def _process_main(part: _Part, pipe) -> None:
    """Entry point of a spawned load process."""
    try:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            header, blobs = runner.run(_load_process(part, pipe))
    except BaseException:
        pipe.send({"error": traceback.format_exc()})
        return
    pipe.send(header)
    for blob in blobs:
        pipe.send_bytes(blob)


# -- the parent -------------------------------------------------------------------------

def _recv(pipe, proc, timeout: float | None, what: str):
    t_end = None if timeout is None else time.monotonic() + timeout
    while not pipe.poll(0.2):
        if not proc.is_alive() and not pipe.poll(0):
            raise RuntimeError(f"load process {proc.pid} exited ({proc.exitcode}) before {what}")
        if t_end is not None and time.monotonic() > t_end:
            raise RuntimeError(f"load process {proc.pid}: no {what} within {timeout:g} s")
    try:
        msg = pipe.recv()
    except EOFError:
        proc.join(1)
        raise RuntimeError(f"load process {proc.pid} exited ({proc.exitcode}) "
                           f"before {what}") from None
    if isinstance(msg, dict) and "error" in msg:
        raise RuntimeError(f"load process {proc.pid} failed:\n{msg['error']}")
    return msg


def _sleep_until(t_ns: int) -> None:
    time.sleep(_delay(t_ns))


def run_load(plan: Plan, mark=None) -> dict:
    """Run ``plan`` in ``plan.procs`` spawned processes and merge their figures.

    ``mark(label)``, if given, is called at the start of the measured window
    ("start"), in its middle ("mid", duration runs only) and at its end
    ("end"); what it returns is kept under ``marks``. The caller samples the
    server there (CPU, stats), so both sides measure the same window.
    """
    ctx = multiprocessing.get_context("spawn")   # no inherited loop, sockets or torch state
    procs, pipes = [], []
    marks: dict = {}
    mark = mark or (lambda label: None)
    try:
        for part in plan.parts():
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_process_main, args=(part, theirs), daemon=True,
                            name="bench-load")
            p.start()
            theirs.close()
            procs.append(p)
            pipes.append(mine)
        for p, pipe in zip(procs, pipes, strict=True):
            _recv(pipe, p, 120, "connecting")
        # Start a little later than now, so every process begins together.
        t_start = clock() + 100_000_000
        t0 = t_start + int(plan.warmup * 1e9)
        t1 = None if plan.requests is not None else t0 + int(plan.duration * 1e9)
        for pipe in pipes:
            pipe.send((t_start, t0, t1))
        _sleep_until(t0)
        marks["start"] = mark("start")
        if t1 is not None:
            _sleep_until(t0 + (t1 - t0) // 2)
            marks["mid"] = mark("mid")
            _sleep_until(t1)
            marks["end"] = mark("end")
        headers, blobs = [], []
        for p, pipe in zip(procs, pipes, strict=True):
            headers.append(_recv(pipe, p, None if t1 is None else plan.grace + 60, "its figures"))
            blobs.append([np.frombuffer(pipe.recv_bytes(), dtype=np.float64) for _ in range(3)])
        if t1 is None:
            marks["end"] = mark("end")
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(30)
    lat, lag, at = (np.concatenate(b) for b in zip(*blobs, strict=True))
    return _merge(plan, headers, lat, lag, at, t0, t1, marks)


def _merge(plan: Plan, headers: list[dict], lat: np.ndarray, lag: np.ndarray, at: np.ndarray,
           t0: int, t1: int | None, marks: dict) -> dict:
    if t1 is None:
        last = max(h["last_measured"] for h in headers)
        window_s = max(last - t0, 1) / 1e9
    else:
        window_s = (t1 - t0) / 1e9
    statuses: dict = {}
    for h in headers:
        for k, v in h["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    answers = sum(h["answers"] for h in headers)
    routes: dict = {}
    for h in headers:
        for lane, arm, n in h["routes"]:
            name = f"{lane}/{arm if arm is not None else '-'}"
            routes[name] = routes.get(name, 0) + n
    per_proc = [round(100 * h["cpu_s"] / max(h["cpu_wall_s"], 1e-9), 1) for h in headers]
    return {
        "mode": plan.mode, "connections": plan.connections, "depth": plan.depth,
        "procs": plan.procs, "rate": plan.rate, "requests": plan.requests,
        "window_s": round(window_s, 3), "answers": answers,
        "throughput_rps": round(answers / window_s, 1),
        "measured": int(len(lat)), "latency_us": latency_summary(lat),
        "send_lag_us": latency_summary(lag) if plan.mode == "open" else None,
        "statuses": dict(sorted(statuses.items())),
        "routes": dict(sorted(routes.items())),
        "unanswered": sum(h["unanswered"] for h in headers),
        "dropped": sum(h["dropped"] for h in headers),
        "errors": [e for h in headers for e in h["errors"]][:10],
        "loadgen_cpu_pct": round(sum(per_proc), 1), "loadgen_cpu_pct_by_proc": per_proc,
        "marks": marks,
        # Per measured request: send time (s from the window's start) and
        # latency (us), for the plots; too big for the JSON.
        "_timeline": (at, lat),
    }
