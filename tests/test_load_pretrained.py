"""`alice_ds.load_pretrained` into MONAI SwinUNETR, the streaming safetensors writer, and the README's
"Fine-tuning with MONAI" lines executed as written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file, save_file

import alice_ds
from alice_ds.errors import DataError, UserError
from alice_ds.export import load_pretrained, write_safetensors

FEATURE_SIZE = 12
README = Path(__file__).resolve().parents[1] / "README.md"
README_FEATURE_SIZE = 48  # what the README's snippet builds (the B preset)


def _export(backbone: torch.nn.Module, path: Path, **meta) -> dict[str, torch.Tensor]:
    """Write `backbone`'s state dict the way `convert` does (streaming writer + JSON metadata)."""
    sd = {k: v.detach().clone() for k, v in backbone.state_dict().items() if k != "mask_token"}
    layout = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
    write_safetensors(path, layout, sd.__getitem__, {k: json.dumps(v) for k, v in meta.items()})
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full-layout export of a (randomly initialised) F=12 backbone."""
    from alice_ds.models import SwinBackbone

    path = tmp_path_factory.mktemp("weights") / "W.safetensors"
    sd = _export(SwinBackbone(FEATURE_SIZE, seed=5), path, feature_size=FEATURE_SIZE, model="teacher")
    return path, sd


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_writer_matches_safetensors_and_leaves_no_partial_file(weights, tmp_path):
    path, sd = weights
    got = load_file(path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert any(v.dtype == torch.int64 for v in got.values())  # buffers keep their dtype
    bad = tmp_path / "bad.safetensors"
    layout = {"a": ((2, 3), "float32")}
    with pytest.raises(DataError, match=r"a: got \(3, 2\)"):
        write_safetensors(bad, layout, lambda name: torch.zeros(3, 2), {})
    assert list(tmp_path.iterdir()) == []


def test_other_out_channels_skip_only_the_head(weights, capsys):
    path, sd = weights
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=5, feature_size=FEATURE_SIZE)
    before = _state(model)
    report = alice_ds.load_pretrained(model, path)
    assert sorted(report.skipped) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert (len(report.loaded), report.missing, report.unexpected) == (157, [], [])
    after = model.state_dict()
    for k, v in after.items():
        expected = before[k] if k.startswith("out.") else sd[k]
        assert torch.equal(v, expected), k
    err = " ".join(capsys.readouterr().err.split())  # rich may wrap the warning lines
    assert "loaded 157 tensors" in err and "skipped 2" in err and "out.* (2)" in err


def test_mismatches_are_refused_before_anything_changes(weights, tmp_path):
    path, sd = weights
    cases = [
        # another architecture: SwinUNETR v2 has layers*c blocks the file lacks
        (dict(feature_size=FEATURE_SIZE, use_v2=True), path, r"missing from the file \(swinViT\.\* \(8\)\)"),
        (dict(feature_size=24), path, r"feature_size 12, the model feature_size 24"),
        (dict(feature_size=FEATURE_SIZE, in_channels=4), path, r"in_channels 1, the model in_channels 4"),
    ]
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "head.last.weight": torch.zeros(3)}, extra)
    cases.append((dict(feature_size=FEATURE_SIZE), extra, r"1 key\(s\) the model does not have \(head\.\* \(1\)\)"))
    for kwargs, file, message in cases:
        model = SwinUNETR(**{"in_channels": 1, "out_channels": 1, **kwargs})
        before = _state(model)
        with pytest.raises(UserError, match=message) as e:
            load_pretrained(model, file)
        assert str(file) in str(e.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), kwargs

    # strict=False loads what matches and reports the rest
    model = SwinUNETR(in_channels=1, out_channels=1, feature_size=FEATURE_SIZE, use_v2=True)
    report = load_pretrained(model, path, strict=False)
    assert len(report.loaded) == len(sd) and len(report.missing) == 8
    assert all(k.startswith("swinViT.layers") and "c.0." in k for k in report.missing)


def test_unreadable_files_name_the_file(weights, tmp_path):
    path, _ = weights
    truncated = tmp_path / "W_truncated.safetensors"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    model = SwinUNETR(in_channels=1, out_channels=1, feature_size=FEATURE_SIZE)
    with pytest.raises(DataError, match="truncated or corrupt") as e:
        load_pretrained(model, truncated)
    assert str(truncated) in str(e.value)

    # a .pt that would run pickled code is refused by weights_only loading
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/")}, evil)
    with pytest.raises(DataError, match="cannot read as torch weights") as e:
        load_pretrained(model, evil)
    assert str(evil) in str(e.value)
    with pytest.raises(DataError, match="no such weights file"):
        load_pretrained(model, tmp_path / "nope.safetensors")


def _readme_snippet() -> str:
    section = README.read_text().split("## Fine-tuning with MONAI", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one python block"
    return blocks[0]


def test_readme_fine_tuning_lines_work(tmp_path, monkeypatch):
    """Execute the README's python block as written, in a folder holding an F=48 `W.safetensors`."""
    from alice_ds.models import SwinBackbone

    snippet = _readme_snippet()
    assert f"feature_size={README_FEATURE_SIZE}" in snippet and 'load_pretrained(model, "W.safetensors")' in snippet
    sd = _export(SwinBackbone(README_FEATURE_SIZE, seed=7), tmp_path / "W.safetensors")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, SwinUNETR) and model.out.conv.conv.out_channels != 1
    state = model.state_dict()
    loaded = [k for k in sd if not k.startswith("out.")]
    assert len(loaded) == len(sd) - 2 and all(torch.equal(state[k], sd[k]) for k in loaded)
    assert os.path.exists("W.safetensors")
