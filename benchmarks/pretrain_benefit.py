"""Does Alice pretraining help? Fine-tuning Dice with K = 1, 2, 4 labelled phantoms, from the
pretrained weights vs from scratch (same steps, seeds and inputs), and the ablations of pretraining
(SAM pairing -> random or intra-case pairs, CASA off, reconstruction off) at K = 2.

Stages, each cached in `--work_dir` (a rerun skips what is finished and resumes what is not):

1. data: small phantoms (`alice-ds phantom --small`) -> datalist (the last `--val_cases` cases are the
   validation list) -> preprocess cache at `--spacing` -> atlas-oracle SAM embeddings
   (`alice_ds.sam.oracle.write_atlas_oracle_embedding`: exact anatomical correspondence, so the
   question is what Alice does with good pairs, not how good our SAM is);
2. pretrain: `deepspeed --num_gpus 2 launch/train.py --config presets/tiny.yaml` (ZeRO-2, bf16, CPU
   ranks with OMP_NUM_THREADS=1) on the training cases, once per variant (`--pretrain_run DIR` reuses
   an existing run for the default variant);
3. convert: `alice-ds convert` (EMA teacher -> MONAI SwinUNETR weights + W.json);
4. fine-tune: `alice-ds finetune` per (variant or scratch, K, seed), validated once at the last step
   on the validation list; its mean Dice over the classes goes into the table;
5. tables: mean ± sample standard deviation over seeds, and each pretrained arm minus scratch with the
   same K and seed (paired: the seed moves both arms together), printed and written as JSON and
   markdown.

Why this default size (it must fit 90 minutes on a 2-core CPU). A from-scratch fine-tuning on 2
full-size phantoms with all 17 classes at 3 mm, 150 steps (~19 CPU-minutes) reached a mean Dice of
only 0.08 (vertebrae 0.57, bowel 0.68, the rest ~0): too little signal to compare arms with the steps
this budget allows. So the defaults ask an easier question with the same machinery: five large
classes (liver, kidneys = left + right, spleen, vertebrae, bowel), small phantoms at 4 mm (close to
their 3 x 3 x 4-6 mm voxels; one 64³ crop spans 256 mm, most of an abdomen), 25 fine-tuning steps of
2 crops, 16 pretraining steps per variant. Measured there (2026-12-03, benchmarks/README.md): the
whole default run 52.5 min; data 1.0 min, each pretraining + export 2.9-3.7 min, each fine-tuning
1.5-1.9 min (one step of two 64³ crops ≈ 3.1 s).
Sixteen Alice steps move the backbone only a little from its initialisation: a difference here says
whether the pipeline transfers anything at CPU scale, not what Alice does at scale (64 pretraining
steps did not change that: docs/experiments/2026-12-03-pretrain-benefit-why.md).

    python benchmarks/pretrain_benefit.py --work_dir work/benefit            # default size (~55 min, 2 cores)
    python benchmarks/pretrain_benefit.py --work_dir work/benefit_quick --quick   # every stage, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["liver=1", "kidneys=2,7", "spleen=3", "vertebrae=11", "bowel=15"]
"""Label values of `alice_ds.data.phantom.LABELS`, left and right kidneys merged."""
VARIANTS = {
    "alice": [],
    "pairing_random": ["--pairing", "random"],
    "pairing_intra": ["--pairing", "intra"],
    "casa_off": ["--casa", "off"],
    "recon_off": ["--lambdas", "1", "1", "0"],
}
"""Pretraining variants: the default Alice run and its ablations (flags of launch/train.py)."""
SCRATCH = "scratch"
ABLATION_K = 2
QUICK = dict(cases=5, val_cases=1, pretrain_steps=2, finetune_steps=3, ks=[1, 2], seeds=[0], ablations=["recon_off"])
"""--quick: every stage once at the smallest size (a smoke run, not a measurement)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict | None = None, log: Path | None = None) -> None:
    """Run `alice-ds ARGS` in a fresh process (its own Accelerate state); output to `log` if given."""
    cmd = [sys.executable, "-m", "alice_ds.cli", *args]
    _run(cmd, env, log)


def _run(cmd: list[str], env: dict | None, log: Path | None) -> None:
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "ALICE_DS_PROGRESS": "0", **(env or {})}
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            result = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT)
    else:
        result = subprocess.run(cmd, cwd=REPO, env=full_env)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}" + (f"\n  log: {log}" if log else ""))


