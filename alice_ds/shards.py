"""Sharded case lists for `preprocess` and `embed`: N processes (a SLURM array, torchrun ranks, or
jobs started by hand with `--shard I/N`) each take a disjoint share of the cases and write into the
same folder. Every writer is atomic and idempotent per case, so shards need no coordination: the
union of the shards' outputs is what one unsharded run writes.

Which share a process takes, in order of precedence:
1. `--shard I/N` (0 <= I < N);
2. a SLURM array job: `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`;
3. a launcher's ranks (`torchrun`, `deepspeed`, `srun`'s step via its variables): `RANK` of
   `WORLD_SIZE` (`embed` then uses GPU `LOCAL_RANK`);
4. otherwise all cases (shard 0/1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from alice_ds.errors import UserError


@dataclass(frozen=True)
class Shard:
    """Share `index` of `count`, and where that came from (for the log line)."""

    index: int = 0
    count: int = 1
    source: str = "unsharded"

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserError(f"shard {self.index}/{self.count} ({self.source}): need 0 <= I < N")

    def take(self, items: Sequence) -> list:
        """This shard's items, in the caller's order: every `count`-th of the sorted items, starting
        at `index`. Sorting makes the split independent of the order the caller listed them in;
        striding balances a list whose case sizes drift with the name (sites, scanners)."""
        if self.count == 1:
            return list(items)
        mine = set(sorted(items)[self.index::self.count])
        return [item for item in items if item in mine]

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count} ({self.source})" if self.count > 1 else "unsharded"


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None


def shard_from_env(environ=None) -> Shard:
    """The share the environment gives this process (SLURM array, then launcher ranks), else all."""
    env = os.environ if environ is None else environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        index = _env_int(env, "SLURM_ARRAY_TASK_ID") - first
        if count > 1:
            if not 0 <= index < count:
                raise UserError(f"SLURM array task {index + first} is outside {first}..{first + count - 1}: "
                                "use a contiguous array (--array=0-N) or pass --shard I/N")
            return Shard(index, count, "SLURM array")
    if "RANK" in env and "WORLD_SIZE" in env and _env_int(env, "WORLD_SIZE") > 1:
        return Shard(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), "RANK/WORLD_SIZE")
    return Shard()


def resolve_shard(arg: Shard | None, environ=None) -> Shard:
    """`--shard` when given, else the environment's."""
    return arg if arg is not None else shard_from_env(environ)

SHARD_HELP = ("process only share I of N of the cases (0 <= I < N), so N jobs can fill one folder together; "
              "default: from SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE (torchrun) when set, else all cases")
