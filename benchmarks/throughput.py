"""Training throughput by phase, per ZeRO stage, against the loop a user of the published code gets.

Ours is the real `Trainer` step (alice_ds.engine.trainer: the DeepSpeed engine, the pair sampler's
DataLoader, the fp32 teacher EMA), built from the same flags as `launch/train.py`, one trainer per
ZeRO stage in one process group. Its phases are timed by wrapping the trainer's own calls, nothing
else changes: data wait (the next batch from the loader), teacher forward and student forward (hooks
on the two backbones), the rest of the forward (heads, CASA, losses), backward, optimizer
(`engine.step`: under ZeRO-1/2/3 DeepSpeed's gradient reduction and partition exchange are split
between backward and this) and EMA; `other` is the rest of the step (copies to the device, the
step's statistics all-reduce, bookkeeping). On CUDA every phase boundary synchronises the device.

`--baseline reference` runs, in the same invocation, the reference-style loop: plain PyTorch (DDP
when the world is larger than one), fp32 (fp16 autocast with a gradient scaler on CUDA under
--bf16), batch 1 per process, each view through each backbone in its own call with the teacher's
whole decoder, and per pair one random query point matched by a whole-volume search, retried up to
101 times below the score threshold (benchmarks/sampler.py's `ReferenceSampler`), in the training
loop. Its losses are ours (Triton kernels on CUDA), so its time is a lower bound of the reference's.

Data: full-size phantoms preprocessed to 2 mm with ground-truth (oracle) SAM embeddings, made in
`--work_dir` once and reused.

    DS_ACCELERATOR=cpu python benchmarks/throughput.py --preset tiny --roi 64 --zero 0 1 2 3 --baseline reference
    deepspeed --num_gpus 1 benchmarks/throughput.py --preset B --roi 96 --bf16 --batch_size 4 --zero 2 \\
        --baseline reference --json out.json
    torchrun --nproc_per_node 8 benchmarks/throughput.py --preset B --roi 96 --bf16 --zero 1 2 3

Rates on a shared CPU are noisy: quote the ratios of one run, absolute figures only from a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

PHASES = ("data", "teacher_fwd", "student_fwd", "rest_fwd", "backward", "optimizer", "ema", "other")
REPO = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds per phase of the current step; `span(name)` times a block, synchronising CUDA first."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spent: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}
        self.seconds: list[float] = []  # per timed step
        self.phases: list[dict] = []  # per timed step: seconds by PHASES

    def end_step(self, total: float) -> None:
        """Keep the step that just ended (`total` seconds): the forward's rest beside the backbones',
        `other` what no phase covers."""
        ph = dict(self.spent)
        ph["rest_fwd"] = ph.pop("forward") - ph["teacher_fwd"] - ph["student_fwd"]
        ph["other"] = total - sum(ph.values())
        self.seconds.append(total)
        self.phases.append(ph)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def span(self, name: str):
        t0 = self.now()
        try:
            yield
        finally:
            self.spent[name] += self.now() - t0

    def start(self, name: str) -> None:
        self._open[name] = self.now()

    def stop(self, name: str) -> None:
        self.spent[name] += self.now() - self._open.pop(name)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.span(name):
                return fn(*args, **kwargs)
        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop(name))


def step_row(seconds: list[float], phases: list[dict], samples: int, flops: int | None,
             world: int, peak: float | None) -> dict:
    """Medians over the timed steps: step seconds, samples/s (all ranks), ms per phase, TFLOP/s per
    device and MFU where the FLOPs and the device's peak are known."""
    step = statistics.median(seconds)
    row = {"step_s": step, "samples_per_s": samples / step,
           "phases_ms": {p: 1e3 * statistics.median(ph.get(p, 0.0) for ph in phases) for p in PHASES}}
    if flops:
        row["tflops_per_device"] = flops * samples / step / world / 1e12
        row["mfu"] = row["tflops_per_device"] / peak if peak else None
    return row


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset, or on the CPU the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def ds_config_for(stage: int, bf16: bool, out: Path, offload: bool = False) -> Path:
    """ds_configs/zero<stage>_bf16.json (zero3_offload_bf16.json with `offload`: optimizer state and
    parameters in CPU memory), without the bf16 autocast unless asked."""
    name = "zero3_offload_bf16" if offload else f"zero{stage}_bf16"
    if offload and stage != 3:
        raise SystemExit(f"--offload needs ZeRO-3, got ZeRO-{stage}")
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    if not bf16:
        ds.pop("torch_autocast", None)
    path = out / f"ds_{name}{'' if bf16 else '_fp32'}.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def train_flags(args, data: Path, cache: Path, embed: Path, out: Path, ds_json: Path) -> list[str]:
    return ["--preset", args.preset, "--roi", str(args.roi), "--batch_size", str(args.batch_size),
            "--deepspeed_config", str(ds_json), "--data_dir", str(data), "--json_list",
            str(data.parent / "datalist.json"), "--cache_dir", str(cache), "--embed_dir", str(embed),
            "--output_dir", str(out), "--num_steps", str(args.warmup + args.steps), "--val_every", "0",
            "--save_every", "0", "--num_workers", str(args.num_workers), "--warmup_steps", "1",
            "--checkpoint_activations", "on" if args.checkpoint_activations else "off"]