def build_data(work: Path, cases: int, val_cases: int, spacing: float, seed: int) -> dict:
    """Phantoms -> datalist (last `val_cases` = validation) -> cache -> atlas-oracle embeddings."""
    from alice_ds.data import case_key
    from alice_ds.data.cache import list_cases, open_case
    from alice_ds.data.datalist import build_datalist, write_datalist
    from alice_ds.data.phantom import subject_for_landmarks, write_dataset
    from alice_ds.data.preprocess import preprocess_dataset
    from alice_ds.errors import DataError
    from alice_ds.sam.io import embedding_path, open_embedding
    from alice_ds.sam.oracle import write_atlas_oracle_embedding

    raw, cache, embed = work / "phantoms", work / "cache", work / "embed"
    datalist = work / "datalist.json"
    if not (raw / "dataset.json").exists():
        write_dataset(raw, cases, seed=seed, small=True)
    if not datalist.exists():
        entries = build_datalist(raw, val_fraction=0.0, seed=seed)["training"]
        if len(entries) <= val_cases:
            sys.exit(f"--cases {cases} leaves no training case after --val_cases {val_cases}")
        write_datalist({"training": entries[:-val_cases], "validation": entries[-val_cases:]}, datalist)
    if len(list_cases(cache) if cache.exists() else []) < cases:
        preprocess_dataset(raw, datalist, cache, spacing=(spacing,) * 3, show=False)
    embed.mkdir(exist_ok=True)
    for c in list_cases(cache):
        try:
            open_embedding(embed, c)
            continue
        except DataError:  # missing, or of an older format: written (again)
            case = open_case(cache, c)
            subject = subject_for_landmarks(raw / "landmarks" / f"{case_key(c)}.json")
            write_atlas_oracle_embedding(embedding_path(embed, c), c, case.affine, case.shape, subject)
    return {"data_dir": raw, "json_list": datalist, "cache": cache, "embed": embed}


