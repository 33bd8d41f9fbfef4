"""Real 2-rank DeepSpeed pretraining on CPU (gloo, sanity checks on), tiny SwinUNETR (F=12, 64^3) on
phantom data. The shared runs (`ds_run`, tests/conftest.py ENGINE_RUNS) are checked here and are the
references of one exact-resume test per ZeRO stage, each through another launcher and another fault:
ZeRO-0 resumed under `deepspeed` and stopped by SIGTERM to the launcher's process group, ZeRO-1 under
`torchrun` with SIGTERM to a rank's process group, ZeRO-2 under srun's variables with SLURM's
time-limit SIGUSR1 (requeue), ZeRO-3 under an MPI launcher's variables and through a universal
checkpoint. Resumed runs use 2 DataLoader workers per rank (the references mostly 0: the sample
stream does not depend on them). Faults are injected with `ALICE_DS_FAULT` (docs/faults.md)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from alice_ds.engine.distenv import SHM_ALLREDUCE_NAME, SHM_DIR
from alice_ds.engine.faults import FAULT_ENV
from alice_ds.engine.preemption import REQUEUE_ENV

EMA_RTOL = 1e-6
FP32_MAX_NORM = math.sqrt(torch.finfo(torch.float32).max)
"""A gradient norm above this overflows an fp32 sum of squares (the trainer's drop criterion)."""
RESUME_ATOL = 1e-5
"""Resumed and uninterrupted runs execute the same ops on the same data in the same order on the CPU;
1e-5 is ~1 % of one Adam step at the tests' peak lr (1.6e-3), so a resume that reloaded anything wrongly
(moments, centers, sampler position, RNG, teacher) fails."""


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _log(out, i=0) -> str:
    """A launch log with the console's line wrapping undone."""
    return " ".join((out / f"launch{i}.log").read_text().split())


def _teacher(out, tag):
    """Full fp32 teacher tensors of a checkpoint, reassembled as docs/interfaces.md says."""
    d = out / "checkpoints" / tag
    state = json.loads((d / "alice_state.json").read_text())
    ranks = range(state["world_size"]) if state["zero_stage"] == 3 else range(1)
    files = [safe_open(str(d / f"teacher_fp32_rank{r}.safetensors"), "pt") for r in ranks]
    shapes = json.loads(files[0].metadata().get("zero3_shapes", "{}"))
    full = {}
    for name in files[0].keys():
        parts = [f.get_tensor(name) for f in files]
        assert all(p.dtype == torch.float32 for p in parts)
        if shapes:
            shape = shapes[name]
            full[name] = torch.cat(parts)[:math.prod(shape)].view(shape)
        else:
            full[name] = parts[0]
    return full


def _student(out, tag):
    """fp32 master weights of student + CASA, teacher-style names: DeepSpeed's zero_to_fp32 (ZeRO 1-3),
    or the module's own fp32 parameters in its model states (ZeRO-0 has no ZeRO optimizer)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = out / "checkpoints" / tag
    if json.loads((d / "alice_state.json").read_text())["zero_stage"] == 0:
        sd = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    else:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag,
                                                      exclude_frozen_parameters=True)
    return {k[len("student."):]: v.float() for k, v in sd.items() if k.startswith("student.")}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].detach().double() - b[k].detach().double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].detach().double().pow(2).sum()) for k in b)
    return math.sqrt(num / den)


def _check_ema(out):
    """Teacher after the last step N == the EMA T_k = m_k T_(k-1) + (1 - m_k) S_k from T_1 (saved at
    step 1) over the student's fp32 masters S_k saved at every step k = 2..N and the logged momenta m_k
    (relative error <= 1e-6); a step whose update was skipped (non-finite gradients) leaves the
    teacher as it was."""
    metrics = {m["step"]: m for m in _metrics(out)}
    last = max(metrics)
    ref = _teacher(out, "step_1")
    t1 = {k: v.clone() for k, v in ref.items()}
    for step in range(2, last + 1):
        if metrics[step]["optimizer_skipped"]:  # the update was skipped: no EMA either
            continue
        m = metrics[step]["momentum"]
        s = _student(out, f"step_{step}")  # parameters and buffers; the teacher file holds parameters
        assert set(ref) <= set(s)
        ref = {k: m * ref[k].double() + (1 - m) * s[k].double() for k in ref}
    got = _teacher(out, f"step_{last}")
    moved = _rel(t1, ref)
    assert moved > 100 * EMA_RTOL, f"teacher moved only {moved:.2e}: the test could not tell"
    err = _rel(got, ref)
    assert err <= EMA_RTOL, f"fp32 teacher differs from the reference EMA: rel err {err:.3e}"
    return err


def _assert_every_update_applied(metrics):
    """bf16 runs: no update was skipped and the gradient norm was finite every step."""
    assert not any(x["optimizer_skipped"] for x in metrics), [x["grad_norm"] for x in metrics]
    assert all(x["grad_norm"] is not None and 0 < x["grad_norm"] < 1e6 for x in metrics), metrics
    assert metrics[-1]["skipped_updates"] == 0


def _assert_resumed_exactly(out, ref, step, atol=RESUME_ATOL):
    """Step `step` of the resumed run `out` equals the uninterrupted run `ref`'s: losses, schedule
    values, update outcome, and every teacher and student tensor of the two step checkpoints."""
    want = {x["step"]: x for x in _metrics(ref)}[step]
    got = {x["step"]: x for x in _metrics(out)}[step]
    for k in ("loss", "cls", "patch", "recon"):
        assert abs(got[k] - want[k]) <= atol, (k, got[k], want[k])
    for k in ("lr", "momentum", "optimizer_skipped"):
        assert got[k] == want[k], k
    for fn in (_teacher, _student):
        a, b = fn(out, f"step_{step}"), fn(ref, f"step_{step}")
        assert a.keys() == b.keys() and len(a) > 100
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def _resume_from(ref, out, tag):
    """`out`'s checkpoints: a copy of the reference run's `tag`, which `latest` names."""
    shutil.copytree(ref / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)


def _shm_buffers() -> set:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_ALLREDUCE_NAME.split("{", 1)[0])}


def test_user_mistakes_exit_2_with_one_line(engine_inputs, phantom_cache, tmp_path, capsys):
    import runpy
    from unittest import mock

    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "launch", "train.py"))["main"]
    base = ["--config", str(engine_inputs / "tiny.yaml"), "--deepspeed_config", str(engine_inputs / "zero1_bf16.json"),
            "--json_list", str(engine_inputs / "datalist.json"), "--cache_dir", str(phantom_cache),
            "--output_dir", str(tmp_path)]
    # the entry point writes RANK, WORLD_SIZE, MASTER_* into its process's environment, as it should;
    # here that process is pytest's, where a later in-process Accelerator would start a group from them
    with mock.patch.dict(os.environ):
        assert main(base + ["--roi", "50"]) == 2
        assert "sampler.roi must be a positive multiple of 32, got 50" in capsys.readouterr().err
        assert main(base + ["--lr", "1e-5", "--min_lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "optim.min_lr 0.0001 must be below the peak lr 3.90625e-08" in err and "Traceback" not in err


@pytest.mark.slow
def test_bad_yaml_value_exits_2_with_one_line_before_any_rendezvous(engine_inputs, ds_launch, phantom_cache,
                                                                      tmp_path):
    """A value only the sampler checks (it used to pass validation and end in a traceback from every
    rank after deepspeed.initialize) stops every rank before any process group starts: one error line
    naming the field and the value, exit 2, through the DeepSpeed launcher (2 ranks) and alone."""
    bad = tmp_path / "bad.yaml"
    bad.write_text((engine_inputs / "tiny.yaml").read_text().replace("sampler: {roi: 64}",
                                                                     "sampler: {roi: 64, mask_block: 15}"))
    want = "error: sampler.mask_block must be a positive multiple of the patch size 2, got 15"
    (proc,) = ds_launch(tmp_path / "ds", "zero1_bf16", 1, ["--config", str(bad)])
    log = (tmp_path / "ds" / "launch0.log").read_text()
    assert proc.returncode == 2, log[-3000:]
    assert log.count(want) == 1 and "Traceback" not in log, log[-3000:]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    single = subprocess.run(
        [sys.executable, os.path.join(repo, "launch", "train.py"), "--config", str(bad), "--deepspeed_config",
         str(engine_inputs / "zero1_bf16.json"), "--json_list", str(engine_inputs / "datalist.json"),
         "--cache_dir", str(phantom_cache), "--output_dir", str(tmp_path / "single")],
        env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert single.returncode == 2 and single.stdout == "", single.stderr[-3000:]
    assert single.stderr.strip().splitlines() == [want], single.stderr[-3000:]
    assert not (tmp_path / "single").exists()  # nothing started, nothing written


def test_zero3_overfit_ema_and_checkpoint_layout(ds_run):
    out = ds_run(3)
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert all(math.isfinite(x[k]) for k in ("loss", "cls", "patch", "recon", "lr", "momentum", "samples_per_s",
                                                 "tflops_per_device"))
    # TFLOP/s x step time = the FLOPs of a step per device: the same every step, and those of the tiny
    # preset's sample (~120 GFLOP at 64^3) times 1 sample per rank
    work = [x["tflops_per_device"] * x["step_time_s"] * 1e3 for x in m]  # GFLOP per device and step
    assert work[0] == pytest.approx(work[1], rel=1e-9) and 60 < work[0] < 240, work
    assert "mfu" not in m[0]  # no datasheet peak on the CPU
    assert m[-1]["loss"] < m[0]["loss"], [x["loss"] for x in m]
    _assert_every_update_applied(m)
    _check_ema(out)
    # layout shared with the export (docs/interfaces.md)
    ck = out / "checkpoints"
    assert (ck / "latest").read_text() == "step_2"
    state = json.loads((ck / "step_2" / "alice_state.json").read_text())
    assert (state["step"], state["world_size"], state["zero_stage"]) == (2, 2, 3)
    assert state["config"]["model"]["feature_size"] == 12 and state["config"]["sampler"]["roi"] == 64
    assert len(state["config"]["data"]["spacing"]) == 3
    for r in (0, 1):
        with safe_open(str(ck / "step_2" / f"teacher_fp32_rank{r}.safetensors"), "pt") as f:
            assert f.get_tensor("backbone.mask_token").ndim == 1  # a flat ZeRO-3 partition
        assert (ck / "step_2" / f"state_rank{r}.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["run"]["num_steps"] == 2
    assert list((out / "monitor").rglob("*.csv")), "DeepSpeed CSV monitor wrote nothing"
    # last layers are frozen during step 1 (lr 0 on their partitioned group): the student kept its
    # initial value there, so the teacher (EMA of init and student) equals it up to fp32 rounding,
    # while every other weight moved by ~lr
    t1, s1 = _teacher(out, "step_1"), _student(out, "step_1")
    for name in ("head.last_layer.weight_v", "head.patch_last_layer.weight_v"):
        torch.testing.assert_close(t1[name], s1[name], rtol=1e-6, atol=1e-8)
    assert (t1["head.mlp.0.weight"] - s1["head.mlp.0.weight"]).abs().max() > 1e-5


def test_zero1_two_nodes_ema(ds_run):
    out = ds_run(1)
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2] and all(math.isfinite(x["loss"]) for x in m)
    assert json.loads((out / "checkpoints" / "step_2" / "alice_state.json").read_text())["world_size"] == 2
    _check_ema(out)


def test_zero2_validation_and_best(ds_run):
    out = ds_run(2)
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2] and all(math.isfinite(x["loss"]) for x in m)
    assert all(math.isfinite(x["val_loss"]) for x in m)
    _assert_every_update_applied(m)
    ck = out / "checkpoints"
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["best", "step_1", "step_2"], names  # no temporaries left
    assert (ck / "latest").read_text() == "step_2"
    best = min(m, key=lambda x: x["val_loss"])["step"]
    assert json.loads((ck / "best" / "alice_state.json").read_text())["step"] == best
    assert json.loads((out / "config.json").read_text())["sampler"]["augment_on"] == "device"


def test_zero0_accumulates_with_workers_and_drops_an_overflowing_update(ds_run):
    """ZeRO-0 (`zero0_bf16.json`, the one-GPU config: plain data parallel, the trainer's own overflow
    check) with 2 micro-batches per step and 2 DataLoader workers per rank: every step consumed exactly
    2 samples per rank; step 1's overflowing gradients (rank 1's first loss x 1e30) are dropped on both
    ranks, so the student is still bit-identical to its initial copy, the teacher; step 2 is applied
    and the teacher follows the fp64 EMA oracle."""
    out = ds_run(0)
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2]
    assert m[0]["optimizer_skipped"] and m[0]["skipped_updates"] == 1
    assert m[0]["grad_norm"] is None or m[0]["grad_norm"] > FP32_MAX_NORM, m[0]["grad_norm"]
    assert not m[1]["optimizer_skipped"] and 0 < m[1]["grad_norm"] < 1e6 and m[1]["skipped_updates"] == 1
    assert [x["sampler_samples"] for x in m] == [2, 4]  # per rank: batch 1 x grad_accum 2 per step
    log = _log(out)
    assert "ZeRO-0" in log and "global batch 4 = 1 x 2 x 2" in log
    assert "step 1: global gradient norm" in log and "overflows fp32, update skipped (1 in a row, 1 in total" in log
    student, teacher = _student(out, "step_1"), _teacher(out, "step_1")
    assert len(teacher) > 100 and all(torch.equal(student[k], teacher[k]) for k in teacher)
    _check_ema(out)


def test_zero0_resume_after_sigterm_to_the_launchers_process_group(ds_run, ds_launch, tmp_path):
    """What a scheduler does to `deepspeed launch/train.py`: SIGTERM to every process of the job, the
    launcher, both ranks and their 2 DataLoader workers each (`kill` sends it to rank 0's process group,
    the launcher's session, once step 2's update is applied). The workers ignore it, both ranks finish the
    step, write step_2 and exit within the launcher's 30 s grace period (the launcher itself dies of the
    signal), and no process of the job is left. Resumed from the ZeRO-0 reference's step_1 (1 + resume
    + 1; with the optimizer state of a dropped update), step 2 equals the uninterrupted run's."""
    ref = ds_run(0)
    out = tmp_path / "resumed"
    _resume_from(ref, out, "step_1")
    (proc,) = ds_launch(out, "zero0_bf16", 2, ["--grad_accum", "2", "--num_workers", "2", "--resume", "auto"],
                        env={FAULT_ENV: "term:0:2"})
    log = _log(out)
    assert proc.returncode == -signal.SIGTERM, log[-3000:]  # the launcher got the signal too
    assert "rank sends SIGTERM to its process group after step 2" in log
    assert "preemption signal: checkpoint step_2 written" in log
    assert "killed by signal" not in log and "Traceback" not in log, log[-3000:]
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_1", "step_2"]
    assert (ck / "latest").read_text() == "step_2" and [x["step"] for x in _metrics(out)] == [2]
    _assert_resumed_exactly(out, ref, 2)


