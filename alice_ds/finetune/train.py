"""`alice-ds finetune`: supervised segmentation with MONAI `SwinUNETR`, from alice-ds weights or from
scratch, trained through HuggingFace Accelerate (`accelerate launch -m alice_ds.cli finetune ...`
runs it on many GPUs; bf16 autocast on CUDA, fp32 on the CPU).

One step: label-balanced crops of `batch_size` cases -> forward -> DiceCE -> backward -> clip ->
AdamW at the step's lr (a pure function of the step) -> metrics line. Every `val_every` steps the
validation list is predicted by sliding windows; the best mean Dice is kept as `best.safetensors`.
Files: `alice_ds.finetune.checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.transforms import Compose
from monai.utils import set_determinism

from alice_ds.args import positive_int
from alice_ds.console import console, progress, table
from alice_ds.errors import DataError, UserError
from alice_ds.export.load import load_pretrained
from alice_ds.files import atomic_write_text
from alice_ds.finetune import checkpoint as ckpt
from alice_ds.finetune.config import FinetuneConfig
from alice_ds.finetune.data import (
    Preprocessing,
    base_transforms,
    parse_classes,
    preprocessing_for,
    random_transforms,
    read_sidecar,
    select_cases,
    unwrap_transform_error,
)
from alice_ds.finetune.metrics import dice_per_class, predict
from alice_ds.memory import freed_memory_kept

GRAD_CLIP = 1.0
MIN_LR_FRACTION = 0.01
"""The cosine schedule ends at this fraction of the peak lr."""
METRICS = "metrics.jsonl"


def lr_at(cfg: FinetuneConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to
    `MIN_LR_FRACTION * lr` at the last step. A pure function: a resume needs only the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * MIN_LR_FRACTION
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * t))


def _datasets(cfg: FinetuneConfig, data_dir, json_list, prep: Preprocessing):
    train_cases = select_cases(json_list, data_dir, cfg.labelled)
    try:
        val_cases = select_cases(json_list, data_dir, None, "validation") if cfg.val_every else []
    except DataError as e:
        raise DataError(e.path, f"{e.problem} (--val_every 0 trains without validation)") from None
    rand = random_transforms(cfg.classes, cfg.roi, cfg.crops_per_case)
    try:
        # CacheDataset keeps the deterministic prefix (load ... pad) in memory; crops are drawn per step
        train = CacheDataset(train_cases, Compose(base_transforms(prep, cfg.classes, cfg.roi) + [rand]),
                             progress=False, num_workers=0)
        val = CacheDataset(val_cases, Compose(base_transforms(prep, cfg.classes, None)), progress=False,
                           num_workers=0)
    except Exception as e:
        raise unwrap_transform_error(e) from None
    return train, val, rand, len(train_cases), len(val_cases)


def _append_metrics(out: Path, line: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(line) + "\n")


def _truncate_metrics(out: Path, step: int) -> None:
    """On resume: drop lines of steps after the checkpoint (they will be run again)."""
    path = out / METRICS
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))


@torch.no_grad()
def validate(model, val_ds, cfg: FinetuneConfig, accelerator: Accelerator) -> tuple[float, list[float]]:
    """Mean Dice over the validation cases (sharded over processes) and per class (NaN = the class is
    in no validation label)."""
    model.eval()
    n = cfg.num_classes - 1
    sums = torch.zeros(n, device=accelerator.device)
    counts = torch.zeros(n, device=accelerator.device)
    for i in range(accelerator.process_index, len(val_ds), accelerator.num_processes):
        item = val_ds[i]
        image = item["image"].unsqueeze(0).to(accelerator.device)  # [1, 1, X, Y, Z]
        with accelerator.autocast():
            pred = predict(model, image, cfg.roi)
        dice = dice_per_class(pred, item["label"].unsqueeze(0).to(pred.device), cfg.num_classes).to(sums.device)
        ok = ~torch.isnan(dice)
        sums += torch.where(ok, dice, torch.zeros_like(dice))
        counts += ok.float()
    sums, counts = accelerator.reduce(sums, "sum"), accelerator.reduce(counts, "sum")
    model.train()
    per_class = [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts)]
    present = [d for d in per_class if not math.isnan(d)]
    return (sum(present) / len(present) if present else math.nan), per_class


def build_and_load(cfg: FinetuneConfig, verbose: bool = True) -> tuple[torch.nn.Module, int]:
    """SwinUNETR of `cfg` (seeded), with `cfg.weights` loaded strictly (only `out.*` may be
    skipped: another architecture is a `UserError` naming the file). Returns (model, tensors loaded)."""
    torch.manual_seed(cfg.seed)
    model = ckpt.build_model(cfg)
    if not cfg.weights:
        return model, 0
    return model, len(load_pretrained(model, cfg.weights, strict=True, verbose=verbose).loaded)


def train_step(model, optimizer, loss_fn, image: torch.Tensor, label: torch.Tensor, lr: float,
               accelerator: Accelerator) -> float:
    """One optimizer step on crops image [N, 1, R, R, R] (float in [0, 1]) and label [N, 1, R, R, R]
    (class indices); returns the loss averaged over processes."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with accelerator.autocast():
        loss = loss_fn(model(image.float()), label.long())
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss.detach().float(), "mean"))


