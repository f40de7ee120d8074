"""Tests for `topo plan`: topo.plan (pure) and topo.cli (argparse, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topo.cli import main
from topo.mesh import DeviceMesh
from topo.plan import format_plan, plan_dict, plan_text

REPO = Path(__file__).resolve().parents[1]
HUGE = ["dp=64", "pp=16", "cp=8", "tp=128"]  # 2**20 ranks


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def python_m_topo(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "topo", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


# ----------------------------------------------------------------------------- text output


def test_default_text_lists_every_axis_groups(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "plan", "dp=2", "pp=2", "tp=2")
    assert status == 0 and err == ""
    assert out.splitlines() == [
        "mesh dp(2) * pp(2) * tp(2) = 8 ranks",
        "dp (size 2, stride 4, 4 groups): [0, 4] [1, 5] [2, 6] [3, 7]",
        "pp (size 2, stride 2, 4 groups): [0, 2] [1, 3] [4, 6] [5, 7]",
        "tp (size 2, stride 1, 4 groups): [0, 1] [2, 3] [4, 5] [6, 7]",
    ]


def test_comma_spec_is_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "plan", "dp=2,pp=2,tp=2") == run_cli(
        capsys, "plan", "dp=2", "pp=2", "tp=2"
    )


def test_rank_shows_coords_groups_and_neighbours(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "plan", "dp=2", "pp=2", "tp=2", "--rank", "5")
    assert status == 0
    lines = out.splitlines()
    assert "rank 5: dp=1, pp=0, tp=1" in lines
    assert (
        "  pp: index 0 of 2, group [5, 7]; prev -, next 7; ring prev 7, ring next 7; "
        "first 5, last 7"
    ) in lines
    assert (
        "  tp: index 1 of 2, group [4, 5]; prev 4, next -; ring prev 4, ring next 4; "
        "first 4, last 5"
    ) in lines
    assert (
        "  dp: index 1 of 2, group [1, 5]; prev 1, next -; ring prev 1, ring next 1; "
        "first 1, last 5"
    ) in lines


def test_rank_neighbours_match_mesh() -> None:
    mesh = DeviceMesh(dp=2, pp=4, tp=2)
    for rank in range(mesh.size):
        section = plan_dict(mesh, rank)["rank"]
        assert section["coords"] == mesh.coords(rank)
        for axis, a in section["axes"].items():
            assert a["group"] == list(mesh.group(axis, rank))
            assert a["index"] == mesh.axis_index(axis, rank)
            assert a["prev"] == mesh.neighbor(axis, rank, -1, wrap=False)
            assert a["next"] == mesh.neighbor(axis, rank, 1, wrap=False)
            assert (a["ring_prev"], a["ring_next"]) == (
                mesh.neighbor(axis, rank, -1),
                mesh.neighbor(axis, rank, 1),
            )
            assert (a["first"], a["last"]) == (mesh.first(axis, rank), mesh.last(axis, rank))


# ------------------------------------------------------------------------------- placement


def test_placement_without_warning_when_tp_fits(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(
        capsys, "plan", "dp=2", "pp=2", "tp=2", "--rank", "5", "--ranks-per-node", "4"
    )
    assert status == 0
    assert "placement: 4 ranks per node, 2 nodes" in out
    assert "  intra-node axes: tp, pp" in out and "  inter-node axes: dp" in out
    assert "  node 1: ranks 4-7" in out
    assert "  rank 5 is on node 1 (local rank 1)" in out
    assert "warning" not in out


def test_warns_when_tp_larger_than_node(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "plan", "dp=2", "tp=8", "--ranks-per-node", "4")
    assert status == 0
    [warning] = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "axis 'tp' spans nodes with 4 ranks per node" in warning
    assert "(tp groups have 8 ranks with stride 1)" in warning
    assert "innermost" not in warning  # tp already is innermost: that advice would be wrong
    assert "multiple of 8" in warning


def test_warns_with_reorder_when_tp_strided(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "plan", "dp=2", "tp=4", "pp=2", "--ranks-per-node", "4")
    assert status == 0
    assert "reorder the axes as `dp=2 pp=2 tp=4`" in out
    assert DeviceMesh(dp=2, pp=2, tp=4).placement(4).spans_nodes("tp") is False


def test_no_warning_without_tp_or_when_intra_node_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert "warning" not in run_cli(capsys, "plan", "dp=4", "pp=2", "--ranks-per-node", "2")[1]
    out = run_cli(capsys, "plan", "dp=2", "tp=8", "--ranks-per-node", "4", "--intra-node", "")[1]
    assert "warning" not in out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.data())
def test_warnings_match_placement_and_advice_works(sizes: list[int], data: st.DataObject) -> None:
    names = ["dp", "pp", "cp", "tp"][-len(sizes) :]
    mesh = DeviceMesh.from_shape(sizes, names)
    divisors = [d for d in range(1, mesh.size + 1) if mesh.size % d == 0]
    rpn = data.draw(st.sampled_from(divisors))
    plan = plan_dict(mesh, ranks_per_node=rpn)
    spans = mesh.placement(rpn).spans_nodes("tp")
    assert len(plan["warnings"]) == int(spans)
    if spans:
        [warning] = plan["warnings"]
        block = mesh.axis_size("tp") * mesh.stride("tp")
        if "reorder the axes as `" in warning:
            reordered = warning.split("`")[1]
            from topo.placement import parse_mesh

            assert not parse_mesh(reordered).placement(rpn).spans_nodes("tp")
        if f"multiple of {block}" in warning:
            assert not mesh.placement(block).spans_nodes("tp")


# ------------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize("spec", [["dp=2", "pp=2", "tp=2"], ["dp=3", "tp=2"], ["pp=4", "cp=1"]])
def test_json_matches_mesh_groups(capsys: pytest.CaptureFixture[str], spec: list[str]) -> None:
    status, out, _ = run_cli(capsys, "plan", *spec, "--json", "--rank", "1")
    assert status == 0
    plan = json.loads(out)
    mesh = DeviceMesh(**{k: int(v) for k, v in (w.split("=") for w in spec)})
    assert plan["mesh"] == dict(mesh.shape) and plan["size"] == mesh.size
    for axis in mesh.axis_names:
        info = plan["axes"][axis]
        assert info["groups"] == [list(g) for g in mesh.groups(axis)]
        assert info["truncated"] is False
        assert (info["size"], info["stride"]) == (mesh.axis_size(axis), mesh.stride(axis))
        assert info["num_groups"] == mesh.num_groups(axis)
    assert plan["rank"]["coords"] == mesh.coords(1)
    assert plan["placement"] is None and plan["warnings"] == []


def test_json_placement_and_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(capsys, "plan", "dp=2", "tp=8", "--ranks-per-node", "4", "--rank", "9", "--json")[
        1
    ]
    plan = json.loads(out)
    assert plan["placement"]["num_nodes"] == 4
    assert plan["placement"]["inter_node_axes"] == ["tp", "dp"]
    assert plan["placement"]["nodes"][2] == [8, 9, 10, 11]
    assert (plan["rank"]["node"], plan["rank"]["local_rank"]) == (2, 1)
    assert len(plan["warnings"]) == 1 and "'tp'" in plan["warnings"][0]


def test_truncated_groups_are_prefixes_of_mesh_groups() -> None:
    mesh = DeviceMesh(dp=3, pp=5, cp=2, tp=11)
    plan = plan_dict(mesh, max_groups=4, max_ranks=8)
    for axis in mesh.axis_names:
        full = mesh.groups(axis)
        assert plan["axes"][axis]["groups"] == [list(g[:8]) for g in full[:4]]
        assert plan["axes"][axis]["truncated"] == (len(full) > 4 or len(full[0]) > 8)


# ------------------------------------------------------------------------------ huge meshes


def test_huge_mesh_output_is_bounded_and_fast(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    status, out, _ = run_cli(capsys, "plan", *HUGE)
    assert status == 0 and len(out) < 4000
    assert "mesh dp(64) * pp(16) * cp(8) * tp(128) = 1048576 ranks" in out
    assert "… (8192 groups in all)" in out and "… (128 ranks)]" in out
    status, out, _ = run_cli(capsys, "plan", *HUGE, "--rank", "123457", "--ranks-per-node", "8")
    assert status == 0 and len(out) < 4000
    assert "rank 123457: dp=7, pp=8, cp=4, tp=65" in out
    assert "rank 123457 is on node 15432 (local rank 1)" in out and "warning: axis 'tp'" in out
    status, out, _ = run_cli(capsys, "plan", *HUGE, "--rank", "5", "--json")
    assert status == 0 and len(json.loads(out)["axes"]["tp"]["groups"]) == 4
    assert time.perf_counter() - start < 2.0


def test_one_axis_of_a_billion_ranks_is_instant() -> None:
    start = time.perf_counter()
    text = plan_text(DeviceMesh(dp=2**15, tp=2**15), rank=2**30 - 1, ranks_per_node=8)
    assert len(text) < 4000 and time.perf_counter() - start < 0.5


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["dp=2", "tp=0"],
        ["dp=2", "tp=x"],
        ["dp2"],
        ["dp=2", "dp=2"],
        ["=2"],
        ["dp=2", "tp=2", "--rank", "4"],
        ["dp=2", "tp=2", "--rank", "-1"],
        ["dp=2", "tp=2", "--ranks-per-node", "3"],
        ["dp=2", "tp=2", "--ranks-per-node", "0"],
        ["dp=2", "tp=2", "--rank", "x"],
        [],
    ],
)
def test_bad_specs_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    try:
        status = main(["plan", *argv])
    except SystemExit as exc:  # argparse's own usage errors
        status = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("topo plan: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_unknown_intra_node_axis_lists_valid_axes(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "plan", "dp=2", "pp=2", "tp=2", "--intra-node", "xx")
    assert status == 2 and out == ""
    assert err == (
        "topo plan: error: intra_node got unknown axis 'xx': "
        "mesh dp(2) * pp(2) * tp(2) has axes 'dp', 'pp', 'tp'\n"
    )


def test_default_intra_node_ignores_missing_tp() -> None:
    assert plan_dict(DeviceMesh(dp=4), ranks_per_node=2)["intra_node"] == []


@pytest.mark.multiprocess
def test_python_m_topo_subprocess() -> None:
    ok = python_m_topo("plan", "dp=2", "tp=2", "--rank", "3")
    assert ok.returncode == 0 and "rank 3: dp=1, tp=1" in ok.stdout
    bad = python_m_topo("plan", "dp=2", "tp=0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("topo plan: error: DeviceMesh axis 'tp' requires a positive size")
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# -------------------------------------------------------------------------- the command line


def test_version_and_no_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("topo ")
    status, out, _ = run_cli(capsys)
    assert status == 2 and "plan" in out and "usage: topo" in out


def test_format_plan_renders_plan_dict() -> None:
    mesh = DeviceMesh(pp=2, tp=2)
    assert plan_text(mesh, 1, 2) == format_plan(plan_dict(mesh, 1, 2))


@pytest.mark.multiprocess
def test_cli_and_plan_do_not_import_torch() -> None:
    code = (
        "import sys, topo; before = 'torch' in sys.modules; import topo.cli, topo.plan; "
        "print(before, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    before, after = result.stdout.split()
    if before == "True":
        pytest.skip("topo/__init__.py imports torch eagerly, so `topo plan` pays for it")
    assert after == "False"
