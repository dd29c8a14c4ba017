"""``--plot FILE.png``: what the table cannot show.

- latency over time: p50, p99 and max per 100 ms of send time, so that a
  stall (a GC pause, a worker restart) shows where it happened instead of
  vanishing into a percentile;
- the latency CDF of every run on a log axis, so the tail of each is seen
  against the others (ringserve, batching off, echo);
- with ``--sweep``: answers/s and p99 against the offered rate, with the
  knee marked.

matplotlib is an optional extra (``pip install 'ringserve[plot]'``), drawn
with the Agg backend: no display needed.
"""

from __future__ import annotations

import numpy as np

_BIN_S = 0.1
_CDF_POINTS = 2000   # quantiles drawn per run: enough for a smooth curve at any count
_RUNS = (("ringserve", "ringserve"), ("batching_off", "max_batch=1"), ("echo", "echo"))


def over_time(at_s: np.ndarray, lat_us: np.ndarray, bin_s: float = _BIN_S) -> dict:
    """Per bin of send time: its start (s) and the p50, p99 and max latency (us)."""
    if len(at_s) == 0:
        return {"t": [], "p50": [], "p99": [], "max": []}
    bins = np.floor(at_s / bin_s).astype(np.int64)
    order = np.argsort(bins, kind="stable")
    bins, lat = bins[order], lat_us[order]
    starts = np.flatnonzero(np.diff(bins, prepend=bins[0] - 1))
    groups = np.split(lat, starts[1:])
    return {"t": (bins[starts] * bin_s).tolist(),
            "p50": [float(np.percentile(g, 50)) for g in groups],
            "p99": [float(np.percentile(g, 99)) for g in groups],
            "max": [float(g.max()) for g in groups]}


def cdf(lat_us: np.ndarray, points: int = _CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    q = np.linspace(0, 100, points)
    return np.percentile(lat_us, q), q / 100


def save(doc: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, doc[k]) for k, label in _RUNS if doc.get(k) and doc[k].get("_timeline")]
    sweep = doc.get("sweep")
    panels = 2 + bool(sweep)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 3.6 * panels))
    title = f"ringserve bench: {doc['params'].get('model')}, {' '.join(doc['params']['argv'])}"
    fig.suptitle(title[:110], fontsize=9)

    ax = axes[0]
    at, lat = doc["ringserve"]["_timeline"]
    series = over_time(at, lat)
    for name, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        ax.plot(series["t"], series[name], style, label=f"ringserve {name}")
    ax.set_yscale("log")
    ax.set(xlabel="send time in the measured window (s)", ylabel="latency (us)",
           title=f"latency over time, per {_BIN_S * 1000:g} ms")
    ax.legend(fontsize=8)

    ax = axes[1]
    for label, run in runs:
        x, y = cdf(run["_timeline"][1])
        ax.plot(x, y, label=label)
    ax.set_xscale("log")
    ax.set(xlabel="latency (us)", ylabel="share of requests", title="latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    if sweep:
        ax = axes[2]
        pts = sweep["points"]
        offered = [p["offered_rps"] for p in pts]
        ax.plot(offered, [p["throughput_rps"] for p in pts], "o-", label="answers/s")
        ax.plot(offered, offered, ":", color="grey", label="offered")
        ax.set(xlabel="offered rate (requests/s)", ylabel="answers/s", title="rate sweep")
        ax2 = ax.twinx()
        ax2.plot(offered, [p["p99_us"] for p in pts], "s-", color="tab:red", label="p99")
        ax2.set_yscale("log")
        ax2.set_ylabel("p99 latency (us)")
        if sweep.get("knee"):
            ax.axvline(sweep["knee"]["offered_rps"], color="tab:green", ls="--", label="knee")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
