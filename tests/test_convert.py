"""`alice-ds convert` on the trainer's real 2-rank DeepSpeed runs (ZeRO-1, 2, 3; gloo on CPU).

The runs are the shared `ds_run(stage)` fixture (tests/conftest.py). Oracles, read independently of
the exporter: the trainer's fp32 teacher is its `teacher_fp32_rank<r>.safetensors` reassembled by the
contract's formula and DeepSpeed's own saved copy of the teacher parameters (the run keeps fp32
parameters under `torch_autocast`); the student's fp32 masters are DeepSpeed's saved fp32 parameters
(ZeRO 1-2) or its fp32 optimizer partitions reassembled by hand (ZeRO-3).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from safetensors import safe_open
from safetensors.torch import load_file

from alice_ds import load_pretrained
from alice_ds.cli import main as cli_main
from alice_ds.errors import DataError, UserError
from alice_ds.export import convert, from_load_from_key, to_load_from_key, verify

STAGES = (1, 2, 3)
FEATURE_SIZE = 12  # the `tiny` preset of the shared runs
ROI = 64
NUM_PARAMS = 151
"""Parameter tensors of SwinUNETR(feature_size=12); the other 8 state-dict entries are buffers."""
RECON_ATOL = 1e-5


def _tag_dir(run: Path) -> Path:
    ckpt = run / "checkpoints"
    return ckpt / (ckpt / "latest").read_text().strip()


def _deepspeed_globals():
    """The DeepSpeed classes its optimizer files pickle: allow exactly those for weights_only loads."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address])


def _unpad(parts: list[torch.Tensor], shape) -> torch.Tensor:
    """ZeRO-3 reassembly: full = cat(partitions over ranks)[:numel].view(shape)."""
    return torch.cat(parts)[: math.prod(shape)].view(*shape)


def _shard_teacher(tag: Path, stage: int, world: int = 2) -> dict[str, torch.Tensor]:
    """The trainer's fp32 teacher backbone at save time, from its shards (contract formula)."""
    files = [tag / f"teacher_fp32_rank{r}.safetensors" for r in (range(world) if stage == 3 else [0])]
    shards = [load_file(f) for f in files]
    with safe_open(str(files[0]), "pt") as f:
        shapes = json.loads((f.metadata() or {}).get("zero3_shapes", "{}"))
    out = {}
    for name in shards[0]:
        if name.startswith("backbone."):
            t = _unpad([s[name] for s in shards], shapes[name]) if stage == 3 else shards[0][name]
            out[name[len("backbone."):]] = t
    return out


def _deepspeed_copy(tag: Path, stage: int, which: str, world: int = 2) -> dict[str, torch.Tensor]:
    """DeepSpeed's own saved fp32 values of `<which>.backbone.*`: the module state (ZeRO 1-2, full
    fp32 parameters), the frozen-parameter fragments (ZeRO-3 teacher) or the fp32 optimizer
    partitions in `param_shapes` order (ZeRO-3 student)."""
    prefix = f"{which}.backbone."
    if stage < 3:
        states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True, mmap=True)
        return {k[len(prefix):]: v for k, v in states["module"].items()
                if k.startswith(prefix) and k not in states["buffer_names"]}
    models = [torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=True, mmap=True)
              for r in range(world)]
    if which == "teacher":
        return {k[len(prefix):]: _unpad([m["frozen_param_fragments"][k] for m in models], shape)
                for k, shape in models[0]["frozen_param_shapes"].items() if k.startswith(prefix)}
    with _deepspeed_globals():
        flats = [torch.cat(torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=True,
                                      mmap=True)["optimizer_state_dict"]["fp32_flat_groups"]) for r in range(world)]
    out, offset = {}, 0
    for group in models[0]["param_shapes"]:
        for name, shape in group.items():
            part = math.ceil(math.prod(shape) / world)  # each rank's padded share of this parameter
            if name.startswith(prefix):
                out[name[len(prefix):]] = _unpad([f[offset:offset + part] for f in flats], shape)
            offset += part
    assert offset == flats[0].numel()
    return out


def _monai(out_channels: int = 1) -> SwinUNETR:
    torch.manual_seed(1)
    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=FEATURE_SIZE)


