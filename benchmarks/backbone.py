"""Backbone speed: our SwinBackbone vs MONAI SwinUNETR with identical weights.

Times the student's work (forward + backward of a scalar of the output, batch B, one crop size) and
the teacher's (forward under no_grad), for MONAI, ours, and ours with activation checkpointing.
Variants are run interleaved (A, B, C, A, B, C, ...) so that load drifting on a shared machine hits
all of them alike; the ratio to MONAI is taken within each round, and its median is reported.
FLOPs of each variant are counted once (PyTorch's FlopCounterMode: matrix products, convolutions,
attention) to give the achieved TFLOP/s, and on a known GPU under `--bf16` the MFU (fraction of the
datasheet dense bf16 peak). Checkpointing recomputes the forward: its MFU counts that work too.

    python benchmarks/backbone.py --feature_size 24 --roi 96 --repeats 5 --json work/bench_backbone.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from alice_ds.engine.flops import count_flops, datasheet_tflops

MIN_TRAIN_ROI = 64
"""At 32^3 the deepest grid is one voxel, and instance norm cannot train on a single voxel."""
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--feature_size", type=int, default=24, help="SwinUNETR feature size F (multiple of 12)")
    p.add_argument("--roi", type=int, default=96, help="cubic crop side in voxels (multiple of 32)")
    p.add_argument("--batch", type=int, default=1, help="crops per forward")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast (CUDA); fp32 otherwise")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN times its convolution algorithms "
                        "once per shape; the trainer does this on CUDA)")
    p.add_argument("--channels_last", action="store_true", help="weights and input in channels_last_3d")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile(ours) in place of ours (MONAI and the checkpointed variant stay "
                        "eager; compilation happens in the untimed warm-up)")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after timing, profile one `ours fwd+bwd` and print its K most expensive ops")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (every timing) to OUT")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from monai.networks.nets import SwinUNETR

    import alice_ds
    from alice_ds.console import console, progress, table
    from alice_ds.models import SwinBackbone

    if args.roi % 32 or args.roi < MIN_TRAIN_ROI:
        raise SystemExit(f"error: --roi must be a multiple of 32 and at least {MIN_TRAIN_ROI}, got {args.roi}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    f, r, b = args.feature_size, args.roi, args.batch

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    ours = SwinBackbone(f, seed=0).to(device, memory_format=fmt)
    ours_ckpt = SwinBackbone(f, checkpoint_activations=True, seed=0).to(device, memory_format=fmt)
    monai_net = SwinUNETR(in_channels=1, out_channels=1, feature_size=f).to(device)
    monai_net.load_state_dict(ours.monai_state_dict(), strict=True)
    monai_net = monai_net.to(memory_format=fmt)
    x = torch.rand(b, 1, r, r, r, generator=torch.Generator().manual_seed(0)).to(device).contiguous(
        memory_format=fmt)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def train_step(net, recon_of):
        def run():
            net.zero_grad(set_to_none=True)
            with autocast():
                out = recon_of(net(x))
            out.float().square().mean().backward()
        return run

    def teacher_forward(net, recon_of):
        def run():
            with torch.no_grad(), autocast():
                recon_of(net(x))
        return run

    def monai_recon(out):
        return out

    def ours_recon(out):
        return out.recon

    variants = {
        "MONAI fwd+bwd": train_step(monai_net, monai_recon),
        "ours fwd+bwd": train_step(ours, ours_recon),
        "ours ckpt fwd+bwd": train_step(ours_ckpt, ours_recon),
        "MONAI fwd (no_grad)": teacher_forward(monai_net, monai_recon),
        "ours fwd (no_grad)": teacher_forward(ours, ours_recon),
    }
    flops = {name: count_flops(run) for name, run in variants.items()}  # eager, also a warm-up of each
    if args.compile:
        compiled = torch.compile(ours)
        variants["ours fwd+bwd"] = train_step(compiled, ours_recon)
        variants["ours fwd (no_grad)"] = teacher_forward(compiled, ours_recon)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() \
        or platform.machine()
    peak_tflops = datasheet_tflops(device_name) if device.type == "cuda" and args.bf16 else None
    times: dict[str, list[float]] = {k: [] for k in variants}
    peak: dict[str, int] = {}
    with progress() as bar:
        task = bar.add_task("backbone benchmark", total=(args.warmup + args.repeats) * len(variants))
        for i in range(args.warmup + args.repeats):
            for name, run in variants.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
                bar.advance(task)

    med = {k: statistics.median(v) for k, v in times.items()}

    def baseline_of(name: str) -> str:
        return "MONAI fwd+bwd" if "fwd+bwd" in name else "MONAI fwd (no_grad)"

    # ratio within each interleaved round, then the median: robust to load drifting between rounds
    paired = {k: statistics.median(t / b for t, b in zip(v, times[baseline_of(k)])) for k, v in times.items()}
    tflops_s = {k: flops[k] / m / 1e12 for k, m in med.items()}  # achieved, at the median time
    rows = []
    for name, m in med.items():
        row = [name, f"{m:.3f}", f"{min(times[name]):.3f}", f"{paired[name]:.2f}",
               f"{flops[name] / 1e9:.1f}", f"{tflops_s[name]:.3g}"]
        if peak_tflops:
            row.append(f"{100 * tflops_s[name] / peak_tflops:.1f}")
        if device.type == "cuda":
            row.append(f"{peak[name] / 2**30:.2f}")
        rows.append(row)
    cols = ["variant", "median s", "min s", "time / MONAI (paired median)", "GFLOP", "TFLOP/s"]
    cols += [f"MFU % of {peak_tflops}"] if peak_tflops else []
    cols += ["peak GiB"] if device.type == "cuda" else []
    title = (f"SwinBackbone vs MONAI SwinUNETR, F={f}, {r}^3, batch {b}, {device.type}"
             f"{' bf16' if args.bf16 else ' fp32'}, {args.repeats} runs"
             + "".join(f", {k}" for k in ("cudnn_benchmark", "channels_last", "compile") if getattr(args, k)))
    console.print(table(title, cols, rows))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            variants["ours fwd+bwd"]()
            sync()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.profile, max_name_column_width=60))

    if args.json:
        report = {
            "device": device_name,
            "threads": torch.get_num_threads(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "monai": __import__("monai").__version__, "alice_ds": alice_ds.__version__},
            "config": vars(args),
            "seconds": times,
            "median_s": med,
            "ratio_vs_monai_paired_median": paired,
            "peak_bytes": peak,
            "flops": flops,
            "tflops_per_s": tflops_s,
            "datasheet_bf16_tflops": peak_tflops,
            "mfu": {k: v / peak_tflops for k, v in tflops_s.items()} if peak_tflops else None,
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
