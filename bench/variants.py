"""Variants of a daemon config for comparison runs: the same file with one
change, e.g. batching off (``max_batch = 1``) for ``--compare-batching``, or
``[server] fronts = N`` for ``--fronts N`` and ``python -m bench.scale``.

The variant is written *beside* the original, not in a temporary folder:
the daemon resolves relative paths (checkpoints, artifacts, model modules
kept next to the config) against the config file's directory, so only
there does the variant load exactly the same models. It is removed when
the ``with`` block ends, with any file the daemon kept beside it under its
name.

The stdlib reads TOML but does not write it; ``dumps`` writes back what
``tomllib`` read from a config: tables, arrays of tables, and values that
are strings, numbers, booleans, arrays and inline tables.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tomllib
from pathlib import Path


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, str)):
        # A JSON string is a TOML basic string (same escapes); ints read alike.
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) \
            else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _key(k: str) -> str:
    bare = k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k)
    return k if bare else json.dumps(k, ensure_ascii=False)


def dumps(doc: dict) -> str:
    """TOML text that ``tomllib.loads`` reads back as ``doc``."""
    top, out = [], []
    for k, v in doc.items():
        if isinstance(v, dict):
            out += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                out += ["", f"[[{_key(k)}]]"]
                out += [f"{_key(a)} = {_value(b)}" for a, b in item.items()]
        else:
            top.append(f"{_key(k)} = {_value(v)}")   # must come before the first table
    return "\n".join(top + out).lstrip("\n") + "\n"


def without_batching(doc: dict) -> dict:
    """``doc`` with every model serving one request per batch."""
    doc = dict(doc)
    models = []
    for m in doc.get("models", []):
        m = {k: v for k, v in m.items() if k != "buckets"}   # buckets above 1 would not validate
        m["max_batch"] = 1
        models.append(m)
    doc["models"] = models
    return doc


MAX_FRONTS = 32   # daemon/config.py: a rid has 5 bits for the front


def with_fronts(n: int | str, metrics: bool | None = None):
    """The change (dict -> dict) setting ``[server] fronts = n`` (1 to 32, or
    "auto"), keeping every other key of the file.

    ``[metrics]`` is still decided inside one front, so the daemon refuses
    ``fronts`` above 1 with it on (daemon/supervisor/cores.py, single_front_parts), and
    it is on by default. ``metrics=False`` turns it off, ``True`` leaves it
    on, and None (the default) turns it off where ``n`` is not 1, the
    benchmark needing no metrics endpoint. A comparison across front
    counts passes False, so that every count serves the same."""
    if n != "auto" and not (type(n) is int and 1 <= n <= MAX_FRONTS):
        raise ValueError(f'fronts: an integer from 1 to {MAX_FRONTS} or "auto", got {n!r}')
    off = (n != 1) if metrics is None else not metrics

    def change(doc: dict) -> dict:
        doc = dict(doc)
        doc["server"] = {**doc.get("server", {}), "fronts": n}
        if off:
            doc["metrics"] = {**doc.get("metrics", {}), "enabled": False}
        return doc
    return change


@contextlib.contextmanager
def variant(config: str | os.PathLike, change, tag: str):
    """The path of ``config`` rewritten by ``change`` (dict -> dict), beside it."""
    src = Path(config).resolve()
    with open(src, "rb") as f:
        doc = change(tomllib.load(f))
    dst = src.with_name(f".{src.stem}.{tag}.{os.getpid()}.toml")
    dst.write_text(f"# {src.name} with {tag}: written by python -m bench, removed after the run\n"
                   + dumps(doc))
    try:
        yield str(dst)
    finally:
        # The file, and what the daemon kept beside it under its name
        # (<stem>.state.json and the like).
        for p in dst.parent.glob(f"{dst.stem}.*"):
            p.unlink(missing_ok=True)
