"""`alice-ds finetune` on real small phantoms (conftest's phantom_dir / phantom_datalist): classes,
preprocessing from the weights' sidecar, the lr schedule, loading exported weights, refusing another
architecture, a loss that falls on a fixed crop, and a real run that writes its files and resumes at
the saved step."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.transforms import Compose
from safetensors.torch import load_file, save_file

from alice_ds.cli import main
from alice_ds.errors import DataError, UserError
from alice_ds.export import write_safetensors
from alice_ds.finetune.config import FinetuneConfig
from alice_ds.finetune.data import RemapLabelsd, base_transforms, parse_classes, preprocessing_for, random_transforms
from alice_ds.finetune.train import MIN_LR_FRACTION, build_and_load, lr_at

F = 12
ROI = 64  # the smallest SwinUNETR input whose deepest stage keeps > 1 voxel (InstanceNorm needs it)
SPACING = 8.0
"""Coarse enough that a phantom is ~52 x 52 x 40 voxels: a step costs one 64^3 crop."""
CLASSES = ["liver=1", "kidneys=2,7", "vertebrae=11"]
FIRST_CONV = "swinViT.patch_embed.proj.weight"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """An `alice-ds convert`-style export (full SwinUNETR F=12, out_channels 1) with its W.json."""
    path = tmp_path_factory.mktemp("ft_weights") / "W.safetensors"
    torch.manual_seed(3)
    model = SwinUNETR(in_channels=1, out_channels=1, feature_size=F)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
    write_safetensors(path, layout, sd.__getitem__, {})
    path.with_suffix(".json").write_text(json.dumps({"feature_size": F, "use_v2": False, "spacing": [SPACING] * 3,
                                                     "intensity_window": [-150.0, 250.0]}))
    return path


def _args(phantom_dir, phantom_datalist, weights, out, *extra):
    return ["finetune", "--data_dir", str(phantom_dir), "--json_list", str(phantom_datalist), "--weights", str(weights),
            "--output_dir", str(out), "--roi", str(ROI), "--crops_per_case", "1", "--classes", *CLASSES, *extra]


def test_classes_select_and_merge_label_values():
    cmap = parse_classes(["liver=1", "kidneys=2,7"], None)
    assert (cmap.names, cmap.num_classes) == (("liver", "kidneys"), 3)
    label = torch.tensor([[[[0, 1, 2], [7, 11, 3]]]], dtype=torch.float32)  # [1, 1, 2, 3]
    out = RemapLabelsd("label", cmap)({"label": label})["label"]
    assert out.tolist() == [[[[0, 1, 2], [2, 0, 0]]]]
    assert parse_classes(None, 3).values == ((1,), (2,))
    for specs, n, message in [(["liver"], None, "NAME=V"), (["a=1", "b=1"], None, "in both 'a' and 'b'"),
                              (["a=1"], 3, "disagrees"), (None, None, "--num_classes must be >= 2")]:
        with pytest.raises(UserError, match=message):
            parse_classes(specs, n)
    with pytest.raises(DataError, match="not a label map"):
        RemapLabelsd("label", cmap)({"label": torch.tensor([0.5])})


def test_preprocessing_comes_from_the_sidecar_unless_flags_say(weights):
    prep = preprocessing_for(str(weights))
    assert (prep.spacing, prep.hu_window) == ((SPACING,) * 3, (-150.0, 250.0))
    assert prep.source == str(weights.with_suffix(".json"))
    assert preprocessing_for(str(weights), spacing=[2, 2, 3]).spacing == (2.0, 2.0, 3.0)
    assert preprocessing_for(None).source == "defaults"


def test_lr_schedule_is_a_function_of_the_step():
    cfg = FinetuneConfig(classes=parse_classes(None, 2), steps=11, lr=1e-3, warmup_steps=2, roi=ROI)
    lrs = [lr_at(cfg, s) for s in range(11)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[-1] == pytest.approx(1e-3 * MIN_LR_FRACTION)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_weights_load_into_the_segmentation_model(weights):
    cfg = FinetuneConfig(classes=parse_classes(CLASSES, None), feature_size=F, roi=ROI, weights=str(weights))
    model, loaded = build_and_load(cfg, verbose=False)
    file = load_file(weights)
    assert loaded == len(file) - 2  # all but the 1-channel head out.conv.conv.{weight,bias}
    state = model.state_dict()
    assert torch.equal(state[FIRST_CONV], file[FIRST_CONV])
    assert state["out.conv.conv.weight"].shape[0] == len(CLASSES) + 1


def test_another_architecture_is_one_line_naming_the_file(weights, phantom_dir, phantom_datalist, tmp_path, capsys):
    other = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 1, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, other)
    cases = [(weights, ["--feature_size", "24"], "feature_size 12, the model feature_size 24"),
             (other, [], "key(s) the model does not have")]
    for file, extra, message in cases:
        assert main(_args(phantom_dir, phantom_datalist, file, tmp_path / "run", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(file) in err and message in " ".join(err.split()), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_loss_falls_on_a_fixed_crop(phantom_dir, phantom_datalist):
    from accelerate import Accelerator
    from monai.losses import DiceCELoss

    from alice_ds.finetune.data import select_cases
    from alice_ds.finetune.train import train_step

    cfg = FinetuneConfig(classes=parse_classes(CLASSES, None), feature_size=F, roi=ROI, spacing=(SPACING,) * 3)
    case = select_cases(phantom_datalist, phantom_dir, 1)[0]
    prep = preprocessing_for(None, spacing=cfg.spacing)
    rand = random_transforms(cfg.classes, ROI, 1)
    rand.set_random_state(seed=0)
    crop = Compose(base_transforms(prep, cfg.classes, ROI) + [rand])(case)[0]
    image, label = crop["image"][None], crop["label"][None]  # [1, 1, 64, 64, 64]
    assert image.shape == (1, 1, ROI, ROI, ROI) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert len(torch.unique(label)) >= 2
    model, _ = build_and_load(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator = Accelerator(cpu=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = [train_step(model, optimizer, loss_fn, image, label, 2e-3, accelerator) for _ in range(2)]
    with torch.no_grad():  # the loss after the second update, without paying for a third step
        losses.append(float(loss_fn(model(image.float()), label.long())))
    assert all(math.isfinite(v) for v in losses) and losses[0] > losses[1] > losses[2], losses


@pytest.fixture(scope="module")
def finetuned_run(weights, phantom_dir, phantom_datalist, tmp_path_factory):
    """1 step from the weights, validated and checkpointed."""
    out = tmp_path_factory.mktemp("ft_run") / "run"
    assert main(_args(phantom_dir, phantom_datalist, weights, out, "--steps", "1", "--val_every", "1",
                      "--save_every", "1", "--labelled", "2", "--lr", "1e-3")) == 0
    return out


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_writes_metrics_best_and_checkpoint(finetuned_run, weights):
    lines = _lines(finetuned_run)
    steps = [ln for ln in lines if "loss" in ln]
    vals = [ln for ln in lines if "val_dice" in ln]
    assert [ln["step"] for ln in steps] == [1]
    assert all(math.isfinite(ln["loss"]) and ln["seconds"] > 0 for ln in steps)
    assert [ln["step"] for ln in vals] == [1]
    assert set(vals[0]["val_dice_per_class"]) == {"liver", "kidneys", "vertebrae"}
    best = json.loads((finetuned_run / "best.json").read_text())
    assert best["val_dice"] == vals[0]["val_dice"] and 0 <= best["val_dice"] <= 1 and best["step"] == 1
    cfg = json.loads((finetuned_run / "config.json").read_text())
    assert (cfg["spacing"], cfg["hu_window"], cfg["feature_size"]) == ([SPACING] * 3, [-150.0, 250.0], F)
    assert cfg["labelled"] == 2 and cfg["weights"] == str(weights)
    assert (finetuned_run / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert sorted(p.name for p in (finetuned_run / "checkpoints").iterdir()) == ["latest", "step_1"]
    best_weights = load_file(finetuned_run / "best.safetensors")
    assert best_weights["out.conv.conv.weight"].shape[0] == len(CLASSES) + 1


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(finetuned_run, phantom_dir, phantom_datalist, weights, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finetuned_run, run)
    before = load_file(run / "checkpoints" / "step_1" / "model.safetensors")
    assert main(_args(phantom_dir, phantom_datalist, weights, run, "--steps", "2", "--val_every", "0",
                      "--save_every", "1", "--labelled", "2", "--lr", "1e-3")) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "resuming from" in err and "(step 1)" in err
    assert [ln["step"] for ln in _lines(run) if "loss" in ln] == [1, 2]
    folder = run / "checkpoints" / "step_2"
    assert json.loads((folder / "model.json").read_text())["step"] == 2
    assert not (run / "checkpoints" / "step_1").exists()
    opt = torch.load(folder / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}  # AdamW went on from its saved step
    after = load_file(folder / "model.safetensors")
    assert not torch.equal(before[FIRST_CONV], after[FIRST_CONV])
    # another model in the same folder is refused before its weights are read
    assert main(_args(phantom_dir, phantom_datalist, "none", run, "--steps", "4", "--feature_size", "24")) == 2
    assert "resuming a run with feature_size=12, now 24" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_evaluate_scores_the_best_checkpoint_and_draws(finetuned_run, phantom_dir, phantom_datalist, tmp_path):
    """Same preprocessing and sliding window as the run's validation: the same mean Dice."""
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(finetuned_run), "--data_dir", str(phantom_dir), "--json_list",
                 str(phantom_datalist), "--json", str(out), "--pictures", str(tmp_path / "pics"),
                 "--num_pictures", "1"]) == 0
    result = json.loads(out.read_text())
    best = json.loads((finetuned_run / "best.json").read_text())
    assert result["num_cases"] == 1 and result["step"] == 1
    assert result["mean_dice"] == pytest.approx(best["val_dice"], abs=1e-6)
    for name, dice in best["val_dice_per_class"].items():
        assert result["per_class"][name]["dice"] == pytest.approx(dice, abs=1e-6)
    pictures = sorted((tmp_path / "pics").glob("*.png"))
    names = {p.name.removesuffix(".png").split("_0000_")[1] for p in pictures}
    assert names and names <= set(best["val_dice_per_class"])


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun_share_one_run(weights, phantom_dir, phantom_datalist, tmp_path):
    """torchrun with 2 CPU processes: Accelerate joins them (gloo), so one run of world 2 trains and
    writes one set of files (two single-process runs would each log step 1 into the same folder)."""
    import os
    import subprocess
    import sys

    from alice_ds.engine.distenv import free_port

    out = tmp_path / "run2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "alice_ds.cli", *_args(phantom_dir, phantom_datalist, weights, out, "--steps", "1",
                                        "--val_every", "1", "--labelled", "2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ALICE_DS_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    lines = _lines(out)
    assert [ln["step"] for ln in lines if "loss" in ln] == [1]
    assert [ln["step"] for ln in lines if "val_dice" in ln] == [1]
