"""`alice-ds sam-train`: self-supervised training of SAMNet on the preprocessed cache (DESIGN §5).

Each step draws `batch_size` cases and `pairs_per_case` pairs of augmented views per case
(crops.view_pair, or crops.reference_pair for `--recipe reference`), runs all views through the
network in one batch and minimises the fine + coarse InfoNCE of loss.py. The recipe (recipe.py) sets
the view shape, the pairing, the coarse negatives, the optimiser and the defaults. The views of
step N are a function of (seed, N) alone, so they are prepared ahead in a DataLoader worker
process (`--workers`) while the network trains, and a resumed run sees exactly the views an
uninterrupted one would.

Output directory:
```
O/checkpoints/step_<N>/model.safetensors   weights (+ BatchNorm buffers)
O/checkpoints/step_<N>/model.json          network config, step, model id
O/checkpoints/step_<N>/optimizer.safetensors + state.json   optimizer state, step, settings
O/checkpoints/latest                       tag of the newest complete checkpoint (written last)
O/sam.safetensors + O/sam.json             final weights for `alice-ds embed --sam_checkpoint`
O/log.jsonl                                one JSON line per step (loss, fine, coarse, seconds)
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alice_ds.console import console, progress
from alice_ds.data.cache import body_voxels, list_cases, open_case
from alice_ds.data.datalist import split_case_ids
from alice_ds.errors import DataError, UserError
from alice_ds.files import atomic_path, atomic_write_text
from alice_ds.sam import SAM_HU_WINDOW
from alice_ds.sam.crops import reference_pair, view_pair, view_shape
from alice_ds.sam.loss import sam_loss
from alice_ds.sam.network import COARSE_STRIDE, SAM_SPACING_MM, SAMNet, scale_hu
from alice_ds.sam.recipe import RECIPES

DEFAULT_TEMPERATURE = 0.5
DEFAULT_THREADS = 1
DEFAULT_WIDTH = 0.25
DEFAULT_SAVE_EVERY = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", required=True, help="preprocessed cache (alice-ds preprocess)")
    p.add_argument("--json_list", default=None,
                   help="decathlon datalist; train only on the cases of its 'training' list "
                        "(default: every cached case)")
    p.add_argument("--output_dir", required=True, help="where checkpoints, final weights and log go")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="default: ours, measured best on the phantoms at CPU scale (64^3 views, AdamW); "
                        "reference: the reference SAM's (96x96x32 slabs around a shared seed point, 20%% "
                        "independent pairs, 6 cases per step, its coarse negatives, SGD 0.02 with "
                        "warm-up, 20000 steps), for GPU-scale runs; see docs/sam.md")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in total (default: the recipe's)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="cases per step (--pairs_per_case view pairs each; default: the recipe's)")
    p.add_argument("--pairs_per_case", type=int, default=None,
                   help="view pairs per case and step at independent random body points; the far "
                        "coarse voxels of a case's other views are its coarse negatives (default recipe; "
                        "the reference recipe uses only the pair's own views and other cases; default: 1)")
    p.add_argument("--cross_case_negatives", action="store_true",
                   help="default recipe: also use every coarse voxel of the other cases of the batch as "
                        "coarse negatives (the reference recipe always samples 1000 of them; measured "
                        "worse on phantoms, see docs/experiments/)")
    p.add_argument("--intensity_aug", action="store_true",
                   help="random linear HU transform per view (crops.INTENSITY_SCALE, INTENSITY_SHIFT_HU)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="InfoNCE temperature")
    p.add_argument("--roi", type=int, nargs="+", default=None, metavar="N",
                   help="view edge (a cube) or X Y Z, in voxels of the --spacing grid (x scale 0.8-1.2); "
                        "multiples of 16, at least 32 (default: the recipe's, 64 or 96 96 32)")
    p.add_argument("--width", type=float, default=DEFAULT_WIDTH,
                   help="channel multiplier of SAMNet (1.0 = ResNet-18 widths)")
    p.add_argument("--spacing", type=float, default=SAM_SPACING_MM,
                   help="isotropic grid of the network in mm (SAM: 2); embed uses the same")
    p.add_argument("--hu_window", type=float, nargs=2, default=SAM_HU_WINDOW, metavar=("LO", "HI"),
                   help="HU clipped to [LO, HI] (default -1000 1000) and scaled to [-1, 1] as the "
                        "network input; stored with the model, embed uses the same (phantoms: -200 300 "
                        "beat the wide default, see docs/experiments/)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the recipe's: AdamW 1e-3 with cosine decay, or SGD 0.02 "
                        "after a linear warm-up)")
    p.add_argument("--save_every", type=int, default=DEFAULT_SAVE_EVERY,
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop after this wall time, checkpoint and write final weights")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and view sampling")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoints/latest (same settings)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch CPU threads of the training process (on a shared or small CPU, 1 "
                        "avoids threads waiting for each other)")
    p.add_argument("--workers", type=int, default=1,
                   help="DataLoader processes preparing views ahead (0: in the training process)")


def training_cases(cache_dir, json_list) -> list[str]:
    """Case ids to train on: all cached cases, or those of the datalist's training split."""
    cached = list_cases(cache_dir)
    chosen = cached if json_list is None else split_case_ids(json_list, "training")
    missing = sorted(set(chosen) - set(cached))
    if missing:
        raise DataError(cache_dir, f"{len(missing)} training case(s) of {json_list} are not "
                                   f"cached, e.g. {missing[0]!r} (run alice-ds preprocess)")
    if not chosen:
        raise UserError(f"{cache_dir}: no cached cases to train on")
    return chosen


