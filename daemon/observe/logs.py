"""Structured logs: one JSON object per line on stderr.

Fields passed with ``extra={...}`` become top-level keys, so a log line reads
``{"ts": ..., "level": "error", "logger": "ringserve.supervisor",
"msg": "worker died; restarting", "worker": "demo@1/cpu#0", "code": -9}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    root = logging.getLogger("ringserve")
    root.handlers.clear()
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter())
    root.addHandler(h)
    root.setLevel(level.upper())
    root.propagate = False
