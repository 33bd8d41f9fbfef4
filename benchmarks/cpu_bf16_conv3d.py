"""Standalone repro of the CPU bf16 Conv3d weight-gradient bug (plain PyTorch, no DeepSpeed), and a
check of the trainer's workaround (`alice_ds.engine.cpu_bf16`).

For each case: a Conv3d (or MONAI's `UnetResBlock`, SwinUNETR's `encoder10`), forward + backward of a
random output gradient under `torch.autocast("cpu", torch.bfloat16)`, `--trials` random inputs; a
trial is *bad* when the weight gradient is not finite or its largest entry exceeds 100x the fp32
reference's (bf16 rounding alone stays within a few percent). Variants: `autocast` (as PyTorch does
it), `no_onednn` (`torch.backends.mkldnn.flags(enabled=False)` around forward and backward) and
`guarded` (our workaround). Prints one line per case and variant: bad trials / trials, worst ratio.

    python benchmarks/cpu_bf16_conv3d.py --trials 40 [--json work/cpu_bf16_conv3d.json]

Takes ~3 min with 40 trials on 2 shared cores (the kernel-5 and UnetResBlock cases dominate).
"""

from __future__ import annotations

import argparse
import json
import platform

BAD_RATIO = 100.0
"""max|bf16 weight grad| / max|fp32 weight grad| above which a trial counts as bad."""

CASES = [
    # (name, in channels, out channels, input [D, H, W], kernel, padding, batch, memory format)
    ("encoder10 F=12 roi64", 192, 192, (2, 2, 2), 3, 1, 1, "contiguous"),
    ("  batch 2", 192, 192, (2, 2, 2), 3, 1, 2, "contiguous"),
    ("  channels_last_3d", 192, 192, (2, 2, 2), 3, 1, 1, "channels_last"),
    ("  48 channels", 48, 48, (2, 2, 2), 3, 1, 1, "contiguous"),
    ("  24 channels", 24, 24, (2, 2, 2), 3, 1, 1, "contiguous"),
    ("  16 channels", 16, 16, (2, 2, 2), 3, 1, 1, "contiguous"),
    ("depth 2, 4x4", 192, 192, (2, 4, 4), 3, 1, 1, "contiguous"),
    ("depth 4, 4x2", 192, 192, (4, 4, 2), 3, 1, 1, "contiguous"),
    ("depth 1, 2x2", 192, 192, (1, 2, 2), 3, 1, 1, "contiguous"),
    ("depth 3 (roi 96)", 192, 192, (3, 3, 3), 3, 1, 1, "contiguous"),
    ("depth 4 (roi 128)", 192, 192, (4, 4, 4), 3, 1, 1, "contiguous"),
    ("depth 4, kernel 5", 192, 192, (4, 4, 4), 5, 2, 1, "contiguous"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="random inputs per case and variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="write every count to OUT")
    return p.parse_args(argv)


def _trial(module, x, variant: str, gen):
    """Weight gradient of the first conv of `module` under the variant, and its fp32 reference."""
    import contextlib

    import torch

    weight = next(m for m in module.modules() if isinstance(m, torch.nn.Conv3d)).weight
    onednn = torch.backends.mkldnn.flags(enabled=False) if variant == "no_onednn" else contextlib.nullcontext()
    with onednn:
        module.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            y = module(x)
        grad_out = torch.randn(y.shape, generator=gen)
        y.backward(grad_out.to(y.dtype))
    got = weight.grad.clone()
    module.zero_grad()
    module(x).backward(grad_out)
    return got, weight.grad.clone()


def run_case(module, shape, batch: int, fmt: str, trials: int, variant: str, seed: int) -> tuple[int, float]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    bad, worst = 0, 0.0
    for _ in range(trials):
        x = torch.randn(batch, module_in_channels(module), *shape, generator=gen)
        if fmt == "channels_last":
            x = x.to(memory_format=torch.channels_last_3d)
        got, ref = _trial(module, x, variant, gen)
        ratio = float(got.abs().max() / ref.abs().max()) if torch.isfinite(got).all() else float("inf")
        worst = max(worst, ratio)
        bad += ratio > BAD_RATIO
    return bad, worst


def module_in_channels(module) -> int:
    import torch

    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv3d)).in_channels


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # mkldnn.flags() noise
    from monai.networks.blocks import UnetResBlock

    from alice_ds.engine.cpu_bf16 import guard_cpu_bf16_conv3d

    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, oneDNN {torch.backends.mkldnn.is_available()}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    cases = [(name, torch.nn.Conv3d(cin, cout, k, padding=pad), shape, b, fmt)
             for name, cin, cout, shape, k, pad, b, fmt in CASES]
    block = UnetResBlock(3, 192, 192, kernel_size=3, stride=1, norm_name="instance")
    cases.append(("UnetResBlock (encoder10) roi64", block, (2, 2, 2), 1, "contiguous"))
    report = []
    for name, module, shape, batch, fmt in cases:
        for variant in ("autocast", "no_onednn", "guarded"):
            m = module
            if variant == "guarded":
                import copy

                m = copy.deepcopy(module)
                guard_cpu_bf16_conv3d(m)
            bad, worst = run_case(m, shape, batch, fmt, args.trials, variant, args.seed)
            report.append({"case": name, "variant": variant, "shape": shape, "batch": batch, "bad": bad,
                           "trials": args.trials, "worst_ratio": worst})
            print(f"{name:32s} {variant:10s} bad {bad:3d}/{args.trials}  worst max-ratio {worst:.3g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