def pretrain_and_convert(work: Path, data: dict, variant: str, steps: int, existing: str | None) -> Path:
    """Weights of one pretraining variant: W/weights/<variant>.safetensors, made once."""
    weights = work / "weights" / f"{variant}.safetensors"
    if weights.exists() and json.loads(weights.with_suffix(".json").read_text()).get("step") == steps:
        return weights
    run = Path(existing) if existing else work / "pretrain" / variant
    if not existing:
        deepspeed = Path(sys.executable).parent / "deepspeed"
        cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", "2",
               "--master_port", str(_free_port()), "launch/train.py", "--config", "presets/tiny.yaml",
               "--deepspeed_config", "ds_configs/zero2_bf16.json", "--data_dir", str(data["data_dir"]),
               "--json_list", str(data["json_list"]), "--cache_dir", str(data["cache"]), "--embed_dir",
               str(data["embed"]), "--output_dir", str(run), "--num_steps", str(steps), "--save_every", str(steps),
               "--resume", "auto", *VARIANTS[variant]]
        _run(cmd, {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, work / "logs" / f"pretrain_{variant}.log")
    weights.parent.mkdir(parents=True, exist_ok=True)
    _cli("convert", str(run), "--out", str(weights), log=work / "logs" / f"convert_{variant}.log")
    return weights


def finetune(work: Path, data: dict, arm: str, weights: Path | None, k: int, seed: int, args) -> dict:
    """One fine-tuning run (resumed or skipped when its folder already holds it); its best.json."""
    out = work / "finetune" / f"{arm}_K{k}_seed{seed}"
    best = out / "best.json"
    if best.exists() and json.loads(best.read_text()).get("step") == args.finetune_steps:
        return json.loads(best.read_text())
    _cli("finetune", "--data_dir", str(data["data_dir"]), "--json_list", str(data["json_list"]),
         "--weights", str(weights) if weights else "none", "--output_dir", str(out), "--labelled", str(k),
         "--seed", str(seed), "--steps", str(args.finetune_steps), "--val_every", str(args.finetune_steps),
         "--save_every", str(max(1, args.finetune_steps // 3)), "--roi", str(args.roi), "--lr", str(args.lr),
         "--spacing", *[str(args.spacing)] * 3, "--feature_size", str(args.feature_size), "--classes", *CLASSES,
         log=work / "logs" / f"finetune_{out.name}.log")
    return json.loads(best.read_text())


def _cell(values: list[float], spec: str = ".3f") -> str:
    """"mean ± sd" (the mean formatted with `spec`, the sd without its sign flag), the value alone for
    one, "n/a" for none."""
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    return (f"{mean:{spec}} ± {statistics.stdev(values):{spec.lstrip('+')}}" if len(values) > 1
            else f"{mean:{spec}}")


def table(results: dict, ks: list[int], arms: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["arm"] + [f"K={k}" for k in ks]
    rows = [[arm] + [_cell([r["val_dice"] for r in results.get(arm, {}).get(str(k), [])]) for k in ks]
            for arm in arms]
    return header, rows


def paired(results: dict, ks: list[int], arms: list[str]) -> tuple[list[str], list[list[str]]]:
    """Each pretrained arm minus scratch at the same K and seed, in Dice points (x 100), mean ± sd over
    the seeds both hold. The seed moves every arm together (crops and the decoder's initialisation are
    the same for both arms), so the paired difference shows an effect that the spread of each arm's
    own mean hides."""
    def diffs(arm: str, k: int) -> list[float]:
        base = {r["seed"]: r["val_dice"] for r in results.get(SCRATCH, {}).get(str(k), [])}
        return [100 * (r["val_dice"] - base[r["seed"]]) for r in results.get(arm, {}).get(str(k), [])
                if r["seed"] in base]

    header = ["arm - scratch"] + [f"K={k}" for k in ks]
    return header, [[arm] + [_cell(diffs(arm, k), "+.1f") for k in ks] for arm in arms if arm != SCRATCH]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work_dir", default="work/pretrain_benefit", help="every stage's output (cached)")
    p.add_argument("--pretrain_run", help="reuse this pretraining output folder for the 'alice' variant")
    p.add_argument("--quick", action="store_true", help=f"smoke size: {QUICK}")
    p.add_argument("--cases", type=int, default=10, help="small phantoms in all")
    p.add_argument("--val_cases", type=int, default=3, help="of which held out for validation")
    p.add_argument("--spacing", type=float, default=4.0, help="mm, isotropic: cache, pretraining, fine-tuning")
    p.add_argument("--pretrain_steps", type=int, default=16)
    p.add_argument("--finetune_steps", type=int, default=25)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="labelled training cases")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ablations = [v for v in VARIANTS if v != "alice"]
    p.add_argument("--ablations", nargs="*", default=ablations, choices=ablations,
                   help=f"pretraining variants fine-tuned at K={ABLATION_K} (none: --ablations with no value)")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--feature_size", type=int, default=12, help="must be the pretraining preset's (tiny: 12)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak lr")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()

    t = time.perf_counter()
    data = build_data(work, args.cases, args.val_cases, args.spacing, seed=0)
    timings["data"] = time.perf_counter() - t
    if max(args.ks) > args.cases - args.val_cases:
        sys.exit(f"K={max(args.ks)} needs more than the {args.cases - args.val_cases} training cases")
    results: dict = {}
    plan = [("alice", k) for k in args.ks] + [(SCRATCH, k) for k in args.ks] + \
           [(v, ABLATION_K) for v in args.ablations]
    weights: dict[str, Path | None] = {SCRATCH: None}
    for arm, k in plan:
        if arm not in weights:
            t = time.perf_counter()
            print(f"== pretraining + convert: {arm}", flush=True)
            weights[arm] = pretrain_and_convert(work, data, arm, args.pretrain_steps,
                                                args.pretrain_run if arm == "alice" else None)
            timings[f"pretrain_{arm}"] = time.perf_counter() - t
        for seed in args.seeds:
            t = time.perf_counter()
            print(f"== fine-tune {arm} K={k} seed={seed}", flush=True)
            best = finetune(work, data, arm, weights[arm], k, seed, args)
            timings[f"finetune_{arm}_K{k}_seed{seed}"] = time.perf_counter() - t
            results.setdefault(arm, {}).setdefault(str(k), []).append(
                {"seed": seed, "val_dice": best["val_dice"], "per_class": best["val_dice_per_class"]})

    arms = ["alice", SCRATCH] + list(args.ablations)
    ks = sorted(set(args.ks) | ({ABLATION_K} if args.ablations else set()))
    header, rows = table(results, ks, arms)
    paired_header, paired_rows = paired(results, ks, arms)
    md = (f"Mean validation Dice ({len(CLASSES)} classes, {args.val_cases} held-out phantoms) after "
          f"{args.finetune_steps} fine-tuning steps, mean ± sd over seeds {args.seeds}; pretraining "
          f"{args.pretrain_steps} steps (tiny preset); ablations at K={ABLATION_K} only.\n\n" + markdown(header, rows)
          + "\nPretrained minus scratch with the same K and seed, Dice points, mean ± sd over seeds:\n\n"
          + markdown(paired_header, paired_rows))
    total = time.perf_counter() - started
    report = {"settings": {k: v for k, v in vars(args).items()}, "classes": CLASSES, "results": results,
              "table": {"header": header, "rows": rows},
              "paired": {"header": paired_header, "rows": paired_rows}, "seconds": timings, "total_seconds": total}
    (work / "benefit.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "benefit.md").write_text(md)
    print("\n" + md)
    print(f"wrote {work / 'benefit.json'} and {work / 'benefit.md'} ({total / 60:.1f} min this run)")
    print("On a GPU, run it at a size where pretraining can matter: realistic phantoms (no --small) or real CT "
          "at the pretraining spacing, a real pretraining run (preset B, roi 96) passed with --pretrain_run and its "
          "--feature_size, "
          "all organ classes, fine-tuning long enough for the scratch arm to converge, and more seeds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
