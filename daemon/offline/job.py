"""One batch job, start to finish: plan, start workers, score, check, publish.

The scoring loop is the hot path, in one thread of the driver::

    fill every free ring slot with the next batch_rows rows (one copy)
    wait for a worker to finish a batch (eventfd) or die (pidfd)
    collect finished batches (outputs copied out, slot released)
    emit them in input order: part file, score stats, progress, checkpoint

Batches are numbered in input order; with several workers they may finish
out of order, so finished batches wait in ``done`` until every earlier one
is written. At most ``workers x depth`` batches are in flight, so memory
stays bounded whatever the table's size.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

from ipc import shm

from ..config import RING_SLOT_BYTES, Config, ModelConfig
from ..workers.spec import TensorDecl, share_cores, spec_for, worker_env
from . import guardrails as gr
from .checkpoint import Checkpoint, job_key
from .columns import ColumnPlan, plan_columns
from .progress import Progress
from .readers import open_reader
from .workers import WorkerError, WorkerPool
from .writers import PARTS, OutputColumns, publish

RING_DEPTH = 3          # slots per worker: one computing, one filled and waiting, one being filled
_TAG_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

# exit codes
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GUARDRAIL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class JobError(Exception):
    """The job cannot run as asked (exit 2), or failed (``code``)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    pass


@dataclass
class JobOptions:
    input: str
    output: str
    format: str | None = None
    output_format: str | None = None
    columns: dict = field(default_factory=dict)
    id_column: str | None = None
    data_tag: str | None = None
    batch_size: int = 4096
    delimiter: str | None = None
    csv_engine: str = "auto"
    checkpoint_s: float = 10.0
    checkpoint_rows: int = 0
    restart: bool = False
    score: str | None = None
    bounds: gr.Bounds = gr.Bounds()
    sample_size: int = gr.DEFAULT_SAMPLE


class DataHasher(threading.Thread):
    """sha256 of the input file, in a thread beside the scoring loop (hashlib
    and file reads release the GIL): the data version costs no wall time."""

    def __init__(self, path: str):
        super().__init__(name="data-hash", daemon=True)
        self.path = path
        self.digest: str | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
            self.digest = h.hexdigest()
        except Exception as e:   # reported by result()
            self.error = e

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise JobError(f"cannot hash {self.path}: {self.error}", EXIT_FAILED)
        return self.digest


def cpu_threads(model: ModelConfig) -> int:
    """Torch threads per CPU worker, as the daemon decides them (the driver,
    which parses the input, keeps a core as the front does)."""
    return model.threads or share_cores(model.devices.count("cpu"))


def data_version(model: ModelConfig) -> str | None:
    """The version of the data the model was trained on, from its metadata."""
    return model.metadata.data_version if model.metadata is not None else None


def output_name(model: ModelConfig, data_tag: str, fmt: str) -> str:
    """``<model>__<version>__<data tag>.<fmt>``, with the model's training
    data version after its version when its metadata gives one:
    ``<model>__<version>__<data_version>__<data tag>.<fmt>``."""
    dv = data_version(model)
    trained = f"__{dv}" if dv is not None else ""
    return f"{model.name}__{model.version}{trained}__{data_tag}.{fmt}"


class Prefetch(threading.Thread):
    """Reads chunks ahead in a thread, so the loop that feeds the workers
    never stalls on a read: measured on Parquet, reading 65k rows in the
    loop left the worker idle 37% of the time. pyarrow and file reads
    release the GIL; at most ``depth`` chunks wait, so memory stays
    bounded."""

    _END = object()

    def __init__(self, chunks, depth: int = 2):
        super().__init__(name="read-ahead", daemon=True)
        self.chunks = chunks
        self.q: queue.Queue = queue.Queue(depth)
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            for c in self.chunks:
                if not self._put(c):
                    return
            self._put(self._END)
        except BaseException as e:   # handed to the loop, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.q.get()
        if item is self._END:
            self.q.put(item)    # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        self.join()


class Assembler:
    """Cuts the reader's chunks into batches of exactly ``rows`` rows (the
    last one shorter), written straight into a slot's input arrays."""

    def __init__(self, chunks, rows: int):
        self.chunks = chunks
        self.rows = rows
        self.cur = None
        self.off = 0

    def fill(self, views) -> tuple[int, list, object]:
        n, ids, end = 0, [], None
        while n < self.rows:
            if self.cur is None or self.off == self.cur.rows:
                self.cur, self.off = next(self.chunks, None), 0
                if self.cur is None:
                    break
            c, o = self.cur, self.off
            take = min(self.rows - n, c.rows - o)
            for v, a in zip(views, c.arrays, strict=True):
                v[n:n + take] = a[o:o + take]
            ids.append(c.ids[o:o + take])
            n += take
            self.off += take
            end = (c, self.off)
        return n, ids, end