@pytest.mark.parametrize("stage", STAGES)
def test_export_equals_fp32_teacher_and_student_at_save_time(ds_run, tmp_path, stage):
    run = ds_run(stage)
    tag = _tag_dir(run)
    state = json.loads((tag / "alice_state.json").read_text())
    monai_keys = _monai().state_dict()
    exported = {}
    for which in ("teacher", "student"):
        out = tmp_path / f"{which}.safetensors"
        result = convert(run, out, which=which)
        got = exported[which] = load_file(out)
        oracles = [_deepspeed_copy(tag, stage, which)]
        if which == "teacher":
            oracles.append(_shard_teacher(tag, stage))
        assert set(got) == set(monai_keys), f"ZeRO-{stage} {which}: not the SwinUNETR key set"
        for ref in oracles:
            assert "mask_token" in ref and len(ref) == NUM_PARAMS + 1
            for name, t in got.items():
                assert t.dtype == monai_keys[name].dtype and t.shape == monai_keys[name].shape, name
                if name in ref:  # parameters: bit-exact fp32 values at save time
                    assert torch.equal(t, ref[name]), f"ZeRO-{stage} {which}: {name} differs"
                else:  # buffers: MONAI's relative position index
                    assert torch.equal(t, monai_keys[name]), name
        side = json.loads(out.with_suffix(".json").read_text())
        assert side == result.info | {"file": out.name}
        assert (side["model"], side["feature_size"], side["use_v2"], side["step"], side["zero_stage"],
                side["world_size"], side["tag"]) == (which, FEATURE_SIZE, False, state["step"], stage, 2, tag.name)
        assert side["intensity_window"] == state["config"]["sampler"]["hu_window"] == [-125.0, 225.0]
        assert (side["roi"], side["spacing"]) == (ROI, state["config"]["data"]["spacing"])
        assert side["source_checkpoint"] == str(tag.resolve())
    # training moved the EMA teacher away from the student: exporting the wrong one fails above
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"
    assert (exported["teacher"][key] - exported["student"][key]).abs().max() > 1e-4


def test_monai_forward_equals_backbone_recon(ds_run, tmp_path):
    """The same weights in MONAI SwinUNETR (loaded from the export) and in our SwinBackbone (loaded
    from the trainer's teacher shards): MONAI's forward output equals our `recon`."""
    from alice_ds.models import SwinBackbone

    run = ds_run(3)
    out = tmp_path / "W.safetensors"
    convert(run, out)
    monai = _monai()
    report = load_pretrained(monai, out)
    assert (len(report.loaded), report.skipped, report.missing, report.unexpected) == (159, [], [], [])
    ours = SwinBackbone(FEATURE_SIZE)
    teacher = _shard_teacher(_tag_dir(run), 3)
    buffers = {k: v for k, v in load_file(out).items() if k not in teacher}
    ours.load_state_dict(teacher | buffers)
    x = torch.rand(1, 1, ROI, ROI, ROI, generator=torch.Generator().manual_seed(3))
    monai.eval(), ours.eval()
    with torch.no_grad():
        expected = ours(x).recon
        got = monai(x)
    assert expected.std() > 0.01  # a real output, not a constant
    torch.testing.assert_close(got, expected, atol=RECON_ATOL, rtol=0)


ZERO0_SCRIPT = """
import copy, sys
from pathlib import Path
import deepspeed, torch
from safetensors.torch import save_file
from torch import nn
from alice_ds.engine import checkpoint
from alice_ds.engine.ema import TeacherEMA
from alice_ds.models import SwinBackbone

class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SwinBackbone(12, seed=1)

class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = Branch()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)

    def forward(self, x):
        return (self.student.backbone(x).recon - x).pow(2).mean()

out = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
module = Pair()
optimizer = torch.optim.AdamW(module.student.parameters(), lr=1e-2)
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
ema = TeacherEMA(module)
engine.backward(engine(torch.rand(1, 1, 64, 64, 64)))
engine.step()
ema.update(0.5)
checkpoint.save(engine, module, ema, out / "checkpoints", "step_1", step=1,
                config={"model": {"feature_size": 12, "use_v2": False}, "sampler": {"roi": 64}}, zero_stage=0,
                rank_state={}, keep_last=0)
ref = {f"{w}.{k}": v.detach().clone() for w in ("student", "teacher")
       for k, v in getattr(module, w).backbone.named_parameters()}
save_file(ref, str(out / "reference.safetensors"))
"""
"""ZeRO-0 (no ZeRO optimizer, fp32 parameters under torch_autocast): one process, one step, saved by
the trainer's own `checkpoint.save`; the shared runs cover ZeRO 1-3."""


def test_zero0_single_process(tmp_path, free_port):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", ZERO0_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(tmp_path / "reference.safetensors")
    for which in ("teacher", "student"):
        out = tmp_path / f"{which}.safetensors"
        convert(tmp_path, out, which=which)
        got = load_file(out)
        assert len(got) == NUM_PARAMS + 8
        for name, t in got.items():
            if f"{which}.{name}" in ref:
                assert torch.equal(t, ref[f"{which}.{name}"]), f"ZeRO-0 {which}: {name}"
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"
    assert (ref[f"teacher.{key}"] - ref[f"student.{key}"]).abs().max() > 1e-4