def test_zero1_resume_under_torchrun_after_sigterm_to_a_ranks_process_group(ds_run, ds_launch, tmp_path):
    """torchrun starts each rank in a process group of its own and, told to stop, sends SIGTERM to each
    group (the rank and its DataLoader workers) 30 s before SIGKILL. Here `kill` does that to rank 1's
    group once step 2's update is applied: both ranks stop after step 2, write step_2 and exit 0. Resumed from
    the two-'node' ZeRO-1 fp32 reference's step_1 with 2 workers per rank (the reference had none: the
    sample stream does not depend on them), step 2 equals the reference's."""
    ref = ds_run(1)
    out = tmp_path / "resumed"
    _resume_from(ref, out, "step_1")
    (proc,) = ds_launch(out, "fp32", 2, ["--resume", "auto", "--num_workers", "2"], launcher="torchrun",
                        env={FAULT_ENV: "term:1:2"})
    log = _log(out)
    assert proc.returncode == 0, log[-3000:]
    assert "world 2 (env)" in log and "preemption signal: checkpoint step_2 written" in log
    assert "killed by signal" not in log and "Traceback" not in log, log[-3000:]
    assert [x["step"] for x in _metrics(out)] == [2]
    _assert_resumed_exactly(out, ref, 2)


def test_zero2_resume_under_srun_usr1_requeues_the_job(ds_run, ds_launch, tmp_path):
    """SLURM's time-limit warning (`--signal=USR1@120`, launch/slurm.sbatch) reaches every process of the
    job step: here `kill` sends SIGUSR1 to the step's process group (both tasks and their 2 DataLoader
    workers each) once rank 1 has applied step 2's update. Both tasks write step_2 and exit 0, and rank 0 alone
    requeues the job: `$ALICE_DS_REQUEUE 4242` (the SLURM_JOB_ID) runs once; a job that exits 0 would
    otherwise end COMPLETED. The tasks see only srun's variables, and the run is itself a restarted job:
    `--resume auto` from the ZeRO-2 bf16 reference's step_1; step 2 (validated too) equals the
    reference's, and `--keep_last 1` prunes the step_1 it started from."""
    ref = ds_run(2)
    out = tmp_path / "resumed"
    _resume_from(ref, out, "step_1")
    requeued = tmp_path / "requeued"
    recorder = tmp_path / "requeue.sh"  # stands in for `scontrol requeue`
    recorder.write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    recorder.chmod(0o755)
    procs = ds_launch(out, "zero2_bf16", 2, ["--val_every", "1", "--augment_on", "device", "--resume", "auto",
                                             "--num_workers", "2", "--keep_last", "1"],
                      launcher="slurm", env={FAULT_ENV: "usr1:1:2", REQUEUE_ENV: str(recorder)})
    logs = _log(out, 0) + "\n" + _log(out, 1)
    assert [p.returncode for p in procs] == [0, 0], logs[-6000:]
    assert "world 2 (slurm)" in logs and "preemption signal: checkpoint step_2 written" in logs
    assert f"SLURM job requeued ({recorder} 4242)" in logs
    assert requeued.read_text() == "4242\n"
    assert "killed by signal" not in logs and "Traceback" not in logs
    assert "step_1" not in [p.name for p in (out / "checkpoints").iterdir()]
    _assert_resumed_exactly(out, ref, 2)
    assert _metrics(out)[0]["val_loss"] == pytest.approx(_metrics(ref)[1]["val_loss"], abs=RESUME_ATOL)


