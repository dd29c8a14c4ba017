"""The daemon's configuration: one table of settings, a TOML loader, frozen results.

Every key is declared exactly once, in ``SETTINGS``, as a ``Setting``: the
section it belongs to, its name, its type as the docs write it, its default,
a one-line doc and a ``check`` that validates and normalises a value read from
the file (raising ``ValueError`` with a message a person can act on). The
loader, the error messages, the ``Config`` objects and the reference in
``docs/config.md`` (``render_reference``, checked by a unit test) all come from
that table, so they cannot disagree.

Sections are declared in ``SECTIONS``: a table (``[server]``) or an array of
tables (``[[models]]``), the frozen dataclass it becomes, and the cross-checks
that involve several keys of one entry (``build``) or several entries
(``check_items``). Adding a section means: a frozen dataclass, a ``Section``,
its ``Setting`` rows, and a field of the same name on ``Config``.

What ``load_config`` returns is immutable all the way down (frozen, slotted
dataclasses, tuples, strings and numbers), so the front, the supervisor and
the reload logic can share one ``Config`` and compare an old one with a new
one without copying.

This module must stay importable without torch: the front process imports it,
and the front never imports torch.

Run ``python -m daemon.config --check FILE`` to validate a file and
``python -m daemon.config --markdown`` to print the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ipc.status import InvalidArgument
from ipc.tensors import DTYPES, TensorSpec, decode_tensor

from .workers.metadata import (
    MetadataError,
    ModelMetadata,
    default_path,
    read_metadata,
    schema_mismatch,
)

__all__ = [
    "PROTOCOL_DTYPES", "RING_SLOT_BYTES", "REQUIRED", "Derived", "ConfigError", "Setting",
    "Section", "SETTINGS", "SECTIONS", "TensorShape", "ServerConfig", "LoggingConfig",
    "ModelConfig", "FallbackConfig", "FALLBACK_CAUSES", "RolloutConfig", "ArmConfig",
    "ExperimentConfig", "ShadowConfig", "GuardrailConfig", "MetricsConfig", "RequestLogConfig",
    "AuthConfig", "RateLimitConfig", "FeedbackConfig", "Config", "with_overrides", "load_config",
    "parse_config", "render_reference",
]

# The tensor dtypes of the wire protocol (protocol.md, "Tensors"), with their
# item sizes in bytes, from the codec's table (ipc.tensors is torch-free).
PROTOCOL_DTYPES: tuple[tuple[str, int], ...] = tuple((d.name, d.itemsize) for d in DTYPES.values())
# The config `ringserve serve` and `ringserve batch` use when none is given.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"

_ITEMSIZE = dict(PROTOCOL_DTYPES)

# One request slot of a worker's ring holds a whole batch of inputs, so
# max_batch x (bytes of one sample's inputs) must fit in it.
RING_SLOT_BYTES = 256 * 1024 * 1024

_MIB = 1024 * 1024
_GIB = 1024 * _MIB


class ConfigError(ValueError):
    """A config file (or dict) that cannot be served.

    The message names the file, the key path and the problem, e.g.
    ``configs/x.toml: models[0] ("demo").max_batch: must be an integer from 1
    to 4096, got 0``. ``source`` and ``key`` (the key path, or None when the
    problem is with the file as a whole) are kept for callers that log them.
    """

    def __init__(self, message: str, *, source: str | None = None,
                 key: str | None = None):
        super().__init__(message)
        self.source = source
        self.key = key


# --------------------------------------------------------------------------
# The frozen results


@dataclass(frozen=True, slots=True)
class TensorShape:
    """The dtype and shape of one sample of one tensor (no batch dimension);
    for an input, ``default``: the raw little-endian bytes of the sample a
    request that omits it gets (None: the input is required)."""

    dtype: str
    shape: tuple[int, ...]
    default: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    max_frame_bytes: int
    deadline_ms: int
    max_connections: int
    drain_timeout_s: float
    start_timeout_s: float
    restart_backoff_max_s: float
    state_file: str | None        # None: beside the config file, <stem>.state.json
    decision_log: str | None      # None: beside the config file, <stem>.decisions.jsonl
    max_connections_per_client: int
    max_inflight_per_connection: int
    idle_timeout_s: float
    header_timeout_s: float
    min_frame_bytes_per_s: int
    frame_buffer_budget_bytes: int
    proxy_protocol: bool
    trusted_proxies: tuple[str, ...]
    node_id: int                  # this node's number in request ids (docs/protocol.md)
    fronts: int | str             # front processes, or "auto" (daemon/supervisor/cores.py)
    front_heartbeat_timeout_s: float


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    host: str
    port: int
    max_connections: int


@dataclass(frozen=True, slots=True)
class RequestLogConfig:
    enabled: bool
    dir: str | None               # None: beside the config file, <stem>-requests/
    sample_rate: float
    max_file_bytes: int
    max_files: int
    buffer: int
    key_secret: str
    score_output: str | None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    tokens_file: str | None       # None: authentication is off
    exempt_ops: tuple[str, ...]
    timeout_s: float              # a connection must authenticate within this
    # (client name, token) read from tokens_file at every load, so a SIGHUP
    # rotates tokens; kept out of repr so no log or traceback prints them.
    tokens: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_s: float         # 0: off
    burst: int


@dataclass(frozen=True, slots=True)
class FeedbackConfig:
    window_s: float               # an answer can be joined this long after it was sent
    max_entries: int              # answers remembered at most (oldest dropped first)


# The failures a fallback can cover (docs/operations.md, "Degraded mode"),
# and the ones it covers unless ``on`` says otherwise.
FALLBACK_CAUSES = ("no_worker", "queue_full", "deadline_near", "model_error")
FALLBACK_DEFAULT_ON = ("no_worker", "queue_full", "deadline_near")


@dataclass(frozen=True, slots=True)
class FallbackConfig:
    """``[models.fallback]``: what answers when the version cannot
    (daemon/serving/fallback.py). Exactly one of ``version`` and ``outputs``."""

    version: str | None           # another [[models]] entry of the same name
    # a constant answer: raw bytes per declared output
    outputs: tuple[tuple[str, bytes], ...] | None
    on: tuple[str, ...]           # the causes it covers, from FALLBACK_CAUSES
    queue_limit: int              # version fallback: most requests it holds in that version's queue


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    version: str
    factory: str | None           # "module:function"; exactly one of factory/artifact
    artifact: str | None          # absolute path of a torch.export .pt2 file
    checkpoint: str | None        # absolute path of a state_dict file (factory only)
    # what it was trained on (daemon/workers/metadata.py); None: no file
    metadata: ModelMetadata | None
    require_metadata: bool
    inputs: tuple[tuple[str, TensorShape], ...]
    single_input: bool            # True: one unnamed input, named "input"
    outputs: tuple[tuple[str, TensorShape], ...]   # () when not declared
    single_output: bool | None    # None when no output schema is declared
    devices: tuple[str, ...]      # one worker process per entry
    threads: int                  # 0 = auto (decided by the daemon)
    compile: str
    dtype: str                    # autocast dtype of the forward pass
    max_batch: int
    window_ms: float
    buckets: tuple[int, ...]      # strictly increasing, ends at max_batch
    queue_limit: int
    inflight_batches: int
    spin_us: float                # worker polls the ring this long before sleeping
    cache: bool
    cache_ttl_s: float
    cache_max_bytes: int
    drift: bool
    # reference profile (``ringserve profile``); None: freeze the first rows
    drift_profile: str | None
    drift_freeze_after: int
    drift_sample_rate: float
    drift_threshold: float
    fallback: FallbackConfig | None   # [models.fallback]; None: failures are answered as errors

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample's inputs, all inputs together."""
        return sum(spec.nbytes for _, spec in self.inputs)


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    model: str
    stable: str                   # version serving the stable lane
    candidate: str                # version serving the canary lane
    salt: str                     # routing salt of this rollout (docs/protocol.md)
    stages: tuple[float, ...]     # canary weights, strictly increasing, in (0, 1]
    stage: int                    # index into stages the operator asks for
    auto_advance: bool
    min_dwell_s: float
    min_samples: int
    retry: int                    # bump to retry a rolled-back candidate


@dataclass(frozen=True, slots=True)
class ArmConfig:
    name: str
    split: float
    version: str | None           # None: a label only; the rollout decides the version


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    id: str
    model: str
    salt: str
    coverage: float
    arms: tuple[ArmConfig, ...]


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    model: str
    candidate: str
    sample_rate: float
    salt: str
    queue_limit: int
    report_interval_s: float