def save_model(model, path: Path, step: int) -> str:
    """Weights + JSON sidecar (same stem). Returns the model id (config + content hash), which
    `embed` writes into every embedding file so stale embeddings are recognisable."""


    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for k in sorted(state):
        digest.update(k.encode())
        digest.update(state[k].numpy().tobytes())
    model_id = f"samnet-w{model.width:g}-step{step}-{digest.hexdigest()[:12]}"
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    path.with_suffix(".json").write_text(json.dumps({**model.config(), "step": step,
                                                     "model_id": model_id}, indent=2))
    return model_id


def load_model(path, device="cpu"):
    """SAMNet from `<name>.safetensors` + `<name>.json` (as written by save_model), in eval mode.
    -> (model, model_id)."""


    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise DataError(path, "SAM checkpoint not found (alice-ds sam-train writes OUTPUT_DIR/sam.safetensors)")
    try:
        cfg = json.loads(sidecar.read_text())
        stride = cfg.get("coarse_stride", COARSE_STRIDE)  # one number in older sidecars
        model = SAMNet(width=float(cfg["width"]), spacing_mm=float(cfg["spacing_mm"]), hu_window=cfg["hu_window"],
                       coarse_stride=[stride] * 3 if isinstance(stride, int) else stride)
        model.load_state_dict(load_file(str(path)))
    except FileNotFoundError:
        raise DataError(sidecar, "SAM checkpoint config (JSON sidecar) not found") from None
    except (json.JSONDecodeError, KeyError, RuntimeError, ValueError) as e:
        raise DataError(path, f"cannot load SAM checkpoint ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg["model_id"]


def _save_optimizer(opt, path: Path) -> None:
    """AdamW state without pickle: tensors named `<param index>.<key>` (exp_avg, exp_avg_sq, step),
    param groups as JSON metadata."""

    sd = opt.state_dict()
    tensors = {f"{i}.{k}": (v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v))
               for i, st in sd["state"].items() for k, v in st.items()}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(sd["param_groups"])})


def _load_optimizer(opt, path: Path) -> None:

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict = {}
        for key in f.keys():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = f.get_tensor(key)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, model, opt, step: int, settings: dict) -> Path:
    """`out/checkpoints/step_<N>/` (weights, optimizer, step + settings), then the
    `latest` pointer, replaced atomically so it always names a complete checkpoint."""
    tag = f"step_{step}"
    d = out / "checkpoints" / tag
    d.mkdir(parents=True, exist_ok=True)
    save_model(model, d / "model.safetensors", step)
    _save_optimizer(opt, d / "optimizer.safetensors")
    (d / "state.json").write_text(json.dumps({"step": step, "settings": settings}, indent=2))
    atomic_write_text(out / "checkpoints" / "latest", tag)
    return d