def test_zero3_resume_under_an_mpi_launcher(ds_run, ds_launch, tmp_path):
    """`deepspeed --launcher mpich` gives each rank only MPI's variables (PMI_RANK, PMI_SIZE,
    MPI_LOCALRANKID) plus the runner's MASTER_ADDR/PORT, WORLD_SIZE and LOCAL_SIZE, and no RANK: both
    processes join one world of 2 (each used to become a world of one on the same port). Resumed from
    the ZeRO-3 bf16 reference's step_1, step 2 equals the reference's."""
    ref = ds_run(3)
    out = tmp_path / "resumed"
    _resume_from(ref, out, "step_1")
    procs = ds_launch(out, "zero3_bf16", 2, ["--overfit_one_batch", "--center_momentum", "1", "--resume", "step_1"],
                      launcher="mpi")
    log = _log(out)
    assert [p.returncode for p in procs] == [0, 0], log[-3000:] + _log(out, 1)[-3000:]
    assert "world 2 (mpi)" in log and "at step 1" in log
    _assert_resumed_exactly(out, ref, 2)


def test_zero3_offload_with_activation_checkpointing_and_accumulation_equals_zero3(ds_run, ds_launch, tmp_path):
    """`zero3_offload_bf16.json` (optimizer states and parameters offloaded to the CPU) with activation
    checkpointing and 2 accumulated micro-batches per step, on the ZeRO-3 reference's data (one batch,
    overfitted, frozen loss centers) and its peak lr (`--lr` halved for the doubled global batch): two
    half-weighted micro-batches of one batch are that batch, and recomputing activations changes no
    value, so step 1's losses, gradient norm, teacher and student equal the plain ZeRO-3 run's."""
    ref = ds_run(3)
    out = tmp_path / "offload"
    (proc,) = ds_launch(out, "zero3_offload_bf16", 1, ["--overfit_one_batch", "--center_momentum", "1",
                                                       "--checkpoint_activations", "--grad_accum", "2", "--lr", "0.1"])
    log = _log(out)
    assert proc.returncode == 0, log[-3000:]
    assert "global batch 4 = 1 x 2 x 2" in log
    (got,), want = _metrics(out), _metrics(ref)[0]
    _assert_every_update_applied([got])
    assert got["lr"] == want["lr"] and got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for k in ("loss", "cls", "patch", "recon"):
        assert abs(got[k] - want[k]) <= RESUME_ATOL, (k, got[k], want[k])
    for fn in (_teacher, _student):
        a, b = fn(out, "step_1"), fn(ref, "step_1")
        assert a.keys() == b.keys() and len(a) > 100
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=RESUME_ATOL)