@dataclass(frozen=True, slots=True)
class GuardrailConfig:
    model: str                    # the rollout it guards
    interval_s: float
    window_s: float
    min_samples: int
    alpha: float
    max_error_rate: float
    max_p95_ms: float             # 0: off
    failing_checks: int
    error_rate_margin: float
    latency_margin: float
    kpi: bool
    kpi_margin: float
    hard_error_rate: float
    hard_min_samples: int
    max_restarts: int
    srm_alpha: float


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    logging: LoggingConfig
    metrics: MetricsConfig
    request_log: RequestLogConfig
    auth: AuthConfig
    rate_limit: RateLimitConfig
    feedback: FeedbackConfig
    models: tuple[ModelConfig, ...]
    rollouts: tuple[RolloutConfig, ...]
    experiments: tuple[ExperimentConfig, ...]
    shadows: tuple[ShadowConfig, ...]
    guardrails: tuple[GuardrailConfig, ...]
    source: str                   # the path it was loaded from, as given

    def guardrail(self, model: str) -> "GuardrailConfig":
        """The guardrails of ``model``'s rollout: its [[guardrails]] entry, or
        every default (a rollout is never unguarded)."""
        for g in self.guardrails:
            if g.model == model:
                return g
        return default_guardrail(model)

    def side_file(self, configured: str | None, suffix: str) -> str:
        """A file the daemon keeps for this config: as configured, or beside
        the config file (``ringserve.toml`` -> ``ringserve<suffix>``)."""
        if configured:
            return configured
        base = os.path.abspath(self.source) if not self.source.startswith("<") else \
            os.path.join(os.getcwd(), "ringserve")
        return os.path.splitext(base)[0] + suffix

    @property
    def state_path(self) -> str:
        return self.side_file(self.server.state_file, ".state.json")

    @property
    def decision_log_path(self) -> str:
        return self.side_file(self.server.decision_log, ".decisions.jsonl")

    @property
    def request_log_dir(self) -> str:
        return self.side_file(self.request_log.dir, "-requests")

    def model(self, name: str, version: str | None = None) -> ModelConfig | None:
        """The entry for (name, version); version None: the first listed with that name."""
        if version is not None:
            version = str(version)
        for m in self.models:
            if m.name == name and (version is None or m.version == version):
                return m
        return None


# --------------------------------------------------------------------------
# Declarations


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a key that must be given."""


@dataclass(frozen=True, slots=True)
class Derived:
    """Default computed from the entry's other (already checked) values."""

    doc: str
    compute: Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class _Context:
    source: str     # the file name used in messages
    base_dir: str   # absolute; relative paths in the file are resolved against it


@dataclass(frozen=True, slots=True)
class Setting:
    """One key: declared once; everything else is derived from it.

    ``type`` is the type as the docs write it. ``default`` is the value used
    when the key is absent: REQUIRED, a Derived, None (unset) or a value
    already in its normalised form. ``check(value, ctx)`` validates a value
    read from the file and returns it normalised (lists become tuples, paths
    absolute strings); it raises ``ValueError`` with the problem, and its
    ``rule`` attribute, when present, is the "allowed" column of the docs.
    """

    section: str
    name: str
    type: str
    default: Any
    doc: str
    check: Callable[[Any, _Context], Any]

    @property
    def rule(self) -> str:
        return getattr(self.check, "rule", "")


@dataclass(frozen=True, slots=True)
class Section:
    """A top-level key of the file: a table or an array of tables.

    ``build(values, ctx)`` turns the checked values of one entry into its
    frozen dataclass and does the checks that involve several keys (raising
    ``_Invalid`` with ``at`` set to the key it blames). ``check_items`` does
    the checks across the entries of an array. ``label`` names the key whose
    value is shown after the index in messages: ``models[0] ("demo")``.
    """

    name: str
    array: bool
    doc: str
    build: Callable[[dict[str, Any], _Context], Any]
    check_items: Callable[[tuple[Any, ...], _Context], None] | None = None
    min_items: int = 0
    label: str | None = None


class _Invalid(ValueError):
    """A problem found by a check; ``at`` is appended to the key path."""

    def __init__(self, problem: str, at: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.at = at


class _Unknown(_Invalid):
    def __init__(self, key: str, valid, at: str = "", hint: str = ""):
        valid = list(valid)
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        if close:
            tail = f"; did you mean {close[0]!r}?"
        else:
            tail = "; valid keys: " + ", ".join(valid)
        super().__init__(f"unknown key {key!r}", at)
        self.key = key
        self.tail = tail + hint


# --------------------------------------------------------------------------
# Checks. Each takes (value, ctx) and returns the normalised value.


def _show(v: Any, limit: int = 80, _depth: int = 0) -> str:
    """A value as TOML writes it, for messages: at most ``limit`` characters,
    built from no more of ``v`` than they show (a value nested deeper than
    the recursion limit, or a million-element array, costs what its first
    few elements do)."""
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, str):
        s = json.dumps(v[:limit])   # its quoted prefix is the quoted value's prefix
        if len(v) > limit:
            s += "..."
    elif isinstance(v, (list, tuple, dict)):
        if _depth >= 8:
            s = "[...]" if not isinstance(v, dict) else "{...}"
        else:
            items = v.items() if isinstance(v, dict) else v
            parts, size = [], 0
            for x in items:
                if size > limit:
                    parts.append("...")
                    break
                part = (f"{x[0]} = {_show(x[1], limit, _depth + 1)}" if isinstance(v, dict)
                        else _show(x, limit, _depth + 1))
                parts.append(part)
                size += len(part) + 2
            s = "[" + ", ".join(parts) + "]" if not isinstance(v, dict) else \
                "{" + ", ".join(parts) + "}"
    elif isinstance(v, int) and v.bit_length() > 256:
        # (TOML's hex, octal and binary integers have no size limit, and
        # Python refuses to write one of more than 4300 digits in decimal)
        s = f"an integer of {v.bit_length()} bits"
    else:
        s = repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _rule(text: str):
    def mark(fn):
        fn.rule = text
        return fn
    return mark


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int):
    @_rule(f"{lo} to {hi}")
    def check(v, ctx):
        if not _is_int(v) or not lo <= v <= hi:
            raise _Invalid(f"must be an integer from {lo} to {hi}, got {_show(v)}")
        return v
    return check


MAX_FRONTS = 32  # the front field of a request id has 5 bits (daemon/front/rids.py)


@_rule(f'"auto" or 1 to {MAX_FRONTS}')
def _check_fronts(v, ctx):
    if v == "auto" or _is_int(v) and 1 <= v <= MAX_FRONTS:
        return v
    raise _Invalid(f'must be "auto" or an integer from 1 to {MAX_FRONTS}, got {_show(v)}')


def _float_in(lo: float, hi: float | None = None, *, lo_open: bool = False):
    if hi is None:
        text = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
    else:
        text = f"{lo:g} to {hi:g}"

    @_rule(text)
    def check(v, ctx):
        # (an integer past the float range, which TOML allows, is out of range too)
        ok = (_is_int(v) and abs(v) <= sys.float_info.max) or isinstance(v, float)
        ok = ok and math.isfinite(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            raise _Invalid(f"must be a number {'from ' if hi is not None else ''}{text}, "
                           f"got {_show(v)}")
        return float(v)
    return check


def _one_of(*options: str, fold_case: bool = False):
    listed = ", ".join(json.dumps(o) for o in options)

    @_rule(listed + (" (any case)" if fold_case else ""))
    def check(v, ctx):
        key = v.lower() if fold_case and isinstance(v, str) else v
        if isinstance(key, str) and key in options:
            return key
        hint = ""
        if isinstance(v, str):
            close = difflib.get_close_matches(v, options, n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean {json.dumps(close[0])}?"
        raise _Invalid(f"must be one of {listed}, got {_show(v)}{hint}")
    return check


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_RULE = "1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"


@_rule("non-empty, no spaces")
def _check_host(v, ctx):
    if not isinstance(v, str) or not v or any(c.isspace() for c in v):
        raise _Invalid('must be a host name or address such as "127.0.0.1" or "::", '
                       f"got {_show(v)}")
    return v


@_rule(_NAME_RULE)
def _check_name(v, ctx):
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise _Invalid(f"must be a string of {_NAME_RULE}, got {_show(v)}")
    return v


@_rule(_NAME_RULE + "; an integer is read as its decimal string")
def _check_version(v, ctx):
    if _is_int(v) and v >= 0:
        v = str(v)
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise _Invalid(f"must be a string (or integer) of {_NAME_RULE}, "
                       f'such as "1" or "2024-06-01", got {_show(v)}')
    return v


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}")


@_rule('"package.module:function"')
def _check_factory(v, ctx):
    if not isinstance(v, str) or not _FACTORY_RE.fullmatch(v):
        raise _Invalid('must be "module:function" (a dotted module path, a colon, '
                       f'a function name), such as "daemon.zoo:mlp_scorer", got {_show(v)}')
    return v


def _path(v, ctx) -> str:
    """A path from the file: ~ expanded, relative to the config's directory."""
    if not isinstance(v, str) or not v:
        raise _Invalid(f"must be a file path, got {_show(v)}")
    return os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(v)))


@_rule("an existing file")
def _check_file(v, ctx):
    path = _path(v, ctx)
    if not os.path.exists(path):
        where = "" if os.path.isabs(os.path.expanduser(v)) else \
            f" (a relative path is resolved against the config file's directory, {ctx.base_dir})"
        raise _Invalid(f"file not found: {path}{where}; fix the path or create the file")
    if not os.path.isfile(path):
        raise _Invalid(f"is not a regular file: {path}")
    return path


@_rule("a path whose directory exists")
def _check_new_file(v, ctx):
    path = _path(v, ctx)
    if not os.path.isdir(os.path.dirname(path)):
        raise _Invalid(f"the directory of {path} does not exist; create it or fix the path")
    return path


_DTYPE_LIST = ", ".join(name for name, _ in PROTOCOL_DTYPES)
_TENSOR_EXAMPLE = '{ dtype = "float32", shape = [128] }'


