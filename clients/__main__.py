"""``python -m clients``: ask a running ringserve daemon something from the shell.

    python -m clients health
    python -m clients --port 7071 models
    python -m clients stats --model demo
    python -m clients infer --model demo --npy x.npy
    python -m clients infer --model magic --json '[1, 2, 3]'
    python -m clients infer --model two --json '{"ids": [1, 2, 3, 4], "dense": [0.5, 1, 2]}'
    python -m clients infer --model two --npy ids=ids.npy --npy dense=dense.npy --json-out

Prints aligned text, or with ``--json-out`` the answer as JSON (tensors as
``{"dtype", "shape", "values"}`` with nested lists). Exit status: 0 OK,
1 the server answered an error (its status and message on stderr; the answer
on stdout with ``--json-out``), 2 bad command line, 3 no answer (cannot
connect, connection lost, timeout).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ipc.status import Status

from ._core import InferResult, RetryPolicy, decode_outputs, read_token
from .errors import ClientError, RingserveError
from .sync import Client

if TYPE_CHECKING:
    from numpy.typing import NDArray

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    # The connection options are accepted before or after the command; in the
    # sub-parsers they default to SUPPRESS so that a value given before the
    # command is not overwritten by the sub-parser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=argparse.SUPPRESS,
                        help="daemon address (default 127.0.0.1)")
    common.add_argument("--port", type=int, default=argparse.SUPPRESS,
                        help="daemon port (default 7070)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for an answer, retries included (default 30)")
    common.add_argument("--no-retry", action="store_true", default=argparse.SUPPRESS,
                        help="do not retry RESOURCE_EXHAUSTED / UNAVAILABLE answers")
    common.add_argument("--json-out", action="store_true", default=argparse.SUPPRESS,
                        help="print the answer as JSON instead of text")
    common.add_argument("--token-file", default=argparse.SUPPRESS,
                        help="read the [auth] token from this file (default: the "
                        "RINGSERVE_TOKEN environment variable, if set)")

    p = argparse.ArgumentParser(prog="python -m clients", parents=[common],
                                description="Talk to a running ringserve daemon.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    h = sub.add_parser("health", parents=[common], help="liveness, readiness, workers")
    h.add_argument("--model", help="only this model's workers")
    sub.add_parser("models", parents=[common], help="served models, their schema and batching")
    s = sub.add_parser("stats", parents=[common], help="counts, latency, queues, workers")
    s.add_argument("--model", help="only this model")
    i = sub.add_parser("infer", parents=[common], help="run a model on one sample")
    i.add_argument("--model", required=True, help="model name")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", dest="json_input", metavar="LITERAL",
                     help="the sample as JSON: a (nested) list of numbers, or a map of input "
                          "name to such a list")
    src.add_argument("--npy", action="append", metavar="[NAME=]FILE",
                     help="the sample from a .npy file; NAME=FILE once per named input")
    i.add_argument("--version", help="pin a model version")
    i.add_argument("--key", help="routing key (user or session id)")
    i.add_argument("--exp", help="experiment id")
    i.add_argument("--deadline-ms", type=int, help="server-side deadline in milliseconds")
    return p


def _inputs(args: argparse.Namespace, p: argparse.ArgumentParser) -> object:
    if args.json_input is not None:
        try:
            value = json.loads(args.json_input)
        except json.JSONDecodeError as e:
            p.error(f"--json: not valid JSON ({e})")
        if not isinstance(value, (list, dict)):
            p.error("--json: give a list of numbers, or a map of input name to list")
        return value
    named: dict[str, Any] = {}
    for item in args.npy:
        name, sep, path = item.rpartition("=")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            p.error(f"--npy {item}: {e}")
        if not sep:
            if len(args.npy) > 1:
                p.error("--npy: with several files, name each input: --npy NAME=FILE")
            return array
        named[name] = array
    return named


# --- text output ---------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                     for r in cells)


def _pairs(pairs: list[tuple[str, object]]) -> str:
    w = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(w)}  {'-' if v is None else v}" for k, v in pairs)


def _yes(v: object) -> str:
    return "yes" if v else "no"


def _spec(s: dict[str, Any] | None) -> str | None:
    return None if s is None else f"{s['dtype']}[{', '.join(map(str, s['shape']))}]"


def _specs(one: dict[str, Any] | None, many: dict[str, Any] | None) -> str | None:
    if many:
        return ", ".join(f"{n}: {_spec(s)}" for n, s in many.items())
    return _spec(one)


def _status_counts(counts: dict[str, Any]) -> str:
    def name(code: str) -> str:
        try:
            return Status(int(code)).name
        except ValueError:
            return code
    return ", ".join(f"{name(k)} {v}" for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))
                     ) or "-"


def show_health(a: dict[str, Any]) -> str:
    rows, errors = [], []
    for m in a.get("models", []):
        rows.append([m.get("name"), m.get("version"), m.get("lane"), m.get("device"),
                     m.get("state"), _yes(m.get("ready")), m.get("pid"), m.get("restarts"),
                     (m.get("hash") or "")[:19] or None])
        if m.get("error"):
            errors.append(f"{m.get('name')}@{m.get('version')} ({m.get('device')}): {m['error']}")
    out = [_pairs([("live", _yes(a.get("live"))), ("ready", _yes(a.get("ready"))),
                   ("draining", _yes(a.get("draining")))]), "",
           _table(["MODEL", "VERSION", "LANE", "DEVICE", "STATE", "READY", "PID", "RESTARTS",
                   "HASH"], rows)]
    if errors:
        out += ["", "errors:"] + [f"  {e}" for e in errors]
    return "\n".join(out)


def show_models(a: dict[str, Any]) -> str:
    rows = []
    for m in a.get("models", []):
        b = m.get("batching", {})
        rows.append([m.get("name"), m.get("version"), m.get("lane"),
                     ",".join(m.get("devices", [])), m.get("dtype"),
                     _specs(m.get("input"), m.get("inputs")),
                     _specs(m.get("output"), m.get("outputs")), b.get("max_batch"),
                     b.get("window_ms"), b.get("queue_limit")])
    return _table(["MODEL", "VERSION", "LANE", "DEVICES", "DTYPE", "INPUT", "OUTPUT",
                   "MAX_BATCH", "WINDOW_MS", "QUEUE_LIMIT"], rows)


def show_stats(a: dict[str, Any]) -> str:
    rows = []
    for m in a.get("models", []):
        lat = m.get("latency_us", {})
        busy = [w.get("busy") for w in m.get("workers", []) if w.get("busy") is not None]
        rows.append([m.get("name"), m.get("version"), m.get("lane"), m.get("queue_depth"),
                     m.get("requests"), _status_counts(m.get("counts", {})), lat.get("p50"),
                     lat.get("p95"), lat.get("p99"), m.get("batches"),
                     " ".join(f"{b:.0%}" for b in busy) or None])
    head = _pairs([("uptime", f"{a.get('uptime_s', 0):g} s"),
                   ("connections", a.get("connections")), ("draining", _yes(a.get("draining"))),
                   ("rejected", _status_counts(a.get("rejected", {})))])
    return "\n".join([head, "", _table(
        ["MODEL", "VERSION", "LANE", "QUEUE", "REQUESTS", "ANSWERS", "P50_US", "P95_US",
         "P99_US", "BATCHES", "BUSY"], rows)])


def _array_text(a: NDArray[Any]) -> str:
    return np.array2string(a, precision=6, threshold=64, max_line_width=100,
                           separator=", ").replace("\n", "\n" + " " * 4)


def show_infer(r: InferResult) -> str:
    t = r.timing
    timing = ", ".join(f"{k.removesuffix('_us')} {v} us" if k.endswith("_us") else f"{k} {v}"
                       for k, v in t.items())
    # numpy arrays: the command line never asks for torch outputs
    outputs = cast("NDArray[Any] | dict[str, NDArray[Any]]", r.outputs)
    outs = outputs if isinstance(outputs, dict) else {"output": outputs}
    pairs: list[tuple[str, object]] = [
        ("model", r.model), ("version", r.version), ("lane", r.lane), ("arm", r.arm),
        ("rid", r.rid), ("timing", timing or None)]
    pairs += [(name, f"{a.dtype}{list(a.shape)}  {_array_text(a)}") for name, a in outs.items()]
    return _pairs(pairs)


# --- JSON output ---------------------------------------------------------------------------

def _jsonable(answer: dict[str, Any]) -> dict[str, Any]:
    out = dict(answer)
    if "outputs" in out:
        outs = decode_outputs(out["outputs"])

        def as_json(a: NDArray[Any]) -> dict[str, Any]:
            return {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.tolist()}
        out["outputs"] = ({k: as_json(v) for k, v in outs.items()} if isinstance(outs, dict)
                          else as_json(outs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    host = getattr(args, "host", "127.0.0.1")
    port = getattr(args, "port", 7070)
    timeout = getattr(args, "timeout", 30.0)
    json_out = getattr(args, "json_out", False)
    retry = None if getattr(args, "no_retry", False) else RetryPolicy()
    inputs = _inputs(args, p) if args.command == "infer" else None
    if not timeout > 0:
        p.error("--timeout must be > 0")
    try:
        token = read_token(getattr(args, "token_file", None))
    except ValueError as e:
        p.error(str(e))
    text: Callable[[dict[str, Any]], str]
    try:
        with Client(host, port, timeout=timeout, connect_timeout=min(timeout, 5.0),
                    retry=retry, token=token) as c:
            if args.command == "health":
                answer = c.health(args.model)
                text = show_health
            elif args.command == "models":
                answer, text = c.models(), show_models
            elif args.command == "stats":
                answer, text = c.stats(args.model), show_stats
            else:
                r = c.infer(args.model, inputs, key=args.key, exp=args.exp, version=args.version,
                            deadline_ms=args.deadline_ms)

                def infer_text(_a: dict[str, Any], r: InferResult = r) -> str:
                    return show_infer(r)
                answer, text = r.answer, infer_text
    except RingserveError as e:
        if json_out:
            print(json.dumps(e.answer, indent=2))
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except (TypeError, ValueError) as e:   # inputs the client cannot send
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(_jsonable(answer), indent=2) if json_out else text(answer))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