def time_ours(args, env, flags_argv: list[str]) -> dict:
    """The real trainer's step, `args.warmup` untimed then `args.steps` timed."""
    from alice_ds.engine import flags
    from alice_ds.engine.runtime import preflight
    from alice_ds.engine.trainer import Trainer

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    cfg, ds_config = preflight(flags.config_from_args(parser.parse_args(flags_argv)), env)
    trainer = Trainer(cfg, env, ds_config)
    device = trainer.engine.device
    clock = Clock(device.type == "cuda")
    clock.hook(trainer.module.teacher.backbone, "teacher_fwd")
    clock.hook(trainer.module.student.backbone, "student_fwd")
    clock.hook(trainer.module, "forward")
    trainer.engine.backward = clock.wrap("backward", trainer.engine.backward)
    trainer.engine.step = clock.wrap("optimizer", trainer.engine.step)
    trainer.ema.update = clock.wrap("ema", trainer.ema.update)
    source = trainer._batches()

    def batches():
        while True:
            with clock.span("data"):
                batch = next(source)
            yield batch

    stream = batches()
    trainer.engine.train()
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock.spent.clear()
            t0 = clock.now()
            trainer.train_step(stream)
            if i >= args.warmup:
                clock.end_step(clock.now() - t0)
    finally:
        source.close()
    samples = cfg.run.batch_size * cfg.run.grad_accum * env.world_size
    row = step_row(clock.seconds, clock.phases, samples, trainer.flops_per_sample, env.world_size,
                   trainer.peak_tflops)
    row.update(zero=trainer.zero_stage, peak_mem_gib=peak_memory_gib(device),
               gflop_per_sample=trainer.flops_per_sample / 1e9)
    return row


