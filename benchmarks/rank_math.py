"""Cost of DeviceMesh rank math on meshes of 4,096, 65,536 and 1,048,576 ranks.

One rank's answers (a group, a neighbour, coordinates) should cost the same on every mesh
size: time proportional to the answer, never to the world size. Enumerating every group of
an axis is the one operation that must grow, linearly in the number of ranks.

Run:  python benchmarks/rank_math.py           (full run, well under a minute)
      python benchmarks/rank_math.py --quick   (a few seconds, coarser numbers)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

try:
    import topo.mesh
except ImportError:  # not installed: use the repository this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import topo.mesh

from topo.mesh import DeviceMesh

FAMILIES: dict[str, list[dict[str, int]]] = {
    "dp×pp×cp×tp (4 axes)": [
        {"dp": 16, "pp": 8, "cp": 4, "tp": 8},
        {"dp": 128, "pp": 16, "cp": 4, "tp": 8},
        {"dp": 512, "pp": 32, "cp": 8, "tp": 8},
    ],
    "dp×pp×ep×cp×tp (5 axes)": [
        {"dp": 16, "pp": 4, "ep": 4, "cp": 2, "tp": 8},
        {"dp": 64, "pp": 8, "ep": 8, "cp": 2, "tp": 8},
        {"dp": 256, "pp": 16, "ep": 8, "cp": 4, "tp": 8},
    ],
}

# (label, statement, answer length) for one rank r; m is the mesh, c the coordinates of r.
PER_CALL: list[tuple[str, str, Callable[[DeviceMesh], int]]] = [
    ('group("tp", r)', 'm.group("tp", r)', lambda m: m.axis_size("tp")),
    ('group(("cp","tp"), r)', 'm.group(("cp", "tp"), r)', lambda m: m.axis_size(("cp", "tp"))),
    ('group(("dp","tp"), r)', 'm.group(("dp", "tp"), r)', lambda m: m.axis_size(("dp", "tp"))),
    ('neighbor("pp", r)', 'm.neighbor("pp", r)', lambda m: 1),
    ('neighbor("pp", r, wrap=False)', 'm.neighbor("pp", r, wrap=False)', lambda m: 1),
    ("coords(r)", "m.coords(r)", lambda m: m.ndim),
    ("rank_of(**coords)", "m.rank_of(**c)", lambda m: 1),
    ('axis_index("tp", r)', 'm.axis_index("tp", r)', lambda m: 1),
    ('axis_index(("dp","tp"), r)', 'm.axis_index(("dp", "tp"), r)', lambda m: 1),
    ('group_index("tp", r)', 'm.group_index("tp", r)', lambda m: 1),
]

ENUMERATE: list[tuple[str, str]] = [
    ('groups("tp")', 'm.groups("tp")'),
    ('groups("pp")', 'm.groups("pp")'),
]


def best_per_call(stmt: str, env: dict[str, object], target_s: float, repeat: int) -> float:
    """Best time of one call (seconds) over ``repeat`` runs of about ``target_s`` each."""
    timer = timeit.Timer(stmt, globals=env)
    number, elapsed = 1, 0.0
    while True:  # calibrate the loop count so that one run takes about target_s
        elapsed = timer.timeit(number)
        if elapsed >= target_s / 4:
            break
        number *= 4
    number = max(1, int(number * target_s / elapsed))
    return min(timer.repeat(repeat=repeat, number=number)) / number


def run_family(title: str, shapes: list[dict[str, int]], target_s: float, repeat: int) -> None:
    meshes = [DeviceMesh(**shape) for shape in shapes]
    print(f"\n== {title}")
    for m in meshes:
        print(f"   {m.size:>9,} ranks: {m!r}")

    col = 26
    head = f"{'one rank r = size-1':<31}" + "".join(f"{f'{m.size:,} ranks':>{col}}" for m in meshes)
    print("\n" + head)
    print(f"{'':<31}" + "".join(f"{'µs/call    ×    len':>{col}}" for _ in meshes))
    print("-" * len(head))
    for label, stmt, answer in PER_CALL:
        times = []
        for m in meshes:
            r = m.size - 1
            env = {"m": m, "r": r, "c": m.coords(r)}
            times.append(best_per_call(stmt, env, target_s, repeat))
        cells = [
            f"{t * 1e6:8.2f} {t / times[0]:6.2f}× {answer(m):>5}"
            for t, m in zip(times, meshes, strict=True)
        ]
        print(f"{label:<31}" + "".join(f"{cell:>{col}}" for cell in cells))

    head = f"{'all groups of an axis':<31}" + "".join(
        f"{f'{m.size:,} ranks':>{col}}" for m in meshes
    )
    print("\n" + head)
    print(f"{'':<31}" + "".join(f"{'ms   ns/rank    ×':>{col}}" for _ in meshes))
    print("-" * len(head))
    for label, stmt in ENUMERATE:
        per_rank = []
        cells = []
        for m in meshes:
            t = min(timeit.Timer(stmt, globals={"m": m}).repeat(repeat=repeat, number=1))
            per_rank.append(t / m.size)
            ratio = per_rank[-1] / per_rank[0]
            cells.append(f"{t * 1e3:7.1f} {per_rank[-1] * 1e9:8.0f} {ratio:5.2f}×")
        print(f"{label:<31}" + "".join(f"{cell:>{col}}" for cell in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, fewer repeats")
    args = parser.parse_args(argv)
    target_s, repeat = (0.01, 3) if args.quick else (0.05, 5)

    print(
        f"python {platform.python_version()} ({platform.python_implementation()}) on "
        f"{platform.platform()}, {os.cpu_count()} CPUs; topo from "
        f"{Path(topo.mesh.__file__).resolve().parent}"
    )
    print(
        f"per call: best of {repeat} runs of ~{target_s * 1e3:.0f} ms (timeit, perf_counter); "
        f"enumeration: best of {repeat} single calls."
        "\n× = ratio to the same family's 4,096-rank mesh (for enumeration: of the time per "
        "rank); len = size of the answer."
    )
    for title, shapes in FAMILIES.items():
        run_family(title, shapes, target_s, repeat)
    print(
        "\nOne rank's answers cost the same on every mesh size (× ≈ 1, or growing only with "
        "len);\nenumerating all groups costs a constant time per rank, so its total grows "
        "linearly with the mesh."
    )


if __name__ == "__main__":
    main()
