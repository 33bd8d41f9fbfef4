"""Which SDPA kernel takes the Swin window attention on this GPU, with and without the padding to
`SDPA_ALIGN` tokens (alice_ds.models.swin.WindowAttention.align), per stage of a preset.

For each stage (window tokens n, heads, head dim, with and without the shift mask) one forward and
backward runs with only the memory-efficient kernel allowed: `ok` or the reason PyTorch gives;
then the default dispatch is timed (median of `--repeats`, bf16 autocast) padded and unpadded.

    python benchmarks/sdpa_windows.py --preset B --roi 96 --batch 2 [--json OUT]

Needs CUDA (on the CPU SDPA has no memory-efficient kernel to choose).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B")
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--batch", type=int, default=2, help="crops per call")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from alice_ds.models.swin import NUM_HEADS, PATCH_SIZE, PRESETS, SDPA_ALIGN, WindowAttention

    if not torch.cuda.is_available():
        print("sdpa_windows: needs CUDA", file=sys.stderr)
        return 2
    f = PRESETS[args.preset]
    rows = []
    for stage, heads in enumerate(NUM_HEADS):
        dim, grid = f * 2 ** stage, args.roi // PATCH_SIZE // 2 ** stage
        w = min(7, grid)
        n, nw = w ** 3, (-(-grid // w)) ** 3
        attn = WindowAttention(dim, heads, (7, 7, 7)).cuda()
        x = torch.randn(args.batch * nw, n, dim, device="cuda", requires_grad=True)
        for shifted in (False, True) if grid > 7 else (False,):
            mask = torch.where(torch.rand(nw, n, n, device="cuda") < 0.2, -100.0, 0.0) if shifted else None
            row = {"stage": stage + 1, "tokens": n, "heads": heads, "head_dim": dim // heads, "shifted": shifted}
            for align in (1, SDPA_ALIGN):
                attn.align = align
                with warnings.catch_warnings(record=True) as caught, torch.autocast("cuda", torch.bfloat16):
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                            attn(x, mask).float().sum().backward()
                        row[f"efficient_align{align}"] = "ok"
                    except RuntimeError as e:
                        reasons = "; ".join(str(w.message) for w in caught)[:300]
                        row[f"efficient_align{align}"] = f"no: {reasons or str(e)[:200]}"
                times = []
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.autocast("cuda", torch.bfloat16):
                        attn(x, mask).float().sum().backward()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row[f"ms_align{align}"] = 1e3 * statistics.median(times)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
