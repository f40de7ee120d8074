"""topo bench: sizes, aggregation and bandwidth arithmetic, the table, option errors, and one
small real sweep through the command line (every result checked)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from topo import bench
from topo.cli import main
from topo.mesh import DeviceMesh

ROOT = Path(__file__).resolve().parent.parent


def test_sizes_parse_and_format() -> None:
    assert bench.parse_size("8") == 8
    assert bench.parse_size("64K") == 64 * 1024
    assert bench.parse_size("64MiB") == 64 * 2**20
    assert bench.parse_size(" 2 g ") == 2 * 2**30
    for bad in ("", "M", "1.5M", "-8", "8 parsecs"):
        with pytest.raises(ValueError, match="a size requires a number"):
            bench.parse_size(bad)
    assert bench.format_size(8) == "8 B"
    assert bench.format_size(65536) == "64 KiB"
    assert bench.format_size(64 * 2**20) == "64 MiB"


def _row(collective: str, time_us: float, raw: float | None, wrong: int = 0) -> dict[str, object]:
    return {
        "collective": collective,
        "axis": "tp",
        "ranks": 4,
        "size": 1_000_000,
        "count": 250_000,
        "dtype": "float32",
        "op": "sum",
        "iters": 10,
        "time_us": time_us,
        "raw_time_us": raw,
        "wrong": wrong,
    }


@pytest.mark.parametrize(
    ("collective", "factor"),
    [("all_reduce", 1.5), ("all_gather", 0.75), ("reduce_scatter", 0.75),
     ("all_to_all", 0.75), ("broadcast", 1.0)],
)  # fmt: skip
def test_aggregate_takes_the_slowest_rank_and_applies_nccl_tests_factors(
    collective: str, factor: float
) -> None:
    per_rank = [[_row(collective, 100.0, 90.0, 1)], [_row(collective, 250.0, 125.0, 2)]]
    (row,) = bench.aggregate(per_rank)
    assert row["time_us"] == 250.0 and row["raw_time_us"] == 125.0
    assert row["wrong"] == 3
    assert row["algbw"] == pytest.approx(1_000_000 / 250e-6 / 1e9)  # 4 GB/s
    assert row["busbw"] == pytest.approx(row["algbw"] * factor)
    assert row["ratio"] == pytest.approx(2.0)


def test_table_csv_and_summary() -> None:
    rows = bench.aggregate([[_row("all_reduce", 100.0, 50.0), _row("broadcast", 10.0, None)]])
    text = bench.format_table(rows, "# header")
    assert text.startswith("# header")
    assert "# all_reduce over axis tp (4 ranks per group)" in text
    assert "#wrong" in text and "topo/raw" in text
    assert "Out of bounds values : 0 OK" in text
    assert "geometric mean 2.000 over 1 rows" in text
    csv_text = bench.to_csv(rows)
    assert csv_text.splitlines()[0].startswith("collective,axis,ranks,size,count")
    assert len(csv_text.splitlines()) == 3
    failed = bench.format_table(bench.aggregate([[_row("all_reduce", 1.0, 1.0, wrong=5)]]))
    assert "Out of bounds values : 5 FAILED" in failed


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_from_arguments() -> None:
    mesh = DeviceMesh(dp=2, pp=1, tp=2)
    config = bench.config_from_args(_args("-b", "8", "-e", "64", "-f", "2"), mesh)
    assert config.sizes == (8, 16, 32, 64)
    assert config.axes == (("dp",), ("tp",))  # every axis of size > 1
    config = bench.config_from_args(_args("--axis", "tp,dp", "--collectives", "broadcast"), mesh)
    assert config.axes == (("dp", "tp"),) and config.collectives == ("broadcast",)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--collectives", "all_reduce,psum"], "--collectives requires names from"),
        (["--dtype", "complex64"], "--dtype requires one of"),
        (["--dtype", "float33"], "--dtype requires one of"),
        (["-b", "1M", "-e", "1K"], "sizes require 0 < --min-bytes <= --max-bytes"),
        (["-f", "1"], "--factor >= 2"),
        (["--axis", "xp"], "unknown axis 'xp'"),
        (["--seconds", "0"], "--seconds requires > 0"),
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "dp=2", "tp=2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_mesh_without_a_real_axis_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tp=1"]) == 2
    assert "requires an axis of size > 1" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_small_real_sweep_checks_every_result(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "topo", "bench", "tp=2", "-e", "256", "-f", "8",
         "--seconds", "0.002", "--reps", "1", "--json", "-q"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = report["rows"]
    assert report["mesh"] == {"tp": 2}
    assert {r["collective"] for r in rows} == set(bench.COLLECTIVES)
    assert {r["size"] for r in rows if r["collective"] == "all_reduce"} == {8, 64}
    assert all(r["wrong"] == 0 for r in rows)
    assert all(r["time_us"] > 0 and r["raw_time_us"] > 0 and r["ratio"] > 0 for r in rows)