class Job:
    def __init__(self, cfg: Config, model: ModelConfig, opts: JobOptions, progress: Progress):
        self.cfg, self.model, self.opts, self.progress = cfg, model, opts, progress
        self.interrupted = False
        self.hasher: DataHasher | None = None
        # where the driver's time goes: reading into slots, waiting for the
        # workers, collecting and writing the results (in the summary)
        self.clock = {"read": 0.0, "wait": 0.0, "write": 0.0}

    # -- planning -----------------------------------------------------------------
    def _plan(self):
        o, m = self.opts, self.model
        # pyarrow's own threads only where cores are left after the workers'
        # torch threads and this process (on 2 cores they compete with the
        # worker: no clear gain measured).
        spare = len(os.sched_getaffinity(0)) - cpu_threads(m) * m.devices.count("cpu")
        reader = open_reader(o.input, o.format, delimiter=o.delimiter or
                             ("\t" if o.input.lower().endswith(".tsv") else ","),
                             engine=o.csv_engine, threads=spare >= 2)
        decls = spec_for(m, m.devices[0], 1).inputs
        meta = m.metadata
        features = {} if meta is None else \
            {n: s.features for n, s in meta.feature_schema if s.features is not None}
        plan = plan_columns(reader.header, decls, o.columns, o.id_column, reader.source,
                            features=features,
                            features_from=f"the feature_schema of {meta.path}" if meta else "")
        out_fmt = o.output_format or reader.kind
        if o.data_tag is not None and (not o.data_tag or len(o.data_tag) > 64
                                       or not set(o.data_tag) <= _TAG_OK):
            raise JobError(f"--data-tag {o.data_tag!r}: use 1 to 64 of A-Z a-z 0-9 . _ -")
        rows = o.batch_size
        if rows < 1:
            raise JobError(f"--batch-size must be at least 1, got {rows}")
        if rows * m.sample_bytes > RING_SLOT_BYTES:
            raise JobError(f"--batch-size {rows} x {m.sample_bytes} bytes per row does not fit "
                           f"the {RING_SLOT_BYTES >> 20} MiB ring slot; use at most "
                           f"{RING_SLOT_BYTES // m.sample_bytes}")
        return reader, plan, out_fmt

    def _specs(self, rows: int):
        m = self.model
        threads = cpu_threads(m)
        specs = []
        for dev in m.devices:
            s = spec_for(m, dev, threads if dev == "cpu" else 1)
            # One bucket, the batch size: every batch but the last is full, and
            # one compiled graph is all a compiled model needs.
            s.buckets = [rows]
            specs.append(s)
        return specs

    # -- the job ----------------------------------------------------------------------
    def run(self) -> dict:
        o, m = self.opts, self.model
        t_start = time.monotonic()
        reader, plan, out_fmt = self._plan()
        os.makedirs(o.output, exist_ok=True)
        st = os.stat(o.input)
        static = {"input": os.path.abspath(o.input), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "data_tag": o.data_tag, "model": m.name, "version": m.version,
                  "output_format": out_fmt}
        identity = {**static, "batch_size": o.batch_size, "header": list(plan.header),
                    "columns": [list(i.columns) for i in plan.inputs], "id_column": plan.id_index,
                    "score": o.score, "sample_size": o.sample_size,
                    "delimiter": getattr(reader, "delim", None),
                    # The model's training data: its outputs are named after
                    # it, so rows scored under another one are not resumed.
                    "data_version": data_version(m),
                    "metadata_hash": m.metadata.hash if m.metadata is not None else None,
                    # A finished checkpoint is published without starting the
                    # model, so without its weights hash: the weight files'
                    # size and mtime make it another job once they change.
                    "weights_files": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns]
                                      for p in (m.checkpoint, m.artifact) if p]}
        workdir = os.path.join(o.output, f".ringserve-batch-{job_key(static)}")
        ck, note = Checkpoint.open(workdir, identity, o.restart)
        hasher = None
        if o.data_tag is None:
            hasher = DataHasher(o.input)
            hasher.start()
        self.hasher = hasher
        if ck.complete:
            # Every row is scored (an earlier run stopped at the guardrails or
            # before its rename): publish without starting the model.
            self.progress.event("start", note, model=m.name, version=m.version, input=o.input)
            outputs = [TensorDecl.from_json(t) for t in ck.meta["outputs"]]
            summary = self._summary(ck, ck.rows, 0.0, ck.meta["weights"], outputs, plan)
            self._publish(ck, hasher, OutputColumns(outputs, plan.id_name, data_version(m)),
                          out_fmt, workdir, summary)
            summary["wall_s"] = round(time.monotonic() - t_start, 3)
            return summary
        removed = shm.sweep_stale()
        if removed:
            self.progress.event("swept", "removed shared memory left by a killed job or daemon",
                                segments=removed)
        pool = WorkerPool(self._specs(o.batch_size), o.batch_size, RING_DEPTH,
                          worker_env(self.cfg.source, os.getcwd()),
                          os.getcwd(), self.cfg.server.start_timeout_s)
        pool.start()
        try:
            if ck.rows and ck.meta.get("weights") != pool.weights_hash:
                ck, note = Checkpoint.open(workdir, identity, restart=True)
                note = "the model's weights changed since the checkpoint; starting afresh"
            ck.meta = {"weights": pool.weights_hash, "outputs": [t.to_json() for t in pool.outputs]}
            try:
                cols = OutputColumns(pool.outputs, plan.id_name, data_version(m))
                cols.index(o.score or cols.names[0])
            except ValueError as e:   # --score or --id-column against the model's outputs
                raise JobError(str(e)) from None
            self.progress.event("start", note, model=m.name, version=m.version, input=o.input,
                                devices=list(m.devices), batch_rows=o.batch_size,
                                weights=pool.weights_hash,
                                workers_ready_s=round(time.monotonic() - t_start, 2))
            t_score, rows_before = time.monotonic(), ck.rows
            self._score(pool, reader, plan, cols, ck, out_fmt)
            scoring_s = time.monotonic() - t_score
            pool.stop(wait=False)   # they exit (torch teardown) while we publish
            summary = self._summary(ck, rows_before, scoring_s, pool.weights_hash, pool.outputs,
                                    plan)
            summary["worker_busy_s"] = [round(w.compute_ns / 1e9, 3) for w in pool.workers]
            self._publish(ck, hasher, cols, out_fmt, workdir, summary)
        finally:
            pool.stop()
        summary["wall_s"] = round(time.monotonic() - t_start, 3)
        return summary

    def _summary(self, ck: Checkpoint, rows_before: int, scoring_s: float, weights: str,
                 outputs, plan: ColumnPlan) -> dict:
        o, m = self.opts, self.model
        cols = OutputColumns(outputs, plan.id_name)
        return {"rows": ck.rows, "rows_this_run": ck.rows - rows_before, "model": m.name,
                "version": m.version, "data_version": data_version(m),
                "metadata_hash": m.metadata.hash if m.metadata is not None else None,
                "weights": weights, "scoring_s": round(scoring_s, 3),
                "rows_per_s": round((ck.rows - rows_before) / max(scoring_s, 1e-9), 1),
                "driver_s": {k: round(v, 3) for k, v in self.clock.items()},
                "score": o.score or cols.names[0], "guardrails": ck.stats_obj.summary(o.bounds)}

    def _publish(self, ck: Checkpoint, hasher, cols: OutputColumns, out_fmt: str,
                 workdir: str, summary: dict) -> None:
        o, m = self.opts, self.model
        data_hash = hasher.result() if hasher is not None else None
        if data_hash and ck.data_hash and data_hash != ck.data_hash:
            raise JobError(f"{o.input} changed since the checkpoint was written (content hash "
                           f"{ck.data_hash[:16]} then, {data_hash[:16]} now); rerun with --restart",
                           EXIT_FAILED)
        if data_hash and not ck.data_hash:
            ck.data_hash = data_hash
            ck.save()
        tag = o.data_tag or f"sha256-{data_hash[:16]}"
        final = os.path.join(o.output, output_name(m, tag, out_fmt))
        summary.update(output=final, data_tag=tag)
        failures = gr.check(ck.stats_obj, o.bounds, summary["score"])
        if failures:
            summary["failed"] = failures
            raise GuardrailFailure(failures, summary, workdir, final)
        publish(ck.part_paths(), out_fmt, cols, final, {
            "model": m.name, "version": m.version, "weights": summary["weights"],
            "data_version": summary["data_version"], "metadata_hash": summary["metadata_hash"],
            "data_tag": tag,
            "input": os.path.abspath(o.input), "rows": ck.rows, "score": summary["score"]})
        ck.remove()

    def _score(self, pool: WorkerPool, reader, plan: ColumnPlan, cols: OutputColumns,
               ck: Checkpoint, out_fmt: str) -> None:
        o, m = self.opts, self.model
        score_index = cols.index(o.score or cols.names[0])
        stats = ck.stats_obj
        rows = o.batch_size
        ahead = Prefetch(reader.chunks(plan, ck.position))
        ahead.start()
        asm = Assembler(ahead, rows)
        part_cls = PARTS[out_fmt]
        part = part_cls(ck.next_part(out_fmt), cols, m.version)
        emitted = ck.rows
        position = ck.position or reader.start_position()
        meta: dict[int, tuple] = {}     # seq -> (first row, ids, end)
        done: dict[int, list] = {}      # seq -> outputs
        seq = emit = 0
        first_row = emitted
        exhausted = False
        last_commit = time.monotonic()
        since_commit = 0
        self.progress.begin(emitted)
        perf = time.perf_counter
        clock = self.clock
        # SIGTERM and Ctrl-C stop the loop between batches (never inside a write).
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                while not exhausted:
                    w = pool.with_free_slot()
                    if w is None:
                        break
                    t0 = perf()
                    n, ids, end = asm.fill(w.next_inputs())
                    clock["read"] += perf() - t0
                    if n == 0:
                        exhausted = True
                        break
                    w.submit(seq, n, rows)
                    meta[seq] = (first_row, ids, end)
                    first_row += n
                    seq += 1
                if emit == seq:
                    break
                t0 = perf()
                pool.wait(1.0)
                t1 = perf()
                clock["wait"] += t1 - t0
                try:
                    for s, outs in pool.collect():
                        done[s] = outs
                except WorkerError as e:
                    if e.seq in meta:
                        first, ids, _ = meta[e.seq]
                        n = sum(len(p) for p in ids)
                        raise WorkerError(f"rows {first} to {first + n - 1} (batch {e.seq} of "
                                          f"this run): {e}") from None
                    raise
                while emit in done:
                    outs = done.pop(emit)
                    row0, ids, end = meta.pop(emit)
                    emit += 1
                    out_cols = cols.columns(outs)
                    part.write(ids, out_cols, time.time())
                    stats.add(row0, out_cols[score_index])
                    n = outs[0].shape[0]
                    emitted += n
                    since_commit += n
                    position = end
                    now = time.monotonic()
                    if (o.checkpoint_rows and since_commit >= o.checkpoint_rows) or \
                            now - last_commit >= o.checkpoint_s:
                        part.close()
                        self._check_input(ck)
                        ck.commit(part.path, part.rows, end[0].position_after(end[1]))
                        part = part_cls(ck.next_part(out_fmt), cols, m.version)
                        last_commit, since_commit = now, 0
                    if self.progress.due():
                        self.progress.update(emitted, reader.fraction(_pos(end)))
                clock["write"] += perf() - t1
                if self.interrupted:
                    raise Interrupted()
        except (Interrupted, WorkerError):
            # Raised between batches, so the part holds whole batches: commit
            # it, and a rerun resumes after the last row written.
            if part.rows:
                part.close()
                self._check_input(ck)
                ck.commit(part.path, part.rows, _pos(position))
            raise
        finally:
            ahead.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        part.close()
        final_pos = _pos(position)
        self._check_input(ck)
        ck.commit(part.path if part.rows else None, part.rows, final_pos, complete=True)
        if not part.rows and os.path.exists(part.path):
            os.unlink(part.path)
        self.progress.update(emitted, 1.0, force=True)
        self.progress.finish()

    def _check_input(self, ck: Checkpoint) -> None:
        """Before a commit: record the input's content hash in the checkpoint
        once it is known, and stop (exit 1) if the input is not the one the
        committed rows were read from. Size and mtime (the identity) miss a
        rewrite that keeps both; without this a resume would publish rows of
        two different files as one output."""
        h = self.hasher
        if h is None or h.is_alive():
            return
        digest = h.result()
        if ck.data_hash is None:
            ck.data_hash = digest  # saved by the commit that follows
        elif digest != ck.data_hash:
            raise JobError(f"{self.opts.input} changed since the checkpoint was written "
                           f"(content hash {ck.data_hash[:16]} then, {digest[:16]} now); rerun "
                           "with --restart", EXIT_FAILED)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = True


def _pos(position):
    if isinstance(position, tuple):
        chunk, k = position
        return chunk.position_after(k)
    return position


class GuardrailFailure(JobError):
    def __init__(self, failures: list[str], summary: dict, workdir: str, final: str):
        kept = ("the previous " + os.path.basename(final) + " is unchanged"
                if os.path.exists(final) else "nothing was published")
        super().__init__("guardrails failed, " + kept + ":\n  " + "\n  ".join(failures) +
                         f"\nthe scored rows are kept in {workdir}; rerun with other bounds to "
                         "publish them, or with --restart to score again", EXIT_GUARDRAIL)
        self.summary = summary
