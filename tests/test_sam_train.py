"""SAM training pieces on real phantom cases: view geometry and positive pairs, the losses, and the
`alice-ds sam-train` CLI (checkpoints, exact resume, user errors)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alice_ds.cli import main
from alice_ds.data.cache import body_voxels, list_cases, open_case
from alice_ds.sam.crops import View, positive_pairs, reference_pair, resample, view_affine, view_pair
from alice_ds.sam.geometry import index_to_world, sample_channels_first, world_to_index
from alice_ds.sam.loss import sam_loss
from alice_ds.sam.network import SAMNet, scale_hu
from alice_ds.sam.recipe import RECIPES
from alice_ds.sam.train import StepViews

ROI = 32
WIDTH = 0.125
SPACING = 4.0
"""Views of 32 voxels at 4 mm (as the conftest SAM fixtures): 128 mm of anatomy, cheap to run."""
LOSS_STEPS = 5


def test_positive_pairs_of_two_scales_are_the_same_world_point(phantom_cache):
    case = open_case(phantom_cache, list_cases(phantom_cache)[0])
    rng = np.random.default_rng(0)
    centre = index_to_world(case.affine, body_voxels(case.array)[[len(body_voxels(case.array)) // 2]])[0]
    views = []
    for scale, shift in ((0.8, [0.0, 0.0, 0.0]), (1.2, [9.0, -7.0, 5.0])):
        aff = view_affine(case.affine, centre + shift, ROI, 2.0 * scale)
        views.append(View(resample(case.array, case.affine, aff, (ROI,) * 3), aff))
    v1, v2 = views
    fine_shape = (ROI // 2,) * 3
    ijk1, ijk2 = positive_pairs(v1, v2, fine_shape, 100, rng)
    assert len(ijk1) == 100
    w1 = index_to_world(v1.fine_affine, ijk1)
    w2 = index_to_world(v2.fine_affine, ijk2)
    np.testing.assert_allclose(w1, w2, atol=1e-6)
    assert np.all((ijk2 >= 0) & (ijk2 <= np.array(fine_shape) - 1))
    # the images agree there: HU of view 1 at its voxels vs HU of view 2 interpolated at the pair
    hu1 = v1.hu[tuple(torch.from_numpy(ijk1 * 2).T)].numpy()
    hu2 = sample_channels_first(v2.hu[None, None], torch.from_numpy(ijk2 * 2.0)[None].float())[0, :, 0]
    diff = np.abs(hu1 - hu2.numpy())
    shuffled = np.abs(hu1 - rng.permutation(hu2.numpy()))
    assert np.median(diff) < 15.0, np.median(diff)
    assert np.median(shuffled) > 3 * np.median(diff) + 10


def test_view_pair_scales_and_overlap(phantom_cache):
    case = open_case(phantom_cache, list_cases(phantom_cache)[1])
    rng = np.random.default_rng(3)
    for _ in range(5):
        v1, v2 = view_pair(case.array, case.affine, ROI, rng)
        for v in (v1, v2):
            assert v.hu.shape == (ROI,) * 3
            spacing = np.diag(v.affine)[:3]
            assert np.all((spacing >= 1.6 - 1e-9) & (spacing <= 2.4 + 1e-9)) and np.ptp(spacing) < 1e-9
        assert len(positive_pairs(v1, v2, (ROI // 2,) * 3, 100, rng)[0]) > 0


def test_separable_resample_matches_grid_sample(phantom_cache):
    """Axis-aligned grids take the separable path; an affine with a negligible off-diagonal term takes
    grid_sample. Both agree to float precision, also where the grid leaves the volume (pad)."""
    case = open_case(phantom_cache, list_cases(phantom_cache)[0])
    body = body_voxels(case.array)
    lowest = index_to_world(case.affine, body[[np.argmin(body[:, 2])]] + [0.3, -0.7, 0.4])[0]
    for scale in (0.8, 1.13):  # views centred on the lowest body slice reach below the volume
        aff = view_affine(case.affine, lowest, ROI, 2.0 * scale)
        tilted = aff.copy()
        tilted[0, 1] = 1e-7
        fast = resample(case.array, case.affine, aff, (ROI,) * 3)
        ref = resample(case.array, case.affine, tilted, (ROI,) * 3)
        assert fast.shape == (ROI,) * 3
        assert (fast == -1024).any() and (fast > -500).any()  # both padding and body in the view
        torch.testing.assert_close(fast, ref, rtol=0, atol=0.05)


def test_step_views_are_a_function_of_the_step(phantom_cache):
    """What makes the DataLoader worker and exact resume possible: a fresh StepViews gives the same
    views for the same step, and different views for another step."""
    ids = list_cases(phantom_cache)[:2]
    make = lambda: StepViews(phantom_cache, ids, ROI, SPACING, 2, 2, True, 7, 10)  # noqa: E731
    x, pairs, cases = make()[3]
    assert x.shape == (8, 1, ROI, ROI, ROI) and len(pairs) == 4 and cases.shape == (4,)
    assert cases[0] == cases[1] and cases[2] == cases[3]  # pairs_per_case pairs of one case in a row
    x2, pairs2, _ = make()[3]
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    np.testing.assert_array_equal(pairs[1][1].affine, pairs2[1][1].affine)
    assert not torch.equal(make()[4][0], x)


def test_coarse_negatives_of_other_cases_only_with_the_flag(phantom_cache):
    """Coarse embeddings constant per case: e for case 0, +e or -e for case 1. Without cross-case
    negatives the loss cannot see which; with them, +e (other case identical) costs more."""
    case = open_case(phantom_cache, list_cases(phantom_cache)[0])
    rng = np.random.default_rng(0)
    pairs = [view_pair(case.array, case.affine, ROI, rng, spacing_mm=SPACING) for _ in range(2)]
    torch.manual_seed(0)
    fine = torch.nn.functional.normalize(torch.randn(4, 128, ROI // 2, ROI // 2, ROI // 2), dim=1)
    e = torch.nn.functional.normalize(torch.randn(128), dim=0)[None, :, None, None, None]
    c = ROI // 16

    def coarse_loss(sign: float, cross: bool) -> float:
        coarse = torch.cat([e.expand(2, 128, c, c, c), sign * e.expand(2, 128, c, c, c)])
        return float(sam_loss(fine, coarse, pairs, np.random.default_rng(1), [0, 1], cross)["coarse"])

    assert coarse_loss(1.0, False) == coarse_loss(-1.0, False)
    assert coarse_loss(1.0, True) > coarse_loss(-1.0, True) + 0.5


def test_loss_decreases_on_phantoms(phantom_cache):
    """A few AdamW steps on fixed view pairs of two phantom cases lower fine and coarse InfoNCE."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [open_case(phantom_cache, c) for c in list_cases(phantom_cache)[:2]]
    pairs = [view_pair(c.array, c.affine, ROI, rng, spacing_mm=SPACING) for c in cases]
    x = torch.stack([scale_hu(v.hu) for p in pairs for v in p])[:, None]
    model = SAMNet(width=WIDTH)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(LOSS_STEPS):
        losses = sam_loss(*model(x), pairs, np.random.default_rng(1))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    assert history[-1]["loss"] < 0.92 * history[0]["loss"], history
    assert history[-1]["fine"] < history[0]["fine"] and history[-1]["coarse"] < history[0]["coarse"]


