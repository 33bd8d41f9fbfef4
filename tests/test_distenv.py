"""Rank discovery for every launcher and the CPU shared-memory buffer release (alice_ds.engine.distenv).
The environments are those the launchers set (srun, sbatch, mpirun of Open MPI / MPICH / MVAPICH2, and
DeepSpeed's MPI runners); tests/test_engine.py runs srun's and `deepspeed --launcher mpich`'s through
real 2-rank jobs."""

import importlib.util
import os

import pytest

from alice_ds.engine.distenv import (
    SHM_ALLREDUCE_NAME,
    SHM_DIR,
    first_slurm_host,
    launcher_rank,
    release_cpu_allreduce_buffer,
    setup_env,
)
from alice_ds.errors import UserError

SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
"""Task 5 of an 8-task `srun` step inside a 16-task allocation."""


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
    env = dict(SRUN_TASK)
    e = setup_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (5, 1, 8, "slurm")  # the step's task count
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("5", "8", "1", "gpu07")
    assert first_slurm_host("a1,b2") == "a1"
    e = setup_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert (e.rank, e.world_size, e.launcher) == (1, 2, "env")
    assert setup_env({}).world_size == 1
    with pytest.raises(UserError, match="RANK=3 is outside WORLD_SIZE=2"):
        setup_env({"RANK": "3", "WORLD_SIZE": "2"})


def test_srun_port_follows_the_job_and_gpus_per_task_gives_device_0():
    # every task of a job computes the same port; two jobs sharing a node get different ones (not 29500)
    env_a, env_b, chosen = dict(SRUN_TASK), dict(SRUN_TASK, SLURM_JOB_ID="123457"), dict(SRUN_TASK, MASTER_PORT="31000")
    for env in (env_a, env_b, chosen):
        setup_env(env)
    assert (env_a["MASTER_PORT"], env_b["MASTER_PORT"], chosen["MASTER_PORT"]) == ("23456", "23457", "31000")
    # --gpus-per-task=1: each task sees only its own GPU, as device 0; SLURM_LOCALID 3 is no device
    env = dict(SRUN_TASK, SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="3")
    assert (setup_env(env).local_rank, env["LOCAL_RANK"]) == (0, "0")
    # --gpus-per-node: every task sees all the node's GPUs, SLURM_LOCALID indexes them
    env = dict(SRUN_TASK, SLURM_LOCALID="3", CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert setup_env(env).local_rank == 3


def test_python_inside_sbatch_without_srun_is_one_process(capsys):
    """The batch script's environment has the allocation's SLURM_NTASKS and SLURM_PROCID=0 but no job
    step: taking 16 as the world size made the process wait forever for 15 ranks."""
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    e = setup_env(env)
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single")
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert "inside SLURM job 77 of 16 tasks but not started by srun" in " ".join(capsys.readouterr().err.split())
    assert 1024 < int(env["MASTER_PORT"]) < 65536 and env["MASTER_PORT"] != "29500"  # a free port


def test_mpi_launchers_map_their_own_variables():
    # mpirun of Open MPI with MASTER_ADDR exported (`-x MASTER_ADDR`, or `.deepspeed_env`)
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node01"}
    e = setup_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (3, 1, 4, "mpi")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("3", "4", "1", "29500")
    # `deepspeed --launcher mpich`: Hydra's PMI_* plus the runner's MASTER_*, WORLD_SIZE, no RANK (this
    # used to be a world of one: RANK=0 WORLD_SIZE=1 written over it)
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29600", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    e = setup_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (1, 1, 2, "mpi")
    assert (env["RANK"], env["MASTER_PORT"]) == ("1", "29600")
    # MVAPICH2
    e = setup_env({"MV2_COMM_WORLD_RANK": "2", "MV2_COMM_WORLD_SIZE": "3", "MV2_COMM_WORLD_LOCAL_RANK": "0",
                   "MASTER_ADDR": "n1"})
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (2, 0, 3, "mpi")
    assert launcher_rank({"PMI_RANK": "3", "PMI_SIZE": "4"}) == 3 and launcher_rank({}) == 0
    # no MASTER_ADDR (`deepspeed --launcher openmpi` exports none): DeepSpeed's MPI discovery finds it, with mpi4py
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    if importlib.util.find_spec("mpi4py") is None:
        with pytest.raises(UserError, match="without MASTER_ADDR: export MASTER_ADDR=<first host>.*install mpi4py"):
            setup_env(env)
    else:
        assert (setup_env(env).rank, setup_env(env).world_size) == (1, 2)
    assert "RANK" not in env and "WORLD_SIZE" not in env  # nothing written that would stop that discovery
