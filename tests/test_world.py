"""topo.world: World values and World.from_env with fake launcher environments.

Every environment here is a plain dict passed as ``env=``; os.environ is only touched through
monkeypatch.
"""

from __future__ import annotations

import doctest
import pickle
import re

import attrs
import pytest

import topo
import topo.world
from topo.world import World, WorldError, first_slurm_host

# ----------------------------------------------------------------------------- torchrun


def test_torchrun_variables() -> None:
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29555",
        "GROUP_RANK": "1",  # set by torchrun, not read
    }
    world = World.from_env(env)
    assert world == World(
        rank=5,
        world_size=8,
        local_rank=1,
        local_world_size=4,
        master_addr="node7",
        master_port=29555,
    )
    assert world.node_rank == 1
    assert not world.is_single_node
    assert not world.store_hosted_externally


def test_torchrun_defaults_when_only_rank_and_world_size() -> None:
    world = World.from_env({"RANK": "2", "WORLD_SIZE": "3"})
    assert (world.local_rank, world.local_world_size) == (2, 3)
    assert (world.master_addr, world.master_port) == ("127.0.0.1", 29500)
    assert world.is_single_node
    assert world.node_rank == 0


def test_empty_master_variables_are_ignored() -> None:
    world = World.from_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "", "MASTER_PORT": ""})
    assert (world.master_addr, world.master_port) == ("127.0.0.1", 29500)


@pytest.mark.parametrize("value", ["True", "true", "TRUE"])
def test_torchelastic_agent_store(value: str) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": value}
    assert World.from_env(env).store_hosted_externally


@pytest.mark.parametrize("value", ["False", "0", ""])
def test_torchelastic_agent_store_off(value: str) -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": value}
    assert not World.from_env(env).store_hosted_externally


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    world = World.from_env()
    assert (world.rank, world.world_size, world.master_addr, world.master_port) == (
        3,
        4,
        "10.0.0.1",
        1234,
    )


# ----------------------------------------------------------------------------- Slurm


def _slurm(**extra: str) -> dict[str, str]:
    env = {
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-004]",
    }
    env.update(extra)
    return env


def test_slurm_variables() -> None:
    world = World.from_env(_slurm())
    assert world == World(
        rank=6, world_size=8, local_rank=2, local_world_size=4, master_addr="gpu003"
    )
    assert world.node_rank == 1


def test_slurm_master_addr_variable_wins_over_nodelist() -> None:
    world = World.from_env(_slurm(MASTER_ADDR="login1", MASTER_PORT="4000"))
    assert (world.master_addr, world.master_port) == ("login1", 4000)


def test_slurm_nodelist_fallback_variable() -> None:
    env = _slurm()
    del env["SLURM_JOB_NODELIST"]
    env["SLURM_NODELIST"] = "cn[12-13]"
    assert World.from_env(env).master_addr == "cn12"


def test_single_node_slurm_without_nodelist_uses_loopback() -> None:
    env = _slurm(SLURM_NTASKS_PER_NODE="8", SLURM_NODEID="0")
    del env["SLURM_JOB_NODELIST"]
    world = World.from_env(env)
    assert world.master_addr == "127.0.0.1" and world.is_local


def test_multi_node_world_without_master_addr_is_an_error() -> None:
    env = _slurm()
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(WorldError, match=r"requires MASTER_ADDR for a world that spans nodes"):
        World.from_env(env)
    mpi = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    }
    with pytest.raises(WorldError, match="MASTER_ADDR"):
        World.from_env(mpi)
    world = World.from_env({**mpi, "MASTER_ADDR": "10.1.2.3"})
    assert world.master_addr == "10.1.2.3" and not world.is_local


def test_is_local_needs_one_node_and_a_loopback_store() -> None:
    assert World(rank=0, world_size=2).is_local
    assert World(rank=0, world_size=2, master_addr="localhost").is_local
    assert not World(rank=0, world_size=2, master_addr="node7").is_local
    assert not World(rank=0, world_size=4, local_world_size=2).is_local


@pytest.mark.parametrize(
    ("tasks_per_node", "node_id", "procid", "localid", "expected"),
    [
        ("4(x2),3", "0", "1", "1", 4),
        ("4(x2),3", "1", "5", "1", 4),
        ("4(x2),3", "2", "9", "1", 3),
        ("2,3(x2)", "2", "6", "1", 3),
        ("5", None, "3", "3", 5),  # SLURM_NODEID missing: node 0
        (" 4(x2) , 3 ", "2", "8", "0", 3),
    ],
)
def test_slurm_tasks_per_node(
    tasks_per_node: str, node_id: str | None, procid: str, localid: str, expected: int
) -> None:
    env = {
        "SLURM_PROCID": procid,
        "SLURM_NTASKS": "11",
        "SLURM_LOCALID": localid,
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_NODELIST": "n[1-3]",
    }
    if node_id is not None:
        env["SLURM_NODEID"] = node_id
    world = World.from_env(env)
    assert world.local_world_size == expected
    assert world.local_rank == int(localid)


