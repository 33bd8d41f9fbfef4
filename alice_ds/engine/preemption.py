"""Preemption: the signals that stop a run cleanly (finish the step, checkpoint, exit 0) and, after
SLURM's time-limit warning, the requeue of the job so that it continues by itself.

Launchers and schedulers signal every process of the job: `deepspeed`'s and `torchrun`'s launchers
send SIGTERM to each rank's process tree (and SIGKILL 30 s later), SLURM signals every process of
the job step (`--signal=USR1@120`: SIGUSR1 two minutes before the time limit; SIGTERM at the limit or
on `scancel`). The DataLoader workers ignore both (`alice_ds.sampler.loader`); the ranks agree on
stopping after the step (`Trainer`), and rank 0 requeues the job after a SIGUSR1 stop: a job that
exits 0 ends COMPLETED, and SLURM's `--requeue` only acts on node failures and preemption.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess

from alice_ds.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Preemption signals: finish the step, checkpoint, exit 0 (SIGUSR1 under SLURM also requeues)."""
REQUEUE_ENV = "ALICE_DS_REQUEUE"
"""The command that requeues a SLURM job, the job id appended (default `scontrol requeue`); tests set
it to a recorder."""
DEFAULT_REQUEUE = "scontrol requeue"
REQUEUE_TIMEOUT_S = 120


class StopSignals:
    """Records which stop signals this process received since `install()` (the handler only sets a
    flag: the step in progress finishes)."""

    def __init__(self):
        self.received: set[int] = set()

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received.add(signum)

    def flags(self) -> list[float]:
        """1.0 / 0.0 per signal of `STOP_SIGNALS`, to be summed over ranks."""
        return [1.0 if s in self.received else 0.0 for s in STOP_SIGNALS]


def requeue_slurm_job(environ: dict | None = None) -> list[str] | None:
    """Requeue this SLURM job (`scontrol requeue $SLURM_JOB_ID`, or `$ALICE_DS_REQUEUE $SLURM_JOB_ID`);
    SLURM then restarts the batch script, whose `--resume auto` continues from the checkpoint just
    written. -> the command run, or None outside SLURM. A failed command is a `UserError` (the job
    would end COMPLETED without continuing)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    cmd = shlex.split(env.get(REQUEUE_ENV, DEFAULT_REQUEUE)) + [job]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    else:
        if r.returncode == 0:
            return cmd
        problem = f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"
    raise UserError(f"`{shlex.join(cmd)}` failed ({problem}): the checkpoint is written, but the job will not "
                    "continue by itself; resubmit it (it resumes with --resume auto)")