def _batches(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def finetune(cfg: FinetuneConfig, data_dir, json_list, output_dir, resume: bool = True) -> dict:
    """Train; returns the summary (`best_dice`, `best_step`, `step`, `loaded_tensors`). On the CPU
    with freed memory kept for the run (`alice_ds.memory`: each step's attention matrices reuse
    mapped pages, 1.5x faster steps)."""
    with freed_memory_kept(enabled=not torch.cuda.is_available()):
        return _finetune(cfg, data_dir, json_list, output_dir, resume)


def _finetune(cfg: FinetuneConfig, data_dir, json_list, output_dir, resume: bool) -> dict:
    cuda = torch.cuda.is_available()  # cpu=True without CUDA: Accelerate then joins torchrun's / its own
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")  # CPU ranks (gloo)
    main = accelerator.is_main_process
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, loaded = build_and_load(cfg, verbose=main)  # first: a wrong weights file fails before any data IO
    prep = Preprocessing(cfg.spacing, cfg.hu_window, cfg.preprocessing_source)
    train_ds, val_ds, rand, n_train, n_val = _datasets(cfg, data_dir, json_list, prep)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best, best_step = 0, -math.inf, None
    last = ckpt.latest_checkpoint(out) if resume else None
    if last is not None:
        _check_same_run(ckpt.checkpoint_info(last)["config"], cfg, last)
        info = ckpt.load_checkpoint(last, model, optimizer)
        step, best, best_step = int(info["step"]), float(info.get("best_dice", -math.inf)), info.get("best_step")
        if main:
            console.print(f"resuming from {last} (step {step})", highlight=False)
            _truncate_metrics(out, step)
    elif main:
        (out / METRICS).unlink(missing_ok=True)
    if main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_json(), indent=2) + "\n")

    # every resume draws a new crop stream (seed + step): not bit-exact, never a replay of the same crops
    set_determinism(cfg.seed + step)
    rand.set_random_state(seed=cfg.seed + step + accelerator.process_index)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if main:
        _print_start(cfg, accelerator, n_train, n_val, loaded, prep)

    batches = _batches(loader)
    info = {"config": cfg.to_json()}
    with progress(disable=not main) as bar:
        task = bar.add_task("fine-tuning", total=cfg.steps, completed=step)
        while step < cfg.steps:
            # ---- sample
            t0 = time.perf_counter()
            batch = next(batches)
            image, label = batch["image"], batch["label"]  # [N, 1, R, R, R], N = batch_size * crops_per_case
            # ---- forward / loss
            lr = lr_at(cfg, step)
            loss_value = train_step(model, optimizer, loss_fn, image, label, lr, accelerator)
            step += 1
            # ---- log
            if not math.isfinite(loss_value):
                raise UserError(f"non-finite loss {loss_value} at step {step}: lower --lr (now {cfg.lr})")
            if main:
                _append_metrics(out, {"step": step, "loss": loss_value, "lr": lr,
                                      "seconds": time.perf_counter() - t0})
            bar.update(task, completed=step, description=f"loss {loss_value:.4f} lr {lr:.2e}")
            # ---- validate / save
            if cfg.val_every and n_val and (step % cfg.val_every == 0 or step == cfg.steps):
                t1 = time.perf_counter()
                # the unwrapped module: a DDP forward would wait on ranks that hold fewer validation cases
                dice, per_class = validate(accelerator.unwrap_model(model), val_ds, cfg, accelerator)
                if main:
                    _append_metrics(out, {"step": step, "val_dice": dice, "seconds": time.perf_counter() - t1,
                                          "val_dice_per_class": dict(zip(cfg.classes.names, per_class))})
                    console.print(f"step {step}: validation mean Dice {dice:.4f}", highlight=False)
                if dice > best:
                    best, best_step = dice, step
                    if main:
                        ckpt.save_weights(out / f"{ckpt.BEST}.safetensors", accelerator.unwrap_model(model),
                                          {**info, "step": step, "val_dice": dice,
                                           "val_dice_per_class": dict(zip(cfg.classes.names, per_class))})
            if main and (step % cfg.save_every == 0 or step == cfg.steps):
                ckpt.save_checkpoint(out, step, accelerator.unwrap_model(model), optimizer,
                                     {**info, "best_dice": best, "best_step": best_step})
            accelerator.wait_for_everyone()
    summary = {"step": step, "best_dice": None if best == -math.inf else best, "best_step": best_step,
               "loaded_tensors": loaded}
    if main:
        console.print(f"done: {step} steps; best validation mean Dice "
                      f"{summary['best_dice'] if summary['best_dice'] is not None else 'n/a'} "
                      f"(step {best_step}); {out}", highlight=False)
    return summary


