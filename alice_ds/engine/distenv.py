"""Rank discovery for every launcher we support (DESIGN §6 "Launchers").

- `deepspeed`, `torchrun`, `accelerate launch` (and `deepspeed --launcher impi`) export `RANK`,
  `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`: used as they are.
- SLURM's `srun` (a job step: `SLURM_STEP_ID`) exports only its own variables; they are mapped here.
  `python launch/train.py` inside a batch script without `srun` is one process, whatever
  `SLURM_NTASKS` says (it used to wait for N-1 ranks that never came).
- MPI launchers (`deepspeed --launcher openmpi|mpich|mvapich`, `mpirun`) export their own rank
  variables (`OMPI_COMM_WORLD_*`, `PMI_*`, `MV2_COMM_WORLD_*`): mapped here when `MASTER_ADDR` is
  known (DeepSpeed's mpich runner exports it), otherwise left to DeepSpeed's MPI discovery (mpi4py).
- Nothing of the above: a world of one, on a free port.

`setup_env` runs before `deepspeed.init_distributed()`, which reads the standard names.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass

from alice_ds.console import warn
from alice_ds.errors import UserError

DEFAULT_MASTER_PORT = "29500"
"""torch.distributed's customary port; DeepSpeed's for MPI launches (its `--master_port` default and its
MPI discovery's)."""
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000
"""An srun job without MASTER_PORT meets on port 20000 + (job id mod 10000): every task computes the
same port, and jobs sharing a node get different ones (a fixed 29500 made the second job's rendezvous
fail). Below Linux's ephemeral range (32768-60999)."""
MPI_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH and Intel MPI (Hydra)
)
"""(rank, world size, local rank) variables of each MPI family."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """`deepspeed|torchrun|accelerate` (indistinguishable: `env`), `slurm`, `mpi`, or `single`."""


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM nodelist: `node[03-05,7],gpu1` -> `node03`, `a1,b2` -> `a1`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read the first host name")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _mpi_variables(env) -> tuple[str, str, str] | None:
    return next((names for names in MPI_VARIABLES if names[0] in env and names[1] in env), None)


def launcher_rank(environ: dict | None = None) -> int:
    """This process's rank as its launcher says, before `setup_env` (0 when none says)."""
    env = os.environ if environ is None else environ
    mpi = _mpi_variables(env)
    for name in ["RANK", "SLURM_PROCID"] + ([mpi[0]] if mpi else []):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0


def slurm_local_rank(env) -> str:
    """The device index of an srun task: SLURM_LOCALID, or 0 when the task sees fewer GPUs than that
    (`--gpus-per-task` / `--gpu-bind`: CUDA_VISIBLE_DEVICES lists only the task's own GPUs)."""
    local = env.get("SLURM_LOCALID", "0")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return "0" if visible and local.isdigit() and int(local) >= len(visible) else local


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def setup_env(environ: dict | None = None) -> DistEnv:
    """Fill the standard torch.distributed variables from the launcher's and return who we are.
    Mutates `environ` (default `os.environ`)."""
    env = os.environ if environ is None else environ
    mpi = _mpi_variables(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "env"
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        env["LOCAL_RANK"] = slurm_local_rank(env)
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise UserError("srun without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master "
                                "host (launch/slurm.sbatch exports MASTER_ADDR)")
            env["MASTER_ADDR"] = first_slurm_host(nodelist)
        job = env.get("SLURM_JOB_ID", "")
        env.setdefault("MASTER_PORT", str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN) if job.isdigit()
                       else DEFAULT_MASTER_PORT)
    elif mpi:
        launcher = "mpi"
        rank, world, local = (env.get(n, "0") for n in mpi)
        if "MASTER_ADDR" in env:
            env.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local)
            env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        elif importlib.util.find_spec("mpi4py") is None:
            raise UserError(f"MPI launch ({mpi[0]}={rank}) without MASTER_ADDR: export MASTER_ADDR=<first host> "
                            "to every rank (mpirun -x MASTER_ADDR), or install mpi4py for DeepSpeed's MPI discovery")
        else:  # DeepSpeed's MPI discovery (mpi4py) sets the standard variables in init_distributed()
            return _checked(rank, local, world, launcher)
    else:
        launcher = "single"
        if "SLURM_JOB_ID" in env and env.get("SLURM_NTASKS", "1") != "1":
            warn(f"inside SLURM job {env['SLURM_JOB_ID']} of {env['SLURM_NTASKS']} tasks but not started by srun: "
                 "training as one process (start it with srun, as launch/slurm.sbatch does)")
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", free_port())  # another run on this machine may hold any fixed port
    env.setdefault("LOCAL_RANK", "0")
    return _checked(env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], launcher)


def _checked(rank: str, local_rank: str, world: str, launcher: str) -> DistEnv:
    try:
        r, lr, w = int(rank), int(local_rank), int(world)
    except ValueError:
        raise UserError(f"launcher environment is not numeric: rank {rank!r}, local rank {local_rank!r}, "
                        f"world size {world!r}") from None
    if not 0 <= r < w:
        raise UserError(f"launcher environment: RANK={r} is outside WORLD_SIZE={w}")
    return DistEnv(rank=r, local_rank=lr, world_size=w, launcher=launcher)


SHM_DIR = "/dev/shm"
SHM_ALLREDUCE_NAME = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"
"""The shared-memory all-reduce buffer (~66 MB) that DeepSpeed's CPU backend creates per rank when
all ranks share one machine (ops/csrc/cpu/comm/shm.cpp) and never unlinks: every CPU run on a new
port left 66 MB per rank of RAM in /dev/shm until reboot (a test session: ~5 GB)."""


def release_cpu_allreduce_buffer(rank: int, environ: dict | None = None) -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name, once every rank has mapped every
    other rank's buffer (call after `deepspeed.init_distributed()` and a barrier). The mappings stay
    valid; the memory is returned when the last rank exits, also on a crash. -> whether a name was
    removed."""
    env = os.environ if environ is None else environ
    name = SHM_ALLREDUCE_NAME.format(uid=os.getuid(), addr=env.get("MASTER_ADDR", ""),
                                     port=env.get("MASTER_PORT", ""), rank=rank)
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True
