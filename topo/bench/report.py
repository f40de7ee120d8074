"""``topo bench``'s report: every rank's rows combined, then a table, CSV or a plot.

The table follows nccl-tests: size, count, type, redop, time, algbw and busbw (GB/s), #wrong,
and two columns of topo's own, the raw call's time and topo's time over it.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from topo.errors import TopoValueError

__all__ = ["BUS_FACTORS", "aggregate", "format_table", "plot", "to_csv"]

#: nccl-tests' bus-bandwidth factors.
BUS_FACTORS: Mapping[str, Callable[[int], float]] = MappingProxyType(
    {
        "all_reduce": lambda n: 2 * (n - 1) / n,
        "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n,
        "all_to_all": lambda n: (n - 1) / n,
        "broadcast": lambda n: 1.0,
    }
)


def aggregate(per_rank: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine every rank's rows: time = the slowest rank's, #wrong = the sum; add bandwidths.

    Example::

        rows = aggregate(topo.spawn(_bench_rank, mesh, config))
    """
    rows: list[dict[str, Any]] = []
    for measured in zip(*per_rank, strict=True):
        row = dict(measured[0])
        row["time_us"] = max(m["time_us"] for m in measured)
        raws = [m["raw_time_us"] for m in measured]
        row["raw_time_us"] = None if None in raws else max(raws)
        row["wrong"] = sum(m["wrong"] for m in measured)
        seconds = row["time_us"] / 1e6
        row["algbw"] = row["size"] / seconds / 1e9
        row["busbw"] = row["algbw"] * BUS_FACTORS[row["collective"]](row["ranks"])
        row["ratio"] = None if row["raw_time_us"] is None else row["time_us"] / row["raw_time_us"]
        rows.append(row)
    return rows


_COLUMNS = (
    ("size", "{:>12}", "size(B)"),
    ("count", "{:>11}", "count"),
    ("dtype", "{:>8}", "type"),
    ("op", "{:>5}", "redop"),
    ("time_us", "{:>11.1f}", "time(us)"),
    ("algbw", "{:>8.3f}", "algbw"),
    ("busbw", "{:>8.3f}", "busbw"),
    ("wrong", "{:>7}", "#wrong"),
    ("raw_time_us", "{:>11.1f}", "raw(us)"),
    ("ratio", "{:>7.3f}", "topo/raw"),
)


def format_table(rows: Sequence[dict[str, Any]], header: str = "", footer: str = "") -> str:
    """The nccl-tests-style table, one block per collective and axis, then a summary per
    collective and ``footer``.

    Example::

        print(format_table(aggregate(per_rank)))
    """
    out = io.StringIO()
    if header:
        out.write(header + "\n")
    block = None
    for row in rows:
        key = (row["collective"], row["axis"])
        if key != block:
            block = key
            out.write(
                f"\n# {row['collective']} over axis {row['axis']} ({row['ranks']} ranks per "
                f"group); algbw/busbw in GB/s\n"
            )
            heads = [f"{title:>{len(fmt.format(0) if 'f' not in fmt else fmt.format(0.0))}}"
                     for _, fmt, title in _COLUMNS]  # fmt: skip
            out.write("#" + " ".join(heads)[1:] + "\n")
        cells = []
        for name, fmt, _ in _COLUMNS:
            value = row.get(name)
            width = len(fmt.format(0.0 if "f" in fmt else 0))
            cells.append(f"{'-':>{width}}" if value is None else fmt.format(value))
        out.write(" ".join(cells) + "\n")
    wrong = sum(r["wrong"] for r in rows)
    ratios = [r["ratio"] for r in rows if r.get("ratio") is not None]
    out.write(f"\n# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}\n")
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        out.write(f"# topo/raw time ratio  : geometric mean {geo:.3f} over {len(ratios)} rows\n")
    out.write(summary(rows))
    if footer:
        out.write(footer + "\n")
    return out.getvalue()


def summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line per collective: rows, #wrong, the median topo/raw ratio and the best busbw.

    Example::

        print(summary(aggregate(per_rank)), end="")
    """
    lines = ["\n# summary (every axis):"]
    for collective in dict.fromkeys(r["collective"] for r in rows):
        mine = [r for r in rows if r["collective"] == collective]
        ratios = sorted(r["ratio"] for r in mine if r.get("ratio") is not None)
        ratio = f"topo/raw median {statistics.median(ratios):.3f}" if ratios else "no raw rows"
        best = max(r["busbw"] for r in mine)
        wrong = sum(r["wrong"] for r in mine)
        lines.append(
            f"#   {collective:<15} {len(mine):>3} rows, #wrong {wrong}, {ratio}, busbw up to "
            f"{best:.3f} GB/s"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV with a header line.

    Example::

        print(to_csv(aggregate(per_rank)))
    """
    out = io.StringIO()
    fields = ["collective", "axis", "ranks", *[c[0] for c in _COLUMNS], "iters"]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Save busbw against size, one line per collective and axis, to ``path`` (PNG).

    Example::

        plot(aggregate(per_rank), "bench.png")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TopoValueError(
            "topo bench --plot requires matplotlib, which is not installed; "
            "pip install 'topo[plot]' (or matplotlib)"
        ) from None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        series.setdefault(f"{row['collective']} ({row['axis']})", []).append(
            (row["size"], row["busbw"])
        )
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("topo bench")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
