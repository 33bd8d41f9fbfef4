"""Rank discovery for every launcher and the CPU shared-memory buffer release (alice_ds.engine.distenv)."""

import os

import pytest

from alice_ds.engine.distenv import (
    SHM_ALLREDUCE_NAME,
    SHM_DIR,
    first_slurm_host,
    release_cpu_allreduce_buffer,
    setup_env,
)
from alice_ds.errors import UserError


def _shm_buffers() -> set:
    return {p for p in os.listdir(SHM_DIR) if p.startswith("deepspeed_allreduce_buffer_")}


def test_release_cpu_allreduce_buffer_unlinks_only_its_own_name():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "65531"}
    names = [os.path.join(SHM_DIR, SHM_ALLREDUCE_NAME.format(uid=os.getuid(), addr="127.0.0.1", port="65531",
                                                              rank=r)) for r in (0, 1)]
    for n in names:
        open(n, "wb").close()
    try:
        assert release_cpu_allreduce_buffer(1, env) is True
        assert os.path.exists(names[0]) and not os.path.exists(names[1])
        assert release_cpu_allreduce_buffer(1, env) is False  # already gone: nothing to do
    finally:
        for n in names:
            if os.path.exists(n):
                os.unlink(n)


def test_launcher_env_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
    e = setup_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (5, 1, 8, "slurm")
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("5", "8", "gpu07", "29500")
    assert first_slurm_host("a1,b2") == "a1"
    e = setup_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "env")
    assert setup_env({}).world_size == 1
    with pytest.raises(UserError, match="RANK=3 is outside WORLD_SIZE=2"):
        setup_env({"RANK": "3", "WORLD_SIZE": "2"})