def test_universal_checkpoint_resumes_under_zero3(ds_run, ds_launch, engine_inputs, tmp_path):
    """The README recipe for another world size or ZeRO stage, under ZeRO-3: the ZeRO-3 bf16 reference's
    step_1 through DeepSpeed's `ds_to_universal` (no extra flags: our checkpoints carry
    `universal_checkpoint_info`), our files copied beside it, resumed with `load_universal`: the student
    and its Adam moments come from the universal files, the fp32 teacher is reassembled from its ZeRO-3
    shards and re-partitioned. Step 2 equals the uninterrupted run's."""
    src = ds_run(3)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(src / "checkpoints" / "step_1", ckpts / "step_1")
    uni = ckpts / "step_1_universal"
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(ckpts / "step_1"), "--output_folder", str(uni), "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], env=dict(os.environ, DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for f in (ckpts / "step_1").iterdir():
        if f.name == "alice_state.json" or f.name.startswith(("teacher_fp32_rank", "state_rank")):
            shutil.copy(f, uni / f.name)
    cfg = json.loads((engine_inputs / "zero3_bf16.json").read_text())
    cfg["checkpoint"] = {"load_universal": True}
    (tmp_path / "zero3_universal.json").write_text(json.dumps(cfg))  # not into the shared inputs
    out = tmp_path / "run"
    (proc,) = ds_launch(out, tmp_path / "zero3_universal.json", 2,
                        ["--overfit_one_batch", "--center_momentum", "1", "--resume", "step_1_universal"])
    log = _log(out)
    assert proc.returncode == 0, log[-3000:]
    flat = "".join(log.split())  # the console wraps long paths
    assert "step_1_universalatstep1" in flat and "ZeRO-3" in log, log[-3000:]
    _assert_resumed_exactly(out, src, 2)


