"""Fault injection for the tests of the trainer's fault paths (NaN losses, overflowing gradients, a
preemption signal to the whole job, a disk that fills up during a save), which cannot be reached on
purpose otherwise, or not at a known step. Read once from the environment variable ALICE_DS_FAULT;
unset in real runs, where every hook is a no-op.

    ALICE_DS_FAULT=nan:1:3:2,term:0:5 deepspeed launch/train.py ...
"""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess

from alice_ds.console import warn
from alice_ds.errors import UserError

FAULT_ENV = "ALICE_DS_FAULT"
"""Fault injection for tests (`Faults`): unset in real runs."""
FAULT_FORMS = "nan:RANK:STEP[:COUNT], overflow:RANK:STEP[:COUNT], term:RANK:STEP, usr1:RANK:STEP or enospc:RANK:STEP"
"""The specs `Faults` accepts, for its error messages."""
OVERFLOW_SCALE = 1e30
"""An `overflow` fault multiplies the loss by this: finite in fp32 (a loss of ~10 becomes ~1e31), but the
gradients' sum of squares (~1e60 and more) overflows fp32, as diverging gradients do."""
GROUP_SIGNALS = {"term": signal.SIGTERM, "usr1": signal.SIGUSR1}
"""Faults that send a signal to the rank's whole process group, and the signal."""


class Faults:
    """Injected faults, read once from the environment variable `ALICE_DS_FAULT` (tests only; the
    fault paths cannot be reached on purpose otherwise). Comma-separated specs:

    - `nan:RANK:STEP[:COUNT]`: on rank RANK the first COUNT forward passes (all when omitted) of the
      step that finishes step STEP return a NaN loss;
    - `overflow:RANK:STEP[:COUNT]`: the same forward passes return their loss times 1e30 (finite), so
      the global gradient norm overflows fp32;
    - `term:RANK:STEP` / `usr1:RANK:STEP`: once step STEP's update is applied, rank RANK has `kill`
      send SIGTERM / SIGUSR1 to the rank's whole process group (under `deepspeed` the launcher, every
      rank and their DataLoader workers; under torchrun the rank and its workers), as a scheduler or a
      launcher does: from another process, which matters (torch's workers exit quietly on their
      parent's SIGTERM). A preemption at a known step whatever the machine's load, late enough in the
      step that the launchers' 30 s grace period covers the checkpoint;
    - `enospc:RANK:STEP`: rank RANK's write of the step-STEP checkpoint fails with "No space left on
      device" after DeepSpeed's files, before ours.
    """

    def __init__(self, spec: str, rank: int):
        self.nan: dict[int, float] = {}  # step -> NaN forward passes left on this rank (inf = all)
        self.overflow: dict[int, float] = {}  # step -> overflowing forward passes left on this rank
        self.signal_at: dict[int, signal.Signals] = {}  # step -> signal this rank sends to its group
        self.enospc_step: int | None = None
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            try:
                kind, fault_rank, step = parts[0], int(parts[1]), int(parts[2])
                count = float(parts[3]) if len(parts) > 3 else math.inf
            except (IndexError, ValueError):
                raise UserError(f"{FAULT_ENV}: cannot parse {item!r} (want {FAULT_FORMS})") from None
            counted = kind in ("nan", "overflow")
            if kind not in ("nan", "overflow", "enospc", *GROUP_SIGNALS) or len(parts) > (4 if counted else 3):
                raise UserError(f"{FAULT_ENV}: unknown fault {item!r} (want {FAULT_FORMS})")
            if fault_rank != rank:
                continue
            if counted:
                getattr(self, kind)[step] = count
            elif kind == "enospc":
                self.enospc_step = step
            else:
                self.signal_at[step] = GROUP_SIGNALS[kind]

    def loss(self, out: dict, step: int) -> dict:
        """`out` with a NaN or an overflowing loss when a `nan` or `overflow` fault covers this forward
        pass of `step`."""
        for kind, factor in (("nan", float("nan")), ("overflow", OVERFLOW_SCALE)):
            left = getattr(self, kind)
            if left.get(step, 0) > 0:
                left[step] -= 1
                return {**out, "loss": out["loss"] * factor}
        return out

    def at_step_end(self, step: int) -> None:
        if step in self.signal_at:
            sig = self.signal_at[step]
            warn(f"{FAULT_ENV}: rank sends {sig.name} to its process group after step {step}")
            # `kill` is in the group too and dies of the signal: its status does not matter
            subprocess.run(["kill", f"-{sig.name.removeprefix('SIG')}", "--", f"-{os.getpgrp()}"], check=False)

    def in_save(self, step: int) -> None:
        """Called by every rank between DeepSpeed's files and ours of the step-`step` checkpoint."""
        if self.enospc_step == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
