"""Pair-sampler throughput: ours (K candidates per coarse-to-fine matcher call, body points listed
once, memory-mapped fine windows) vs the reference algorithm (one random point per try, full-volume
similarity by conv3d over the whole fine grid, up to 101 tries, embeddings re-read from disk every
try), in one run, on phantom cases of realistic size preprocessed to 1.5 mm.

Embeddings are ground-truth oracle files (alice_ds.sam.oracle) fitted to each phantom's landmarks
(phantoms deform smoothly, so the affine fit leaves a few mm of residual and points outside the
partner's field of view score low: acceptance is below 1, as with a learned SAM).

    python benchmarks/sampler.py [--json OUT] [--num_cases 4] [--pairs 40] [--baseline_pairs 3]

Everything runs in one process on one torch thread, so the rates are per CPU core (one DataLoader
worker); rates are pairs per CPU-second of the process, so other load on the machine slows them
less than wall time, but still some (shared caches): quote ratios within one run. The CPU time per
pair is also split by stage (matcher, crops, augmentation, masks, other).

Three sampler settings: without augmentation, augmented in the worker (`augment_on="worker"`), and
`augment_on="device"` (the worker only draws the augmentation parameters; the trainer applies them
to the batch with `apply_device_augment`). For the last, the cost of `apply_device_augment` on a
collated batch is timed on this CPU, one thread (`--device_batch` pairs per call), and where CUDA is
available also on the GPU (the batch moved there first, as the trainer does): one batched
grid_sample plus per-view noise, off the DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REFERENCE_MAX_TRIES = 101
"""The reference code's bound on match attempts per sample."""
BODY_HU = -500.0


def build_data(work: Path, num_cases: int, seed: int, spacing: float) -> tuple[Path, Path]:
    """Phantoms (full profile) -> cache at `spacing` mm -> oracle embeddings; reused when present."""
    from alice_ds.console import progress
    from alice_ds.data import case_key
    from alice_ds.data.cache import list_cases, open_case
    from alice_ds.data.datalist import build_datalist, write_datalist
    from alice_ds.data.phantom import write_dataset
    from alice_ds.data.preprocess import preprocess_dataset
    from alice_ds.sam.io import embedding_path
    from alice_ds.sam.oracle import write_oracle_embedding

    raw, cache, embed = work / "phantom", work / "cache", work / "embed"
    if not (raw / "dataset.json").exists():
        with progress() as bar:
            task = bar.add_task("phantoms", total=num_cases)
            write_dataset(raw, num_cases, seed=seed, small=False, on_case=lambda c: bar.advance(task))
    if len(list_cases(cache) if cache.exists() else []) < num_cases:
        datalist = write_datalist(build_datalist(raw, val_fraction=0.0, seed=seed), work / "datalist.json")
        preprocess_dataset(raw, datalist, cache, spacing=(spacing,) * 3)
    ids = list_cases(cache)
    landmarks = {cid: json.loads((raw / "landmarks" / f"{case_key(cid)}.json").read_text())["landmarks"]
                 for cid in ids}
    reference = max(landmarks.values(), key=len)  # the widest field of view defines the frame
    with progress() as bar:
        task = bar.add_task("oracle embeddings", total=len(ids))
        for cid in ids:
            path = embedding_path(embed, cid)
            if not path.exists():
                case = open_case(cache, cid)
                write_oracle_embedding(path, cid, case.affine, case.shape, landmarks[cid], reference)
            bar.advance(task)
    return cache, embed