def test_sam_train_cli_checkpoints_and_exact_resume(phantom_cache, sam_checkpoint, tmp_path):
    """The session fixture trained 2 steps with a checkpoint per step; resuming from step 1 in a
    copy reproduces the step-2 weights exactly."""
    import shutil

    src = sam_checkpoint.parent
    log = [json.loads(line) for line in (src / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert (src / "checkpoints" / "latest").read_text() == "step_2"
    out = tmp_path / "resumed"
    shutil.copytree(src / "checkpoints" / "step_1", out / "checkpoints" / "step_1")
    (out / "checkpoints" / "latest").write_text("step_1")
    cfg = json.loads((src / "checkpoints" / "step_1" / "state.json").read_text())["settings"]
    assert main(["sam-train", "--cache_dir", str(phantom_cache), "--output_dir", str(out),
                 "--steps", str(cfg["steps"]), "--save_every", "1", "--batch_size", str(cfg["batch_size"]),
                 "--roi", *map(str, cfg["roi"]), "--width", str(cfg["width"]), "--spacing", str(cfg["spacing"]),
                 "--resume"]) == 0
    want, got = load_file(str(sam_checkpoint)), load_file(str(out / "sam.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    resumed_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [2]
    assert resumed_log[-1]["loss"] == log[-1]["loss"]


def test_sam_train_user_errors(phantom_cache, tmp_path, capsys):
    base = ["sam-train", "--cache_dir", str(phantom_cache), "--output_dir", str(tmp_path / "o")]
    assert main(base + ["--roi", "40"]) == 2
    assert "--roi" in capsys.readouterr().err
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "imagesTr/Nope_00001_0000.nii.gz"}]}))
    assert main(base + ["--json_list", str(datalist)]) == 2
    assert "Nope_00001_0000" in capsys.readouterr().err
    assert main(base + ["--resume"]) == 2
    assert "latest" in capsys.readouterr().err


