"""Model metadata: what a model was trained on, from a JSON file beside its weights.

A training pipeline writes the file next to the checkpoint or artifact it
produced, named after it with ``.json`` appended (``ranker-v7.pt`` ->
``ranker-v7.pt.json``), or anywhere a ``[[models]]`` entry's ``metadata``
key points::

    {"data_version": "clicks-2026-11-30",
     "feature_schema": {"input": {"dtype": "float32", "shape": [128],
                                  "features": ["f0", "f1", ..., "f127"]}},
     "training": {"epochs": 12, "lr": 0.001}}

- ``data_version`` (required): the version of the data the model was trained
  on; 1 to 64 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit (it
  becomes part of file names: ``ringserve batch`` names its output with it).
- ``feature_schema`` (required): for each input, under the config's names
  (``input`` for a model with one unnamed input), the dtype and shape of one
  sample (no batch dimension), as the config writes them. ``features``
  (optional): the table's column names of the input's elements, in C order,
  one per element; ``ringserve batch`` reads those columns when no
  ``--columns`` maps the input.
- ``training`` (optional): any JSON object (hyper-parameters, code
  revision, metrics); reported as it is, never interpreted.

Any other top-level key is refused, so that a misspelt ``data_version`` is
an error and not a model served as if it had none. The hash of the metadata
is ``sha256:`` and the hex sha256 of the file's bytes, exactly as read.

Who reads it: the front, when it validates a config (``daemon/config.py``:
a feature schema that does not match the declared inputs makes the config
invalid, so a SIGHUP that brings one is refused); the worker again when it
loads the model (``daemon/workers/runtime.py``: the file may have changed since);
the batch job, for its output's name and columns. Torch-free, and no I/O
beyond reading the one file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ipc.tensors import DTYPES

__all__ = ["MAX_BYTES", "MetadataError", "FeatureSpec", "ModelMetadata", "default_path",
           "read_metadata", "parse_metadata", "schema_mismatch", "describe_inputs"]

# Bytes read at most: a schema with features names for thousands of inputs
# is far below it; a file past it is not metadata.
MAX_BYTES = 16 * 1024 * 1024
KEYS = ("data_version", "feature_schema", "training")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class MetadataError(ValueError):
    """A metadata file that cannot be read or says something impossible;
    the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One input as the model was trained on it."""

    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] | None   # column names of its elements, C order

    def text(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    path: str                     # absolute path of the file read
    hash: str                     # "sha256:<hex>" of the file's bytes
    data_version: str
    feature_schema: tuple[tuple[str, FeatureSpec], ...]
    training: str                 # the "training" object as JSON text ("{}" without one)

    def features(self, name: str) -> tuple[str, ...] | None:
        for n, spec in self.feature_schema:
            if n == name:
                return spec.features
        return None

    def describe(self) -> dict[str, Any]:
        """For the ``models`` op: every field but the path."""
        schema: dict[str, dict[str, Any]] = {}
        for n, s in self.feature_schema:
            schema[n] = {"dtype": s.dtype, "shape": list(s.shape)}
            if s.features is not None:
                schema[n]["features"] = list(s.features)
        return {"data_version": self.data_version, "hash": self.hash,
                "feature_schema": schema, "training": json.loads(self.training)}


def default_path(weights: str | None) -> str | None:
    """Where the metadata of a checkpoint or artifact file is looked for."""
    return weights + ".json" if weights else None


def read_metadata(path: str) -> ModelMetadata:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise MetadataError(f"cannot read the metadata file {path}: "
                            f"{e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise MetadataError(f"the metadata file {path} is larger than {MAX_BYTES >> 20} MiB; "
                            "keep bulky training records elsewhere and link them from "
                            "\"training\"")
    return parse_metadata(raw, os.path.abspath(path))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = {}
    for k, v in pairs:
        if k in out:
            raise MetadataError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


def parse_metadata(raw: bytes, path: str) -> ModelMetadata:
    """The metadata in ``raw`` (the bytes of the file at ``path``)."""
    def bad(problem: str) -> MetadataError:
        return MetadataError(f"{path}: {problem}")

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise bad(f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except MetadataError as e:
        raise bad(str(e)) from None
    except (ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise bad(f"must be a JSON object with {', '.join(KEYS)}, got {_short(doc)}")
    for key in doc:
        if key not in KEYS:
            import difflib
            near = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else \
                "put free training parameters under \"training\""
            raise bad(f"unknown key {key[:64]!r}; {hint} (keys: {', '.join(KEYS)})")
    version = doc.get("data_version")
    if version is None:
        raise bad("missing data_version: the version of the data the model was trained on")
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise bad("data_version must be a string of 1 to 64 of A-Z a-z 0-9 . _ -, starting "
                  f"with a letter or digit, got {_short(version)}")
    schema = doc.get("feature_schema")
    if schema is None:
        raise bad("missing feature_schema: the dtype and shape of each input the model was "
                  "trained on, e.g. {\"input\": {\"dtype\": \"float32\", \"shape\": [128]}}")
    if not isinstance(schema, dict) or not schema:
        raise bad(f"feature_schema must be a non-empty object of input name to "
                  f"{{dtype, shape, features?}}, got {_short(schema)}")
    specs = tuple((name, _feature(name, spec, bad)) for name, spec in schema.items())
    training = doc.get("training", {})
    if not isinstance(training, dict):
        raise bad(f"training must be a JSON object of free parameters, got {_short(training)}")
    return ModelMetadata(path=path, hash="sha256:" + hashlib.sha256(raw).hexdigest(),
                         data_version=version, feature_schema=specs,
                         training=json.dumps(training, sort_keys=True, separators=(",", ":")))


def _feature(name: str, spec: Any, bad: Callable[[str], MetadataError]) -> FeatureSpec:
    where = f"feature_schema.{name[:64]}"
    if not _NAME_RE.fullmatch(name):
        raise bad(f"{where}: input names are Python identifiers of at most 64 characters, as "
                  "in the config (\"input\" for a model with one unnamed input)")
    if not isinstance(spec, dict):
        raise bad(f"{where}: must be an object like {{\"dtype\": \"float32\", \"shape\": [128]}}, "
                  f"got {_short(spec)}")
    for key in spec:
        if key not in ("dtype", "shape", "features"):
            raise bad(f"{where}: unknown key {key[:64]!r} (keys: dtype, shape, features)")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in DTYPES:
        raise bad(f"{where}.dtype: must be one of {', '.join(DTYPES)}, got {_short(dtype)}")
    if (not isinstance(shape, list) or not shape
            or not all(type(d) is int and d > 0 for d in shape)):
        raise bad(f"{where}.shape: must be a non-empty list of positive integers (one sample, "
                  f"no batch dimension), got {_short(shape)}")
    features = spec.get("features")
    if features is not None:
        n = math.prod(shape)
        if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features):
            raise bad(f"{where}.features: must be a list of column names, got {_short(features)}")
        if len(features) != n:
            raise bad(f"{where}.features: lists {len(features)} names, but shape {shape} has "
                      f"{n} elements; name each element once, in C order")
        if len(set(features)) != n:
            dup = next(f for f in features if features.count(f) > 1)
            raise bad(f"{where}.features: {dup[:64]!r} is listed twice")
        features = tuple(features)
    return FeatureSpec(dtype, tuple(shape), features)


def describe_inputs(inputs: Iterable[tuple[str, str, Sequence[int]]]) -> str:
    """``[(name, dtype, shape)]`` as ``{input: float32[128]}`` for messages."""
    return "{" + ", ".join(f"{n}: {d}{list(s)}" for n, d, s in inputs) + "}"


def schema_mismatch(meta: ModelMetadata,
                    inputs: Iterable[tuple[str, str, Sequence[int]]]) -> str | None:
    """None when the declared ``inputs`` (``[(name, dtype, shape)]``, the
    config's) are the feature schema's, else a message naming the first
    input that differs and both schemas."""
    declared = [(n, d, tuple(s)) for n, d, s in inputs]
    trained = {n: s for n, s in meta.feature_schema}
    problem = None
    for name, dtype, shape in declared:
        t = trained.get(name)
        if t is None:
            problem = f"input {name!r} is not in the model's feature_schema"
        elif (t.dtype, t.shape) != (dtype, shape):
            problem = (f"input {name!r} is {dtype}{list(shape)} in the config but the model was "
                       f"trained on {t.text()}")
        if problem:
            break
    if problem is None:
        names = {n for n, _, _ in declared}
        extra = [n for n, _ in meta.feature_schema if n not in names]
        if extra:
            problem = (f"the model was trained on input {extra[0]!r}, which the config does "
                       "not declare")
    if problem is None:
        return None
    return (f"{problem} (config inputs: {describe_inputs(declared)}; feature_schema of "
            f"{meta.path}, data_version {meta.data_version!r}: "
            f"{describe_inputs((n, s.dtype, s.shape) for n, s in meta.feature_schema)}); "
            "declare the inputs the model was trained on, or serve the weights that match "
            "the config")