class ReferenceSampler:
    """The reference algorithm, faithfully slow: per try one random body point of A, both embedding
    files loaded whole from disk, similarity of that point to every voxel of B by conv3d on the
    fine grid and on the coarse grid (upsampled to fine), argmax; accept at score >= threshold."""

    def __init__(self, cache_dir, embed_dir, roi: int, threshold: float, seed: int):
        from alice_ds.data.cache import list_cases
        self.cache_dir, self.embed_dir, self.roi, self.threshold = cache_dir, embed_dir, roi, threshold
        self.cases = list_cases(cache_dir)
        self.rng = np.random.default_rng(seed)
        self.tries: list[int] = []

    def _load(self, case_id):
        import torch
        from safetensors.torch import load_file

        from alice_ds.sam.io import embedding_path, open_embedding, unpack_codes
        ef = open_embedding(self.embed_dir, case_id)  # header: affines
        t = load_file(str(embedding_path(self.embed_dir, case_id)))  # the whole file, every try
        fine = ef.decode(unpack_codes(t["fine"].numpy(), ef.bits, ef.channels)).permute(3, 0, 1, 2)[None]  # codes
        # [X, Y, Z, K] -> [1, 128, X, Y, Z]
        coarse = t["coarse"].float().permute(3, 0, 1, 2)[None]
        return ef, torch.nn.functional.normalize(fine, dim=1), torch.nn.functional.normalize(coarse, dim=1)

    def _random_body_point(self, case):
        while True:  # rejection sampling on the memory map: a voxel per draw
            ijk = self.rng.integers(np.asarray(case.shape))
            if case.array[tuple(ijk)] > BODY_HU:
                return case.voxel_to_world(ijk)[0]

    def pair(self):
        import torch
        import torch.nn.functional as F

        from alice_ds.data.cache import hu_window, open_case
        from alice_ds.sam.geometry import index_to_world, world_to_index
        a, b = self.rng.choice(len(self.cases), 2, replace=False)
        ca, cb = open_case(self.cache_dir, self.cases[a]), open_case(self.cache_dir, self.cases[b])
        for t in range(1, REFERENCE_MAX_TRIES + 1):
            p = self._random_body_point(ca)
            efa, fa, cfa = self._load(ca.case_id)
            efb, fb, cfb = self._load(cb.case_id)
            i = np.clip(np.rint(world_to_index(efa.fine_affine, p)[0]).astype(int), 0, np.asarray(fa.shape[2:]) - 1)
            j = np.clip(np.rint(world_to_index(efa.coarse_affine, p)[0]).astype(int), 0, np.asarray(cfa.shape[2:]) - 1)
            qf = fa[0, :, i[0], i[1], i[2]].view(1, -1, 1, 1, 1)  # [C] -> [1, C, 1, 1, 1] kernel
            qc = cfa[0, :, j[0], j[1], j[2]].view(1, -1, 1, 1, 1)
            sim_f = F.conv3d(fb, qf)  # [1, 1, Xf, Yf, Zf]
            sim_c = F.interpolate(F.conv3d(cfb, qc), size=sim_f.shape[2:], mode="trilinear", align_corners=True)
            sim = ((sim_f + sim_c) / 2)[0, 0]
            score = float(sim.max())
            if score >= self.threshold or t == REFERENCE_MAX_TRIES:
                break
        best = np.unravel_index(int(sim.argmax()), sim.shape)
        m = index_to_world(efb.fine_affine, np.asarray(best)[None])[0]
        r = (self.roi,) * 3
        query = torch.from_numpy(hu_window(ca.crop(p, r)))[None]
        anchor = torch.from_numpy(hu_window(cb.crop(m, r)))[None]
        self.tries.append(t)
        return query, anchor, score


class Stages:
    """CPU time of the sampler's stages, accumulated by wrapping the dataset's own methods (the
    real code runs; only the clock is added): matcher calls, crops (cache read + HU window),
    augmentation (applying it, or only drawing its parameters with augment_on="device"), masks
    (+ packing the sample dict); `other` is the rest of each sample (candidate
    and partner draws, per-sample generator, Python)."""

    NAMES = ("matcher", "crops", "augmentation", "masks")

    def __init__(self, ds):
        self.cpu_s = dict.fromkeys(self.NAMES, 0.0)
        self.calls = 0
        ds._matcher = _Timed(self, "matcher", ds.matcher.match, counted=True)
        ds._window = _Timed(self, "crops", ds._window)
        ds._augmented = _Timed(self, "augmentation", ds._augmented)
        ds._pack = _Timed(self, "masks", ds._pack)

    def reset(self):
        self.cpu_s = dict.fromkeys(self.NAMES, 0.0)
        self.calls = 0

    def ms_per_pair(self, total_cpu_s: float, pairs: int) -> dict:
        out = {k: 1e3 * v / pairs for k, v in self.cpu_s.items()}
        out["other"] = 1e3 * total_cpu_s / pairs - sum(out.values())
        return out