def _check_same_run(saved: dict, cfg: FinetuneConfig, folder: Path) -> None:
    """A resume must continue the same model on the same classes; other flags may change."""
    now = cfg.to_json()
    for key in ("feature_size", "use_v2", "classes", "roi", "spacing", "hu_window", "weights"):
        if json.dumps(saved.get(key)) != json.dumps(now[key]):
            raise UserError(f"{folder}: resuming a run with {key}={saved.get(key)!r}, now {now[key]!r} "
                            "(use another --output_dir or --resume never)")


def _print_start(cfg, accelerator, n_train, n_val, loaded, prep) -> None:
    crops = cfg.batch_size * cfg.crops_per_case * accelerator.num_processes
    rows = [["weights", f"{cfg.weights} ({loaded} tensors loaded)" if cfg.weights else "none (from scratch)"],
            ["model", f"SwinUNETR(feature_size={cfg.feature_size}, out_channels={cfg.num_classes})"],
            ["classes", ", ".join(f"{n}={'+'.join(map(str, v))}" for n, v in zip(cfg.classes.names,
                                                                                 cfg.classes.values))],
            ["cases", f"{n_train} training (labelled), {n_val} validation"],
            ["input", f"{cfg.roi}^3 crops at {list(prep.spacing)} mm, HU {list(prep.hu_window)} -> [0, 1] "
                      f"({prep.source})"],
            ["steps", f"{cfg.steps} x {crops} crops ({accelerator.num_processes} process(es), "
                      f"{accelerator.mixed_precision} precision, {accelerator.device})"]]
    console.print(table("alice-ds finetune", ["", ""], rows))


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", required=True, help="folder the datalist's paths are relative to")
    parser.add_argument("--json_list", required=True,
                        help="decathlon datalist: training cases from 'training', validation from 'validation' "
                             "(entries need a 'label')")
    parser.add_argument("--weights", required=True, metavar="W.safetensors|none",
                        help="alice-ds convert output (spacing and HU window come from W.json beside it), "
                             "or none to train from scratch")
    parser.add_argument("--output_dir", required=True, help="run folder (config.json, metrics.jsonl, best.*, "
                                                            "checkpoints/)")
    parser.add_argument("--classes", nargs="+", metavar="NAME=V[,V]",
                        help="output classes from label values, merging with commas (liver=1 kidneys=2,7); "
                             "other values become background")
    parser.add_argument("--num_classes", type=positive_int,
                        help="classes including background, label values used as they are (without --classes)")
    parser.add_argument("--labelled", type=positive_int, help="use only the first K labelled training cases")
    parser.add_argument("--roi", type=positive_int, default=96, help="crop and sliding-window edge (multiple of 32)")
    parser.add_argument("--feature_size", type=positive_int, help="SwinUNETR width (default: the weights' "
                                                                  "W.json, else 48)")
    parser.add_argument("--use_v2", action="store_true", help="SwinUNETR v2 (default: the weights' W.json)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="resampling in mm (default: the weights' W.json, else 1.5 1.5 2)")
    parser.add_argument("--hu_window", type=float, nargs=2, metavar=("LO", "HI"),
                        help="HU mapped to [0, 1] (default: the weights' W.json, else -125 225)")
    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW lr (cosine decay)")
    parser.add_argument("--warmup_steps", type=int, default=0, help="linear lr warmup steps")
    parser.add_argument("--batch_size", type=positive_int, default=1, help="cases per step and process")
    parser.add_argument("--crops_per_case", type=positive_int, default=2, help="label-balanced crops per case")
    parser.add_argument("--val_every", type=int, default=100, help="validate every N steps and at the end (0: never)")
    parser.add_argument("--save_every", type=positive_int, default=100, help="resumable checkpoint every N steps")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and crop seed")
    parser.add_argument("--resume", choices=("auto", "never"), default="auto",
                        help="auto: continue from output_dir/checkpoints/latest when it exists")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    weights = None if args.weights.lower() == "none" else args.weights
    if weights and not Path(weights).is_file():
        raise UserError(f"{weights}: no such weights file (or pass --weights none)")
    prep = preprocessing_for(weights, args.spacing, args.hu_window)
    side, _ = read_sidecar(weights)
    feature_size = args.feature_size or side.get("feature_size") or FinetuneConfig.feature_size
    return FinetuneConfig(classes=parse_classes(args.classes, args.num_classes), feature_size=int(feature_size),
                          use_v2=bool(args.use_v2 or side.get("use_v2", False)), roi=args.roi,
                          spacing=prep.spacing, hu_window=prep.hu_window, weights=weights, steps=args.steps,
                          lr=args.lr, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                          crops_per_case=args.crops_per_case, val_every=args.val_every,
                          save_every=args.save_every, labelled=args.labelled, seed=args.seed,
                          num_workers=args.num_workers, preprocessing_source=prep.source)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    finetune(cfg, args.data_dir, args.json_list, args.output_dir, resume=args.resume == "auto")
    return 0