def _tensor(v, at: str = "", default_ok: bool = False) -> TensorShape:
    """``default_ok``: an input, which may declare ``default`` (``_constant``)."""
    if not isinstance(v, dict):
        raise _Invalid(f"must be a table like {_TENSOR_EXAMPLE}, got {_show(v)}", at)
    keys = ("dtype", "shape", "default") if default_ok else ("dtype", "shape")
    for key in v:
        if key not in keys:
            hint = ""
            if isinstance(v[key], dict):
                hint = " (for named tensors use inputs/outputs, not input/output)"
            raise _Unknown(key, keys, at, hint)
    if "dtype" not in v or "shape" not in v:
        missing = "dtype" if "dtype" not in v else "shape"
        raise _Invalid(f"missing {missing}; write it like {_TENSOR_EXAMPLE}", at)
    dtype, shape = v["dtype"], v["shape"]
    if dtype not in _ITEMSIZE:
        raise _Invalid(f"must be one of {_DTYPE_LIST}, got {_show(dtype)}", at + ".dtype")
    if (not isinstance(shape, list) or not shape
            or not all(_is_int(d) and d > 0 for d in shape)):
        raise _Invalid("must be a non-empty list of positive integers (the shape of one "
                       f"sample, no batch dimension), got {_show(shape)}", at + ".shape")
    # TOML lets a dimension be thousands of digits long: refuse a sample of
    # 2**63 bytes or more here, before the ring-slot check (_build_model)
    # computes sizes from it and formats them.
    nbytes = _ITEMSIZE[dtype]
    for d in shape:
        nbytes *= d
        if nbytes >= 2**63:
            raise _Invalid(f"shape {_show(shape)} makes a sample of 2**63 bytes or more; "
                           "one sample must fit the ring slot "
                           f"({RING_SLOT_BYTES // _MIB} MiB)", at + ".shape")
    t = TensorShape(dtype, tuple(shape))
    if "default" in v:
        t = TensorShape(dtype, t.shape, _constant(v["default"], t, at + ".default"))
    return t


def _constant(v, t: TensorShape, at: str) -> bytes:
    """A constant sample of ``t`` written in the file (an input's default, a
    constant fallback's output): nested lists of its shape, or one number
    for every element; returned as its raw little-endian bytes, checked as
    the wire's list form is (dtype range, whole numbers for integers, finite
    floats)."""
    try:
        if isinstance(v, (int, float)):  # bool too: for a bool tensor
            return decode_tensor([v], TensorSpec(t.dtype, (1,)), "the value") * t.numel
        return decode_tensor(v, TensorSpec(t.dtype, t.shape), "the value")
    except InvalidArgument as e:  # (the codec's words are for requests: drop what does not fit)
        why = e.message.removeprefix("the value: ").replace(" the model's input", "")
        why = why.replace("; send one sample (no batch dimension)", "")
        raise _Invalid(f"must be a constant {t.dtype} sample of shape {list(t.shape)} (nested "
                       f"lists, or one number for every element): {why}", at) from None


@_rule("dtype: " + _DTYPE_LIST + "; shape: positive integers")
def _check_tensor(v, ctx) -> TensorShape:
    return _tensor(v)


@_rule("dtype: " + _DTYPE_LIST + "; shape: positive integers; default: a sample of them")
def _check_input(v, ctx) -> TensorShape:
    return _tensor(v, default_ok=True)


_TENSOR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@_rule("names: Python identifiers; each as for input")
def _check_tensors(v, ctx, default_ok: bool = False) -> tuple[tuple[str, TensorShape], ...]:
    if not isinstance(v, dict) or not v:
        raise _Invalid("must be a table of named tensors, like { ids = { dtype = \"int64\", "
                       f"shape = [8] }}, dense = {_TENSOR_EXAMPLE} }}, got {_show(v)}")
    out = []
    for name, spec in v.items():
        if not _TENSOR_NAME_RE.fullmatch(name):
            raise _Invalid("tensor names must be Python identifiers of at most 64 "
                           f"characters, got {json.dumps(name)}")
        out.append((name, _tensor(spec, f".{name}", default_ok)))
    return tuple(out)


@_rule("names: Python identifiers; each as for input")
def _check_inputs(v, ctx) -> tuple[tuple[str, TensorShape], ...]:
    return _check_tensors(v, ctx, default_ok=True)


@_rule("true or false")
@_rule("IP addresses or CIDR networks")
def _check_networks(v, ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Invalid(f"must be an array of addresses or CIDR networks, got {_show(v)}")
    for x in v:
        try:
            ipaddress.ip_network(x, strict=False)
        except ValueError:
            raise _Invalid(f"{json.dumps(x)} is not an IP address or CIDR network "
                           "(e.g. \"10.0.0.0/8\", \"::1\")") from None
    return tuple(v)


def _check_bool(v, ctx) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"must be true or false, got {_show(v)}")
    return v


def _check_str(v) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"must be a string, got {_show(v)}")
    return v


@_rule("non-empty string")
def _check_salt(v, ctx) -> str:
    if not isinstance(v, str) or not v:
        raise _Invalid(f"must be a non-empty string, got {_show(v)}")
    return v


@_rule("strictly increasing numbers in (0, 1]")
def _check_stages(v, ctx) -> tuple[float, ...]:
    if (not isinstance(v, list) or not v
            or not all((_is_int(x) or isinstance(x, float)) and 0 < x <= 1 for x in v)
            or any(a >= b for a, b in zip(v, v[1:], strict=False))):
        raise _Invalid("must be a strictly increasing list of canary weights in (0, 1], "
                       f"such as [0.01, 0.05, 0.1, 0.25, 1.0], got {_show(v)}")
    return tuple(float(x) for x in v)


@_rule("[{ name, split, version? }, ...]; splits sum to 1")
def _check_arms(v, ctx) -> tuple[ArmConfig, ...]:
    example = ('[{ name = "control", split = 0.5 }, '
               '{ name = "treatment", split = 0.5, version = "2" }]')
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(a, dict) for a in v):
        raise _Invalid(f"must be a list of at least two arms, like {example}, got {_show(v)}")
    arms, names = [], set()
    for i, a in enumerate(v):
        for key in a:
            if key not in ("name", "split", "version"):
                raise _Unknown(key, ("name", "split", "version"), f"[{i}]")
        name = _check_name(a.get("name"), ctx) if "name" in a else None
        if name is None:
            raise _Invalid("missing name", f"[{i}]")
        if name in names:
            raise _Invalid(f"arm name {json.dumps(name)} is used twice", f"[{i}].name")
        names.add(name)
        split = a.get("split")
        if not (_is_int(split) or isinstance(split, float)) or not 0 < split <= 1:
            raise _Invalid(f"must be a number in (0, 1], got {_show(split)}", f"[{i}].split")
        version = _check_version(a["version"], ctx) if "version" in a else None
        arms.append(ArmConfig(name, float(split), version))
    total = sum(a.split for a in arms)
    if abs(total - 1.0) > 1e-9:
        raise _Invalid(f"splits must sum to 1, they sum to {total:g}")
    return tuple(arms)


_DEVICE_RE = re.compile(r"cpu|cuda|cuda:(?:0|[1-9][0-9]{0,2})")