class _Timed:
    """A callable that adds its CPU time to one stage of `Stages` (and has `match` for the matcher)."""

    def __init__(self, stages: Stages, name: str, fn, counted: bool = False):
        self.stages, self.name, self.fn, self.counted = stages, name, fn, counted

    def __call__(self, *args, **kwargs):
        c0 = time.process_time()
        out = self.fn(*args, **kwargs)
        self.stages.cpu_s[self.name] += time.process_time() - c0
        self.stages.calls += self.counted
        return out

    match = __call__


def _rate(fn, n: int, repeats: int) -> dict:
    """Pairs per CPU-second of this process (one torch thread, so per core; insensitive to other
    load on the machine) and per wall-second, each the median over `repeats` runs of `n` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        cpu.append(n / (time.process_time() - c0))
        wall.append(n / (time.perf_counter() - t0))
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall), "cpu_runs": cpu, "wall_runs": wall}


def time_cuda_augment(batch: dict, augment, repeats: int) -> dict:
    """Milliseconds per `augment(batch)` call with the batch already on the GPU (what the trainer
    does after its host-to-device copy), median of `repeats` x 10 calls after a warm-up."""
    import torch

    gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    augment(gpu)
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            augment(gpu)
        torch.cuda.synchronize()
        runs.append(1e3 * (time.perf_counter() - t0) / 10)
    return {"ms_per_batch": statistics.median(runs), "runs_ms": runs, "batch": len(batch["query"]),
            "device": torch.cuda.get_device_name()}


def anatomy_mix(cache, embed, raw: Path, cfg, calls: int, seed: int) -> dict:
    """Which anatomy the query crops are centred on, by phantom label, under three rules applied to
    the same matcher calls (the sampler's own candidates, partners and threshold): every body
    candidate (the prior), the best-scoring candidate when it passes (the former rule) and one
    drawn uniformly among those that pass (the rule since). -> {rule: {label: fraction}}."""
    import nibabel as nib

    from alice_ds.data import case_key
    from alice_ds.data.phantom import LABELS
    from alice_ds.sampler import PairDataset

    names = {v: k for k, v in LABELS.items()} | {0: "other (body wall, fat, muscle)"}
    ds = PairDataset(cache, embed, cfg, seed=seed, rank=0, world_size=1)
    labels = {}
    for cid in ds.cases:
        img = nib.load(raw / "labelsTr" / f"{case_key(cid)}.nii.gz")
        labels[cid] = (np.asarray(img.dataobj), np.linalg.inv(img.affine))

    def label(cid, points):
        arr, inv = labels[cid]
        ijk = np.rint(points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        ijk = np.clip(ijk, 0, np.asarray(arr.shape) - 1)
        return [names.get(int(v), str(v)) for v in arr[tuple(ijk.T)]]

    rng = np.random.default_rng(seed)
    found = {"all body candidates": [], "best of K (former)": [], "uniform among passing (since)": []}
    for n in range(calls):
        a = ds.cases[n % len(ds.cases)]
        b = ds._partner(a, rng)
        points = ds._body_points(ds._case(a), cfg.num_candidates, rng)
        _, scores = ds.matcher.match(a, b, points)
        found["all body candidates"] += label(a, points)
        passing = np.flatnonzero(scores >= cfg.score_threshold)
        if len(passing):
            found["best of K (former)"] += label(a, points[[int(np.argmax(scores))]])
            found["uniform among passing (since)"] += label(a, points[[int(rng.choice(passing))]])
    return {rule: {k: v / len(got) for k, v in sorted(_count(got).items(), key=lambda kv: -kv[1])}
            for rule, got in found.items()}


def precision_table(cache, embed, landmarks, common: dict, cycles, samples: int, seed: int, priors=()) -> dict:
    """Pair precision (alice_ds.sampler.precision: anchor centre within 20 mm of the true
    correspondence, phantoms only), acceptance and pairs per CPU-second without augmentation, for
    each cycle-check radius in `cycles` (0: none) without the level prior, then for each level-prior
    radius in `priors` (only when the embedding folder has a levels file), over the first `samples`
    samples of one rank's stream -> {f"cycle {r} mm" | f"level prior {r} mm": report}."""
    from alice_ds.data.cache import list_cases
    from alice_ds.sam.levels import LEVELS_FILE
    from alice_ds.sampler import PairDataset, SamplerConfig
    from alice_ds.sampler.precision import PRECISION_RADIUS_MM, pair_errors_mm, phantom_subjects, precision_report

    subjects, out = phantom_subjects(landmarks, list_cases(cache)), {}
    rows = [(f"cycle {r:g} mm" if r else "no cycle check", {"cycle_mm": float(r), "level_prior_mm": 0.0})
            for r in cycles]
    if (Path(embed) / LEVELS_FILE).exists():
        rows += [(f"level prior {r:g} mm", {"level_prior_mm": float(r)}) for r in priors]
    for name, rule in rows:
        cfg = SamplerConfig(**common, rotation=0.0, noise_std=0.0, **rule)
        ds = PairDataset(cache, embed, cfg, seed=seed, rank=0, world_size=1)
        it = iter(ds)
        for _ in range(min(len(ds.cases), samples)):  # warm-up: body lists and coarse grids
            next(it)
        c0 = time.process_time()
        got = [next(it) for _ in range(samples)]
        cpu = time.process_time() - c0
        kinds = _count([s["kind"] for s in got])
        matched = [s for s in got if s["tries"] > 0]  # samples that called the matcher
        report = precision_report(pair_errors_mm(got, subjects), sum(s["tries"] for s in matched))
        best = pair_errors_mm(got, subjects, ("best",))
        report |= {"pairs_per_cpu_s": samples / cpu,
                   "sample_acceptance": kinds.get("inter", 0) / len(matched) if matched else None,
                   "kinds": {k: kinds.get(k, 0) for k in ("inter", "best", "intra")},
                   "best_fallback_precision": float(np.mean(best <= PRECISION_RADIUS_MM)) if len(best) else None}
        out[name] = report
    return out


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _mm(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv=None) -> int:
    from alice_ds.memory import WORKER_MMAP_THRESHOLD, keep_freed_memory
    from alice_ds.sampler import PairDataset, SamplerConfig, apply_device_augment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the report here")
    ap.add_argument("--work_dir", type=Path, help="phantoms, cache and embeddings (reused); default: a temp dir")
    ap.add_argument("--num_cases", type=int, default=4, help="phantom cases")
    ap.add_argument("--spacing", type=float, default=1.5, help="cache spacing in mm")
    ap.add_argument("--roi", type=int, default=96, help="crop edge in voxels")
    ap.add_argument("--pairs", type=int, default=40, help="pairs per timed repeat of our sampler")
    ap.add_argument("--baseline_pairs", type=int, default=3, help="pairs per timed repeat of the baseline")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    ap.add_argument("--device_batch", type=int, default=8,
                    help="pairs per apply_device_augment call (augment_on='device'), timed on this CPU")
    ap.add_argument("--num_candidates", type=int, default=SamplerConfig.num_candidates,
                    help="query points per matcher call (SamplerConfig.num_candidates)")
    ap.add_argument("--match_candidates", type=int, default=SamplerConfig.match_candidates,
                    help="coarse candidates per matcher point (SamplerConfig.match_candidates)")
    ap.add_argument("--seed", type=int, default=0, help="phantom and sampling seed")
    ap.add_argument("--mix_calls", type=int, default=200,
                    help="matcher calls for the anatomical mix of the query crops (0: skip it)")
    ap.add_argument("--cache_dir", type=Path, help="use this cache (with --embed_dir and --landmarks: learned "
                    "embeddings of phantom cases) instead of building phantoms and oracle embeddings")
    ap.add_argument("--embed_dir", type=Path, help="embeddings of the --cache_dir cases (alice-ds embed)")
    ap.add_argument("--landmarks", type=Path, help="the phantoms' landmark folder (precision needs the generator)")
    ap.add_argument("--precision_samples", type=int, default=200,
                    help="samples per row of the precision table (0: skip it)")
    ap.add_argument("--cycle_mm", type=float, nargs="+", default=[0.0, 16.0],
                    help="cycle-check radii of the precision table's rows (0: no cycle check)")
    ap.add_argument("--level_prior_mm", type=float, nargs="*", default=[SamplerConfig.level_prior_mm],
                    help="level-prior radii of the precision table's rows, used when --embed_dir has a levels "
                         "file (alice-ds sam-levels)")
    ap.add_argument("--score_threshold", type=float, default=SamplerConfig.score_threshold,
                    help="acceptance threshold for both samplers; oracle embeddings score ~1 at a true "
                         "match, so a higher threshold mimics the lower acceptance of a learned SAM")
    args = ap.parse_args(argv)

    import torch
    from torch.utils.data import default_collate

    from alice_ds.console import console, table

    torch.set_num_threads(1)  # per-core rates: one DataLoader worker runs one thread
    keep_freed_memory(WORKER_MMAP_THRESHOLD)  # as PairDataset does in each DataLoader worker
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="alice_sampler_bench_"))
    if args.cache_dir:
        if not (args.embed_dir and args.landmarks):
            ap.error("--cache_dir needs --embed_dir and --landmarks")
        cache, embed, landmarks = args.cache_dir, args.embed_dir, args.landmarks
    else:
        cache, embed = build_data(work, args.num_cases, args.seed, args.spacing)
        landmarks = work / "phantom" / "landmarks"

    results = {}
    thr = args.score_threshold
    common = dict(roi=args.roi, score_threshold=thr, match_candidates=args.match_candidates,
                  num_candidates=args.num_candidates)
    for name, cfg in (("plain", SamplerConfig(**common, rotation=0.0, noise_std=0.0)),
                      ("augmented", SamplerConfig(**common)),
                      ("device_aug", SamplerConfig(**common, augment_on="device"))):
        ds = PairDataset(cache, embed, cfg, seed=args.seed, rank=0, world_size=1)
        stages = Stages(ds)
        it = iter(ds)
        for _ in range(len(ds.cases)):  # warm-up: body lists and coarse grids of the cases
            next(it)
        stages.reset()
        c0 = time.process_time()
        rate = _rate(lambda: next(it), args.pairs, args.repeats)
        total = time.process_time() - c0
        n = args.pairs * args.repeats
        results[name] = dict(rate=rate, stats=ds.stats(), stages_ms_per_pair=stages.ms_per_pair(total, n),
                             matcher_ms_per_call=1e3 * stages.cpu_s["matcher"] / stages.calls,
                             matcher_cpu_fraction=stages.cpu_s["matcher"] / total)
    batch = default_collate([next(it) for _ in range(args.device_batch)])  # it: the augment_on="device" stream
    apply_device_augment(batch)  # warm-up
    device_aug = _rate(lambda: apply_device_augment(batch), 1, args.repeats)
    device_aug_ms = 1e3 / (device_aug["cpu"] * args.device_batch)  # CPU ms per pair (two views)
    cuda_aug = time_cuda_augment(batch, apply_device_augment, args.repeats) if torch.cuda.is_available() else None

    base = ReferenceSampler(cache, embed, args.roi, thr, args.seed)
    base_rate = _rate(base.pair, args.baseline_pairs, args.repeats)

    from alice_ds.data.cache import open_case
    shapes = [list(open_case(cache, c).shape) for c in base.cases]
    stats = results["plain"]["stats"]
    plain, aug, dev = results["plain"]["rate"], results["augmented"]["rate"], results["device_aug"]["rate"]
    report = {
        "ours_pairs_per_s": plain["cpu"],
        "ours_augmented_pairs_per_s": aug["cpu"],
        "baseline_pairs_per_s": base_rate["cpu"],
        "ratio": plain["cpu"] / base_rate["cpu"],
        "ratio_augmented": aug["cpu"] / base_rate["cpu"],
        "ours_device_aug_pairs_per_s": dev["cpu"],
        "ratio_device_aug": dev["cpu"] / base_rate["cpu"],
        "device_augment_cpu_ms_per_pair": device_aug_ms,
        "device_augment_note": (f"apply_device_augment on a collated batch of {args.device_batch} pairs, this CPU, "
                                "one thread; on a GPU the same call is one batched grid_sample + per-view noise"),
        "device_augment_cuda_ms_per_pair": cuda_aug and cuda_aug["ms_per_batch"] / args.device_batch,
        "device_augment_cuda": cuda_aug,
        "acceptance_rate": stats["acceptance_rate"],
        "call_acceptance_rate": stats["call_acceptance_rate"],
        "mean_score": stats["mean_score"],
        "baseline_mean_tries": float(np.mean(base.tries)),
        "matcher_ms_per_call": results["plain"]["matcher_ms_per_call"],
        "matcher_cpu_fraction": {k: results[k]["matcher_cpu_fraction"] for k in results},
        "stages_ms_per_pair": {k: results[k]["stages_ms_per_pair"] for k in results},
        "rate_unit": "pairs per CPU-second of one single-threaded process (= per core); *_wall: per wall-second",
        "wall": {"ours_pairs_per_s": plain["wall"], "ours_augmented_pairs_per_s": aug["wall"],
                 "ours_device_aug_pairs_per_s": dev["wall"],
                 "baseline_pairs_per_s": base_rate["wall"], "ratio": plain["wall"] / base_rate["wall"]},
        "runs": {"ours": plain, "ours_augmented": aug, "ours_device_aug": dev, "baseline": base_rate,
                 "device_augment_batches": device_aug},
        "config": {"roi": args.roi, "spacing_mm": args.spacing, "num_cases": len(base.cases),
                   "case_shapes": shapes, "pairs": args.pairs, "baseline_pairs": args.baseline_pairs,
                   "repeats": args.repeats, "device_batch": args.device_batch, "torch_threads": 1,
                   "sampler": SamplerConfig(**common).__dict__},
        "device": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                   "torch": torch.__version__, "numpy": np.__version__},
    }
    rows = [["ours (pairing + crops + masks)", plain, plain["cpu"] / base_rate["cpu"]],
            ["ours + augmentation", aug, aug["cpu"] / base_rate["cpu"]],
            ["ours, augmentation drawn (augment_on=device)", dev, dev["cpu"] / base_rate["cpu"]],
            ["reference algorithm", base_rate, 1.0]]
    console.print(table("pair sampler, one CPU core", ["sampler", "pairs/CPU-s", "pairs/wall-s", "vs baseline"],
                        [[n, f"{r['cpu']:.3g}", f"{r['wall']:.3g}", f"{x:.1f}x"] for n, r, x in rows]))
    console.print(table("CPU ms per pair, by stage", ["sampler", *Stages.NAMES, "other"],
                        [[k, *[f"{v:.1f}" for v in results[k]["stages_ms_per_pair"].values()]] for k in results]))
    console.print(f"acceptance {report['acceptance_rate']:.2f} (per call {report['call_acceptance_rate']:.2f}), "
                  f"mean score {report['mean_score']:.3f}; baseline tries/pair {report['baseline_mean_tries']:.1f}; "
                  f"matcher {report['matcher_ms_per_call']:.1f} CPU-ms/call "
                  f"({report['matcher_cpu_fraction']['plain']:.0%} of ours); "
                  f"cases {shapes}")
    console.print(f"augment_on=device: the trainer's apply_device_augment costs {device_aug_ms:.1f} CPU-ms per pair "
                  f"on this CPU (batch {args.device_batch}, one thread; worker-side augmentation "
                  f"{results['augmented']['stages_ms_per_pair']['augmentation']:.1f}); on a GPU it is one batched "
                  "grid_sample + per-view noise")
    if cuda_aug:
        console.print(f"on {cuda_aug['device']}: {report['device_augment_cuda_ms_per_pair']:.3f} ms per pair "
                      f"(batch {args.device_batch} already on the GPU)")
    if args.precision_samples:
        prec = precision_table(cache, embed, landmarks, common, args.cycle_mm, args.precision_samples, args.seed,
                               args.level_prior_mm)
        report["precision"] = prec
        console.print(table(f"pair precision: accepted pairs with the anchor within 20 mm of the true "
                            f"correspondence, {args.precision_samples} samples, no augmentation",
                            ["sampler", "precision", "acceptance (per call)", "median mm", "p95 mm", "pairs/CPU-s"],
                            [[k, _pct(r["precision"]), _pct(r["acceptance"]), _mm(r["median_mm"]), _mm(r["p95_mm"]),
                              f"{r['pairs_per_cpu_s']:.3g}"] for k, r in prec.items()]))
    if args.mix_calls:
        mix = anatomy_mix(cache, embed, landmarks.parent, SamplerConfig(**common), args.mix_calls, args.seed)
        report["anatomy_mix"] = mix
        rules = list(mix)
        shown = sorted({k for m in mix.values() for k in m}, key=lambda k: -mix[rules[0]].get(k, 0.0))
        console.print(table(f"query crop centres by phantom label, {args.mix_calls} matcher calls", ["label", *rules],
                            [[k, *[f"{100 * mix[r].get(k, 0.0):.1f} %" for r in rules]] for k in shown]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
