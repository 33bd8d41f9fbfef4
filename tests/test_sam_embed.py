"""`alice-ds embed`, `match` and `sam-eval` on real phantom cases (cache from the real preprocess
path, a real SAMNet trained a few steps with `alice-ds sam-train`)."""

import json
import math
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from alice_ds.cli import main
from alice_ds.data.cache import body_voxels, list_cases, open_case
from alice_ds.data.landmarks import load_landmarks
from alice_ds.data.phantom import ATLAS_FIXED_LANDMARKS
from alice_ds.sam.crops import resample, sam_grid
from alice_ds.sam.embed import BORDER, BORDER_KEY, FACES_KEY, cut_faces, embed_volume, faces_text
from alice_ds.sam.evaluate import evaluate
from alice_ds.sam.geometry import index_to_world
from alice_ds.sam.io import AUTO_KEEP, DEFAULT_BITS, REQUIRED_META, embedding_path, list_embeddings, open_embedding
from alice_ds.sam.matcher import Matcher
from alice_ds.sam.train import load_model

AUTO_FINE_SPAN = 17
"""Directions a width-0.125 SAMNet's fine vectors can span: its 16-channel head's output, plus bias."""
FINE_MM = 8.0
"""Fine grid of the test model: stride 2 of its 4 mm grid (conftest SAM_TEST_SPACING)."""
EVAL_WINDOW = 12
"""Fine-search window for the evaluation tests: 96 mm at 8 mm fine voxels, less work than the default."""


def test_embedding_files_carry_documented_format(phantom_cache, sam_checkpoint, sam_embed_dir):
    cases = list_cases(phantom_cache)
    assert list_embeddings(sam_embed_dir) == cases
    model_id = json.loads(sam_checkpoint.with_suffix(".json").read_text())["model_id"]
    for case_id in cases:
        ef = open_embedding(sam_embed_dir, case_id)
        case = open_case(phantom_cache, case_id)
        sam_affine, sam_shape = sam_grid(case.affine, case.shape, FINE_MM / 2)
        assert set(REQUIRED_META) <= set(ef.meta)
        assert ef.meta["case_id"] == case_id and ef.meta["model_id"] == model_id
        assert json.loads(ef.meta["fine_stride"]) == [2, 2, 2]
        assert json.loads(ef.meta["coarse_stride"]) == [16, 16, 16]
        assert ef.fine_shape == tuple(math.ceil(s / 2) for s in sam_shape)
        assert sam_grid(case.affine, case.shape, FINE_MM / 2)[1] == sam_shape
        assert ef.coarse_shape == tuple(math.ceil(s / 16) for s in sam_shape)
        # voxel 0 of every grid is voxel 0 of the cache; spacings 4 mm and 32 mm, RAS axes
        np.testing.assert_allclose(ef.fine_affine[:3, 3], case.affine[:3, 3], atol=1e-6)
        np.testing.assert_allclose(ef.fine_affine[:3, :3], np.diag([FINE_MM] * 3), atol=1e-6)
        np.testing.assert_allclose(ef.coarse_affine[:3, :3], np.diag([FINE_MM * 8] * 3), atol=1e-6)
        # --channels auto: the 16-wide fine head (width 0.125) plus its bias span at most 17 directions
        assert ef.channels <= AUTO_FINE_SPAN and float(ef.meta["fine_kept"]) >= AUTO_KEEP - 1e-4
        assert ef.bits == DEFAULT_BITS == 4  # --bits default: two channels per stored byte
        assert ef.fine_map().dtype == np.int8 and ef.fine_map().shape[-1] == (ef.channels + 1) // 2
        assert ef.fine_codes().shape == (*ef.fine_shape, ef.channels) and np.abs(ef.fine_codes()).max() == 7
        torch.testing.assert_close(ef.basis.T @ ef.basis, torch.eye(ef.channels), atol=1e-5, rtol=0)
    assert not list(sam_embed_dir.glob(".*tmp"))
    # the stored channels keep the model's 128-d vectors (the first case, embedded again whole)
    case = open_case(phantom_cache, cases[0])
    affine, shape = sam_grid(case.affine, case.shape, FINE_MM / 2)
    full, _ = embed_volume(load_model(sam_checkpoint)[0], resample(case.array, case.affine, affine, shape))
    stored = open_embedding(sam_embed_dir, cases[0]).fine()
    cos = torch.nn.functional.cosine_similarity(stored, full.float(), dim=-1)
    norms = stored.norm(dim=-1)  # a projection: at most 1, up to the rounding to 15 levels per channel
    assert cos.median() > 0.99 and cos.quantile(0.01) > 0.9, (cos.median(), cos.quantile(0.01))
    assert norms.max() < 1.1 and 0.97 < norms.median() < 1.03, (norms.max(), norms.median())


