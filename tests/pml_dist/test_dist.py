"""The rank resolver under each launcher's environment (patched variables, no processes)."""

from __future__ import annotations

import pytest

from pml_dist.dist import expand_nodelist, resolve
from pml_dist.errors import PmlError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
         "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_torchrun_environment():
    info = resolve(TORCHRUN)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)
    assert (info.master_addr, info.master_port, info.source) == ("node-a", 29400, "torchrun")


def test_complete_torchrun_environment_wins_over_slurm():
    """torchrun inside a Slurm allocation: its variables describe the real process layout."""
    assert resolve({**SLURM, **TORCHRUN}).source == "torchrun"


def test_slurm_environment_master_is_the_first_node_and_port_follows_the_job():
    info = resolve(SLURM)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 2)
    assert info.master_addr == "gpu07" and info.source == "slurm"
    assert info.master_port == 15000 + 123456 % 20000
    assert resolve({**SLURM, "SLURM_JOB_ID": "123457"}).master_port == info.master_port + 1


def test_no_launcher_is_one_process():
    info = resolve({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK"])
def test_partial_torchrun_environment_names_what_is_missing(missing):
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(PmlError, match=f"incomplete torch distributed environment: .* {missing} missing"):
        resolve(env)


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_partial_slurm_environment_names_what_is_missing(missing):
    env = {k: v for k, v in SLURM.items() if k != missing}
    with pytest.raises(PmlError, match=f"incomplete Slurm environment: {missing} missing"):
        resolve(env)


def test_inconsistent_values_are_errors():
    with pytest.raises(PmlError, match="rank 8 is outside world size 8"):
        resolve({**TORCHRUN, "RANK": "8"})
    with pytest.raises(PmlError, match="RANK='x' is not an integer"):
        resolve({**TORCHRUN, "RANK": "x"})


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],b7,c[1,3]", ["a8", "a9", "a10", "b7", "c1", "c3"]),
        ("rack1-n[001-002]", ["rack1-n001", "rack1-n002"]),
        ("localhost,myhost", ["localhost", "myhost"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
