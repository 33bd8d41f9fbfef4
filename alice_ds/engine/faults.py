"""Fault injection for the tests of the trainer's fault paths (NaN losses, a dying rank, a preemption
signal at a known step), which cannot be reached on purpose otherwise. Read once from the
environment variable ALICE_DS_FAULT; unset in real runs, where every hook is a no-op.

    ALICE_DS_FAULT=nan:1:3:2,exit:0:5 deepspeed launch/train.py ...
"""

from __future__ import annotations

import math
import os
import signal

from alice_ds.console import warn
from alice_ds.errors import UserError

FAULT_ENV = "ALICE_DS_FAULT"
"""Fault injection for tests (`Faults`): unset in real runs."""
FAULT_EXIT_CODE = 17
"""Exit status of a rank killed by an injected `exit` fault."""
FAULT_FORMS = "nan:RANK:STEP[:COUNT], exit:RANK:STEP or term:RANK:STEP"
"""The specs `Faults` accepts, for its error messages."""


class Faults:
    """Injected faults, read once from the environment variable `ALICE_DS_FAULT` (tests only; the
    fault paths cannot be reached on purpose otherwise). Comma-separated specs:

    - `nan:RANK:STEP[:COUNT]`: on rank RANK the first COUNT forward passes (all when omitted) of the
      step that finishes step STEP return a NaN loss;
    - `exit:RANK:STEP`: rank RANK dies (`os._exit(17)`, no cleanup) when step STEP starts;
    - `term:RANK:STEP`: rank RANK sends itself SIGTERM when step STEP starts (a preemption arriving
      mid-step, at a known step whatever the machine's load).
    """

    def __init__(self, spec: str, rank: int):
        self.nan: dict[int, float] = {}  # step -> NaN forward passes left on this rank (inf = all)
        self.exit_step: int | None = None
        self.term_step: int | None = None
        for item in filter(None, spec.split(",")):
            parts = item.split(":")
            try:
                kind, fault_rank, step = parts[0], int(parts[1]), int(parts[2])
                count = float(parts[3]) if len(parts) > 3 else math.inf
            except (IndexError, ValueError):
                raise UserError(f"{FAULT_ENV}: cannot parse {item!r} (want {FAULT_FORMS})") from None
            if kind not in ("nan", "exit", "term") or len(parts) > (4 if kind == "nan" else 3):
                raise UserError(f"{FAULT_ENV}: unknown fault {item!r} (want {FAULT_FORMS})")
            if fault_rank != rank:
                continue
            if kind == "nan":
                self.nan[step] = count
            elif kind == "exit":
                self.exit_step = step
            else:
                self.term_step = step

    def at_step_start(self, step: int) -> None:
        if self.exit_step == step:
            warn(f"{FAULT_ENV}: rank exits at step {step}")
            os._exit(FAULT_EXIT_CODE)
        if self.term_step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, out: dict, step: int) -> dict:
        """`out` with a NaN loss when a `nan` fault covers this forward pass of `step`."""
        if self.nan.get(step, 0) <= 0:
            return out
        self.nan[step] -= 1
        return {**out, "loss": out["loss"] * float("nan")}