class ReferenceStep(torch.nn.Module):
    """The reference-style forward: each view through each backbone in its own call, the teacher's
    decoder run to the end; heads, CASA and losses as ours."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, views, masks, step):
        m = self.m
        with torch.no_grad():
            t_out = [m.teacher.backbone(x, None) for x in views]
            t_cls = [m.teacher.head.forward_cls(o.global_feat) for o in t_out]
        s_out = [m.student.backbone(x, k) for x, k in zip(views, masks)]
        s_cls = [m.student.head.forward_cls(o.global_feat) for o in s_out]
        s_patch, t_patch, _ = m._patch_logits(s_out, t_out)
        return m.loss(s_cls, t_cls, s_patch, t_patch, recon=[o.recon for o in s_out], target=views,
                      masks=masks, step=step)


def time_reference(args, env, cache: Path, embed: Path, flags_argv: list[str]) -> dict:
    from alice_ds.engine import flags
    from alice_ds.engine.runtime import preflight
    from alice_ds.method import AliceMetaArch
    from alice_ds.models.swin import PATCH_SIZE
    from alice_ds.sampler.masks import block_mask
    from benchmarks.sampler import ReferenceSampler

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    cfg, _ = preflight(flags.config_from_args(parser.parse_args(flags_argv)), env)
    device = torch.device(f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    module = AliceMetaArch(cfg.model, cfg.loss).to(device).train()
    step_fn = ReferenceStep(module)
    if env.world_size > 1:
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=[device.index] if device.index
                                                            is not None else None)
    trained = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.04)
    fp16 = args.bf16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    sampler = ReferenceSampler(cache, embed, args.roi, cfg.sampler.score_threshold, cfg.run.seed + env.rank)
    rng = np.random.default_rng(cfg.run.seed + env.rank)
    grid = (args.roi // PATCH_SIZE,) * 3
    clock = Clock(device.type == "cuda")
    clock.hook(module.teacher.backbone, "teacher_fwd")  # two calls each per step: their times add up
    clock.hook(module.student.backbone, "student_fwd")
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock.spent.clear()
        t0 = clock.now()
        with clock.span("data"):
            query, anchor, _ = sampler.pair()
            views = [v[None].to(device) for v in (query, anchor)]  # [1, 1, R, R, R]
            masks = [torch.from_numpy(block_mask(grid, cfg.sampler.mask_ratio, cfg.sampler.mask_block // PATCH_SIZE,
                                                 rng))[None].to(device) for _ in views]
        with clock.span("forward"), torch.autocast(device.type, torch.float16, enabled=fp16):
            out = step_fn(views, masks, i)
        with clock.span("backward"):
            scaler.scale(out["loss"]).backward()
        with clock.span("optimizer"):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trained, 3.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            module.loss.update_centers(**out["center_sums"])
        with clock.span("ema"), torch.no_grad():
            for ps, pt in zip(module.student.parameters(), module.teacher.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
        if i >= args.warmup:
            clock.end_step(clock.now() - t0)
    row = step_row(clock.seconds, clock.phases, env.world_size, None, env.world_size, None)
    row.update(zero=None, peak_mem_gib=peak_memory_gib(device), match_tries=float(np.mean(sampler.tries)))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, B, L, H)")
    p.add_argument("--roi", type=int, default=64, help="crop side in voxels (multiple of 32; >= 64 to train)")
    p.add_argument("--batch_size", type=int, default=1, help="pairs per process per step (ours)")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3],
                   help="ZeRO stages to time, one trainer each")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for ours (fp16 autocast for the baseline on CUDA); fp32 otherwise")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of our sampler")
    p.add_argument("--checkpoint_activations", action="store_true", help="activation checkpointing (ours)")
    p.add_argument("--offload", action="store_true", help="ZeRO-3 with optimizer and parameters offloaded to CPU")
    p.add_argument("--baseline", choices=["none", "reference"], default="none",
                   help="also time the reference-style loop (see above)")
    p.add_argument("--num_cases", type=int, default=4, help="phantom cases in the benchmark data")
    p.add_argument("--work_dir", type=Path, default=None, help="data and run folders (reused); default: a temp dir")
    p.add_argument("--json", type=Path, default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)

    from alice_ds.console import console, table
    from alice_ds.engine.distenv import setup_env
    from alice_ds.engine.runtime import distributed
    from benchmarks.sampler import build_data

    env = setup_env()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="alice_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    if env.rank == 0:
        build_data(work / "data", args.num_cases, seed=0, spacing=2.0)
    rows = {}
    with distributed(env):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 made the data
        data, cache, embed = work / "data" / "phantom", work / "data" / "cache", work / "data" / "embed"
        for stage in args.zero:
            out = work / f"run_zero{stage}"
            ds_json = ds_config_for(stage, args.bf16, work, args.offload)
            rows[f"ZeRO-{stage}"] = time_ours(args, env, train_flags(args, data, cache, embed, out, ds_json))
        if args.baseline == "reference":
            rows["reference"] = time_reference(args, env, cache, embed,
                                               train_flags(args, data, cache, embed, work / "run_ref",
                                                           ds_config_for(0, False, work)))
    if env.rank != 0:
        return 0
    names = list(rows)
    body = [["samples/s", *[f"{rows[n]['samples_per_s']:.3f}" for n in names]],
            ["step s", *[f"{rows[n]['step_s']:.2f}" for n in names]],
            *[[f"{ph} ms", *[f"{rows[n]['phases_ms'][ph]:.0f}" for n in names]] for ph in PHASES],
            ["TFLOP/s per device", *[f"{rows[n]['tflops_per_device']:.3g}" if "tflops_per_device" in rows[n] else "-"
                                     for n in names]],
            ["MFU", *[f"{rows[n]['mfu']:.1%}" if rows[n].get("mfu") else "-" for n in names]],
            ["peak GiB" + ("" if torch.cuda.is_available() else " (process RSS)"),
             *[f"{rows[n]['peak_mem_gib']:.2f}" for n in names]]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    console.print(table(f"throughput: preset {args.preset}, {args.roi}^3, batch {args.batch_size}/process, "
                        f"world {env.world_size}, {'bf16' if args.bf16 else 'fp32'}, {device}", ["", *names], body))
    result = {"device": device, "world": env.world_size, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    if "reference" in rows:
        ref = rows["reference"]["samples_per_s"]
        result["speedup_vs_reference"] = {k: r["samples_per_s"] / ref for k, r in rows.items() if k != "reference"}
        console.print("speed-up over the reference-style loop (samples/s ratio): " + ", ".join(
            f"{k} {v:.2f}x" for k, v in result["speedup_vs_reference"].items()), highlight=False)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `benchmarks.sampler` when run as a script
    sys.exit(main())