def test_embed_is_idempotent_and_tiles_agree(phantom_cache, sam_checkpoint, sam_embed_dir, capsys):
    stamps = {p.name: p.stat().st_mtime_ns for p in sam_embed_dir.iterdir()}
    assert main(["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(sam_checkpoint),
                 "--embed_dir", str(sam_embed_dir)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in sam_embed_dir.iterdir()} == stamps
    # tiling: 64-voxel tiles with 32 overlap (2 x 2 x 1 tiles) reproduce the one-tile embedding
    case = open_case(phantom_cache, list_cases(phantom_cache)[0])
    affine, shape = sam_grid(case.affine, case.shape, FINE_MM / 2)
    hu = resample(case.array, case.affine, affine, shape)[:96, :96, :64]
    model, _ = load_model(sam_checkpoint)
    whole_f, whole_c = embed_volume(model, hu, tile=96, overlap=0, border=0)
    fine, coarse = embed_volume(model, hu, tile=64, overlap=32, border=0)
    cos_f = (fine.float() * whole_f.float()).sum(-1)
    cos_c = (coarse.float() * whole_c.float()).sum(-1)
    assert cos_f.median() > 0.999 and cos_f.quantile(0.01) > 0.95, cos_f.quantile(0.01)
    assert cos_c.median() > 0.99, cos_c.median()


def test_border_is_the_replicated_faces_on_the_same_grid(sam_checkpoint):
    """embed_volume(border=16) = the embedding of the volume with its faces repeated 16 voxels out
    (numpy's edge padding), cut back to the volume's own fine and coarse voxels."""
    model, _ = load_model(sam_checkpoint)
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (40, 36, 50)).astype(np.float32)  # odd shapes: ceil(n / stride) on each axis
    fine, coarse = embed_volume(model, torch.from_numpy(hu), border=16)
    big_f, big_c = embed_volume(model, torch.from_numpy(np.pad(hu, 16, mode="edge")), border=0)
    assert fine.shape[:3] == (20, 18, 25) and coarse.shape[:3] == (3, 3, 4)
    torch.testing.assert_close(fine, big_f[8:28, 8:26, 8:33], atol=0, rtol=0)
    torch.testing.assert_close(coarse, big_c[1:4, 1:4, 1:5], atol=0, rtol=0)
    plain, _ = embed_volume(model, torch.from_numpy(hu), border=0)  # air outside: other vectors at the faces
    assert (plain.float() - fine.float()).abs()[0].max() > 1e-2
    faces = np.array([[False, False], [False, False], [True, True]])  # z only: x and y as without a border
    zf, zc = embed_volume(model, torch.from_numpy(hu), border=16, faces=faces)
    big_f, big_c = embed_volume(model, torch.from_numpy(np.pad(hu, [(0, 0), (0, 0), (16, 16)], mode="edge")), border=0)
    torch.testing.assert_close(zf, big_f[:, :, 8:33], atol=0, rtol=0)
    torch.testing.assert_close(zc, big_c[:, :, 1:5], atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of the coarse stride 16, got 8"):
        embed_volume(model, torch.from_numpy(hu), border=8)


def test_reference_coarse_grid_is_8_mm_along_z():
    """SAMNet(coarse_stride=(16, 16, 4)), the reference recipe's network: coarse voxels 32 mm
    in-plane and 8 mm along z, the same fine grid; embed's border keeps both grids exact."""
    from alice_ds.sam.network import SAMNet

    torch.manual_seed(0)
    model = SAMNet(width=0.125, coarse_stride=(16, 16, 4)).eval()
    hu = torch.from_numpy(np.random.default_rng(0).normal(0, 300, (40, 36, 50)).astype(np.float32))
    fine, coarse = embed_volume(model, hu, border=0)
    assert fine.shape[:3] == (20, 18, 25) and coarse.shape[:3] == (3, 3, 13)
    faces = np.array([[False, False], [False, False], [True, True]])
    zf, zc = embed_volume(model, hu, border=16, faces=faces)
    big_f, big_c = embed_volume(model, torch.from_numpy(np.pad(hu.numpy(), [(0, 0), (0, 0), (16, 16)],
                                                               mode="edge")), border=0)
    torch.testing.assert_close(zf, big_f[:, :, 8:33], atol=0, rtol=0)
    torch.testing.assert_close(zc, big_c[:, :, 4:17], atol=0, rtol=0)
    with pytest.raises(ValueError, match="coarse_stride"):
        SAMNet(width=0.125, coarse_stride=(16, 16, 2))


def test_cut_faces_are_the_faces_through_the_body():
    """A body that fits in x and y and runs past both z faces is cut at z only; a crop of it at every
    face it crosses; a stray voxel on a face does not count."""
    hu = np.full((40, 40, 30), -1000.0, dtype=np.float32)
    hu[8:32, 10:30, :] = 40.0  # the body: inside in x and y, through both z faces
    hu[0, 0, 5] = 500.0  # one stray voxel on the low x face
    assert cut_faces(hu).tolist() == [[False, False], [False, False], [True, True]]
    assert cut_faces(hu[12:, :20]).tolist() == [[True, False], [False, True], [True, True]]
    assert faces_text(cut_faces(hu[12:, :20])) == "x-y+z-z+" and faces_text(np.zeros((3, 2), bool)) == ""


def test_self_match_real_embeddings(phantom_cache, sam_checkpoint, tmp_path):
    """Points at fine-voxel centres inside the body match back to themselves, score ~ 1. With all 128
    channels at 8 bits: the 2-step network's vectors differ by ~1 % between neighbouring voxels, which
    the codes of its few principal directions blur, and 4-bit codes more (a trained network's are told apart:
    docs/experiments/2026-12-03-compact-embeddings.md)."""
    case_id = list_cases(phantom_cache)[1]
    case = open_case(phantom_cache, case_id)
    sam_embed_dir = tmp_path / "emb"
    assert main(["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(sam_checkpoint),
                 "--embed_dir", str(sam_embed_dir), "--channels", "128", "--bits", "8"]) == 0
    ef = open_embedding(sam_embed_dir, case_id)
    assert ef.channels == 128
    rng = np.random.default_rng(0)
    body = body_voxels(case.array)
    pts_cache = index_to_world(case.affine, body[rng.choice(len(body), 30, replace=False)])
    fine_ijk = np.rint(np.linalg.solve(ef.fine_affine, np.c_[pts_cache, np.ones(30)].T).T[:, :3])
    pts = index_to_world(ef.fine_affine, np.clip(fine_ijk, 0, np.asarray(ef.fine_shape) - 1))
    matched, scores = Matcher(sam_embed_dir, refine=False).match(case_id, case_id, pts)  # voxel centres
    err = np.abs(matched - pts).max(1)
    # the match is never worse than the point itself (similarity 1); a 3-step network still has
    # look-alike voxels in flat tissue, so only most points must come back exactly
    assert scores.min() > 0.99, scores
    assert np.median(err) == 0 and np.mean(err <= FINE_MM) >= 0.6, err


def test_lps_and_ras_storage_give_the_same_matches(phantom_dir, phantom_cache, sam_checkpoint,
                                                   sam_embed_dir, tmp_path):
    """Case 1 is stored LPS; a RAS copy through the real preprocess path must embed to the same
    world grid, and a query matched into either version lands on the same world mm."""
    from alice_ds.data.preprocess import preprocess_dataset

    lps_path = phantom_dir / "imagesTr" / "Case_00001_0000.nii.gz"
    img = nib.load(lps_path)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    data = tmp_path / "data"
    (data / "imagesTr").mkdir(parents=True)
    shutil.copy(lps_path, data / "imagesTr" / "Lps_00001_0000.nii.gz")
    nib.save(nib.as_closest_canonical(img), data / "imagesTr" / "Ras_00001_0000.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "imagesTr/Lps_00001_0000.nii.gz"},
                                                 {"image": "imagesTr/Ras_00001_0000.nii.gz"}]}))
    cache_spacing = open_case(phantom_cache, "Case_00001_0000").spacing
    preprocess_dataset(data, datalist, tmp_path / "cache", spacing=cache_spacing, show=False)
    emb = tmp_path / "emb"
    assert main(["embed", "--cache_dir", str(tmp_path / "cache"), "--sam_checkpoint",
                 str(sam_checkpoint), "--embed_dir", str(emb)]) == 0
    shutil.copy(embedding_path(sam_embed_dir, "Case_00002_0000"), emb)
    lps, ras = open_embedding(emb, "Lps_00001_0000"), open_embedding(emb, "Ras_00001_0000")
    np.testing.assert_allclose(lps.fine_affine, ras.fine_affine, atol=1e-4)
    marks = load_landmarks(phantom_dir / "landmarks")
    query = np.array(list(marks["Case_00002"].values()))
    matcher = Matcher(emb)
    m_lps, s_lps = matcher.match("Case_00002_0000", "Lps_00001_0000", query)
    m_ras, s_ras = matcher.match("Case_00002_0000", "Ras_00001_0000", query)
    np.testing.assert_allclose(m_lps, m_ras, atol=1e-4)
    np.testing.assert_allclose(s_lps, s_ras, atol=1e-3)
    # same grid, same vectors: no axis of the LPS file was mirrored on the way
    np.testing.assert_allclose(lps.fine().numpy(), ras.fine().numpy(), atol=2e-3)
    # case 1's landmarks: LPS -> RAS gives what RAS -> RAS gives
    own = np.array(list(marks["Case_00001"].values()))
    across, _ = matcher.match("Lps_00001_0000", "Ras_00001_0000", own)
    itself, _ = matcher.match("Ras_00001_0000", "Ras_00001_0000", own)
    np.testing.assert_allclose(across, itself, atol=0.05)  # the sub-voxel step sees the fp16 differences


