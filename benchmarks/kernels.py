"""Time and peak memory of the fused losses against the plain-PyTorch reference, forward + backward.

    python benchmarks/kernels.py [--json OUT] [--quick] [--dtype float32|bfloat16] [--max_mem_gib G]

Centered cross-entropy at (N, K) in {(4096, 512), (65536, 8192), (16384, 65536)} and the masked
reconstruction MSE at B=8, 96³ (mask ratio 0.75 on 2-voxel blocks). On CUDA: Triton vs eager, with
achieved GB/s (bytes the fused path must move: CE 7·N·K·itemsize for two sweeps over s and t, the
gradient write and the in-place backward scale; MSE 5·voxels·itemsize + mask) and, for known devices,
the fraction of the datasheet memory bandwidth. Elsewhere: the chunked PyTorch path vs the reference;
a case whose reference would not fit in `--max_mem_gib` is run with N halved until it fits (the row says which N ran).

Peak memory is measured per case in a fresh subprocess, as the extra memory above what the inputs
already hold: on CUDA `torch.cuda.max_memory_allocated()` minus the allocation before the step; on
CPU the resident-set high-water mark (`VmHWM`, reset just before the step by writing 5 to
`/proc/self/clear_refs`) minus the resident set size just before it. The case subprocess runs with a
fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_), so every block above it goes back to the OS
when freed and RSS tracks the live tensors (with glibc's default dynamic threshold a freed 13 MiB
gradient stays in the heap and the next step's gradient appears to cost nothing). Both count the
returned gradient. Times are the median of `--repeats` steps after one warm-up step and the memory
step; compare them only within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CE_SIZES = [(4096, 512), (65536, 8192), (16384, 65536)]
QUICK_CE_SIZES = [(1024, 512), (4096, 8192)]
RECON_B, RECON_SIDE = 8, 96
QUICK_RECON_B = 2
MASK_BLOCK, MASK_RATIO = 2, 0.75
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
DATASHEET_GB_S = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                  "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
                  "A100 80GB PCIe": 1935}
"""Memory bandwidth from NVIDIA datasheets, keyed by a substring of `torch.cuda.get_device_name()`."""
REF_CE_FP32_COPIES = 7
"""Upper estimate of the [N, K] fp32 tensors the reference CE holds at its peak (inputs included),
used only to shrink N on CPU so the case fits in --max_mem_gib; the measured peak is reported."""
REF_MSE_FP32_COPIES = 10
BYTES_PER_KIB = 1024
TABLE_WIDTH = 110
MMAP_THRESHOLD = 1 << 17
"""Bytes; glibc's default starting value, made fixed (setting it disables the dynamic threshold)."""
"""Columns of the result table even when stderr is not a terminal (rich would default to 80)."""


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def case_env() -> dict:
    """Environment of a case subprocess: glibc returns every block above MMAP_THRESHOLD on free."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * BYTES_PER_KIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _make_case(case):
    """Inputs, a fwd+bwd closure, a closure that drops the gradient, and the bytes the fused path