def test_slurm_ntasks_per_node_wins_over_tasks_per_node() -> None:
    env = _slurm(SLURM_NTASKS_PER_NODE="4", SLURM_TASKS_PER_NODE="3(x2),2")
    assert World.from_env(env).local_world_size == 4


def test_slurm_bad_tasks_per_node() -> None:
    env = _slurm(SLURM_TASKS_PER_NODE="4(y2)")
    del env["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(WorldError, match="SLURM_TASKS_PER_NODE") as info:
        World.from_env(env)
    assert "'4(y2)'" in str(info.value)


def test_slurm_missing_ntasks_names_the_variable() -> None:
    with pytest.raises(WorldError, match="SLURM_NTASKS"):
        World.from_env({"SLURM_PROCID": "0"})


def test_slurm_bad_nodelist() -> None:
    with pytest.raises(WorldError, match="SLURM_JOB_NODELIST"):
        World.from_env(_slurm(SLURM_JOB_NODELIST="node[1-2"))


def test_torchrun_inside_srun_rank_wins() -> None:
    env = _slurm(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    del env["SLURM_JOB_NODELIST"]
    env["MASTER_ADDR"] = "gpu003"
    world = World.from_env(env)
    assert (world.rank, world.world_size, world.local_rank, world.local_world_size) == (
        3,
        4,
        1,
        2,
    )
    assert world.master_addr == "gpu003"


# ----------------------------------------------------------------------------- OpenMPI


def test_openmpi_variables() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "head",
        "MASTER_PORT": "7000",
    }
    world = World.from_env(env)
    assert world == World(
        rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="head", master_port=7000
    )


def test_slurm_checked_before_openmpi() -> None:
    env = {**_slurm(), "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert World.from_env(env).rank == 6


# ----------------------------------------------------------------------------- explicit args


def test_explicit_arguments_win() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "env-host", "MASTER_PORT": "1111"}
    world = World.from_env(env, rank=1, master_addr="explicit", master_port=2222)
    assert (world.rank, world.world_size, world.master_addr, world.master_port) == (
        1,
        4,
        "explicit",
        2222,
    )


def test_explicit_arguments_without_environment() -> None:
    world = World.from_env({}, rank=0, world_size=2, store_hosted_externally=True)
    assert world == World(rank=0, world_size=2, store_hosted_externally=True)


def test_explicit_unknown_argument() -> None:
    with pytest.raises(TypeError, match="unknown argument") as info:
        World.from_env({}, rank=0, world_size=1, ranks=3)
    assert "'ranks'" in str(info.value)
    assert "world_size" in str(info.value)  # lists the valid ones


def test_explicit_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="rank"):
        World.from_env({"WORLD_SIZE": "2"}, rank="1")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "RANK"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0"}, "WORLD_SIZE"),
        ({"SLURM_PROCID": "0"}, "SLURM_NTASKS"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
    ],
)
def test_missing_rank_or_world_size_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(WorldError) as info:
        World.from_env(env)
    assert re.search(rf"\b{variable}\b", str(info.value)), str(info.value)
    assert "explicitly" in str(info.value)


def test_missing_world_size_can_be_given_explicitly() -> None:
    assert World.from_env({"RANK": "1"}, world_size=2).world_size == 2


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, "WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT"),
        (
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2(x1)"},
            "SLURM_NTASKS_PER_NODE",
        ),
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "4",
                "SLURM_TASKS_PER_NODE": "2(x2)",
                "SLURM_NODEID": "a",
            },
            "SLURM_NODEID",
        ),
        (
            {
                "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "-",
            },
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
    ],
)
def test_non_integer_variable_names_it(env: dict[str, str], variable: str) -> None:
    with pytest.raises(WorldError) as info:
        World.from_env(env)
    message = str(info.value)
    assert f"variable {variable} requires an integer" in message
    assert repr(env[variable]) in message


@pytest.mark.parametrize(
    ("env", "variables"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, ["RANK=4", "WORLD_SIZE=4"]),
        (
            {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"],
        ),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
            ["LOCAL_WORLD_SIZE=4", "WORLD_SIZE=2"],
        ),
        ({"RANK": "0", "WORLD_SIZE": "0"}, ["WORLD_SIZE=0"]),
        ({"SLURM_PROCID": "8", "SLURM_NTASKS": "8"}, ["SLURM_PROCID=8", "SLURM_NTASKS=8"]),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"},
            ["OMPI_COMM_WORLD_RANK=2", "OMPI_COMM_WORLD_SIZE=2"],
        ),
    ],
)
def test_contradicting_values_name_the_variables(env: dict[str, str], variables: list[str]) -> None:
    with pytest.raises(WorldError) as info:
        World.from_env(env)
    message = str(info.value)
    for variable in variables:
        assert variable in message, message
    assert "environment" in message