def test_hu_window_is_a_model_setting(phantom_cache, tmp_path, capsys):
    """--hu_window goes into the model's config; load_model and embed use it; resuming with another
    window is refused."""
    from alice_ds.sam.embed import embed_volume
    from alice_ds.sam.train import load_model

    out = tmp_path / "soft"
    args = ["sam-train", "--cache_dir", str(phantom_cache), "--output_dir", str(out), "--steps", "1",
            "--roi", "32", "--width", "0.125", "--spacing", "4", "--workers", "0"]
    assert main(args + ["--hu_window", "-200", "300"]) == 0
    assert json.loads((out / "sam.json").read_text())["hu_window"] == [-200.0, 300.0]
    model, _ = load_model(out / "sam.safetensors")
    assert model.hu_window == (-200.0, 300.0)
    hu = torch.linspace(-1000, 1000, 32 ** 3).view(32, 32, 32)
    fine, coarse = embed_volume(model, hu, tile=32, overlap=0, border=0)
    with torch.no_grad():
        want_f, want_c = model(scale_hu(hu, (-200.0, 300.0))[None, None])
        wide_f, _ = model(scale_hu(hu)[None, None])
    torch.testing.assert_close(fine.float(), want_f[0].permute(1, 2, 3, 0), atol=2e-3, rtol=0)
    torch.testing.assert_close(coarse.float(), want_c[0].permute(1, 2, 3, 0), atol=2e-3, rtol=0)
    assert (want_f - wide_f).abs().max() > 0.01  # the window changes what the network sees
    assert scale_hu(torch.tensor([-500.0, 50.0, 900.0]), (-200.0, 300.0)).tolist() == [-1.0, 0.0, 1.0]
    capsys.readouterr()
    assert main(args + ["--steps", "2", "--resume"]) == 2  # default window vs the checkpoint's
    assert "--hu_window" in capsys.readouterr().err
    assert main(args + ["--hu_window", "300", "-200"]) == 2


SLAB = (48, 48, 32)
"""Reference-recipe views in the tests: 192 x 192 x 128 mm at 4 mm."""


