"""``python -m daemon.front --ctrl-fd N``: one front process (daemon/front/app.py),
started by the supervisor (daemon/supervisor/), never by hand."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.front")
    p.add_argument("--ctrl-fd", type=int, required=True)
    a = p.parse_args(argv)
    from ..workers.lifeline import die_with_parent
    die_with_parent()
    from ipc.control import Channel

    from .app import run_front
    return run_front(Channel.from_fd(a.ctrl_fd))


if __name__ == "__main__":
    sys.exit(main())
