"""``ringserve batch`` / ``python -m daemon batch``: the command line.

Every option is declared once, in ``OPTIONS``: its flag, its type, its
default and its help. The same table reads the optional job file
(``--job FILE``, TOML): a ``[batch]`` table whose keys are the options'
names with underscores (``id_column = "user"``, ``columns = { input =
"f0:f127" }``, ``quantile = ["0.99:0:0.95"]``). A flag given on the command
line wins over the job file, which wins over the default.

Exit codes: 0 published; 1 the job failed (a worker died, the model raised,
the input changed under a resume); 2 bad usage, config or input; 3 the
guardrails failed (nothing published, the previous output is unchanged);
130 interrupted (SIGINT/SIGTERM; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass

from ..config import DEFAULT_CONFIG, ConfigError, load_config
from . import guardrails as gr
from .columns import ColumnError, parse_mapping
from .job import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, Job, JobError, JobOptions
from .progress import Progress
from .readers import InputError
from .workers import WorkerError

_REQUIRED = object()


@dataclass(frozen=True)
class Option:
    name: str                     # job-file key and attribute; the flag is --name-with-dashes
    type: object                  # str, int, float, bool (a switch), list (repeatable), or a parser
    default: object
    help: str
    choices: tuple | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _off_or_float(v) -> float | None:
    if v in ("off", None):
        return None
    x = float(v)
    if not 0 <= x <= 1:
        raise ValueError(f"must be a rate from 0 to 1 or 'off', got {v!r}")
    return x


OPTIONS: tuple[Option, ...] = (
    Option("config", str, None, "daemon config file (default: configs/default.toml)",
           metavar="FILE"),
    Option("model", str, None, "model name (default: the config's only model)"),
    Option("version", str, None, "model version (default: the stable version of the model's "
           "rollout, else its only version)"),
    Option("input", str, _REQUIRED, "input table, .csv or .parquet", metavar="PATH"),
    Option("output", str, _REQUIRED, "output directory (created)", metavar="DIR"),
    Option("format", str, None, "input format (default: from the file name)", ("csv", "parquet")),
    Option("output_format", str, None, "output format (default: the input's)", ("csv", "parquet")),
    Option("columns", list, [], "map a model input to columns, repeatable: INPUT=f0:f127 or "
           "INPUT=a,b,c (default: a one-input model takes every column but the id)",
           metavar="INPUT=COLUMNS"),
    Option("id_column", str, None, "column copied to the output as the row's id "
           "(default: the row number, as column 'row')", metavar="NAME"),
    Option("data_tag", str, None, "data version in the output name (default: sha256 of the "
           "input, 16 hex digits)", metavar="TAG"),
    Option("batch_size", int, 4096, "rows per batch handed to a worker", metavar="N"),
    Option("delimiter", str, None, "CSV field delimiter (default: ',' or tab for .tsv)",
           metavar="CHAR"),
    Option("csv_engine", str, "auto", "CSV parser: pyarrow when installed (faster), else numpy",
           ("auto", "numpy", "pyarrow")),
    Option("checkpoint_s", float, 10.0, "seconds between checkpoints", metavar="SECONDS"),
    Option("checkpoint_rows", int, 0, "also checkpoint every N rows (0: by time only)",
           metavar="N"),
    Option("restart", bool, False, "ignore a checkpoint and score from the first row"),
    Option("progress", str, "auto", "progress on stderr: a line on a terminal, JSON lines "
           "otherwise", ("auto", "tty", "json", "off")),
    Option("progress_interval", float, None, "seconds between progress updates "
           "(default: 0.5 on a terminal, 5 otherwise)", metavar="SECONDS"),
    Option("score", str, None, "output column the guardrails check (default: the first)",
           metavar="COLUMN"),
    Option("max_nan_rate", _off_or_float, 0.0, "fail when a larger share of scores is NaN or "
           "infinite ('off' to allow any)", metavar="RATE"),
    Option("mean", lambda v: gr.parse_range(v, "--mean"), None,
           "fail unless the mean of the finite scores is in [LOW, HIGH]", metavar="LOW:HIGH"),
    Option("quantile", list, [], "fail unless quantile Q of the scores is in [LOW, HIGH]; "
           "repeatable", metavar="Q:LOW:HIGH"),
    Option("sample_size", int, gr.DEFAULT_SAMPLE, "scores sampled for the quantiles "
           "(exact up to this many rows)", metavar="N"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringserve batch",
        description="Score a CSV or Parquet table with a configured model, on every device "
                    "the model is configured for; resumable, atomic, guarded (docs/batch.md).")
    p.add_argument("--job", metavar="FILE",
                   help="TOML job file with a [batch] table of these options")
    for o in OPTIONS:
        shown = o.default not in (None, _REQUIRED, [], False) and "default" not in o.help
        kw = {"dest": o.name, "default": None,
              "help": o.help + (f" (default: {o.default})" if shown else "")}
        if o.type is bool:
            kw["action"] = "store_const"
            kw["const"] = True
        elif o.type is list:
            kw["action"] = "append"
        else:
            kw["choices"] = o.choices
            if o.metavar:
                kw["metavar"] = o.metavar
        if o.type is list and o.metavar:
            kw["metavar"] = o.metavar
        p.add_argument(o.flag, **kw)
    return p


def render_options() -> str:
    """The options table of docs/batch.md (a unit test keeps them equal)."""
    rows = ["| flag | job-file key | default | meaning |", "| --- | --- | --- | --- |",
            "| `--job FILE` | | | TOML file with a `[batch]` table of the options below |"]
    for o in OPTIONS:
        flag = o.flag + (f" {o.metavar}" if o.metavar else "" if o.type is bool else
                         " {" + ",".join(o.choices) + "}" if o.choices else f" {o.name.upper()}")
        default = "required" if o.default is _REQUIRED else "" if o.default in (None, []) \
            else f"`{str(o.default).lower() if isinstance(o.default, bool) else o.default}`"
        rows.append(f"| `{flag}` | `{o.name}` | {default} | {o.help} |")
    return "\n".join(rows)


def _convert(o: Option, v, where: str):
    if o.type is list:
        if o.name == "columns" and isinstance(v, dict):
            return v
        if isinstance(v, str) or not isinstance(v, list):
            v = [v]
        return [str(x) for x in v]
    if o.type is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{where}: must be true or false, got {v!r}")
        return v
    if o.name == "mean" and isinstance(v, list):
        v = ":".join(map(str, v))
    try:
        x = o.type(v) if v is not None else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if o.choices and x not in o.choices:
        raise ValueError(f"{where}: must be one of {', '.join(o.choices)}, got {v!r}")
    return x


def resolve(args: argparse.Namespace) -> dict:
    """Flags over the job file over the defaults -> {name: value}."""
    from_file = {}
    if args.job:
        try:
            with open(args.job, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read the job file {args.job}: {e}") from None
        table = doc.get("batch")
        if not isinstance(table, dict) or set(doc) - {"batch"}:
            raise ValueError(f"{args.job}: put the options in one [batch] table")
        known = {o.name: o for o in OPTIONS}
        for k, v in table.items():
            if k not in known:
                import difflib
                near = difflib.get_close_matches(k, known, n=1)
                raise ValueError(f"{args.job}: unknown key {k!r} in [batch]"
                                 + (f"; did you mean {near[0]!r}?" if near else ""))
            from_file[k] = _convert(known[k], v, f"{args.job}: batch.{k}")
    out = {}
    for o in OPTIONS:
        v = getattr(args, o.name)
        if v is not None:
            v = _convert(o, v, o.flag)
        elif o.name in from_file:
            v = from_file[o.name]
        elif o.default is _REQUIRED:
            raise ValueError(f"{o.flag} is required (or `{o.name} = ...` in the job file)")
        else:
            v = o.default
        out[o.name] = v
    return out


def choose_model(cfg, name: str | None, version: str | None):
    names = list(dict.fromkeys(m.name for m in cfg.models))
    if name is None:
        if len(names) != 1:
            raise ValueError(f"--model is required: {cfg.source} serves {', '.join(names)}")
        name = names[0]
    versions = [m.version for m in cfg.models if m.name == name]
    if not versions:
        raise ValueError(f"{cfg.source} has no model {name!r}; it has {', '.join(names)}")
    if version is None:
        stable = [r.stable for r in cfg.rollouts if r.model == name]
        if stable:
            version = stable[0]
        elif len(versions) == 1:
            version = versions[0]
        else:
            raise ValueError(f"--version is required: {name!r} has versions {', '.join(versions)}")
    m = cfg.model(name, version)
    if m is None:
        raise ValueError(f"{name!r} has no version {version!r}; it has {', '.join(versions)}")
    return m


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        o = resolve(args)
        bounds = gr.Bounds(o["max_nan_rate"], o["mean"],
                           tuple(gr.parse_quantile(q) for q in o["quantile"]))
        if o["sample_size"] < 1:
            raise ValueError("--sample-size must be at least 1")
        cfg = load_config(o["config"] or os.environ.get("RINGSERVE_CONFIG") or DEFAULT_CONFIG)
        model = choose_model(cfg, o["model"], o["version"])
        opts = JobOptions(
            input=o["input"], output=o["output"], format=o["format"],
            output_format=o["output_format"], columns=parse_mapping(o["columns"]),
            id_column=o["id_column"], data_tag=o["data_tag"], batch_size=o["batch_size"],
            delimiter=o["delimiter"], csv_engine=o["csv_engine"], checkpoint_s=o["checkpoint_s"],
            checkpoint_rows=o["checkpoint_rows"], restart=o["restart"], score=o["score"],
            bounds=bounds, sample_size=o["sample_size"])
    except (ValueError, ConfigError) as e:
        print(f"ringserve batch: {e}", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(o["progress"], o["progress_interval"])
    try:
        summary = Job(cfg, model, opts, progress).run()
    except JobError as e:
        progress.finish()
        progress.event("failed", str(e).splitlines()[0], **({"guardrails": e.summary["guardrails"]}
                                                            if hasattr(e, "summary") else {}))
        print(f"ringserve batch: {e}", file=sys.stderr)
        if hasattr(e, "summary"):
            print(json.dumps(e.summary), flush=True)
        return e.code
    except (ColumnError, InputError) as e:
        progress.finish()
        print(f"ringserve batch: {e}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerError as e:
        progress.finish()
        print(f"ringserve batch: {e}\nwhat was scored before is checkpointed; rerun the same "
              "command to resume", file=sys.stderr)
        return EXIT_FAILED
    except (Interrupted, KeyboardInterrupt):
        progress.finish()
        print("ringserve batch: interrupted; what was scored is checkpointed, rerun the same "
              "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.event("published", summary["output"], rows=summary["rows"],
                   rows_per_s=summary["rows_per_s"])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