def test_reference_pairs_are_slabs_around_a_shared_point(phantom_cache):
    case = open_case(phantom_cache, list_cases(phantom_cache)[1])
    rng = np.random.default_rng(5)
    for _ in range(8):
        v1, v2 = reference_pair(case.array, case.affine, SLAB, rng, disjoint=False, spacing_mm=SPACING)
        assert v1.hu.shape == v2.hu.shape == SLAB
        # the seed point is inside both views: they share voxels at the same world point
        assert len(positive_pairs(v1, v2, tuple(s // 2 for s in SLAB), 100, rng)[0]) > 0
    d1, d2 = reference_pair(case.array, case.affine, SLAB, rng, disjoint=True, spacing_mm=SPACING)
    assert d1.hu.shape == SLAB and not np.allclose(d1.affine[:3, 3], d2.affine[:3, 3], atol=1.0)


def test_reference_coarse_rule_and_disjoint_pairs(phantom_cache):
    """Every embedding equal, so each InfoNCE term is log(1 + number of negatives). Reference rule:
    the pair's own 16 coarse voxels but those < 5 mm from the query (at most one per view at >= 51 mm
    spacing) plus the other case's 16; the 'far' rule only has the same case's voxels beyond 64 mm.
    A pair of views that do not overlap counts under the reference rule (each query its own
    positive, 500 fine negatives from view 2) and is skipped under ours."""
    import math

    cases = [open_case(phantom_cache, c) for c in list_cases(phantom_cache)[:2]]
    rng = np.random.default_rng(0)
    pairs = [view_pair(c.array, c.affine, ROI, rng, spacing_mm=SPACING) for c in cases]
    c = ROI // 16
    fine = torch.ones(4, 128, ROI // 2, ROI // 2, ROI // 2) / math.sqrt(128)
    coarse = torch.ones(4, 128, c, c, c) / math.sqrt(128)
    ref = sam_loss(fine, coarse, pairs, np.random.default_rng(1), [0, 1], coarse_rule="reference")
    ours = sam_loss(fine, coarse, pairs, np.random.default_rng(1), [0, 1])
    assert math.log(31) - 1e-4 <= float(ref["coarse"]) <= math.log(33) + 1e-4, ref
    assert float(ours["coarse"]) <= math.log(17) + 1e-4
    assert abs(float(ref["fine"]) - math.log(501)) < 1e-3  # 500 hardest candidates, none too close

    body = body_voxels(cases[0].array)
    low, high = (index_to_world(cases[0].affine, body[[i]])[0]
                 for i in (np.argmin(body[:, 2]), np.argmax(body[:, 2])))
    assert high[2] - low[2] > ROI * SPACING * 1.2 + 10  # the two views cannot overlap
    apart = tuple(View(resample(cases[0].array, cases[0].affine, a, (ROI,) * 3), a)
                  for a in (view_affine(cases[0].affine, p, ROI, SPACING * 1.2) for p in (low, high)))
    alone = sam_loss(fine[:2], coarse[:2], [apart], np.random.default_rng(1), [0], coarse_rule="reference")
    assert abs(float(alone["fine"]) - math.log(501)) < 1e-3
    assert math.log(16) - 1e-4 <= float(alone["coarse"]) <= math.log(17) + 1e-4  # own 16 but < 5 mm
    with pytest.raises(RuntimeError, match="overlaps"):
        sam_loss(fine[:2], coarse[:2], [apart], np.random.default_rng(1), [0])


def test_recipe_learning_rates():
    ref, ours = RECIPES["reference"], RECIPES["default"]
    assert ref.lr_at(0, 20000, 0.02) == pytest.approx(0.02 / 500)
    assert ref.lr_at(499, 20000, 0.02) == ref.lr_at(15000, 20000, 0.02) == pytest.approx(0.02)
    assert ref.lr_at(4, 100, 0.02) == pytest.approx(0.01)  # a short run warms up over a tenth
    assert ours.lr_at(0, 100, 1e-3) == pytest.approx(1e-3) and ours.lr_at(100, 100, 1e-3) == pytest.approx(0)
    assert ours.lr_at(50, 100, 1e-3) == pytest.approx(5e-4)


def test_sam_train_reference_recipe_resumes_exactly(phantom_cache, tmp_path, capsys):
    """`--recipe reference`: slab views, SGD with momentum (its buffers are checkpointed: a resume
    from step 1 reproduces step 2), the recipe recorded and checked on resume."""
    out = tmp_path / "ref"
    args = ["sam-train", "--recipe", "reference", "--cache_dir", str(phantom_cache), "--steps", "2",
            "--save_every", "1", "--batch_size", "2", "--roi", *map(str, SLAB), "--width", str(WIDTH),
            "--spacing", str(SPACING), "--workers", "0"]
    assert main(args + ["--output_dir", str(out)]) == 0
    state = json.loads((out / "checkpoints" / "step_1" / "state.json").read_text())["settings"]
    assert state["recipe"] == "reference" and state["roi"] == list(SLAB) and state["lr"] == 0.02
    assert any(k.endswith("momentum_buffer") for k in load_file(str(out / "checkpoints" / "step_1" /
                                                                   "optimizer.safetensors")))
    import shutil

    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints" / "step_1", again / "checkpoints" / "step_1")
    (again / "checkpoints" / "latest").write_text("step_1")
    assert main(args + ["--output_dir", str(again), "--resume"]) == 0
    want, got = load_file(str(out / "sam.safetensors")), load_file(str(again / "sam.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    # its 8 mm coarse grid along z goes into the model, the files, and the matcher reads them
    from alice_ds.sam.io import open_embedding
    from alice_ds.sam.matcher import Matcher
    from alice_ds.sam.train import load_model

    assert load_model(out / "sam.safetensors")[0].coarse_stride == (16, 16, 4)
    emb = tmp_path / "emb"
    assert main(["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(out / "sam.safetensors"),
                 "--embed_dir", str(emb), "--channels", "128", "--bits", "8"]) == 0
    case_id = list_cases(phantom_cache)[0]
    ef = open_embedding(emb, case_id)
    assert ef.coarse_stride == (16, 16, 4) and ef.fine_stride == (2, 2, 2)
    np.testing.assert_allclose(np.linalg.norm(ef.coarse_affine[:3, :3], axis=0), [64, 64, 16])  # mm at 4 mm
    body = body_voxels(open_case(phantom_cache, case_id).array)
    fine_ijk = np.rint(world_to_index(ef.fine_affine, index_to_world(open_case(phantom_cache, case_id).affine,
                                                                      body[::max(1, len(body) // 20)])))
    pts = index_to_world(ef.fine_affine, np.clip(fine_ijk, 0, np.asarray(ef.fine_shape) - 1))
    for search in ("global", "window"):
        matched, scores = Matcher(emb, refine=False, search=search).match(case_id, case_id, pts)
        assert scores.min() > 0.99 and np.median(np.abs(matched - pts).max(1)) == 0, (search, scores)
    capsys.readouterr()
    assert main(args + ["--output_dir", str(tmp_path / "x"), "--cross_case_negatives"]) == 2
    assert "--cross_case_negatives" in capsys.readouterr().err
    default = [a for a in args if a not in ("--recipe", "reference")]
    assert main(default + ["--output_dir", str(again), "--steps", "3", "--resume"]) == 2
    assert "--recipe" in capsys.readouterr().err