def test_port_out_of_range_from_environment() -> None:
    with pytest.raises(WorldError, match="65535"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"})


def test_world_error_is_a_value_error() -> None:
    assert issubclass(WorldError, ValueError)
    assert topo.WorldError is WorldError
    assert topo.World is World


# ----------------------------------------------------------------------------- World()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": True, "world_size": 2},
        {"rank": 0, "world_size": True},
        {"rank": "0", "world_size": 2},
        {"rank": 0, "world_size": "2"},
        {"rank": 0.0, "world_size": 2},
        {"rank": 0, "world_size": 2, "local_rank": False},
        {"rank": 0, "world_size": 2, "local_world_size": "2"},
        {"rank": 0, "world_size": 2, "master_port": "29500"},
        {"rank": 0, "world_size": 2, "master_port": True},
    ],
)
def test_world_type_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError, match="requires an int"):
        World(**kwargs)  # type: ignore[arg-type]


def test_world_master_addr_type_error() -> None:
    with pytest.raises(TypeError, match="master_addr requires a host name"):
        World(rank=0, world_size=1, master_addr=None)  # type: ignore[arg-type]


def test_world_blank_master_addr_from_env() -> None:
    with pytest.raises(WorldError, match="MASTER_ADDR requires"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "  "})


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rank": -1, "world_size": 2}, "non-negative"),
        ({"rank": 0, "world_size": 0}, "positive"),
        ({"rank": 2, "world_size": 2}, "rank < world_size"),
        ({"rank": 0, "world_size": 2, "local_rank": -1}, "non-negative"),
        ({"rank": 0, "world_size": 2, "local_world_size": 0}, "positive"),
        ({"rank": 0, "world_size": 4, "local_rank": 2, "local_world_size": 2}, "local_rank <"),
        ({"rank": 0, "world_size": 2, "local_world_size": 4, "local_rank": 0}, "<= world_size"),
        ({"rank": 0, "world_size": 1, "master_port": 65536}, "65535"),
        ({"rank": 0, "world_size": 1, "master_port": -1}, "non-negative"),
        ({"rank": 0, "world_size": 1, "master_addr": ""}, "master_addr"),
    ],
)
def test_world_value_errors(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        World(**kwargs)  # type: ignore[arg-type]


def test_world_defaults_and_port_zero() -> None:
    world = World(rank=1, world_size=4)
    assert (world.local_rank, world.local_world_size) == (1, 4)
    assert World(rank=0, world_size=1, master_port=0).master_port == 0
    assert World(rank=0, world_size=1, master_port=65535).master_port == 65535


def test_world_is_frozen_hashable_and_picklable() -> None:
    world = World(rank=1, world_size=4, local_rank=1, local_world_size=2, master_port=1234)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        world.rank = 2  # type: ignore[misc]
    same = World(rank=1, world_size=4, local_rank=1, local_world_size=2, master_port=1234)
    assert world == same
    assert hash(world) == hash(same)
    assert len({world, same, World(rank=0, world_size=4)}) == 2
    assert pickle.loads(pickle.dumps(world)) == world
    assert attrs.evolve(world, rank=3).rank == 3


def test_world_properties() -> None:
    assert World(rank=7, world_size=8, local_rank=3, local_world_size=4).node_rank == 1
    assert World(rank=3, world_size=8, local_rank=3, local_world_size=4).node_rank == 0
    assert not World(rank=0, world_size=8, local_world_size=4).is_single_node
    assert World(rank=0, world_size=8).is_single_node


# ----------------------------------------------------------------------------- Slurm host lists


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("node[1-4]", "node1"),
        ("node[0001]", "node0001"),
        ("gpu[003-005,009],cpu1", "gpu003"),
        ("gpu[009,003-005]", "gpu009"),
        ("a,b", "a"),
        ("a b", "a"),
        ("  node7  ", "node7"),
        ("gpu-[07-09]", "gpu-07"),
        ("cn1,gpu[1-2]", "cn1"),
        ("node[01-02]-ib", "node01-ib"),
        ("rack[1-2]-node[07-08]", "rack1-node07"),
        ("n[5,7-9],m1", "n5"),
        ("host.example.com", "host.example.com"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "   ", ",node1", "node[1-2", "node]", "2-1["])
def test_first_slurm_host_rejects_malformed(nodelist: str) -> None:
    with pytest.raises(WorldError, match="SLURM_JOB_NODELIST"):
        first_slurm_host(nodelist)


# ----------------------------------------------------------------------------- doctests


def test_doctests() -> None:
    result = doctest.testmod(topo.world, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


def test_contradiction_from_explicit_arguments_alone_is_blamed_on_them() -> None:
    with pytest.raises(ValueError, match=r"World requires rank < world_size") as info:
        World.from_env({}, rank=5, world_size=2)
    assert not isinstance(info.value, WorldError)
    with pytest.raises(WorldError, match=r"RANK=3.*explicit \['world_size'\]"):
        World.from_env({"RANK": "3", "WORLD_SIZE": "4"}, world_size=2)
