"""`alice-ds evaluate`: per-class and mean Dice and HD95 (mm) of a fine-tuned checkpoint over one list
of a datalist, as a table and JSON, with overlay pictures of a few cases (`alice_ds.finetune.pictures`).

Cases are preprocessed exactly as in fine-tuning (the checkpoint's config: spacing, HU window,
classes); scores are computed on that grid, HD95 in mm of it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from monai.data import Dataset
from monai.transforms import Compose

from alice_ds.args import positive_int
from alice_ds.console import console, progress, table
from alice_ds.files import atomic_write_text
from alice_ds.finetune import checkpoint as ckpt
from alice_ds.finetune.data import Preprocessing, base_transforms, select_cases, unwrap_transform_error
from alice_ds.finetune.metrics import dice_per_class, hd95_per_class, nanmean, predict


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{digits}f}")


def evaluate(checkpoint, data_dir, json_list, split: str = "validation", pictures=None, num_pictures: int = 3,
             device: str | None = None) -> dict:
    """Scores of every labelled case of `split`; returns the JSON document (see `alice-ds evaluate
    --help`): `per_case` (Dice and HD95 per class), `per_class` (means over the cases that have the
    class), `mean_dice`, `mean_hd95` (over classes, inf when a class was missed in some case)."""
    path, cfg, info = ckpt.resolve_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = ckpt.build_model(cfg)
    model.load_state_dict(ckpt.read_weights(path))
    model.to(device).eval()
    cases = select_cases(json_list, data_dir, None, split)
    prep = Preprocessing(cfg.spacing, cfg.hu_window, cfg.preprocessing_source)
    ds = Dataset(cases, Compose(base_transforms(prep, cfg.classes, None)))  # one case in memory at a time
    names = list(cfg.classes.names)
    per_case, drawn = [], []
    with progress() as bar:
        task = bar.add_task(f"evaluate {split}", total=len(cases))
        for i, case in enumerate(cases):
            try:
                item = ds[i]
            except Exception as e:
                raise unwrap_transform_error(e) from None
            image = item["image"].unsqueeze(0).to(device)  # [1, 1, X, Y, Z]
            label = item["label"].unsqueeze(0).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pred = predict(model, image, cfg.roi)
            dice = dice_per_class(pred, label, cfg.num_classes)
            hd = hd95_per_class(pred, label, cfg.num_classes, cfg.spacing)
            case_id = Path(case["image"]).name.split(".")[0]
            per_case.append({"case": case_id, "image": case["image"],
                             "dice": dict(zip(names, map(float, dice))), "hd95_mm": dict(zip(names, map(float, hd)))})
            if pictures and len(drawn) < num_pictures:
                from alice_ds.finetune.pictures import draw_case  # matplotlib only when asked for

                drawn += draw_case(Path(pictures), case_id, image[0, 0].float().cpu().numpy(),
                                   label[0, 0].cpu().numpy(), pred[0, 0].cpu().numpy(), names, cfg.spacing)
            bar.advance(task)
    per_class = {n: {"dice": nanmean(c["dice"][n] for c in per_case),
                     "hd95_mm": nanmean(c["hd95_mm"][n] for c in per_case),
                     "cases": sum(not math.isnan(c["dice"][n]) for c in per_case)} for n in names}
    return {"checkpoint": str(path), "step": info.get("step"), "split": split, "num_cases": len(per_case),
            "spacing": list(cfg.spacing), "classes": cfg.classes.to_json(),
            "mean_dice": nanmean(v["dice"] for v in per_class.values()),
            "mean_hd95_mm": nanmean(v["hd95_mm"] for v in per_class.values()),
            "per_class": per_class, "per_case": per_case, "pictures": [str(p) for p in drawn]}


def _json_safe(x):
    """NaN and inf are not JSON: null and the string "inf"."""
    if isinstance(x, float):
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a finetune run folder (its best.safetensors) or a weights file with its .json beside it")
    parser.add_argument("--data_dir", required=True, help="folder the datalist's paths are relative to")
    parser.add_argument("--json_list", required=True, help="decathlon datalist (entries need a 'label')")
    parser.add_argument("--split", default="validation", choices=("training", "validation"),
                        help="which list of the datalist to score")
    parser.add_argument("--json", metavar="OUT", help="write the scores (per case, per class, means) as JSON")
    parser.add_argument("--pictures", metavar="DIR", help="write PNG overlays (label vs prediction, axial, "
                                                          "coronal, sagittal through each organ's centroid)")
    parser.add_argument("--num_pictures", type=positive_int, default=3, help="cases drawn with --pictures")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def run(args: argparse.Namespace) -> int:
    result = evaluate(args.checkpoint, args.data_dir, args.json_list, args.split, args.pictures,
                      args.num_pictures, args.device)
    rows = [[n, v["cases"], _fmt(v["dice"]), _fmt(v["hd95_mm"], 1)] for n, v in result["per_class"].items()]
    rows.append(["mean", result["num_cases"], _fmt(result["mean_dice"]), _fmt(result["mean_hd95_mm"], 1)])
    console.print(table(f"{result['checkpoint']} (step {result['step']}) on {result['split']}",
                        ["class", "cases", "Dice", "HD95 mm"], rows))
    if result["pictures"]:
        console.print(f"{len(result['pictures'])} pictures in {args.pictures}", highlight=False)
    if args.json:
        atomic_write_text(args.json, json.dumps(_json_safe(result), indent=2) + "\n")
        console.print(f"wrote {args.json}", highlight=False)
    return 0