class StepViews:
    """The views of every training step, indexable by step (a map-style dataset for DataLoader):
    `[step]` -> (x [B * K * 2, 1, X, Y, Z] network input, pairs [(View, View)] * B * K,
    cases [B * K] index of each pair's case), drawn with default_rng([seed, step]). `roi`: view
    shape (an edge or (X, Y, Z)); `disjoint_fraction` None: crops.view_pair, else
    crops.reference_pair with this fraction of independent pairs. Cases are opened (memory-mapped)
    on first use, so every worker process opens its own."""

    def __init__(self, cache_dir, case_ids: list[str], roi, spacing: float, batch_size: int,
                 pairs_per_case: int, intensity: bool, seed: int, steps: int, hu_window=SAM_HU_WINDOW,
                 disjoint_fraction: float | None = None):
        self.cache_dir, self.case_ids, self.hu_window = cache_dir, list(case_ids), tuple(hu_window)
        self.roi, self.spacing, self.intensity = view_shape(roi), spacing, intensity
        self.batch_size, self.pairs_per_case, self.seed, self.steps = batch_size, pairs_per_case, seed, steps
        self.disjoint_fraction = disjoint_fraction
        self._cases = None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        if self._cases is None:
            opened = [open_case(self.cache_dir, c) for c in self.case_ids]
            self._cases = [(c, body_voxels(c.array)) for c in opened]
        rng = np.random.default_rng([self.seed, step])
        cases = np.repeat(rng.integers(0, len(self._cases), self.batch_size), self.pairs_per_case)
        pairs = []
        for i in cases:
            case, body = self._cases[i]
            if self.disjoint_fraction is None:
                pairs.append(view_pair(case.array, case.affine, self.roi, rng, body, self.spacing, self.intensity))
            else:
                disjoint = bool(rng.random() < self.disjoint_fraction)
                pairs.append(reference_pair(case.array, case.affine, self.roi, rng, disjoint, body,
                                            self.spacing, self.intensity))
        # network input [2BK, 1, X, Y, Z]
        x = torch.stack([scale_hu(v.hu, self.hu_window) for pair in pairs for v in pair])[:, None]
        return x, pairs, cases


def _identity(batch):
    return batch


