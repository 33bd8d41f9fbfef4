"""Stop signals and the SLURM requeue after a time-limit stop (alice_ds.engine.preemption); the real
2-rank USR1 stop and requeue is tests/test_engine.py::test_zero2_resume_under_srun_usr1_requeues_the_job."""

import os
import signal

import pytest

from alice_ds.engine.preemption import REQUEUE_ENV, StopSignals, requeue_slurm_job
from alice_ds.errors import UserError


def test_requeue_runs_the_command_with_the_job_id_or_says_it_failed(tmp_path):
    requeued = tmp_path / "requeued"
    recorder = tmp_path / "requeue.sh"
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    recorder.chmod(0o755)
    assert requeue_slurm_job({"SLURM_JOB_ID": "99", REQUEUE_ENV: f"{recorder} --reason=USR1"}) == [
        str(recorder), "--reason=USR1", "99"]
    assert requeued.read_text() == "--reason=USR1 99\n"
    assert requeue_slurm_job({REQUEUE_ENV: str(recorder)}) is None  # not a SLURM job: nothing runs
    assert requeued.read_text() == "--reason=USR1 99\n"
    with pytest.raises(UserError, match=r"`false 99` failed \(exit 1: \): the checkpoint is written.*resubmit"):
        requeue_slurm_job({"SLURM_JOB_ID": "99", REQUEUE_ENV: "false"})
    with pytest.raises(UserError, match=r"`scontrol requeue 99` failed .*No such file"):
        requeue_slurm_job({"SLURM_JOB_ID": "99", "PATH": str(tmp_path)})  # the default command, without SLURM


def test_stop_signals_record_which_arrived():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    stop = StopSignals()
    try:
        stop.install()
        assert stop.flags() == [0.0, 0.0]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.flags() == [0.0, 1.0]
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.flags() == [1.0, 1.0]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
