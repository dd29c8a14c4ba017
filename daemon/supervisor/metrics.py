"""Prometheus metrics and load-balancer probes over HTTP, on a port of their own.

``GET /metrics`` (text exposition format), ``GET /healthz`` (200 while the
process serves), ``GET /readyz`` (200 once every worker is warm and the
daemon is not draining, 503 otherwise).

Nothing here runs on the request path. The serving code keeps plain counters
and histograms (``daemon/observe/stats.py``: the front is one thread, so no locks);
at scrape time ``Collector`` reads them and builds metric families, which
``prometheus_client`` writes in its exposition format. Workers' figures (the
compute time of each batch) already travel with every result through the
ring, so none of them is read with a lock either. Measured reason for not
using ``prometheus_client``'s own Counter/Histogram on the hot path: each
``inc``/``observe`` takes a ``threading.Lock``, several per request.

Names follow Prometheus conventions: ``ringserve_`` prefix, base units
(seconds), ``_total`` counters, one label set per model, version, lane, arm,
status. docs/operations.md lists them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ipc.status import Status

from ..observe.stats import DURATION_BOUNDS_S
from ..workers.state import WorkerState

log = logging.getLogger("ringserve.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192
# A client has this long to send its request head once connected (one that
# connects and sends nothing, or trickles bytes, is closed), and this long to
# take its answer (one that stops reading is cut off, not waited on).
READ_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
REFUSAL_LOG_INTERVAL_S = 60.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _status(code: int) -> str:
    try:
        return Status(code).name
    except ValueError:
        return str(code)


def _histogram(family: HistogramMetricFamily, labels: list[str], h, bounds, scale: float) -> None:
    cum = h.cumulative()
    buckets = [(repr(float(b)), c) for b, c in zip(bounds, cum, strict=False)] + [("+Inf", cum[-1])]
    family.add_metric(labels, buckets, h.sum * scale)


class Collector:
    def __init__(self, app):
        self.app = app

    def collect(self):  # noqa: C901 - one flat list of families reads best
        app = self.app
        mv = ["model", "version"]
        requests = CounterMetricFamily(
            "ringserve_requests", "Infer answers by model, version, lane, A/B arm and status.",
            labels=mv + ["lane", "arm", "status"])
        duration = HistogramMetricFamily(
            "ringserve_request_duration_seconds",
            "Time from arrival to answer of OK infer answers.", labels=mv + ["lane"])
        queue = HistogramMetricFamily(
            "ringserve_queue_duration_seconds",
            "Time a request waited in the front before its batch went to a worker.", labels=mv)
        compute = HistogramMetricFamily(
            "ringserve_compute_duration_seconds",
            "Time a worker spent on one batch (measured in the worker).", labels=mv)
        batch = HistogramMetricFamily(
            "ringserve_batch_size", "Requests per batch (before padding).", labels=mv)
        dispatch = CounterMetricFamily(
            "ringserve_batches", "Batches handed to workers, by why they left the queue: "
            "idle (a worker had nothing to do), full (max_batch), window (window_ms passed), "
            "deadline (the oldest request had less than a window left), shadow.",
            labels=mv + ["reason"])
        padding = CounterMetricFamily(
            "ringserve_padding_rows", "Rows of padding added to reach a batch bucket.", labels=mv)
        depth = GaugeMetricFamily("ringserve_queue_depth", "Requests queued in the front.",
                                  labels=mv)
        shed = CounterMetricFamily(
            "ringserve_shed", "Requests refused or expired by a model queue, by reason "
            "(queue_full, no_worker, deadline).", labels=mv + ["reason"])
        cache = CounterMetricFamily(
            "ringserve_cache_requests", "Response-cache lookups by result (hit, miss).",
            labels=mv + ["result"])
        defaulted = CounterMetricFamily(
            "ringserve_defaulted_inputs", "Accepted requests that left an input out and took "
            "its declared default, per input.", labels=mv + ["input"])
        busy = GaugeMetricFamily(
            "ringserve_worker_busy_ratio", "Share of the last 10 s a worker spent computing.",
            labels=mv + ["device", "worker"])
        restarts = CounterMetricFamily(
            "ringserve_worker_restarts", "Restarts of a worker after it died.",
            labels=mv + ["device", "worker"])
        ready = GaugeMetricFamily("ringserve_worker_ready",
                                  "1 when the worker is warm and serving.",
                                  labels=mv + ["device", "worker"])
        fallback = CounterMetricFamily(
            "ringserve_fallback_answers", "Answers given by a version's fallback instead of "
            "it (version: the one the router chose; answered_by: the fallback version or "
            "fallback:constant), by reason (no_worker, queue_full, deadline_near, model_error).",
            labels=mv + ["lane", "arm", "reason", "answered_by"])
        drift = GaugeMetricFamily(
            "ringserve_drift_ks_distance", "Kolmogorov-Smirnov distance of a served input "
            "feature from its reference.", labels=mv + ["feature"])
        for q in app.all_queues():
            s, lv = q.stats, [q.name, q.version]
            for (lane, arm, status), n in s.by_route.items():
                requests.add_metric(lv + [lane, arm or "", _status(status)], n)
            for lane, h in s.duration.items():
                _histogram(duration, lv + [lane], h, DURATION_BOUNDS_S, 1e-6)
            _histogram(queue, lv, s.queue_time, DURATION_BOUNDS_S, 1e-6)
            _histogram(compute, lv, s.compute_time, DURATION_BOUNDS_S, 1e-6)
            _histogram(batch, lv, s.batch_hist, s.batch_hist.bounds, 1.0)
            for reason, n in s.dispatch.items():
                dispatch.add_metric(lv + [reason], n)
            padding.add_metric(lv, s.padded_rows)
            depth.add_metric(lv, q.queued)
            for reason, n in s.shed.items():
                shed.add_metric(lv + [reason], n)
            for result, n in s.cache.items():
                cache.add_metric(lv + [result], n)
            for name, n in s.defaulted.items():
                defaulted.add_metric(lv + [name], n)
            for w in q.workers:
                wl = lv + [w.device, str(w.index)]
                busy.add_metric(wl, w.busy.fraction())
                restarts.add_metric(wl, w.restarts)
                ready.add_metric(wl, 1.0 if w.state == WorkerState.READY else 0.0)
            if q.drift is not None:
                for feature, d in q.drift.named_distances():
                    drift.add_metric(lv + [feature], d)
            if q.fallback is not None:
                for (lane, arm, reason, by), n in q.fallback.answered.items():
                    fallback.add_metric(lv + [lane, arm or "", reason, by], n)
        yield from (requests, duration, queue, compute, batch, dispatch, padding, depth, shed,
                    cache, defaulted, busy, restarts, ready, drift, fallback)

        rejected = CounterMetricFamily(
            "ringserve_rejected", "Requests refused before reaching a model queue (bad input "
            "or frame, unknown model or version, draining, too many connections, auth, rate "
            "limit, an internal error), by status.", labels=["status"])
        for status, n in app.rejected.items():
            rejected.add_metric([_status(status)], n)
        reloads = CounterMetricFamily("ringserve_reloads", "Config reloads by result.",
                                      labels=["result"])
        for result, n in app.reloads.items():
            reloads.add_metric([result], n)
        conns = GaugeMetricFamily("ringserve_connections", "Open client connections.")
        conns.add_metric([], len(app.conns))
        up = GaugeMetricFamily("ringserve_ready", "1 when every worker is warm and the daemon "
                               "is not draining.")
        up.add_metric([], 1.0 if app.ready() else 0.0)
        degraded = GaugeMetricFamily("ringserve_degraded", "1 while some version is answered "
                                     "by its fallback alone (no ready worker of its own).")
        degraded.add_metric([], 1.0 if app.degraded() else 0.0)
        refused = CounterMetricFamily(
            "ringserve_access_refused", "Requests refused by [auth] or [rate_limit], by reason "
            "(unauthenticated, bad_token, reauthenticate, rate_limited).", labels=["reason"])
        if app.access is not None:
            for reason, n in app.access.refused.items():
                refused.add_metric([reason], n)
        closed = CounterMetricFamily(
            "ringserve_connections_closed", "Connections the server closed on its own, by "
            "reason (idle, header_timeout, slow_frame, frame_budget, frame_too_large, "
            "auth_timeout, auth, per_client, max_connections, proxy_header, draining).",
            labels=["reason"])
        for reason, n in app.closed_by.items():
            closed.add_metric([reason], n)
        frame_bytes = GaugeMetricFamily(
            "ringserve_frame_buffer_bytes", "Bytes held for unfinished frames, all connections "
            "(bounded by server.frame_buffer_budget_bytes).")
        frame_bytes.add_metric([], app.frame_bytes)
        yield from (rejected, reloads, conns, up, degraded, refused, closed, frame_bytes)

        weight = GaugeMetricFamily("ringserve_rollout_weight", "Canary share of keyed traffic.",
                                   labels=["model", "stable", "candidate"])
        stage = GaugeMetricFamily("ringserve_rollout_stage", "Index of the rollout's stage.",
                                  labels=["model"])
        rolled = GaugeMetricFamily("ringserve_rollout_rolled_back",
                                   "1 when the guardrails rolled the canary back.",
                                   labels=["model"])
        checks = CounterMetricFamily(
            "ringserve_guardrail_checks", "Guardrail checks by verdict (hold, pass, fail, "
            "rollback) and the actions taken (advance, promote).", labels=["model", "verdict"])
        for ro in app.rollouts.snapshot():
            weight.add_metric([ro["model"], ro["stable"], ro["candidate"]], ro["weight"])
            stage.add_metric([ro["model"]], ro["stage"])
            rolled.add_metric([ro["model"]], 1.0 if ro["status"] == "rolled_back" else 0.0)
        for (model, verdict), n in app.rollouts.verdicts.items():
            checks.add_metric([model, verdict], n)
        yield from (weight, stage, rolled, checks)

        sl = ["model", "candidate"]
        mirrored = CounterMetricFamily(
            "ringserve_shadow_requests", "Mirrored requests by outcome: the shadow's answer "
            "status, or shed_<reason>.", labels=sl + ["result"])
        agreement = GaugeMetricFamily("ringserve_shadow_agreement_ratio",
                                      "Share of compared shadow answers that agree.", labels=sl)
        diff_mean = GaugeMetricFamily("ringserve_shadow_score_diff_mean",
                                      "Mean absolute score difference, shadow against primary.",
                                      labels=sl)
        diff_max = GaugeMetricFamily("ringserve_shadow_score_diff_max",
                                     "Largest absolute score difference seen.", labels=sl)
        for sh in app.shadows.values():
            k = [sh.model, sh.candidate]
            for status, n in sh.by_status.items():
                mirrored.add_metric(k + [_status(status)], n)
            for reason, n in sh.shed.items():
                mirrored.add_metric(k + [f"shed_{reason}"], n)
            if sh.compared:
                agreement.add_metric(k, sh.agreed / sh.compared)
                diff_mean.add_metric(k, sh.diff_sum / sh.compared)
                diff_max.add_metric(k, sh.diff_max)
        yield from (mirrored, agreement, diff_mean, diff_max)

        records = CounterMetricFamily(
            "ringserve_request_log_records", "Request-log records by result (written, "
            "dropped when the writer fell behind); no samples while the log is off.",
            labels=["result"])
        if app.reqlog is not None:
            records.add_metric(["written"], app.reqlog.written)
            records.add_metric(["dropped"], app.reqlog.dropped)
        yield records


class MetricsServer:
    """A minimal HTTP/1.1 server on the front's event loop: one request per
    connection, GET only, bounded header size, read and write time, and at
    most ``[metrics] max_connections`` connections at once (a further one is
    answered 503 and closed at once: a scraper flood or a pile of idle
    sockets cannot grow the front's memory or file descriptors)."""

    def __init__(self, source):
        # ``source`` (the supervisor): ``cfg``, ``ready()``, ``draining``,
        # ``degraded()`` and ``async view()``, the machine's merged figures
        # (daemon/observe/figures.py) that a scrape renders.
        self.app = source
        self.collector = Collector(None)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server = None
        self.port = None
        self.max_connections = 0
        self.open = 0      # connections being served now
        self.refused = 0   # over the cap, since start
        self._refusal_logged = -REFUSAL_LOG_INTERVAL_S

    async def start(self, host: str, port: int) -> None:
        # [metrics] changes need a restart, so the cap is read once, here.
        self.max_connections = self.app.cfg.metrics.max_connections
        self.server = await asyncio.start_server(self._handle, host, port,
                                                 limit=MAX_REQUEST_HEAD, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics endpoint listening", extra={"host": host, "port": self.port,
                                                      "max_connections": self.max_connections})

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def render(self, path: str, view=None) -> tuple[int, str, bytes]:
        if path == "/metrics":
            self.collector.app = view
            try:
                return 200, CONTENT_TYPE, generate_latest(self.registry)
            finally:
                self.collector.app = None
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self.app.ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", (b"draining\n" if self.app.draining else
                                       b"not ready (degraded: answering from fallbacks)\n"
                                       if self.app.degraded() else b"not ready\n")
        return 404, "text/plain", b"not found; paths: /metrics /healthz /readyz\n"

    @staticmethod
    def _response(code: int, ctype: str, body: bytes) -> bytes:
        return (f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Over the cap: a short 503 into the socket buffer, then close; no
        read, no wait, nothing kept."""
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            self._refusal_logged = now
            log.warning("metrics endpoint at its connection cap; refusing connections",
                        extra={"max_connections": self.max_connections, "refused": self.refused})
        writer.write(self._response(503, "text/plain", b"too many connections\n"))
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.max_connections:
            self._refuse(writer)
            return
        self.open += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                code, ctype, body = 400, "text/plain", b"bad request\n"
            elif parts[0] not in (b"GET", b"HEAD"):
                code, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                path = parts[1].split(b"?", 1)[0].decode("latin-1")
                view = await self.app.view() if path == "/metrics" else None
                code, ctype, body = self.render(path, view)
                if parts[0] == b"HEAD":
                    body = b""
            writer.write(self._response(code, ctype, body))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            writer.transport.abort()  # close() would wait to flush to a client that never reads
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # a bug of ours: log it, never take the daemon down
            log.exception("metrics request failed")
        finally:
            self.open -= 1
            writer.close()