@_rule('"cpu", "cuda", "cuda:N"; at least one')
def _check_devices(v, ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise _Invalid('must be a non-empty list of devices such as ["cpu"] or '
                       f'["cuda:0", "cuda:1"], got {_show(v)}')
    for i, d in enumerate(v):
        if not isinstance(d, str) or not _DEVICE_RE.fullmatch(d):
            raise _Invalid(f'must be "cpu", "cuda" or "cuda:N", got {_show(d)}', f"[{i}]")
    return tuple(v)


_BUCKETS_PROBLEM = "must be strictly increasing positive integers ending exactly at max_batch"


@_rule("strictly increasing, ending at max_batch")
def _check_buckets(v, ctx) -> tuple[int, ...]:
    if (not isinstance(v, list) or not v or not all(_is_int(b) and b > 0 for b in v)
            or any(a >= b for a, b in zip(v, v[1:], strict=False))):
        raise _Invalid(f"{_BUCKETS_PROBLEM}, got {_show(v)}")
    return tuple(v)


def _default_buckets(values: dict[str, Any]) -> tuple[int, ...]:
    """Powers of two and the points halfway between them (x1.5) below
    max_batch, then max_batch: 64 -> 1 2 3 4 6 8 12 16 24 32 48 64. A batch
    is padded by at most a third (powers of two alone: up to a half), and
    padded rows are compute thrown away: the demo MLP on the CPU runs a batch
    of 21 in 133 us padded to 24, in 170 us padded to 32."""
    max_batch = values["max_batch"]
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        if b >= 2 and b + b // 2 < max_batch:
            out.append(b + b // 2)
        b *= 2
    return tuple(out) + (max_batch,)


_FALLBACK_KEYS = ("version", "outputs", "on", "queue_limit")
_FALLBACK_EXAMPLE = '{ version = "small" } or { outputs = [0.0] }'


@_rule("version or outputs; on: " + ", ".join(FALLBACK_CAUSES) + "; queue_limit: 1 to 1000000")
def _check_fallback(v, ctx) -> dict[str, Any]:
    """The table's own keys; the checks against the model's outputs and the
    other entries are ``_build_fallback`` and ``_check_models``."""
    if not isinstance(v, dict):
        raise _Invalid(f"must be a table ([models.fallback]) like {_FALLBACK_EXAMPLE}, "
                       f"got {_show(v)}")
    for key in v:
        if key not in _FALLBACK_KEYS:
            raise _Unknown(key, _FALLBACK_KEYS)
    if ("version" in v) == ("outputs" in v):
        raise _Invalid("set exactly one of version (another [[models]] entry of this model "
                       "that answers instead) and outputs (a constant answer), like "
                       f"{_FALLBACK_EXAMPLE}; " + ("both are set" if "version" in v
                                                   else "neither is set"))
    out: dict[str, Any] = {"version": None, "outputs": v.get("outputs"),
                           "queue_limit": 256, "on": FALLBACK_DEFAULT_ON}
    if "version" in v:
        try:
            out["version"] = _check_version(v["version"], ctx)
        except _Invalid as e:
            raise _Invalid(e.problem, ".version") from None
    if "queue_limit" in v:
        if out["version"] is None:
            raise _Invalid("only applies to a version fallback (a constant answer needs no "
                           "queue); remove queue_limit", ".queue_limit")
        try:
            out["queue_limit"] = _int_in(1, 1_000_000)(v["queue_limit"], ctx)
        except _Invalid as e:
            raise _Invalid(e.problem, ".queue_limit") from None
    if "on" in v:
        on = v["on"]
        if (not isinstance(on, list) or not on or not all(isinstance(c, str) for c in on)):
            raise _Invalid(f"must be a non-empty list of causes from {', '.join(FALLBACK_CAUSES)}"
                           f", got {_show(on)}", ".on")
        for c in on:
            if c not in FALLBACK_CAUSES:
                close = difflib.get_close_matches(c, FALLBACK_CAUSES, n=1, cutoff=0.6)
                hint = f"; did you mean {json.dumps(close[0])}?" if close else ""
                raise _Invalid(f"unknown cause {json.dumps(c)}; causes are "
                               f"{', '.join(FALLBACK_CAUSES)}{hint}", ".on")
        out["on"] = tuple(c for c in FALLBACK_CAUSES if c in on)
    return out


def _build_fallback(fb: dict[str, Any], outputs, single_output) -> FallbackConfig:
    """A constant fallback's outputs against the declared output schema."""
    consts = None
    if fb["version"] is None:
        raw, at = fb["outputs"], ".fallback.outputs"
        if not outputs:
            raise _Invalid("a constant fallback answers in the declared output schema: declare "
                           f"output = {_TENSOR_EXAMPLE} (or outputs = {{ NAME = ... }}) for "
                           "this model", at)
        if single_output:
            consts = (("output", _constant(raw, outputs[0][1], at)),)
        else:
            names = [n for n, _ in outputs]
            if not isinstance(raw, dict):
                raise _Invalid(f"the model declares named outputs ({', '.join(names)}): give a "
                               f"table of name to value, like {{ {names[0]} = [...] }}, got "
                               f"{_show(raw)}", at)
            for key in raw:
                if key not in names:
                    raise _Unknown(key, names, at)
            missing = [n for n in names if n not in raw]
            if missing:
                raise _Invalid(f"missing {', '.join(missing)}: a constant answer gives every "
                               "declared output", at)
            consts = tuple((n, _constant(raw[n], spec, f"{at}.{n}")) for n, spec in outputs)
    return FallbackConfig(fb["version"], consts, fb["on"], fb["queue_limit"])


# --------------------------------------------------------------------------
# Cross-checks of a model entry and of the models array


def _pick(values, one: str, many: str, required: bool):
    single, named = values[one], values[many]
    if single is not None and named is not None:
        raise _Invalid(f"set {one} or {many}, not both", "." + many)
    if single is not None:
        return ((one, single),), True
    if named is not None:
        return named, False
    if required:
        raise _Invalid(f"missing {one}/{many}: set {one} = {_TENSOR_EXAMPLE} for one unnamed "
                       f"tensor, or {many} = {{ NAME = {_TENSOR_EXAMPLE}, ... }} for named ones")
    return (), None


def _build_model(values: dict[str, Any], ctx: _Context) -> ModelConfig:
    factory, artifact = values["factory"], values["artifact"]
    if (factory is None) == (artifact is None):
        raise _Invalid(
            "set exactly one of factory (\"module:function\" returning an nn.Module) "
            "or artifact (a torch.export .pt2 file); "
            + ("both are set" if factory is not None else "neither is set"))
    if values["checkpoint"] is not None and factory is None:
        raise _Invalid("only applies with factory (an artifact carries its own weights); "
                       "remove checkpoint", ".checkpoint")
    inputs, single_input = _pick(values, "input", "inputs", required=True)
    outputs, single_output = _pick(values, "output", "outputs", required=False)

    max_batch, buckets = values["max_batch"], values["buckets"]
    if buckets[-1] != max_batch:
        raise _Invalid(f"{_BUCKETS_PROBLEM} ({max_batch}), got {_show(buckets)}; end the list "
                       f"with {max_batch} or change max_batch", ".buckets")

    sample = sum(spec.nbytes for _, spec in inputs)
    if max_batch * sample > RING_SLOT_BYTES:
        fits = RING_SLOT_BYTES // sample
        advice = (f"lower max_batch to {fits} or less, or send smaller inputs" if fits
                  else "one sample alone is larger than the slot; send smaller inputs")
        raise _Invalid(
            f"{max_batch} x {sample} bytes of inputs per sample = {max_batch * sample} bytes "
            f"({max_batch * sample / _MIB:.1f} MiB), more than the {RING_SLOT_BYTES // _MIB} MiB "
            f"ring slot; {advice}", ".max_batch")

    if values["drift"] and (len(inputs) != 1 or inputs[0][1].dtype not in
                            ("float32", "float64", "float16")):
        raise _Invalid("drift tracking needs a model with one float32, float64 or float16 "
                       "input; turn drift off or track the features upstream", ".drift")
    fields = {k: v for k, v in values.items() if k not in ("input", "output")}
    if values["fallback"] is not None:
        fields["fallback"] = _build_fallback(values["fallback"], outputs, single_output)
    fields.update(inputs=inputs, single_input=single_input,
                  outputs=outputs, single_output=single_output,
                  metadata=_model_metadata(values, inputs))
    return ModelConfig(**fields)


def _model_metadata(values: dict[str, Any], inputs) -> ModelMetadata | None:
    """The entry's metadata (daemon/workers/metadata.py), read now, at validation,
    so that a feature schema that does not match the declared inputs makes
    the file invalid (a reload that brings one is refused), and so that the
    front knows the data version without asking a worker."""
    path = values["metadata"]
    weights = values["checkpoint"] or values["artifact"]
    if path is None:
        guess = default_path(weights)
        if guess is not None and os.path.isfile(guess):
            path = guess
    if path is None:
        if values["require_metadata"]:
            where = (f"there is no {default_path(weights)}" if weights else
                     "a factory without a checkpoint has no file to look beside")
            raise _Invalid(f"require_metadata is true but the model has no metadata file "
                           f"({where}); write one (docs/models.md) or set metadata = "
                           "\"FILE\"", ".metadata")
        return None
    try:
        meta = read_metadata(path)
    except MetadataError as e:
        raise _Invalid(str(e), ".metadata") from None
    problem = schema_mismatch(meta, [(n, s.dtype, s.shape) for n, s in inputs])
    if problem is not None:
        raise _Invalid(problem, ".metadata")
    return meta


def _check_models(models: tuple[ModelConfig, ...], ctx: _Context) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, m in enumerate(models):
        first = seen.setdefault((m.name, m.version), i)
        if first != i:
            key = f'models[{i}] ({json.dumps(m.name)}).version'
            raise ConfigError(
                f"{ctx.source}: {key}: {json.dumps(m.name)} version {json.dumps(m.version)} "
                f"is already declared by models[{first}]; give each entry its own version "
                "(list several devices in one entry for more workers)",
                source=ctx.source, key=key)
    for i, m in enumerate(models):
        if m.fallback is not None and m.fallback.version is not None:
            _check_fallback_version(i, m, models, seen, ctx)


def _schema(tensors) -> tuple:
    """Names, dtypes and shapes: what two versions must share to take the
    same requests (defaults aside) or give the same answers."""
    return tuple((n, t.dtype, t.shape) for n, t in tensors)


def _check_fallback_version(i: int, m: ModelConfig, models, seen: dict, ctx: _Context) -> None:
    """A version fallback answers the requests of ``m``: it must be another
    entry of the same model, taking the same inputs and, where both declare
    them, giving the same outputs."""
    key = f"models[{i}] ({json.dumps(m.name)}).fallback.version"
    v = m.fallback.version

    def fail(problem: str) -> None:
        raise ConfigError(f"{ctx.source}: {key}: {problem}", source=ctx.source, key=key)

    if v == m.version:
        fail(f"names this entry's own version {json.dumps(v)}; a fallback is another version "
             "of the model")
    j = seen.get((m.name, v))
    if j is None:
        versions = sorted(x.version for x in models if x.name == m.name and x is not m)
        fail(f"{json.dumps(m.name)} version {json.dumps(v)} is not in [[models]] (other "
             f"versions of {json.dumps(m.name)}: {', '.join(versions) or 'none'}); a fallback "
             "version is another [[models]] entry of the same name")
    other = models[j]
    if (_schema(other.inputs), other.single_input) != (_schema(m.inputs), m.single_input):
        fail(f"version {json.dumps(v)} takes other inputs than version {json.dumps(m.version)} "
             "(names, dtypes, shapes), so it cannot answer the same requests; give it the "
             "same inputs")
    if m.outputs and other.outputs and (_schema(other.outputs), other.single_output) != (
            _schema(m.outputs), m.single_output):
        fail(f"version {json.dumps(v)} declares other outputs than version "
             f"{json.dumps(m.version)}, so its answers would not be in this version's "
             "schema; give it the same outputs")


def _build_rollout(values: dict[str, Any], ctx: _Context) -> RolloutConfig:
    if values["stable"] == values["candidate"]:
        raise _Invalid("candidate must differ from stable", ".candidate")
    if values["stage"] >= len(values["stages"]):
        raise _Invalid(f"must index stages (0 to {len(values['stages']) - 1}), got "
                       f"{values['stage']}", ".stage")
    return RolloutConfig(**values)


def _unique(items, attr: str, section: str, what: str, ctx: _Context) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        value = getattr(item, attr)
        first = seen.setdefault(value, i)
        if first != i:
            key = f"{section}[{i}].{attr}"
            raise ConfigError(f"{ctx.source}: {key}: {what} {json.dumps(value)} is already "
                              f"declared by {section}[{first}]; one per {what}",
                              source=ctx.source, key=key)


def _check_across(built: dict[str, Any], ctx: _Context) -> None:
    """Checks that involve several sections: every version a rollout,
    experiment or shadow names must be a configured [[models]] entry."""
    served = {(m.name, m.version) for m in built["models"]}
    names = {m.name for m in built["models"]}

    def need(key: str, model: str, version: str | None) -> None:
        if model not in names:
            raise ConfigError(f"{ctx.source}: {key}: model {json.dumps(model)} is not in "
                              f"[[models]] (models: {', '.join(sorted(names))})",
                              source=ctx.source, key=key)
        if version is not None and (model, version) not in served:
            versions = sorted(v for n, v in served if n == model)
            raise ConfigError(f"{ctx.source}: {key}: {json.dumps(model)} version "
                              f"{json.dumps(version)} is not in [[models]] (versions: "
                              f"{', '.join(versions)}); add a [[models]] entry for it",
                              source=ctx.source, key=key)

    for i, r in enumerate(built["rollouts"]):
        need(f"rollouts[{i}].model", r.model, None)
        need(f"rollouts[{i}].stable", r.model, r.stable)
        need(f"rollouts[{i}].candidate", r.model, r.candidate)
    for i, e in enumerate(built["experiments"]):
        need(f"experiments[{i}].model", e.model, None)
        for j, a in enumerate(e.arms):
            if a.version is not None:
                need(f"experiments[{i}].arms[{j}].version", e.model, a.version)
    for i, sh in enumerate(built["shadows"]):
        need(f"shadows[{i}].candidate", sh.model, sh.candidate)
        cand = next(m for m in built["models"] if (m.name, m.version) == (sh.model, sh.candidate))
        other = [m.version for m in built["models"]
                 if m.name == sh.model and _schema(m.inputs) != _schema(cand.inputs)]
        if other:
            key = f"shadows[{i}].candidate"
            raise ConfigError(f"{ctx.source}: {key}: version {json.dumps(sh.candidate)} takes "
                              f"other inputs than version(s) {', '.join(other)} of "
                              f"{json.dumps(sh.model)}, so their requests cannot be mirrored to "
                              "it; give it the same inputs", source=ctx.source, key=key)
    _unique(built["rollouts"], "model", "rollouts", "model", ctx)
    _unique(built["experiments"], "id", "experiments", "experiment id", ctx)
    _unique(built["shadows"], "model", "shadows", "model", ctx)
    rolled = {r.model for r in built["rollouts"]}
    for i, g in enumerate(built["guardrails"]):
        if g.model not in rolled:
            key = f"guardrails[{i}].model"
            raise ConfigError(f"{ctx.source}: {key}: model {json.dumps(g.model)} has no "
                              f"[[rollouts]] entry to guard (rollouts: "
                              f"{', '.join(sorted(rolled)) or 'none'})", source=ctx.source, key=key)
    _unique(built["guardrails"], "model", "guardrails", "model", ctx)


# --------------------------------------------------------------------------
# [auth] and [rate_limit]

AUTH_OPS = ("infer", "health", "stats", "models", "feedback")
MIN_TOKEN_CHARS = 16


@_rule("a list of " + ", ".join(AUTH_OPS))
def _check_ops(v, ctx) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(o, str) for o in v):
        raise _Invalid(f'must be a list of op names such as ["health"], got {_show(v)}')
    for o in v:
        if o not in AUTH_OPS:
            raise _Invalid(f"unknown op {json.dumps(o)}; ops are {', '.join(AUTH_OPS)}")
    return tuple(dict.fromkeys(v))


def read_tokens(path: str) -> tuple[tuple[str, str], ...]:
    """The ``NAME:TOKEN`` lines of a tokens file (blank lines and ``#``
    comments skipped). Refused unless only its owner can read it: the file
    holds secrets."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _Invalid(f"cannot read the tokens file {path}: {e}") from None
    if st.st_mode & 0o077:
        raise _Invalid(f"the tokens file {path} is readable by others (mode "
                       f"{st.st_mode & 0o777:o}); it holds secrets: chmod 600 it")
    out, names, seen = [], set(), set()
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not _NAME_RE.fullmatch(name):
            raise _Invalid(f"{path} line {i}: must be NAME:TOKEN, NAME being {_NAME_RULE} "
                           "(the client's name in logs and rate limits)")
        if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
            raise _Invalid(f"{path} line {i}: the token of {name!r} must be at least "
                           f"{MIN_TOKEN_CHARS} characters without spaces; make one with "
                           "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if name in names or token in seen:
            raise _Invalid(f"{path} line {i}: "
                           f"{'client name ' + repr(name) if name in names else 'this token'} "
                           "is listed twice; each client has one line and its own token")
        names.add(name)
        seen.add(token)
        out.append((name, token))
    if not out:
        raise _Invalid(f"the tokens file {path} lists no NAME:TOKEN line; with no token "
                       "nobody could connect (remove tokens_file to turn authentication off)")
    return tuple(out)


def _build_auth(values: dict[str, Any], ctx: _Context) -> AuthConfig:
    tokens = ()
    if values["tokens_file"] is not None:
        try:
            tokens = read_tokens(values["tokens_file"])
        except _Invalid as e:
            raise _Invalid(e.problem, ".tokens_file") from None
    return AuthConfig(**values, tokens=tokens)


def _default_burst(values: dict[str, Any]) -> int:
    return max(1, math.ceil(values["requests_per_s"]))


# --------------------------------------------------------------------------
# The table


SECTIONS: tuple[Section, ...] = (
    Section("server", False,
            "The TCP front: where it listens, its limits, and how it supervises the workers.",
            lambda values, ctx: ServerConfig(**values)),
    Section("logging", False,
            "The daemon's own diagnostic log.",
            lambda values, ctx: LoggingConfig(**values)),
    Section("metrics", False,
            "The HTTP endpoint for Prometheus (`/metrics`) and load-balancer probes "
            "(`/healthz` live, `/readyz` ready).",
            lambda values, ctx: MetricsConfig(**values)),
    Section("request_log", False,
            "JSON Lines log of answers and feedback, for audits and the A/B report "
            "(`ringserve report`); raw routing keys never reach it, only a keyed hash.",
            lambda values, ctx: RequestLogConfig(**values)),
    Section("auth", False,
            "Shared-token authentication (off unless `tokens_file` is set). A client sends "
            "`token` in a request (the clients do it once per connection, with op `auth`); "
            "a connection that presented a valid token stays authenticated. Other requests "
            "are answered UNAUTHENTICATED; a wrong token also closes the connection. SIGHUP "
            "re-reads the file, so tokens rotate without a restart (docs/operations.md).",
            _build_auth),
    Section("rate_limit", False,
            "Per-client rate limit (off while `requests_per_s` is 0): a token bucket per "
            "client (its token's name, or its IP address without auth), shared by all of "
            "its connections. A request over the limit is answered RESOURCE_EXHAUSTED at once. "
            "`health` (load balancers poll it) and `auth` are never limited.",
            lambda values, ctx: RateLimitConfig(**values)),
    Section("feedback", False,
            "The online join of `feedback` outcomes to earlier answers (KPI guardrails, A/B "
            "reports): every OK answer is remembered for `window_s`, at most `max_entries` "
            "of them, about 210 bytes each (measured; 1,000,000 entries hold about 210 MB).",
            lambda values, ctx: FeedbackConfig(**values)),
    Section("models", True,
            "One `[[models]]` table per served model version; at least one. Each entry of "
            "`devices` gets its own worker process. `max_batch` x the bytes of one sample's "
            f"inputs must fit the {RING_SLOT_BYTES // _MIB} MiB ring slot.",
            _build_model, _check_models, min_items=1, label="name"),
    Section("rollouts", True,
            "A staged canary: the candidate version takes `stages[stage]` of the model's keyed "
            "traffic (`bucket(salt, key) < weight * 10000`, docs/protocol.md), the stable "
            "version the rest. Both versions must be `[[models]]` entries. At most one rollout "
            "per model.", _build_rollout, label="model"),
    Section("experiments", True,
            "An A/B experiment: requests that send `exp = ID` get an arm by cumulative split "
            "of `bucket(salt, key)` over the covered buckets; an arm with a version routes "
            "there.", lambda values, ctx: ExperimentConfig(**values), label="id"),
    Section("shadows", True,
            "Dark launch: a sample of a model's requests is mirrored to a candidate version; "
            "its answers are only compared and logged, never returned.",
            lambda values, ctx: ShadowConfig(**values), label="model"),
    Section("guardrails", True,
            "The checks that guard a rollout (docs/operations.md, \"Guardrails\"); a rollout "
            "without an entry is guarded with every default. Relative limits compare the canary "
            "with the stable lane by sequential tests whose false-rollback rate per stage is at "
            "most `alpha` however often they are checked.",
            lambda values, ctx: GuardrailConfig(**values), label="model"),
)

SETTINGS: tuple[Setting, ...] = (
    # [server]
    Setting("server", "host", "string", "127.0.0.1",
            "Address to listen on; the loopback default keeps the daemon private to the "
            "machine; \"0.0.0.0\" or \"::\" serves the network.", _check_host),
    Setting("server", "port", "integer", 7070,
            "TCP port; 0 picks a free ephemeral port (used by tests).", _int_in(0, 65535)),
    Setting("server", "max_frame_bytes", "integer", 8 * _MIB,
            "Largest frame accepted from a client; a larger one is answered "
            "RESOURCE_EXHAUSTED and the connection is closed.", _int_in(1024, _GIB)),
    Setting("server", "deadline_ms", "integer", 1000,
            "Default per-request deadline, counted from arrival, for requests that send no "
            "deadline_ms; past it the answer is DEADLINE_EXCEEDED.", _int_in(1, 3_600_000)),
    Setting("server", "max_connections", "integer", 1024,
            "Most client connections open at once; further ones are refused.",
            _int_in(1, 1_000_000)),
    Setting("server", "drain_timeout_s", "float", 30.0,
            "On SIGTERM, how long accepted requests may take to be answered before the "
            "workers are stopped anyway.", _float_in(0, lo_open=True)),
    Setting("server", "start_timeout_s", "float", 300.0,
            "How long a worker may take to load and warm up before it counts as failed.",
            _float_in(0, lo_open=True)),
    Setting("server", "restart_backoff_max_s", "float", 30.0,
            "Cap of the exponential backoff between restarts of a crashed worker.",
            _float_in(0, lo_open=True)),
    Setting("server", "state_file", "path", None,
            "Where rollout state (current stage, rolled back or not) is kept across restarts "
            "and reloads; unset: beside the config file, `<config stem>.state.json`.",
            _check_new_file),
    Setting("server", "decision_log", "path", None,
            "JSON Lines log of every reload, guardrail check, stage change and rollback; "
            "unset: beside the config file, `<config stem>.decisions.jsonl`.", _check_new_file),
    Setting("server", "max_connections_per_client", "integer", 256,
            "Most connections open at once from one client address (the PROXY protocol's "
            "address behind a trusted proxy); further ones are answered RESOURCE_EXHAUSTED "
            "and closed. Behind a proxy without `proxy_protocol` every client shares one "
            "address: raise it to `max_connections` there.", _int_in(1, 1_000_000)),
    Setting("server", "max_inflight_per_connection", "integer", 1024,
            "Most unanswered infer requests one connection may have; one more is answered "
            "RESOURCE_EXHAUSTED at once (pipeline less deeply, or open another connection).",
            _int_in(1, 1_000_000)),
    Setting("server", "idle_timeout_s", "float", 300.0,
            "A connection with nothing read and nothing in flight for this long is sent "
            "RESOURCE_EXHAUSTED (id 0, \"idle timeout\") and closed; the clients reconnect.",
            _float_in(0, lo_open=True)),
    Setting("server", "header_timeout_s", "float", 10.0,
            "Once a frame's first byte has arrived, its 4-byte header must follow within "
            "this; it is also the grace before `min_frame_bytes_per_s` applies to its body.",
            _float_in(0, lo_open=True)),
    Setting("server", "min_frame_bytes_per_s", "integer", 65536,
            "Slowest average rate a started frame may arrive at (after `header_timeout_s` of "
            "grace); a slower one is answered RESOURCE_EXHAUSTED and its connection closed. "
            "An 8 MiB frame may take 128 s + the grace.", _int_in(1, 10**12)),
    Setting("server", "frame_buffer_budget_bytes", "integer", 128 * _MIB,
            "Bytes held for unfinished frames across all connections; the connection whose "
            "frame would exceed it is answered RESOURCE_EXHAUSTED and closed.",
            _int_in(1024, 64 * _GIB)),
    Setting("server", "proxy_protocol", "boolean", False,
            "Read a PROXY protocol header (v1 or v2, as HAProxy's `send-proxy-v2` sends) at "
            "the start of connections from `trusted_proxies`, and use the client address it "
            "carries for limits, rate buckets and logs.", _check_bool),
    Setting("server", "trusted_proxies", "array of strings", ("127.0.0.1", "::1"),
            "Addresses or networks (CIDR) whose connections must start with a PROXY header "
            "when `proxy_protocol` is on; others are served as direct clients.",
            _check_networks),
    Setting("server", "node_id", "integer", 0,
            "This daemon's number in a fleet (0-255): part of every request id (`rid`), so "
            "rids of different nodes never collide (docs/protocol.md).", _int_in(0, 255)),
    Setting("server", "fronts", 'integer or "auto"', "auto",
            "Front processes that accept connections on the port (SO_REUSEPORT), each with "
            "its own rings to every worker. \"auto\": one per CPU this process may use beyond "
            "those the CPU workers take, at least 1, and 1 on a machine of 2 CPUs or fewer "
            "(the formula and a table: docs/architecture.md, \"How many fronts\").",
            _check_fronts),
    Setting("server", "front_heartbeat_timeout_s", "float", 10.0,
            "A front that sends no heartbeat for this long (a wedged event loop) is killed "
            "and restarted; /readyz fails meanwhile.", _float_in(1.0)),
    # [logging]
    Setting("logging", "level", "string", "info",
            "Lowest level of the daemon's log records that are written.",
            _one_of("debug", "info", "warning", "error", fold_case=True)),
    # [metrics]
    Setting("metrics", "enabled", "boolean", True,
            "Serve /metrics, /healthz and /readyz over HTTP.", _check_bool),
    Setting("metrics", "host", "string", "127.0.0.1",
            "Address of the metrics endpoint; loopback by default, like the server.",
            _check_host),
    Setting("metrics", "port", "integer", 7071,
            "Port of the metrics endpoint; 0 picks a free one (shown by `health`).",
            _int_in(0, 65535)),
    Setting("metrics", "max_connections", "integer", 64,
            "Most HTTP connections to the metrics endpoint open at once; a further one is "
            "answered 503 and closed (a scrape or probe takes one for a moment).",
            _int_in(1, 100_000)),
    # [request_log]
    Setting("request_log", "enabled", "boolean", False,
            "Write one record per answer (sampled) and per feedback.", _check_bool),
    Setting("request_log", "dir", "path", None,
            "Directory of the log files (created); unset: beside the config file, "
            "`<config stem>-requests/`.", _check_new_file),
    Setting("request_log", "sample_rate", "float", 1.0,
            "Share of answers logged (feedback is always logged).", _float_in(0, 1)),
    Setting("request_log", "max_file_bytes", "integer", 64 * _MIB,
            "A file is closed and a new one started past this size.", _int_in(4096, 64 * _GIB)),
    Setting("request_log", "max_files", "integer", 50,
            "Files kept; the oldest is deleted beyond this.", _int_in(1, 1_000_000)),
    Setting("request_log", "buffer", "integer", 65536,
            "Records waiting for the writer thread; beyond it records are dropped and "
            "counted (the event loop never waits for the disk).", _int_in(16, 10_000_000)),
    Setting("request_log", "key_secret", "string", "",
            "Secret of the keyed hash that stands for the routing key in the log; set it "
            "(the same on every node) so hashes join across restarts and nodes; empty: a "
            "random secret per start.", lambda v, ctx: _check_str(v)),
    Setting("request_log", "score_output", "string", None,
            "Output whose first element is logged as the score; unset: the first output.",
            _check_name),
    # [auth]
    Setting("auth", "tokens_file", "path", None,
            "File of `NAME:TOKEN` lines, one per client, mode 600; unset: no authentication "
            "(keep the loopback bind then).", _check_file),
    Setting("auth", "exempt_ops", "array of strings", (),
            "Ops answered without a token, e.g. [\"health\"] for TCP health checks (the "
            "metrics port's /healthz needs none).", _check_ops),
    Setting("auth", "timeout_s", "float", 10.0,
            "With authentication on, a connection that has not presented a valid token "
            "this long after it opened is answered UNAUTHENTICATED (id 0) and closed.",
            _float_in(0, lo_open=True)),
    # [rate_limit]
    Setting("rate_limit", "requests_per_s", "float", 0.0,
            "Sustained requests per second allowed to one client; 0 turns the limit off.",
            _float_in(0)),
    Setting("rate_limit", "burst", "integer",
            Derived("requests_per_s rounded up (at least 1)", _default_burst),
            "Requests a client may send at once above the sustained rate (the bucket's size).",
            _int_in(1, 10**9)),
    # [feedback]
    Setting("feedback", "window_s", "float", 3600.0,
            "How long after an answer its `rid` (or routing key) can still be joined by a "
            "`feedback` outcome.", _float_in(0, lo_open=True)),
    Setting("feedback", "max_entries", "integer", 1_000_000,
            "Most answers remembered for the join, oldest dropped first; about 210 bytes "
            "each.", _int_in(1, 10**9)),
    # [[models]]
    Setting("models", "name", "string", REQUIRED,
            "Model name, as clients send it in `model`.", _check_name),
    Setting("models", "version", "string", "1",
            "Version of this entry; (name, version) pairs are unique.", _check_version),
    Setting("models", "factory", "string", None,
            "Function that returns the nn.Module (imported by the worker, not at load); "
            "set exactly one of factory and artifact.", _check_factory),
    Setting("models", "artifact", "path", None,
            "torch.export .pt2 file; set exactly one of factory and artifact; relative to "
            "the config file's directory, checked at load.", _check_file),
    Setting("models", "checkpoint", "path", None,
            "state_dict file loaded into the factory's module (factory only); relative to "
            "the config file's directory, checked at load.", _check_file),
    Setting("models", "metadata", "path", None,
            "JSON file of what the model was trained on: data_version, feature_schema, "
            "training (docs/models.md); the declared inputs must match its feature_schema. "
            "Unset: the checkpoint's or artifact's file name + `.json`, when it exists.",
            _check_file),
    Setting("models", "require_metadata", "boolean", False,
            "Refuse the entry when it has no metadata file (rather than serve it with no "
            "data_version and an unchecked feature schema).", _check_bool),
    Setting("models", "input", "tensor", None,
            f"The one unnamed input of one sample (no batch dimension), like "
            f"`{_TENSOR_EXAMPLE}`; set exactly one of input and inputs. `default` (nested "
            "lists of the shape, or one number for every element) is what a request that "
            "omits the input gets; without it the input is required.", _check_input),
    Setting("models", "inputs", "table of tensors", None,
            "Named inputs, `{ NAME = { dtype = ..., shape = [...] }, ... }` or "
            "`[models.inputs.NAME]` tables; set exactly one of input and inputs. Each may "
            "have a `default`, as for input: a request may omit those inputs.",
            _check_inputs),
    Setting("models", "output", "tensor", None,
            "Declared unnamed output of one sample, checked against the model at warm-up; "
            "optional.", _check_tensor),
    Setting("models", "outputs", "table of tensors", None,
            "Declared named outputs, checked against the model at warm-up; optional; at "
            "most one of output and outputs.", _check_tensors),
    Setting("models", "devices", "list of strings", ("cpu",),
            "Where workers run: one worker process per entry, so a device listed twice "
            "gets two workers.", _check_devices),
    Setting("models", "threads", "integer", 0,
            "torch intra-op threads of each CPU worker; 0 = auto: the daemon shares the "
            "cores among the CPU workers and leaves the front process a core of its own.",
            _int_in(0, 1024)),
    Setting("models", "compile", "string", "auto",
            "torch.compile mode; \"auto\" = \"off\" on CPU (measured: torch.compile makes "
            "small MLPs slower on CPU and costs ~20 s of start-up), \"default\" on CUDA.",
            _one_of("auto", "off", "default", "reduce-overhead", "max-autotune")),
    Setting("models", "dtype", "string", "float32",
            "Autocast dtype of the forward pass; float32 runs without autocast.",
            _one_of("float32", "bfloat16", "float16")),
    Setting("models", "max_batch", "integer", 64,
            "Largest batch handed to a worker.", _int_in(1, 4096)),
    Setting("models", "window_ms", "float", 2.0,
            "How long the oldest queued request may wait for a fuller batch when every "
            "worker is busy; an idle worker never waits.", _float_in(0, 10)),
    Setting("models", "buckets", "list of integers",
            Derived("powers of two and the points halfway between them (x1.5) below max_batch, "
                    "then max_batch: 1 2 3 4 6 8 12 16 24 32 48 64 for 64", _default_buckets),
            "Batch sizes that batches are padded up to, so compiled graphs are reused.",
            _check_buckets),
    Setting("models", "queue_limit", "integer", 1024,
            "Requests queued in the front for this model; beyond it a request gets "
            "RESOURCE_EXHAUSTED at once.", _int_in(1, 1_000_000)),
    Setting("models", "inflight_batches", "integer", 2,
            "Batches handed to one worker before the first comes back; 2 lets the front "
            "fill the next while the worker computes.", _int_in(1, 8)),
    # [[rollouts]]
    Setting("rollouts", "model", "string", REQUIRED, "The model name being rolled out.",
            _check_name),
    Setting("rollouts", "stable", "string", REQUIRED,
            "Version serving the stable lane (and every request outside the canary).",
            _check_version),
    Setting("rollouts", "candidate", "string", REQUIRED,
            "Version serving the canary lane.", _check_version),
    Setting("rollouts", "salt", "string", REQUIRED,
            "Routing salt; changing it reshuffles who is in the canary, so keep it for the "
            "life of the rollout.", _check_salt),
    Setting("rollouts", "stages", "list of floats", (0.01, 0.05, 0.10, 0.25, 1.0),
            "Canary weights, one per stage; a key in the canary at one stage stays in it at "
            "every later stage.", _check_stages),
    Setting("rollouts", "stage", "integer", 0,
            "Index into stages to serve now; edit it and send SIGHUP to move the rollout.",
            _int_in(0, 1000)),
    Setting("rollouts", "auto_advance", "boolean", False,
            "Move to the next stage by itself once the stage has lasted min_dwell_s, the "
            "canary has min_samples answers and every guardrail check passes.", _check_bool),
    Setting("rollouts", "min_dwell_s", "float", 600.0,
            "Shortest time a stage lasts before it may auto-advance.", _float_in(0)),
    Setting("rollouts", "min_samples", "integer", 1000,
            "Canary answers a stage needs before it may auto-advance.", _int_in(0, 10**12)),
    Setting("rollouts", "retry", "integer", 0,
            "A rolled-back candidate stays rolled back through reloads and restarts; change "
            "this number (or the candidate) to try it again.", _int_in(0, 10**9)),
    # [[experiments]]
    Setting("experiments", "id", "string", REQUIRED,
            "Experiment id, sent by clients as `exp`.", _check_name),
    Setting("experiments", "model", "string", REQUIRED, "The model the experiment runs on.",
            _check_name),
    Setting("experiments", "salt", "string", REQUIRED,
            "Assignment salt; give each experiment its own so assignments are independent.",
            _check_salt),
    Setting("experiments", "coverage", "float", 1.0,
            "Share of keys in the experiment; the others get no arm.", _float_in(0, 1)),
    Setting("experiments", "arms", "list of tables", REQUIRED,
            "The arms: `[{ name = \"control\", split = 0.5 }, { name = \"treatment\", split = "
            "0.5, version = \"2\" }]`; splits sum to 1; a version must be a [[models]] entry.",
            _check_arms),
    # [[shadows]]
    Setting("shadows", "model", "string", REQUIRED,
            "The model whose requests are mirrored.", _check_name),
    Setting("shadows", "candidate", "string", REQUIRED,
            "Version that receives the mirrored copies.", _check_version),
    Setting("shadows", "sample_rate", "float", 0.05,
            "Share of keys mirrored (by bucket of salt and key, so the same keys are "
            "mirrored every time).", _float_in(0, 1)),
    Setting("shadows", "salt", "string", "shadow",
            "Sampling salt.", _check_salt),
    Setting("shadows", "queue_limit", "integer", 256,
            "Mirrored requests queued for the candidate; beyond it they are shed (counted), "
            "before any primary request is.", _int_in(1, 1_000_000)),
    Setting("shadows", "report_interval_s", "float", 60.0,
            "How often the shadow's comparison figures are written to the decision log.",
            _float_in(0, lo_open=True)),
    # [[guardrails]]
    Setting("guardrails", "model", "string", REQUIRED,
            "The model whose [[rollouts]] entry these checks guard.", _check_name),
    Setting("guardrails", "interval_s", "float", 10.0,
            "Seconds between checks.", _float_in(0, lo_open=True)),
    Setting("guardrails", "window_s", "float", 300.0,
            "Span of the absolute limits (error rate, p95); the relative tests use the whole "
            "stage.", _float_in(0, lo_open=True)),
    Setting("guardrails", "min_samples", "integer", 200,
            "Answers a lane needs (in the window, or in the stage for relative tests) before "
            "a check may fail or pass; with fewer it holds.", _int_in(1, 10**9)),
    Setting("guardrails", "alpha", "float", 0.05,
            "False-rollback rate of each relative test over a stage, under continuous "
            "monitoring.", _float_in(0, 0.5, lo_open=True)),
    Setting("guardrails", "max_error_rate", "float", 0.05,
            "Absolute limit on the canary's error rate (DEADLINE_EXCEEDED, INTERNAL, "
            "UNAVAILABLE) over the window.", _float_in(0, 1)),
    Setting("guardrails", "max_p95_ms", "float", 0.0,
            "Absolute limit on the canary's p95 latency over the window; 0 = off.",
            _float_in(0)),
    Setting("guardrails", "failing_checks", "integer", 3,
            "Consecutive checks breaking an absolute limit that roll back; a passing check "
            "resets the count.", _int_in(1, 1000)),
    Setting("guardrails", "error_rate_margin", "float", 0.0,
            "Relative: roll back when the canary's error rate is significantly above the "
            "stable lane's plus this.", _float_in(0, 1)),
    Setting("guardrails", "latency_margin", "float", 0.1,
            "Relative: roll back when canary answers are significantly more often slower than "
            "(1 + this) x the stable lane's p95.", _float_in(0, 10)),
    Setting("guardrails", "kpi", "boolean", False,
            "Also compare the KPI from `feedback` outcomes (higher is better).", _check_bool),
    Setting("guardrails", "kpi_margin", "float", 0.0,
            "Relative: roll back when the canary's mean outcome is significantly below the "
            "stable lane's minus this.", _float_in(0)),
    Setting("guardrails", "hard_error_rate", "float", 0.5,
            "Hard floor: a canary error rate at or above this over hard_min_samples answers "
            "rolls back at once.", _float_in(0, 1, lo_open=True)),
    Setting("guardrails", "hard_min_samples", "integer", 20,
            "Canary answers in the window the hard floor needs.", _int_in(1, 10**9)),
    Setting("guardrails", "max_restarts", "integer", 3,
            "Crashes of the candidate's workers in one stage that roll back at once.",
            _int_in(1, 10**6)),
    Setting("guardrails", "srm_alpha", "float", 0.001,
            "Sample-ratio mismatch: when the canary's share of routed traffic differs from its "
            "weight with p below this, decisions freeze (only the hard floor acts).",
            _float_in(0, 0.5, lo_open=True)),
    Setting("models", "spin_us", "float", 0.0,
            "After each batch the worker polls its ring this long before it sleeps on the "
            "eventfd; saves a ~25 us wake-up when the next batch comes quickly, at the cost of "
            "CPU. 0 (measured best on 2 cores, where the spin steals the front's core); try "
            "20-100 where cores are idle.", _float_in(0, 10_000)),
    Setting("models", "cache", "boolean", False,
            "Answer repeated inputs from a response cache in the front (key: version + hash "
            "of the input bytes), without a worker.", _check_bool),
    Setting("models", "cache_ttl_s", "float", 60.0,
            "How long a cached answer is served.", _float_in(0, lo_open=True)),
    Setting("models", "cache_max_bytes", "integer", 64 * _MIB,
            "Size bound of the cache (output bytes and keys); least recently used out first.",
            _int_in(1024, 64 * _GIB)),
    Setting("models", "drift", "boolean", False,
            "Track input drift: per-feature KS distance of served inputs against a reference "
            "(models with one floating-point input).", _check_bool),
    Setting("models", "drift_profile", "path", None,
            "Reference profile written by `ringserve profile`; unset: the first "
            "drift_freeze_after sampled rows become the reference.", _check_file),
    Setting("models", "drift_freeze_after", "integer", 10_000,
            "Rows that make the reference when there is no profile file.", _int_in(1, 10**9)),
    Setting("models", "drift_sample_rate", "float", 0.1,
            "Share of requests whose inputs are summarised.", _float_in(0, 1)),
    Setting("models", "drift_threshold", "float", 0.1,
            "KS distance beyond which a feature is flagged (stats, metrics, decision log).",
            _float_in(0, 1, lo_open=True)),
    Setting("models", "fallback", "table", None,
            "`[models.fallback]`: what answers, marked `fallback`, when this version cannot "
            "(docs/operations.md, \"Degraded mode\"): `version` (another [[models]] entry of this "
            "model, with the same inputs and outputs; it queues at most `queue_limit` (256) "
            "requests of this fallback) or `outputs` (a constant answer of the declared output "
            "schema: a value for one output, a table of name to value for named ones), for the "
            "causes in `on` (default no_worker, queue_full, deadline_near; also model_error). "
            "Unset: those failures are answered as errors.", _check_fallback),
)

_SECTION_BY_NAME = {s.name: s for s in SECTIONS}
_SETTINGS_BY_SECTION: dict[str, dict[str, Setting]] = {s.name: {} for s in SECTIONS}
for _s in SETTINGS:
    assert _s.name not in _SETTINGS_BY_SECTION[_s.section], _s
    _SETTINGS_BY_SECTION[_s.section][_s.name] = _s
del _s


def with_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """``cfg`` with command-line values replacing the file's: {section: {key:
    value}}. Applied at start and again to every reloaded file, so a reload
    keeps what the command line said."""
    for section, values in overrides.items():
        if values:
            cfg = dataclasses.replace(
                cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def default_guardrail(model: str) -> GuardrailConfig:
    values = {s.name: s.default for s in _SETTINGS_BY_SECTION["guardrails"].values()}
    values["model"] = model
    return GuardrailConfig(**values)


# --------------------------------------------------------------------------
# Loading


def _fail(ctx: _Context, path: str, exc: _Invalid) -> ConfigError:
    key = path + exc.at
    if isinstance(exc, _Unknown):
        message = f"{ctx.source}: unknown key {exc.key!r} in {key}{exc.tail}"
    else:
        message = f"{ctx.source}: {key}: {exc.problem}"
    return ConfigError(message, source=ctx.source, key=key)


def _parse_entry(section: Section, raw: dict[str, Any], where: str, ctx: _Context) -> Any:
    settings = _SETTINGS_BY_SECTION[section.name]
    if section.label and section.label in raw:
        try:
            label = settings[section.label].check(raw[section.label], ctx)
        except ValueError:
            pass
        else:
            where = f"{where} ({json.dumps(label)})"
    for key in raw:
        if key not in settings:
            raise _fail(ctx, where, _Unknown(key, settings))
    values: dict[str, Any] = {}
    derived = []
    for s in settings.values():
        if s.name in raw:
            try:
                values[s.name] = s.check(raw[s.name], ctx)
            except _Invalid as e:
                raise _fail(ctx, f"{where}.{s.name}", e) from None
            except ValueError as e:     # a check that raises a plain ValueError
                raise _fail(ctx, f"{where}.{s.name}", _Invalid(str(e))) from None
        elif s.default is REQUIRED:
            raise _fail(ctx, f"{where}.{s.name}",
                        _Invalid(f"missing; this key is required ({s.doc})"))
        elif isinstance(s.default, Derived):
            derived.append(s)
        else:
            values[s.name] = s.default
    for s in derived:
        values[s.name] = s.default.compute(values)
    try:
        return section.build(values, ctx)
    except _Invalid as e:
        raise _fail(ctx, where, e) from None


def _parse_section(section: Section, raw: Any, ctx: _Context) -> Any:
    name = section.name
    if not section.array:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise _fail(ctx, name, _Invalid(f"must be a table ([{name}]), got {_show(raw)}"))
        return _parse_entry(section, raw, name, ctx)
    raw = [] if raw is None else raw
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise _fail(ctx, name, _Invalid(
            f"must be an array of tables, one [[{name}]] per entry, got {_show(raw)}"))
    if len(raw) < section.min_items:
        raise _fail(ctx, name, _Invalid(
            f"at least {section.min_items} [[{name}]] table is required, found {len(raw)}"))
    items = tuple(_parse_entry(section, e, f"{name}[{i}]", ctx) for i, e in enumerate(raw))
    if section.check_items is not None:
        section.check_items(items, ctx)
    return items


def parse_config(data: dict, source: str = "<config>", *,
                 base_dir: str | os.PathLike | None = None) -> Config:
    """Validate a dict as tomllib returns it; raise ConfigError on the first problem.

    Relative paths are resolved against ``base_dir``; by default the directory
    of ``source`` when it names a file, else the current directory.
    """
    if base_dir is None:
        base_dir = (os.getcwd() if source.startswith("<")
                    else os.path.dirname(os.path.abspath(source)))
    ctx = _Context(source, os.path.abspath(base_dir))
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a table of sections, got {_show(data)}",
                          source=source)
    for key in data:
        if key not in _SECTION_BY_NAME:
            close = difflib.get_close_matches(str(key), list(_SECTION_BY_NAME), n=1, cutoff=0.6)
            tail = (f"; did you mean {close[0]!r}?" if close
                    else "; valid sections: " + ", ".join(_SECTION_BY_NAME))
            raise ConfigError(f"{source}: unknown section {key!r}{tail}", source=source, key=key)
    built = {s.name: _parse_section(s, data.get(s.name), ctx) for s in SECTIONS}
    _check_across(built, ctx)
    return Config(**built, source=source)


def load_config(path: str | os.PathLike) -> Config:
    """Read, parse and validate a TOML config file; raise ConfigError if it is unusable."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config file: {e.strerror or e}",
                          source=source) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: is not UTF-8 text ({e.reason} at byte {e.start})",
                          source=source) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}", source=source) from None
    except RecursionError:
        # tomllib recurses once per level of nested arrays and inline tables
        raise ConfigError(f"{source}: invalid TOML: arrays or inline tables nested too "
                          "deeply to read", source=source) from None
    except ValueError as e:
        # tomllib lets int() refuse a decimal integer of more than 4300 digits
        # (its message then ends in advice for programmers: cut it off)
        raise ConfigError(f"{source}: invalid TOML: {str(e).split(';')[0]}",
                          source=source) from None
    return parse_config(data, source)


# --------------------------------------------------------------------------
# The reference (docs/config.md holds this output between its markers)


def _toml(v: Any) -> str:
    if v is REQUIRED:
        return "required"
    if v is None:
        return "unset"
    if isinstance(v, Derived):
        return v.doc
    return f"`{_show(v, limit=1000)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """The settings table as markdown: one heading and one table per section."""
    out = []
    for section in SECTIONS:
        heading = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        out += [f"### `{heading}`", "", section.doc, "",
                "| key | type | default | allowed | meaning |",
                "| --- | --- | --- | --- | --- |"]
        for s in _SETTINGS_BY_SECTION[section.name].values():
            out.append("| " + " | ".join(_cell(c) for c in (
                f"`{s.name}`", s.type, _toml(s.default), s.rule, s.doc)) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.config",
                                     description="Check a ringserve config file "
                                                 "or print the reference.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", metavar="FILE",
                       help="validate FILE: print ok, or the error and exit 2")
    group.add_argument("--markdown", action="store_true", help="print the settings reference")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(render_reference())
        return 0
    try:
        load_config(args.check)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