class _Recorder(dict):
    """A state dict that remembers which keys `SwinUNETR.load_from` reads."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_load_from_layout_is_what_monai_load_from_reads(ds_run, tmp_path):
    run = ds_run(2)
    full = tmp_path / "W.safetensors"
    enc = tmp_path / "W_enc.safetensors"
    pt = tmp_path / "model_swinvit.pt"
    convert(run, full)
    enc_result = convert(run, enc, fmt="monai-load-from")
    convert(run, pt, fmt="monai-load-from")
    weights = load_file(full)
    enc_sd = _Recorder(load_file(enc))
    assert all(k.startswith("module.") for k in enc_sd)
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in enc_sd  # Tang et al. naming
    model = _monai(out_channels=3)
    model.load_from({"state_dict": enc_sd})
    assert enc_sd.read == set(enc_sd), f"keys load_from never reads: {sorted(set(enc_sd) - enc_sd.read)[:3]}"
    state = model.state_dict()
    for key in enc_sd:
        assert torch.equal(state[from_load_from_key(key)], weights[from_load_from_key(key)]), key
    # the .pt twin is the `{"state_dict": ...}` dict public scripts torch.load, readable without pickle code
    obj = torch.load(pt, weights_only=True)
    assert set(obj["state_dict"]) == set(enc_sd)
    assert all(torch.equal(obj["state_dict"][k], dict.__getitem__(enc_sd, k)) for k in enc_sd)
    assert to_load_from_key("swinViT.layers2.0.blocks.1.mlp.linear2.bias") == "module.layers2.0.blocks.1.mlp.fc2.bias"
    # --verify on this layout goes through SwinUNETR.load_from itself
    rows = dict(verify(enc_result, out_channels=3))
    assert rows["tensors loaded / in file"].startswith(f"{len(enc_sd)} / {len(enc_sd)}")
    assert rows["forward"].startswith("[1, 1, 64, 64, 64] -> [1, 3, 64, 64, 64]")
    # load_pretrained reads the encoder-only layout too and says what stays random
    fresh = _monai(out_channels=3)
    report = load_pretrained(fresh, enc)
    assert len(report.loaded) == len(enc_sd) and report.missing and all(
        not k.startswith("swinViT.") for k in report.missing)


def test_cli_verify_prints_table(ds_run, tmp_path, capsys):
    run = ds_run(1)
    out = tmp_path / "W.safetensors"
    rc = cli_main(["convert", str(run / "checkpoints"), "--out", str(out), "--tag", _tag_dir(run).name,
                   "--model", "student", "--verify", "--verify_out_channels", "3"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "alice-ds convert --verify: OK" in err
    assert "157 / 159" in err  # all but out.conv.conv.weight/bias
    assert "skipped (out.*)" in err and "│ 2 " in err  # out.conv.conv.*: 1 -> 3 channels
    assert json.loads(out.with_suffix(".json").read_text())["model"] == "student"


def _copy_tag(run: Path, dst_root: Path) -> Path:
    """A copy of a run's latest checkpoint whose files are symlinks, so that a test can replace one."""
    src = _tag_dir(run)
    dst = dst_root / "checkpoints" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    shutil.copy(run / "checkpoints" / "latest", dst.parent / "latest")
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def test_clear_errors(ds_run, tmp_path, capsys):
    run = ds_run(3)
    # missing tag: CLI exits 2 with one line naming the folder and the tags that exist
    rc = cli_main(["convert", str(run), "--out", str(tmp_path / "W.safetensors"), "--tag", "step_7"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "step_7" in err and "no checkpoint tag" in err and _tag_dir(run).name in err
    assert not (tmp_path / "W.safetensors").exists()

    # no `latest` pointer
    bare = tmp_path / "bare"
    tag = _copy_tag(run, bare)
    (bare / "checkpoints" / "latest").unlink()
    with pytest.raises(DataError, match="latest"):
        convert(bare, tmp_path / "W.safetensors")

    # another architecture: alice_state.json says feature_size 24, the tensors are F=12
    other = tmp_path / "other"
    tag = _copy_tag(run, other)
    state = json.loads((tag / "alice_state.json").read_text())
    state["config"]["model"]["feature_size"] = 24
    (tag / "alice_state.json").unlink()
    (tag / "alice_state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=r"another architecture") as e:
        convert(other, tmp_path / "W.safetensors")
    assert str(tag) in str(e.value) and "feature_size=24" in str(e.value)
    assert not list(tmp_path.glob("*W.safetensors*")), "a failed export must leave no partial file"

    # truncated teacher shard / truncated DeepSpeed optimizer partition: named in the error
    for name, which in (("teacher_fp32_rank1.safetensors", "teacher"),
                        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "student")):
        broken = tmp_path / f"broken_{which}"
        tag = _copy_tag(run, broken)
        shutil.copy((tag / name).resolve(), tag / (name + ".tmp"))
        (tag / name).unlink()
        (tag / (name + ".tmp")).rename(tag / name)
        _truncate(tag / name)
        with pytest.raises(DataError, match="truncated or corrupt") as e:
            convert(broken, tmp_path / "W.safetensors", which=which)
        assert str(tag / name) in str(e.value)

    # an export of F=12 into a SwinUNETR of F=24: refused before anything is written to the model
    out = tmp_path / "W.safetensors"
    convert(run, out)
    big = SwinUNETR(in_channels=1, out_channels=1, feature_size=24)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(UserError, match="feature_size 12, the model feature_size 24") as e:
        load_pretrained(big, out)
    assert str(out) in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in big.state_dict().items())
