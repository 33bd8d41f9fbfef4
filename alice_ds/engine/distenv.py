"""Rank discovery for every launcher we support (DESIGN §6 "Launchers").

`deepspeed`, `torchrun` and `accelerate launch` export `RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
`MASTER_ADDR` and `MASTER_PORT`. SLURM's `srun` exports only its own variables; they are mapped here
before `deepspeed.init_distributed()` reads the standard names. A single process without any
launcher is a world of one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from alice_ds.errors import UserError

DEFAULT_MASTER_PORT = "29500"
"""torch.distributed's customary rendezvous port, used when SLURM jobs do not set MASTER_PORT."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str
    """`deepspeed|torchrun|accelerate` (indistinguishable: `env`), `slurm`, or `single`."""


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


def setup_env(environ: dict | None = None) -> DistEnv:
    """Fill the standard torch.distributed variables from the launcher's and return who we are.
    Mutates `environ` (default `os.environ`)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "env"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise UserError("srun without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master "
                                "host (launch/slurm.sbatch exports MASTER_ADDR)")
            env["MASTER_ADDR"] = first_slurm_host(nodelist)
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    else:
        launcher = "single"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    env.setdefault("LOCAL_RANK", "0")
    try:
        rank, local_rank, world = int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise UserError(f"launcher environment is not numeric: RANK={env['RANK']!r} "
                        f"LOCAL_RANK={env['LOCAL_RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r}") from None
    if not 0 <= rank < world:
        raise UserError(f"launcher environment: RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, launcher=launcher)


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