moves, for one case (run inside the case subprocess)."""
    import torch

    from alice_ds.losses import centered_cross_entropy, masked_mse, reference
    dev = case["device"]
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator(device=dev).manual_seed(0)
    impl = case["impl"]
    if case["op"] == "centered_ce":
        n, k = case["N"], case["K"]
        s = torch.randn(n, k, generator=g, device=dev).to(dtype).requires_grad_()
        t = torch.randn(n, k, generator=g, device=dev).to(dtype)
        c = torch.zeros(k, device=dev)

        def clear():
            s.grad = None

        def step():
            if impl in ("reference", "eager"):
                loss = reference.centered_cross_entropy(s, t, c, STUDENT_TEMP, TEACHER_TEMP)
            else:
                loss = centered_cross_entropy(s, t, c, STUDENT_TEMP, TEACHER_TEMP, impl=impl)
            loss.mean().backward()
        # fused bytes: 2 sweeps reading s and t, the gradient written, then scaled in place
        fused_bytes = 7 * n * k * s.element_size()
        return step, clear, fused_bytes
    b, side = case["N"], RECON_SIDE
    p = torch.rand(b, 1, side, side, side, generator=g, device=dev).to(dtype).requires_grad_()
    tg = torch.rand(b, 1, side, side, side, generator=g, device=dev).to(dtype)
    cells = side // MASK_BLOCK
    m = torch.rand(b, cells, cells, cells, generator=g, device=dev) < MASK_RATIO

    def clear():
        p.grad = None

    def step():
        if impl in ("reference", "eager"):
            loss = reference.masked_mse(p, tg, m, MASK_BLOCK)
        else:
            loss = masked_mse(p, tg, m, MASK_BLOCK, impl=impl)
        loss.backward()
    # read pred, target, mask; write the gradient; backward reads and writes it again
    fused_bytes = 5 * p.numel() * p.element_size() + m.numel()
    return step, clear, fused_bytes


def run_case(case) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    import torch
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    step, clear, fused_bytes = _make_case(case)
    dev = case["device"]
    step()  # warm-up: one-time allocations (autograd engine, kernel compilation) stay out of the peak
    clear()  # the gradient is freed before "before" is read, so the peak counts the new one
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        _reset_peak_rss()
        before = _rss_bytes()
        step()
        peak = _peak_rss_bytes() - before
    times = []
    for _ in range(case["repeats"]):
        clear()
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    row = dict(case, ms=round(ms, 3), peak_mem_bytes=int(peak))
    if dev == "cuda" and case["impl"] == "triton":
        row["GB_s"] = round(fused_bytes / (ms * 1e-3) / 1e9, 1)
    return row


def _device_name(dev: str) -> str:
    import torch
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def build_cases(args) -> list[dict]:
    dev = args.device
    impls = ["triton", "eager"] if dev == "cuda" else ["chunked", "reference"]
    budget = args.max_mem_gib * 2**30
    itemsize = 4
    cases = []
    for n_req, k in (QUICK_CE_SIZES if args.quick else CE_SIZES):
        n = n_req
        while dev != "cuda" and n > 1 and n * k * itemsize * REF_CE_FP32_COPIES > budget:
            n //= 2
        for impl in impls:
            cases.append(dict(op="centered_ce", N=n, K=k, N_requested=n_req, impl=impl))
    b_req = QUICK_RECON_B if args.quick else RECON_B
    b = b_req
    while dev != "cuda" and b > 1 and b * RECON_SIDE**3 * itemsize * REF_MSE_FP32_COPIES > budget:
        b //= 2
    for impl in impls:
        cases.append(dict(op="masked_mse", N=b, K=RECON_SIDE**3, N_requested=b_req, impl=impl))
    for c in cases:
        c.update(device=dev, dtype=args.dtype, repeats=args.repeats, threads=args.threads)
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="OUT", help="also write the rows as a JSON list to OUT")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (N·K up to 4096·8192, B=2 volumes) for a fast smoke run")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="input dtype of logits and volumes (losses accumulate in fp32 either way)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed fwd+bwd steps per case, after a warm-up step and the memory step "
                         "(median reported)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per case (0: torch's default). On a shared, oversubscribed "
                         "machine 1 gives steadier timings")
    ap.add_argument("--max_mem_gib", type=float, default=6.0,
                    help="CPU only: halve N until the reference's estimated peak fits in this many GiB")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row
    args = ap.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0, got {args.threads}")
    if args.max_mem_gib <= 0:
        ap.error(f"--max_mem_gib must be > 0, got {args.max_mem_gib}")

    import torch
    import triton
    from rich.console import Console

    from alice_ds.console import console, progress, table
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    device_name = _device_name(args.device)
    rows = []
    cases = build_cases(args)
    with progress() as bar:
        task = bar.add_task("kernel benchmark", total=len(cases))
        for case in cases:
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                  capture_output=True, text=True, env=case_env())
            if proc.returncode != 0:
                console.print(proc.stderr[-2000:])
                raise SystemExit(f"case {case} failed with exit code {proc.returncode}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(device_name=device_name, torch=torch.__version__, triton=triton.__version__)
            peak_bw = next((v for key, v in DATASHEET_GB_S.items() if key in device_name), None)
            if "GB_s" in row and peak_bw:
                row["bandwidth_fraction"] = round(row["GB_s"] / peak_bw, 3)
            rows.append(row)
            bar.advance(task)

    fused = "triton" if args.device == "cuda" else "chunked"
    base = {(r["op"], r["N"], r["K"]): r for r in rows if r["impl"] != fused}
    for r in rows:
        if r["impl"] == fused:
            b = base[(r["op"], r["N"], r["K"])]
            r["speedup"] = round(b["ms"] / r["ms"], 2)
            r["mem_ratio"] = round(b["peak_mem_bytes"] / max(r["peak_mem_bytes"], 1), 2)
    cols = ["op", "N", "K", "impl", "ms", "peak MiB", "mem ×", "speed ×", "GB/s"]
    body = [[r["op"], r["N"] if r["N"] == r["N_requested"] else f"{r['N']}/{r['N_requested']}",
             r["K"], r["impl"], f"{r['ms']:.1f}", f"{r['peak_mem_bytes'] / 2**20:.1f}",
             r.get("mem_ratio", ""), r.get("speedup", ""), r.get("GB_s", "")] for r in rows]
    wide = Console(stderr=True, width=max(console.width, TABLE_WIDTH))
    wide.print(table(f"{args.dtype} fwd+bwd on {device_name}; N a/b: ran a of b rows; "
                        "mem ×, speed ×: baseline / fused", cols, body))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
