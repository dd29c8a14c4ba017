"""The answer to an infer request: built here, and marked given here.

One request, one answer. Many things can end a request: its batch's
result, the model's error, its deadline, a dead worker, a full queue, a
NaN found in its batch, the response cache, its fallback, the drain. Each
of them may race with another (a deadline fires while the batch is in the
worker; a worker dies as its result arrives), so whoever answers first
``claim``s the request, and everyone after finds it claimed and does
nothing. ``claim`` is the only writer of ``Pending.done``.

The answer maps are built by ``ok`` and ``error`` alone, so every path
gives the same fields (protocol.md, "Answers"): an OK answer carries the
outputs, what produced them (model, version, data_version), the router's
lane and arm, the rid and the timing; an error carries the status, a
message a person can act on, and the rid (a refused request still has one:
the request log and feedback can name it). A fallback answer is an OK
answer with ``fallback`` (its cause) and the version that gave it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (request.py imports this module)
    from .request import Pending

OK = 0


def claim(req: Pending) -> bool:
    """True once: the caller gives ``req`` its answer. False when it was
    answered already; the caller then does nothing."""
    if req.done:
        return False
    req.done = True
    return True


def ok(req: Pending, outputs: Any, model: str, version: str, data_version: str | None,
       timing: dict[str, Any], fallback: str | None = None) -> dict[str, Any]:
    answer = {"id": req.id, "status": OK, "outputs": outputs, "model": model,
              "version": version, "data_version": data_version, "lane": req.lane,
              "arm": req.arm, "rid": req.rid, "timing": timing}
    if fallback is not None:
        answer["fallback"] = fallback
    if req.defaulted is not None:
        answer["defaulted"] = req.defaulted
    return answer


def error(req: Pending, status: int, message: str) -> dict[str, Any]:
    return {"id": req.id, "status": status, "error": message, "rid": req.rid}
