"""Real 2-rank DeepSpeed pretraining on CPU (gloo, sanity checks on), tiny SwinUNETR (F=12, 64^3) on
phantom data. The runs are shared through the `ds_run` fixture (tests/conftest.py): ZeRO-3 overfits
one batch, ZeRO-2 validates and prunes (both bf16 autocast, no update may be skipped), ZeRO-1 runs as
two 'nodes' in fp32 and is the exact-resume reference. Two more launches inject faults (`ALICE_DS_FAULT`):
NaN losses under ZeRO-1 bf16, and a rank that dies."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from alice_ds.engine.distenv import SHM_ALLREDUCE_NAME, SHM_DIR
from alice_ds.engine.faults import FAULT_ENV, FAULT_EXIT_CODE

EMA_RTOL = 1e-6
RESUME_ATOL = 1e-5


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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
    """fp32 master weights of student + CASA (DeepSpeed's zero_to_fp32), teacher-style names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
    (relative error <= 1e-6); a step whose update DeepSpeed skipped (non-finite gradients) leaves the
    teacher as it was."""
    metrics = {m["step"]: m for m in _metrics(out)}
    last = max(metrics)
    ref = _teacher(out, "step_1")
    t1 = {k: v.clone() for k, v in ref.items()}
    for step in range(2, last + 1):
        if metrics[step]["optimizer_skipped"]:  # DeepSpeed skipped the update: no EMA either
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
    """bf16 runs: DeepSpeed skipped no update and reported a finite gradient norm every step."""
    assert not any(x["optimizer_skipped"] for x in metrics), [x["grad_norm"] for x in metrics]
    assert all(x["grad_norm"] is not None and 0 < x["grad_norm"] < 1e6 for x in metrics), metrics
    assert metrics[-1]["skipped_updates"] == 0












def _shm_buffers() -> set:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_ALLREDUCE_NAME.split("{", 1)[0])}


def test_user_mistakes_exit_2_with_one_line(engine_inputs, phantom_cache, tmp_path, capsys):
    import runpy

    main = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "launch", "train.py"))["main"]
    base = ["--config", str(engine_inputs / "tiny.yaml"), "--deepspeed_config", str(engine_inputs / "zero1_bf16.json"),
            "--json_list", str(engine_inputs / "datalist.json"), "--cache_dir", str(phantom_cache),
            "--output_dir", str(tmp_path)]
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


def test_zero2_validation_best_and_pruning(ds_run):
    out = ds_run(2)
    m = _metrics(out)
    assert all(math.isfinite(x["loss"]) for x in m)
    assert math.isfinite(m[-1]["val_loss"]) and "val_loss" not in m[0]
    _assert_every_update_applied(m)
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["best", "step_2"], tags  # keep_last 1 removed step_1; best is kept
    assert (out / "checkpoints" / "latest").read_text() == "step_2"
    assert json.loads((out / "config.json").read_text())["sampler"]["augment_on"] == "device"


def test_exact_resume_after_sigterm(ds_run, ds_launch, tmp_path):
    """Reference: the ZeRO-1 run (2 steps). Resume from its step_1; both ranks get SIGTERM when step 2
    starts (each sends it to itself, `term` fault: the same handler as a scheduler's signal, at a step
    that does not depend on the machine's load): they finish the step, checkpoint step_2 (as
    preemption) and exit 0. Step 2's losses, teacher and student equal the uninterrupted run's (N
    steps + resume + N steps with N = 1)."""
    ref = ds_run(1)
    out = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoints" / "step_1", out / "checkpoints" / "step_1")
    (out / "checkpoints" / "latest").write_text("step_1")
    (proc,) = ds_launch(out, "fp32", 2, ["--resume", "auto"], env={FAULT_ENV: "term:0:2,term:1:2"})
    assert proc.returncode == 0, (out / "launch0.log").read_text()[-3000:]
    assert "preemption signal" in (out / "launch0.log").read_text()
    assert (out / "checkpoints" / "latest").read_text() == "step_2"

    want = {x["step"]: x for x in _metrics(ref)}
    got = _metrics(out)
    assert [x["step"] for x in got] == [2]
    for k in ("loss", "cls", "patch", "recon"):
        assert abs(got[0][k] - want[2][k]) <= RESUME_ATOL, (k, got[0][k], want[2][k])
    for k in ("lr", "momentum", "optimizer_skipped"):
        assert got[0][k] == want[2][k], k
    for fn in (_teacher, _student):
        a, b = fn(out, "step_2"), fn(ref, "step_2")
        assert a.keys() == b.keys() and len(a) > 100
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=RESUME_ATOL)


def test_nan_losses_skipped_then_stop_keeps_last_checkpoint(ds_launch, engine_inputs, tmp_path):
    """ZeRO-1 bf16 with injected NaN losses and max_nonfinite 2: rank 1's first forward of step 2 is NaN,
    so both ranks skip that micro-batch (warned, counted) and finish step 2 on the next one; every
    forward of step 3 on rank 0 is NaN, so after 2 in a row the run stops with an error naming the
    last good checkpoint, step_2, which stays complete and `latest`."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text((engine_inputs / "tiny.yaml").read_text().replace("run: {", "run: {max_nonfinite: 2, "))
    out = tmp_path / "run"
    shm_before = _shm_buffers()
    (proc,) = ds_launch(out, "zero1_bf16", 4, ["--config", str(cfg)], env={FAULT_ENV: "nan:1:2:1,nan:0:3"})
    log = " ".join((out / "launch0.log").read_text().split())  # undo console line wrapping
    assert proc.returncode == 2, log[-3000:]  # a TrainingError is a user-facing error: exit 2
    assert _shm_buffers() == shm_before, "the run left shared memory behind"
    ck = out / "checkpoints"
    assert (f"2 non-finite losses in a row at step 3: stopping; last good checkpoint: {ck / 'step_2'}" in log)
    assert "step 2: non-finite loss on 1 rank(s), micro-batch skipped (1 in a row, 1 in total)" in log
    assert "Traceback" not in log
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2]
    assert [x["skipped"] for x in m] == [0, 1] and m[-1]["nonfinite_total"] == 1
    assert all(math.isfinite(x["loss"]) for x in m)
    _assert_every_update_applied(m)  # ZeRO-1 with bf16 autocast
    assert (ck / "latest").read_text() == "step_2"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_1", "step_2"]
    assert json.loads((ck / "step_2" / "alice_state.json").read_text())["step"] == 2
    teacher = _teacher(out, "step_2")
    assert len(teacher) > 100 and all(torch.isfinite(t).all() for t in teacher.values())


def test_dead_rank_takes_the_job_down(ds_launch, tmp_path):
    """Rank 1 dies (`os._exit`) when step 2 starts while rank 0 waits for it in a collective: the
    launcher kills rank 0 and exits with the dead rank's status, no process of the run is left, and
    step_1 stays the latest checkpoint."""
    import psutil

    out = tmp_path / "run"
    (proc,) = ds_launch(out, "zero2_bf16", 3, env={FAULT_ENV: "exit:1:2"}, wait=False)
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        for c in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            c.kill()
        raise AssertionError(f"the launcher hung after a rank died:\n{(out / 'launch0.log').read_text()[-3000:]}")
    log = (out / "launch0.log").read_text()
    assert rc == FAULT_EXIT_CODE, log[-3000:]
    assert "rank exits at step 2" in " ".join(log.split())
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the dead run still alive: {left}"
    assert (out / "checkpoints" / "latest").read_text() == "step_1"
    assert [x["step"] for x in _metrics(out)] == [1]


@pytest.mark.parametrize("launcher, shown", [("torchrun", "(env)"), ("slurm", "(slurm)")])
def test_torchrun_and_srun_launches(ds_launch, tmp_path, launcher, shown):
    """The same 2-rank run started by torchrun, and as srun starts it (two processes that see only
    SLURM_PROCID/LOCALID/NTASKS and the nodelist): both ranks join one world of 2 and train a step."""
    out = tmp_path / launcher
    procs = ds_launch(out, "zero2_bf16", 1, launcher=launcher)
    logs = "\n".join((out / f"launch{i}.log").read_text() for i in range(len(procs)))
    assert all(p.returncode == 0 for p in procs), logs[-3000:]
    assert f"world 2 {shown}" in " ".join(logs.split()), logs[-3000:]
    m = _metrics(out)
    assert [x["step"] for x in m] == [1] and math.isfinite(m[0]["loss"])
    assert (out / "checkpoints" / "latest").read_text() == "step_1"


def test_universal_checkpoint_resumes_on_another_world_size(ds_run, ds_launch, engine_inputs, tmp_path):
    """The README recipe: a 2-rank ZeRO-1 checkpoint through DeepSpeed's `ds_to_universal` (no extra
    flags: our checkpoints carry `universal_checkpoint_info`), our files copied beside it, resumed on
    1 rank with `load_universal`, trains the next step."""
    import sys

    src = ds_run(1)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(src / "checkpoints" / "step_2", ckpts / "step_2")
    uni = ckpts / "step_2_universal"
    r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(ckpts / "step_2"), "--output_folder", str(uni), "--num_extract_workers", "1",
                        "--num_merge_workers", "1"], env=dict(os.environ, DS_ACCELERATOR="cpu"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for f in (ckpts / "step_2").iterdir():
        if f.name == "alice_state.json" or f.name.startswith(("teacher_fp32_rank", "state_rank")):
            shutil.copy(f, uni / f.name)
    cfg = json.loads((engine_inputs / "fp32.json").read_text())
    cfg["checkpoint"] = {"load_universal": True}
    (tmp_path / "fp32_universal.json").write_text(json.dumps(cfg))  # not into the shared inputs
    out = tmp_path / "run"
    (proc,) = ds_launch(out, tmp_path / "fp32_universal.json", 3, ["--resume", "step_2_universal"], ranks=1)
    log = (out / "launch0.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    flat = "".join(log.split())  # the console wraps long paths
    assert "step_2_universalatstep2" in flat and "world1(env)" in flat, log[-3000:]
    m = _metrics(out)
    assert [x["step"] for x in m] == [3] and math.isfinite(m[0]["loss"]), m