def test_match_cli_json_and_errors(sam_embed_dir, capsys, tmp_path):
    args = ["match", "--embed_dir", str(sam_embed_dir), "--query", "Case_00002_0000",
            "--key", "Case_00004_0000", "--point", "10", "-20", "30", "--json", "-"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    matched, scores = Matcher(sam_embed_dir, search="global").match("Case_00002_0000", "Case_00004_0000",
                                                                     [[10, -20, 30]])
    np.testing.assert_allclose(out["matched_mm"], matched[0], atol=1e-3)
    assert out["score"] == pytest.approx(float(scores[0]), abs=1e-4)
    assert main(args[:-1] + [str(tmp_path / "m.json")]) == 0  # --json FILE: the sentence, and the file
    assert "Case_00004_0000" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text()) == out
    assert main(args + ["--search", "window", "--window", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    matched, scores = Matcher(sam_embed_dir, search="window", window=8).match("Case_00002_0000", "Case_00004_0000",
                                                                               [[10, -20, 30]])
    np.testing.assert_allclose(out["matched_mm"], matched[0], atol=1e-3)
    assert out["score"] == pytest.approx(float(scores[0]), abs=1e-4)
    # a missing case and a corrupt file: exit 2, one line naming the file, no traceback
    broken = tmp_path / "emb"
    shutil.copytree(sam_embed_dir, broken)
    f = embedding_path(broken, "Case_00004_0000")
    f.write_bytes(f.read_bytes()[:1000])
    missing = ["match", "--embed_dir", str(broken), "--query", "Case_00002_0000",
               "--key", "Case_00009_0000", "--point", "0", "0", "0"]
    assert main(missing) == 2
    assert "Case_00009_0000.safetensors" in capsys.readouterr().err
    # the real console script, once: exit status 2, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "alice_ds.cli", "match", "--embed_dir", str(broken),
                           "--query", "Case_00002_0000", "--key", "Case_00004_0000",
                           "--point", "0", "0", "0"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Case_00004_0000.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sam_eval_cli_matches_direct_computation(phantom_dir, sam_embed_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["sam-eval", "--embed_dir", str(sam_embed_dir), "--landmarks",
                 str(phantom_dir / "landmarks"), "--json", str(out), "--window", str(EVAL_WINDOW)]) == 0
    doc = json.loads(out.read_text())
    marks = load_landmarks(phantom_dir / "landmarks")
    cases = list_embeddings(sam_embed_dir)
    assert doc["pairs"] == len(cases) * (len(cases) - 1)
    matcher, errors, per, offsets = Matcher(sam_embed_dir, window=EVAL_WINDOW, search="global"), [], {}, []
    for q in cases:
        for k in cases:
            if q == k:
                continue
            lq, lk = marks[q[:-5]], marks[k[:-5]]
            names = sorted(set(lq) & set(lk))
            matched, _ = matcher.match(q, k, [lq[n] for n in names])
            offsets.append(matched - np.array([lk[n] for n in names]))
            for n, e in zip(names, np.linalg.norm(offsets[-1], axis=1)):
                errors.append(e)
                per.setdefault(n, []).append(e)
    assert doc["n"] == len(errors)
    assert doc["median_mm"] == pytest.approx(np.median(errors), rel=1e-6)
    assert doc["mean_mm"] == pytest.approx(np.mean(errors), rel=1e-6)
    assert doc["within_10mm"] == pytest.approx(np.mean(np.array(errors) <= 10), abs=1e-9)
    assert doc["beyond_50mm"] == pytest.approx(np.mean(np.array(errors) > 50), abs=1e-9)
    fixed = [e for n, v in per.items() if n in ATLAS_FIXED_LANDMARKS for e in v]  # phantom splits
    assert doc["fixed"]["n"] == len(fixed) > 0 and doc["fixed"]["n"] + doc["organ_bound"]["n"] == doc["n"]
    assert doc["fixed"]["median_mm"] == pytest.approx(np.median(fixed), rel=1e-6)
    np.testing.assert_allclose(doc["median_abs_xyz_mm"], np.median(np.abs(np.concatenate(offsets)), axis=0),
                               rtol=1e-6)
    name = sorted(per)[0]
    assert doc["per_landmark"][name]["median_mm"] == pytest.approx(np.median(per[name]), rel=1e-6)
    # N random pairs, and a bad --pairs value as a one-line user error
    sub = evaluate(sam_embed_dir, marks, pairs="3", seed=1, window=EVAL_WINDOW)
    assert sub["pairs"] == 3
    assert main(["sam-eval", "--embed_dir", str(sam_embed_dir), "--landmarks",
                 str(phantom_dir / "landmarks"), "--pairs", "some"]) == 2
    # --search window: the same pairs scored by the window Matcher
    assert main(["sam-eval", "--embed_dir", str(sam_embed_dir), "--landmarks", str(phantom_dir / "landmarks"),
                 "--pairs", "3", "--seed", "1", "--search", "window", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    want = evaluate(sam_embed_dir, marks, pairs="3", seed=1, search="window")
    assert doc["search"] == "window" and doc["n"] == want["overall"]["n"] == sub["overall"]["n"]
    assert doc["median_mm"] == pytest.approx(want["overall"]["median_mm"], rel=1e-6)
    # --context 0: the global search with the point's own vector alone
    assert main(["sam-eval", "--embed_dir", str(sam_embed_dir), "--landmarks", str(phantom_dir / "landmarks"),
                 "--pairs", "3", "--seed", "1", "--context", "0", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    want = evaluate(sam_embed_dir, marks, pairs="3", seed=1, context=0)
    assert doc["context"] == 0 and doc["median_mm"] == pytest.approx(want["overall"]["median_mm"], rel=1e-6)
    # --search coarse: the coarse argmax alone, on the coarse grid
    assert main(["sam-eval", "--embed_dir", str(sam_embed_dir), "--landmarks", str(phantom_dir / "landmarks"),
                 "--pairs", "3", "--seed", "1", "--search", "coarse", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    want = evaluate(sam_embed_dir, marks, pairs="3", seed=1, search="coarse")
    assert doc["search"] == "coarse" and doc["n"] == sub["overall"]["n"]
    assert doc["median_mm"] == pytest.approx(want["overall"]["median_mm"], rel=1e-6)


def test_missing_embedding_dir_is_a_user_error(phantom_dir, tmp_path, capsys):
    assert main(["sam-eval", "--embed_dir", str(tmp_path / "nowhere"), "--landmarks",
                 str(phantom_dir / "landmarks")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_older_format_and_other_channels_are_re_embedded(phantom_cache, sam_checkpoint, sam_embed_dir,
                                                          tmp_path):
    """A format-1 file (fp16 x 128 fine grid) is refused by name and replaced by the next `embed`;
    so is a file with other channels or bits than asked; files already right are left alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from alice_ds.errors import DataError

    emb = tmp_path / "emb"
    shutil.copytree(sam_embed_dir, emb)
    cases = list_cases(phantom_cache)
    old = embedding_path(emb, cases[0])
    with safe_open(str(old), framework="pt") as f:
        meta = {**f.metadata(), "format_version": "1"}
    ef = open_embedding(emb, cases[0])
    tensors = load_file(str(old))
    save_file({"fine": ef.fine().half(), "coarse": tensors["coarse"]}, str(old), metadata=meta)
    with pytest.raises(DataError, match="format_version '1', this alice-ds reads '3'"):
        open_embedding(emb, cases[0])
    args = ["embed", "--cache_dir", str(phantom_cache), "--sam_checkpoint", str(sam_checkpoint),
            "--embed_dir", str(emb)]
    assert main(args) == 0
    assert open_embedding(emb, cases[0]).channels <= AUTO_FINE_SPAN
    stamps = {c: embedding_path(emb, c).stat().st_mtime_ns for c in cases}
    assert main(args + ["--channels", "8"]) == 0  # other channels: every file again
    assert all(open_embedding(emb, c).channels == 8 for c in cases)
    assert all(embedding_path(emb, c).stat().st_mtime_ns != stamps[c] for c in cases)
    stamps = {c: embedding_path(emb, c).stat().st_mtime_ns for c in cases}
    assert main(args + ["--channels", "8"]) == 0
    assert {c: embedding_path(emb, c).stat().st_mtime_ns for c in cases} == stamps
    assert main(args + ["--channels", "8", "--bits", "8"]) == 0  # other bits: every file again
    assert all(open_embedding(emb, c).bits == 8 for c in cases)
    assert all(embedding_path(emb, c).stat().st_mtime_ns != stamps[c] for c in cases)
    assert open_embedding(emb, cases[0]).meta[BORDER_KEY] == str(BORDER) == "16"
    # the phantoms run through both z faces; the bodies fit in x and y except case 1's (2 % of its low x face)
    assert [open_embedding(emb, c).meta[FACES_KEY] for c in cases] == ["x-z-z+", "z-z+", "z-z+", "z-z+"]
    path = embedding_path(emb, cases[1])  # a file of every face padded (no FACES_KEY): embedded again
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != FACES_KEY}
    save_file(load_file(str(path)), str(path), metadata=meta)
    stamps = {c: embedding_path(emb, c).stat().st_mtime_ns for c in cases}
    assert main(args + ["--channels", "8", "--bits", "8"]) == 0
    assert [embedding_path(emb, c).stat().st_mtime_ns != stamps[c] for c in cases[:2]] == [False, True]
    assert open_embedding(emb, cases[1]).meta[BORDER_KEY] == "16"
    with pytest.raises(SystemExit) as e:  # argparse: a usage line and the error, exit 2
        main(args + ["--channels", "0"])
    assert e.value.code == 2
