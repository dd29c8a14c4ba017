"""Progress of a batch job: one rewritten line on a terminal, JSON Lines
otherwise (both on stderr; stdout gets only the final summary).

A JSON line reads ``{"ts": ..., "event": "progress", "rows": 250000,
"rows_per_s": 181234.5, "fraction": 0.25, "eta_s": 4.1, "elapsed_s": 1.4}``;
other events (``start``, ``resume``, ``published``, ``failed``) carry their
own fields. The rate and the ETA count only the rows scored by this run, so
a resumed job does not look faster than it is.
"""

from __future__ import annotations

import json
import sys
import time


def _clock(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, mode: str = "auto", interval_s: float | None = None, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "tty" if self.stream.isatty() else "json"
        self.mode = mode            # tty | json | off
        self.interval = interval_s if interval_s is not None else (0.5 if mode == "tty" else 5.0)
        self.t0 = time.monotonic()
        self.rows0 = 0
        self._last = 0.0
        self._line = False

    def begin(self, rows_already: int) -> None:
        self.t0 = time.monotonic()
        self.rows0 = rows_already

    def figures(self, rows: int, fraction: float | None) -> dict:
        elapsed = time.monotonic() - self.t0
        done = rows - self.rows0
        rate = done / elapsed if elapsed > 0 else 0.0
        d = {"rows": rows, "rows_per_s": round(rate, 1), "elapsed_s": round(elapsed, 2)}
        if fraction is not None:
            d["fraction"] = round(fraction, 4)
            # the fraction still to go, at the pace of this run's share of it
            start_fraction = fraction * self.rows0 / rows if rows else 0.0
            run_fraction = fraction - start_fraction
            if run_fraction > 0:
                d["eta_s"] = round(elapsed * (1 - fraction) / run_fraction, 1)
        return d

    def due(self) -> bool:
        return self.mode != "off" and time.monotonic() - self._last >= self.interval

    def update(self, rows: int, fraction: float | None, force: bool = False) -> None:
        if self.mode == "off" or not (force or self.due()):
            return
        self._last = time.monotonic()
        d = self.figures(rows, fraction)
        if self.mode == "json":
            self.event("progress", **d)
            return
        pct = f"{100 * d['fraction']:5.1f}%  " if "fraction" in d else ""
        eta = f"  ETA {_clock(d['eta_s'])}" if "eta_s" in d else ""
        self.stream.write(f"\r{rows:>12,} rows  {pct}{d['rows_per_s']:>10,.0f} rows/s"
                          f"  {_clock(d['elapsed_s'])}{eta}  ")
        self.stream.flush()
        self._line = True

    def event(self, event: str, message: str | None = None, **fields) -> None:
        if self.mode == "off":
            return
        if self.mode == "json":
            rec = {"ts": round(time.time(), 3), "event": event, **fields}
            if message:
                rec["message"] = message
            self.stream.write(json.dumps(rec, default=str) + "\n")
        else:
            if self._line:
                self.stream.write("\n")
                self._line = False
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            self.stream.write(f"{event}: {message or ''}"
                              f"{' ' if message and extra else ''}{extra}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._line:
            self.stream.write("\n")
            self.stream.flush()
            self._line = False
