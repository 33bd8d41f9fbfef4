"""Scores, pictures and plots of `alice_ds.finetune` on synthetic arrays: Dice against a hand count,
HD95 of a known shift in mm, overlays that are not blank, curves from small metrics files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from alice_ds.cli import main
from alice_ds.finetune.metrics import dice_per_class, hd95_per_class
from alice_ds.finetune.pictures import draw_case
from alice_ds.finetune.plot import PRETRAIN_PANELS


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)[None, None]  # [X, Y, Z] -> [1, 1, X, Y, Z]


def test_dice_equals_a_hand_count():
    label = np.zeros((12, 12, 12), np.uint8)
    pred = np.zeros_like(label)
    label[2:6, 2:6, 2:6] = 1          # 64 voxels
    pred[3:7, 2:6, 2:6] = 1           # shifted by one: 48 shared
    label[8:10, 8:10, 8:10] = 2       # 8 voxels, predicted as 3 (class 2 missed, 3 false)
    pred[8:10, 8:10, 8:10] = 3
    dice = dice_per_class(_t(pred), _t(label), num_classes=5).numpy()
    inter = np.sum((pred == 1) & (label == 1))
    assert dice[0] == pytest.approx(2 * inter / (np.sum(pred == 1) + np.sum(label == 1))) == pytest.approx(0.75)
    assert dice[1] == 0.0
    assert math.isnan(dice[2]) and math.isnan(dice[3])  # absent from the label: no score, whatever is predicted


def test_hd95_of_a_shifted_cube_is_the_shift_in_mm():
    label = np.zeros((24, 24, 24), np.uint8)
    label[6:14, 6:14, 6:14] = 1
    pred = np.roll(label, 3, axis=0)  # 3 voxels along x
    hd = hd95_per_class(_t(pred), _t(label), 3, spacing=(2.0, 1.0, 1.0))
    assert float(hd[0]) == pytest.approx(6.0)
    assert math.isnan(float(hd[1]))
    missed = hd95_per_class(_t(np.zeros_like(label)), _t(label), 2, spacing=(2.0, 2.0, 2.0))
    assert math.isinf(float(missed[0]))


def test_pictures_show_ct_label_and_prediction(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((32, 32, 24)).astype(np.float32)
    label = np.zeros((32, 32, 24), np.uint8)
    label[8:20, 8:20, 6:16] = 1
    pred = np.roll(label, 2, axis=1)
    paths = draw_case(tmp_path, "case1", image, label, pred, ["liver", "spleen"], (1.5, 1.5, 3.0))
    assert [p.name for p in paths] == ["case1_liver.png"]  # spleen is in neither
    rgb = imread(paths[0])[..., :3]
    assert rgb.std() > 0.05
    green = (rgb[..., 1] > 0.7) & (rgb[..., 0] < 0.4)
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.3)
    assert green.sum() > 50 and red.sum() > 50  # both outlines are drawn


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_writes_curves_of_either_kind_of_run(tmp_path):
    keys = {k for panels in PRETRAIN_PANELS.values() for _, ks, _ in panels for k in ks}
    pre = [{"step": s, **{k: 1.0 / s + (0.1 if k == "lr" else 0.0) for k in keys}} for s in range(1, 6)]
    _write(tmp_path / "pre", pre)
    fine = [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3, "seconds": 1.0} for s in range(1, 5)]
    fine.insert(2, {"step": 2, "val_dice": 0.3, "val_dice_per_class": {"liver": 0.5, "bowel": 0.1}})
    _write(tmp_path / "fine", fine)
    assert main(["plot", str(tmp_path / "pre")]) == 0
    assert main(["plot", str(tmp_path / "fine"), "--out", str(tmp_path / "fine_png")]) == 0
    pre_png = sorted(p.name for p in (tmp_path / "pre" / "plots").glob("*.png"))
    assert pre_png == sorted(f"{name}.png" for name in PRETRAIN_PANELS)
    assert sorted(p.name for p in (tmp_path / "fine_png").glob("*.png")) == ["loss.png", "val_dice.png"]
    for p in [*(tmp_path / "pre" / "plots").glob("*.png"), *(tmp_path / "fine_png").glob("*.png")]:
        assert imread(p)[..., :3].std() > 0.01, p
    _write(tmp_path / "bad", [{"step": 1, "other": 1}])
    assert main(["plot", str(tmp_path / "bad")]) == 2
