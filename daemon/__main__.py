"""Command line: ``python -m daemon`` / ``ringserve``.

    ringserve serve [--config FILE] [--host H] [--port P] [--metrics-port P] [--port-file F]
    ringserve check FILE            validate a config, print "ok" or the error
    ringserve reload --pid-file F   validate the running daemon's config file, then SIGHUP it
    ringserve batch --input PATH --output DIR [...]   score a table offline (docs/batch.md)
    ringserve report --log DIR ...  A/B and lane report over the request log
                                    (daemon/tools/report.py)
    ringserve profile --input F ... reference profile of training data for drift
                                    (daemon/observe/drift.py)
    python -m daemon [...]          same as ``ringserve serve [...]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .config import DEFAULT_CONFIG


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"TOML config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--host", default=None, help="override [server] host")
    p.add_argument("--port", type=int, default=None,
                   help="override [server] port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="override [metrics] port (0: any free port, shown by `health`); "
                        "with --port 0 it defaults to 0 too")
    p.add_argument("--port-file", default=None,
                   help="write the bound port to this file once listening (for scripts and tests)")
    p.add_argument("--pid-file", default=None,
                   help="write the daemon's pid here (for `ringserve reload --pid-file`)")
    p.add_argument("--check-config", metavar="FILE", default=None,
                   help="validate FILE and exit (0 ok, 2 invalid) without serving")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .config import ConfigError, load_config

    if argv and argv[0] == "reload":
        return _reload(argv[1:])
    if argv and argv[0] == "batch":
        from .offline.cli import main as batch_main
        return batch_main(argv[1:])
    if argv and argv[0] == "report":
        from .tools.report import main as report_main
        return report_main(argv[1:])
    if argv and argv[0] == "profile":
        from .observe.drift import profile_main
        return profile_main(argv[1:])
    if argv and argv[0] == "check":
        p = argparse.ArgumentParser(prog="ringserve check")
        p.add_argument("file")
        a = p.parse_args(argv[1:])
        argv = ["--check-config", a.file]
    elif argv and argv[0] == "serve":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="ringserve serve", description="Serve PyTorch models over "
                                "msgpack/TCP with shared-memory workers.")
    _serve_args(p)
    a = p.parse_args(argv)
    if a.check_config:
        try:
            load_config(a.check_config)
        except ConfigError as e:
            print(f"invalid config: {e}", file=sys.stderr)
            return 2
        print("ok")
        return 0
    path = a.config or os.environ.get("RINGSERVE_CONFIG") or str(DEFAULT_CONFIG)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    from .config import with_overrides
    metrics_port = a.metrics_port if a.metrics_port is not None else (0 if a.port == 0 else None)
    overrides = {"server": {k: v for k, v in (("host", a.host), ("port", a.port)) if v is not None},
                 "metrics": {"port": metrics_port} if metrics_port is not None else {}}
    cfg = with_overrides(cfg, overrides)
    from .observe import logs
    from .supervisor import serve
    logs.setup(cfg.logging.level)
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n{os.path.abspath(path)}\n")
    try:
        return serve(cfg, a.port_file, overrides)
    finally:
        if a.pid_file:
            try:
                os.unlink(a.pid_file)
            except FileNotFoundError:
                pass


def _reload(argv: Sequence[str]) -> int:
    """Check the config file the daemon was started with, then send SIGHUP.
    The daemon validates again itself (and keeps the old config if the file
    changed in between); checking here first gives the operator the error at
    the prompt instead of in the log."""
    import signal

    from .config import ConfigError, load_config
    p = argparse.ArgumentParser(prog="ringserve reload")
    p.add_argument("--pid-file", required=True,
                   help="the file given to `ringserve serve --pid-file`")
    a = p.parse_args(argv)
    try:
        pid_line, config_path = open(a.pid_file).read().split("\n")[:2]
        pid = int(pid_line)
    except (OSError, ValueError) as e:
        print(f"cannot read the pid file {a.pid_file}: {e}", file=sys.stderr)
        return 2
    try:
        load_config(config_path)
    except ConfigError as e:
        print(f"not reloading, the config is invalid: {e}", file=sys.stderr)
        return 2
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no daemon runs with pid {pid} (stale pid file {a.pid_file}?)", file=sys.stderr)
        return 2
    print(f"sent SIGHUP to {pid}; `health`/`stats` (reloads) and the log show the outcome")
    return 0


if __name__ == "__main__":
    sys.exit(main())