def run(args) -> int:



    recipe = RECIPES[args.recipe]
    for name in ("roi", "batch_size", "pairs_per_case", "steps", "lr"):  # unset: the recipe's
        if getattr(args, name) is None:
            setattr(args, name, getattr(recipe, name))
    if len(args.roi) not in (1, 3) or any(r % COARSE_STRIDE or r < 2 * COARSE_STRIDE for r in args.roi):
        raise UserError(f"--roi must be one edge or X Y Z, each a multiple of {COARSE_STRIDE} and "
                        f">= {2 * COARSE_STRIDE}, got {' '.join(map(str, args.roi))}")
    roi = list(view_shape(args.roi[0] if len(args.roi) == 1 else args.roi))
    for name in ("steps", "batch_size", "pairs_per_case", "save_every", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.cross_case_negatives and recipe.coarse_rule == "reference":
        raise UserError("--cross_case_negatives is part of --recipe reference already (1000 voxels of the "
                        "other cases); use it with the default recipe")
    if args.temperature <= 0 or args.lr <= 0:
        raise UserError(f"--temperature and --lr must be > 0, got {args.temperature} and {args.lr}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    case_ids = training_cases(args.cache_dir, args.json_list)
    hu_window = [float(v) for v in args.hu_window]
    if not hu_window[1] > hu_window[0]:
        raise UserError(f"--hu_window must be LO HI with HI > LO, got {hu_window}")
    settings = {"recipe": recipe.name, "roi": roi, "width": args.width, "spacing": args.spacing, "hu_window": hu_window,
                "batch_size": args.batch_size, "pairs_per_case": args.pairs_per_case,
                "cross_case_negatives": args.cross_case_negatives, "intensity_aug": args.intensity_aug,
                "temperature": args.temperature, "lr": args.lr, "steps": args.steps, "seed": args.seed,
                "cases": case_ids}

    torch.manual_seed(args.seed)
    model = SAMNet(width=args.width, spacing_mm=args.spacing, hu_window=hu_window,
                   coarse_stride=recipe.coarse_stride).to(device)
    opt = recipe.make_optimizer(model.parameters(), args.lr)
    step = 0
    if args.resume:
        latest = out / "checkpoints" / "latest"
        if not latest.is_file():
            raise DataError(latest, "no checkpoint to resume from")
        d = out / "checkpoints" / latest.read_text().strip()
        state = json.loads((d / "state.json").read_text())
        # older checkpoints: the default window and recipe, a cube's edge
        saved = {"hu_window": list(SAM_HU_WINDOW), "recipe": "default", **state["settings"]}
        saved["roi"] = list(view_shape(saved["roi"]))
        for name, value in (("recipe", recipe.name), ("width", args.width), ("spacing", args.spacing),
                            ("roi", roi), ("hu_window", hu_window)):
            if saved[name] != value:
                raise UserError(f"--{name} {value} differs from the checkpoint's {saved[name]} ({d})")
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        _load_optimizer(opt, d / "optimizer.safetensors")
        step = state["step"]
        console.print(f"resumed from {d} at step {step}")
    console.print(f"sam-train ({recipe.name} recipe): {len(case_ids)} cases, batch {args.batch_size} x "
                  f"{args.pairs_per_case} x 2 views of {'x'.join(map(str, roi))} at {args.spacing:g} mm, "
                  f"width {args.width}, coarse stride {'x'.join(map(str, model.coarse_stride))}, "
                  f"{recipe.optimizer} lr {args.lr:g}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, {device}")

    def lr_at(s: int) -> float:
        return recipe.lr_at(s, args.steps, args.lr)

    views = StepViews(args.cache_dir, case_ids, roi, args.spacing, args.batch_size, args.pairs_per_case,
                      args.intensity_aug, args.seed, args.steps, hu_window, recipe.disjoint_fraction)
    loader = torch.utils.data.DataLoader(views, batch_size=None, sampler=range(step, args.steps),
                                         num_workers=args.workers, collate_fn=_identity)
    model.train()
    start = time.time()
    log = (out / "log.jsonl").open("a")
    with progress() as bar:
        task = bar.add_task("sam-train", total=args.steps, completed=step)
        t0 = time.time()
        for x, pairs, cases in loader:  # sample: views of this step, prepared ahead by the loader
            t_data = time.time() - t0
            # forward + loss
            fine, coarse = model(x.to(device))
            losses = sam_loss(fine, coarse, pairs, np.random.default_rng([args.seed, step, 1]), cases,
                              args.cross_case_negatives, args.temperature, recipe.coarse_rule,
                              model.coarse_stride)
            # backward + step
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            # log
            rec = {"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()},
                   "lr": lr_at(step - 1), "seconds": round(time.time() - t0, 3),
                   "data_wait": round(t_data, 3)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.update(task, advance=1, description=f"sam-train loss {rec['loss']:.3f}")
            out_of_time = args.max_minutes is not None and time.time() - start > args.max_minutes * 60
            if step % args.save_every == 0 or step == args.steps or out_of_time:
                save_checkpoint(out, model, opt, step, settings)
            if out_of_time:
                console.print(f"stopping at step {step}: --max_minutes {args.max_minutes} reached")
                break
            t0 = time.time()
    log.close()
    model_id = save_model(model, out / "sam.safetensors", step)
    console.print(f"wrote {out / 'sam.safetensors'} ({model_id}) after {step} steps, "
                  f"{time.time() - start:.0f} s")
    return 0
