"""A batch job's state on disk, so a killed job resumes without losing or
repeating a row.

The job's work directory (``OUTPUT/.ringserve-batch-<key>/``, ``key`` a hash
of what the job is: input file, size and mtime, data tag, model and version,
output format) holds::

    checkpoint.json     the committed state (below), replaced atomically
    part-000000.<ext>   output rows, in input order, one file per commit
    stats-000000.npz    the guardrails' score sample at that commit

``checkpoint.json``::

    {"identity": {...},          what the job is; another job starts afresh
     "position": {...},          the reader's position of the next row to score
     "rows": int,                rows in the committed parts
     "parts": [name, ...], "part_rows": [int, ...],
     "stats": {...}, "stats_file": name,     the score guardrails' running figures
     "meta": {"weights": str, "outputs": [...]},   the model that scored the parts
     "data_hash": str | null,    content hash of the input, once known
     "complete": bool}           every row is scored; only publishing is left

A commit is: close and fsync the part being written, write the stats file,
then replace ``checkpoint.json`` (write a temporary file, fsync, rename,
fsync the directory). Whatever the job was writing when it was killed is not
in the checkpoint; ``open`` deletes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from .guardrails import DEFAULT_SAMPLE, ScoreStats

FILE = "checkpoint.json"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def job_key(static_identity: dict) -> str:
    return hashlib.sha256(json.dumps(static_identity, sort_keys=True).encode()).hexdigest()[:16]


class Checkpoint:
    def __init__(self, directory: str, identity: dict, state: dict | None = None):
        self.dir = directory
        self.identity = identity
        s = state or {}
        self.position: dict | None = s.get("position")
        self.rows: int = s.get("rows", 0)
        self.parts: list[str] = list(s.get("parts", []))
        self.part_rows: list[int] = list(s.get("part_rows", []))
        self.stats: dict | None = s.get("stats")
        self.stats_file: str | None = s.get("stats_file")
        self.data_hash: str | None = s.get("data_hash")
        self.complete: bool = s.get("complete", False)
        self.meta: dict = s.get("meta") or {}
        self.stats_obj = ScoreStats(identity.get("sample_size", DEFAULT_SAMPLE))
        if self.stats_file:
            with np.load(os.path.join(directory, self.stats_file)) as z:
                self.stats_obj = ScoreStats.restore(self.stats, {k: z[k] for k in z.files})

    @classmethod
    def open(cls, directory: str, identity: dict,
             restart: bool = False) -> tuple["Checkpoint", str]:
        """The checkpoint of this job (fresh or resumed) and a line saying which."""
        path = os.path.join(directory, FILE)
        note = "starting"
        state = None
        if os.path.exists(path) and not restart:
            try:
                with open(path) as f:
                    doc = json.load(f)
            except (OSError, ValueError) as e:
                doc, note = None, f"ignoring an unreadable checkpoint ({e}); starting afresh"
            if doc is not None and doc.get("identity") == identity:
                state = doc
                note = ("resuming a finished job (publishing only)" if doc.get("complete") else
                        f"resuming after row {doc.get('rows', 0)}")
            elif doc is not None:
                changed = sorted(k for k in set(identity) | set(doc.get("identity", {}))
                                 if identity.get(k) != doc.get("identity", {}).get(k))
                note = (f"the checkpoint is for another job (differs in {', '.join(changed)}); "
                        "starting afresh")
        elif restart and os.path.exists(directory):
            note = "--restart: discarding the checkpoint"
        if state is None and os.path.exists(directory):
            shutil.rmtree(directory)
        os.makedirs(directory, exist_ok=True)
        ck = cls(directory, identity, state)
        ck._delete_unlisted()
        return ck, note

    def _delete_unlisted(self) -> None:
        keep = {FILE, *self.parts} | ({self.stats_file} if self.stats_file else set())
        for name in os.listdir(self.dir):
            if name not in keep:
                os.unlink(os.path.join(self.dir, name))

    def next_part(self, ext: str) -> str:
        return os.path.join(self.dir, f"part-{len(self.parts):06d}.{ext}")

    def commit(self, part_path: str | None, part_rows: int, position: dict,
               complete: bool = False) -> None:
        """Record a finished (closed, fsynced) part and the state after it."""
        if part_path is not None:
            self.parts.append(os.path.basename(part_path))
            self.part_rows.append(part_rows)
            self.rows += part_rows
        self.position = position
        stats = self.stats_obj
        old = self.stats_file
        self.stats_file = f"stats-{len(self.parts):06d}.npz"
        tmp = os.path.join(self.dir, self.stats_file + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **stats.arrays())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, self.stats_file))
        self.stats = stats.state()
        self.complete = complete
        self.save()
        if old and old != self.stats_file:
            os.unlink(os.path.join(self.dir, old))

    def save(self) -> None:
        replace_json(os.path.join(self.dir, FILE), {
            "identity": self.identity, "position": self.position, "rows": self.rows,
            "parts": self.parts, "part_rows": self.part_rows, "stats": self.stats,
            "stats_file": self.stats_file, "meta": self.meta, "data_hash": self.data_hash,
            "complete": self.complete})

    def part_paths(self) -> list[str]:
        return [os.path.join(self.dir, p) for p in self.parts]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