def test_nan_losses_and_overflowing_gradients_are_skipped_then_stop(ds_launch, engine_inputs, tmp_path):
    """ZeRO-1 bf16 with injected faults and max_nonfinite 2. Step 2: rank 1's first forward is NaN, so
    both ranks skip that micro-batch (warned, counted) and take the next one, whose loss rank 0 scales
    by 1e30: DeepSpeed finds the gradient norm not finite and skips the update (warned, counted;
    student and teacher stay bit-identical to step 1's). Step 3: every forward on rank 0 is NaN, so
    after 2 in a row the run stops with an error naming the last good checkpoint, step_2, which stays
    complete and `latest`; no shared memory is left behind."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text((engine_inputs / "tiny.yaml").read_text().replace("run: {", "run: {max_nonfinite: 2, "))
    out = tmp_path / "run"
    shm_before = _shm_buffers()
    (proc,) = ds_launch(out, "zero1_bf16", 4, ["--config", str(cfg)],
                        env={FAULT_ENV: "nan:1:2:1,overflow:0:2,nan:0:3"})
    log = _log(out)
    assert proc.returncode == 2, log[-3000:]  # a TrainingError is a user-facing error: exit 2
    assert _shm_buffers() == shm_before, "the run left shared memory behind"
    ck = out / "checkpoints"
    assert f"2 non-finite losses in a row at step 3: stopping; last good checkpoint: {ck / 'step_2'}" in log
    assert "step 2: non-finite loss on 1 rank(s), micro-batch skipped (1 in a row, 1 in total)" in log
    assert "step 2: global gradient norm" in log and "overflows fp32, update skipped (1 in a row, 1 in total" in log
    assert "Traceback" not in log
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2] and all(math.isfinite(x["loss"]) for x in m[:1])
    assert [x["skipped"] for x in m] == [0, 1] and [x["optimizer_skipped"] for x in m] == [False, True]
    assert (m[1]["grad_norm"], m[1]["skipped_updates"], m[1]["nonfinite_total"]) == (None, 1, 2)
    _assert_every_update_applied(m[:1])  # ZeRO-1 with bf16 autocast
    assert (ck / "latest").read_text() == "step_2"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_1", "step_2"]
    assert json.loads((ck / "step_2" / "alice_state.json").read_text())["step"] == 2
    for fn in (_teacher, _student):
        after, before = fn(out, "step_2"), fn(out, "step_1")
        assert len(before) > 100 and all(torch.equal(after[k], before[k]) for k in before)


def test_rank_failing_mid_save_leaves_no_checkpoint_that_looks_finished(ds_launch, tmp_path, capsys):
    """Rank 1's write of the step-1 checkpoint fails with "No space left on device" after DeepSpeed's files
    (a full disk; a rank killed there is the same to the others): rank 1 exits 2 with one line naming the
    checkpoint, rank 0's barrier breaks, the launcher stops the job with the status of the failed rank it
    sees first, and no process of the job is left. Nothing named step_1 exists: the partial save is the hidden
    `.step_1.tmp` without `alice_state.json` (rank 0 used to write that marker before the barrier, so
    `--resume step_1` and `alice-ds convert --tag step_1` accepted a checkpoint rank 1 never finished),
    and `--resume auto` starts fresh."""
    from alice_ds.cli import main as cli_main
    from alice_ds.engine.checkpoint import resolve_resume
    from alice_ds.errors import DataError

    out = tmp_path / "run"
    (proc,) = ds_launch(out, "zero2_bf16", 2, env={FAULT_ENV: "enospc:1:1"})
    log = _log(out)
    ck = out / "checkpoints"
    assert proc.returncode in (2, 1), log[-3000:]  # rank 1's 2, or rank 0's 1 (broken barrier) if seen first
    assert f"error: {ck / 'step_1'}: cannot write the checkpoint (No space left on device)" in log, log[-3000:]
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == [".step_1.tmp"] and not (ck / "latest").exists()
    assert not (ck / ".step_1.tmp" / "alice_state.json").exists()
    assert [x["step"] for x in _metrics(out)] == [1]
    with pytest.raises(DataError, match="no finished checkpoint here"):
        resolve_resume(ck, "step_1")
    assert resolve_resume(ck, "auto") is None
    assert cli_main(["convert", str(out), "--out", str(tmp_path / "W.safetensors"), "--tag", "step_1"]) == 2
    assert "no checkpoint tag 'step_1' (tags here: none)" in " ".join(capsys.readouterr().err.split())


def test_ranks_that_load_different_steps_stop_with_one_error(ds_run, ds_launch, tmp_path):
    """Rank 0 decides the tag and every rank checks the step it loaded: rank 1's state file says step 7
    (a stale file on node-local storage), so every rank stops before training with the same error
    listing what each rank read; nothing is trained."""
    ref = ds_run(1)
    out = tmp_path / "run"
    _resume_from(ref, out, "step_1")
    state = out / "checkpoints" / "step_1" / "state_rank1.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 7}))
    (proc,) = ds_launch(out, "fp32", 2, ["--resume", "auto"])
    log = _log(out)
    assert proc.returncode == 2, log[-3000:]
    assert ("ranks loaded different steps (per rank: alice_state.json, state_rank<r>.json, DeepSpeed) "
            "[[1, 1, 1], [1, 7, 1]]") in log, log[-3000:]
    assert not (out / "metrics.jsonl").exists() and "Traceback" not in log


class _RunsCode:
    """Unpickling this calls os.mkdir(path): a checkpoint that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_resume_refuses_a_deepspeed_pickle_that_would_run_code(ds_run, ds_launch, tmp_path):
    """DeepSpeed unpickles its checkpoint files with weights_only=False; the trainer lists every file's
    globals first and loads with weights_only=True and the DeepSpeed classes allowed. A model-states file
    that would call os.mkdir when loaded stops every rank with one error naming the file and the
    global, and nothing runs."""
    ref = ds_run(1)
    out = tmp_path / "run"
    _resume_from(ref, out, "step_1")
    f = out / "checkpoints" / "step_1" / "mp_rank_00_model_states.pt"
    states = torch.load(f, map_location="cpu", weights_only=False)  # the reference's own, trusted file
    planted = tmp_path / "planted"
    torch.save({**states, "extra": _RunsCode(str(planted))}, f)
    (proc,) = ds_launch(out, "fp32", 2, ["--resume", "auto"])
    log = _log(out)
    assert proc.returncode == 2, log[-3000:]
    assert f"error: {f}: refusing to unpickle unexpected classes ['posix.mkdir']" in log, log[-3000:]
    assert not planted.exists(), "loading the checkpoint ran its code"
    assert not (out / "metrics.jsonl").exists()
