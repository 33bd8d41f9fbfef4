"""Write real DeepSpeed checkpoints in the layout of docs/interfaces.md ("Training module and
checkpoints") for the `convert` tests, plus the fp32 values the exporter must reproduce.

Run under a launcher (`python -m torch.distributed.run --nproc_per_node 2 tests/convert_ckpt_writer.py
--out DIR --stages 1 2 3`). For each ZeRO stage it trains a tiny module with the contract's
submodule names (`student.backbone`, `student.head`, `teacher.backbone`, `teacher.head`, `casa`) for
a few bf16 steps, keeps an fp32 EMA teacher, and writes

    DIR/zero<S>/checkpoints/step_<N>/   DeepSpeed files + alice_state.json + teacher_fp32_rank<r>.safetensors
    DIR/zero<S>/checkpoints/latest      the tag, written by rank 0 after a barrier
    DIR/zero<S>/reference.safetensors   `student.<name>`: fp32 master weights at save time
                                        (`deepspeed.utils.safe_get_full_fp32_param`),
                                        `teacher.<name>`: the fp32 teacher at save time.

The backbone is `alice_ds.models.SwinBackbone` when that module exists, else a MONAI `SwinUNETR`
with a `mask_token` parameter: the same state-dict keys, which is all the exporter reads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from monai.networks.nets import SwinUNETR  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

FEATURE_SIZE = 12
ROI = 64  # smallest edge whose deepest stage (ROI / 32) still has 2 voxels for InstanceNorm
TEACHER_MOMENTUM = 0.9  # far from 1 so that a few steps move the teacher measurably
HEAD_DIM = 8


class StandInBackbone(SwinUNETR):
    """MONAI SwinUNETR plus the learned mask token: the state-dict keys of `SwinBackbone`."""

    def __init__(self, feature_size: int):
        super().__init__(in_channels=1, out_channels=1, feature_size=feature_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, feature_size))

    def recon(self, x: torch.Tensor) -> torch.Tensor:
        # the token is added to every position so that it trains like the other parameters
        return self.forward(x) + self.mask_token.mean()


def make_backbone() -> nn.Module:
    try:
        from alice_ds.models import SwinBackbone
    except ImportError:
        return StandInBackbone(FEATURE_SIZE)
    return SwinBackbone(FEATURE_SIZE)


class Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = make_backbone()
        self.head = nn.Linear(1, HEAD_DIM)


class TinyAlice(nn.Module):
    """Student + frozen teacher + CASA in one module, named as the trainer names them."""

    def __init__(self):
        super().__init__()
        self.student = Branch()
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.casa = nn.Linear(HEAD_DIM, HEAD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.student.backbone
        recon = backbone.recon(x) if hasattr(backbone, "recon") else backbone(x, None).recon
        pooled = recon.float().mean(dim=(2, 3, 4))  # [B, 1, X, Y, Z] -> [B, 1]
        logits = self.casa(self.student.head(pooled.to(recon.dtype)))
        return ((recon.float() - x.float()) ** 2).mean() + logits.float().pow(2).mean()


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def full_fp32_student(engine) -> dict[str, torch.Tensor]:
    """Every student parameter's fp32 master value, gathered (collective under ZeRO-3)."""
    out = {}
    for name, p in engine.module.student.named_parameters():
        out[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
    return out


def write_teacher_shards(tag_dir: str, teacher: dict[str, torch.Tensor], stage: int, rank: int,
                         world: int) -> None:
    """The contract's `teacher_fp32_rank<r>.safetensors`: full tensors on rank 0 under ZeRO 0-2, one
    flat padded partition per rank (ceil(numel / world) elements, like `param.ds_tensor`) under ZeRO-3."""
    if stage < 3:
        if rank == 0:
            save_file({n: t.contiguous() for n, t in teacher.items()},
                      os.path.join(tag_dir, "teacher_fp32_rank0.safetensors"))
        return
    parts, shapes = {}, {}
    for name, t in teacher.items():
        part = math.ceil(t.numel() / world)
        flat = torch.zeros(part * world, dtype=torch.float32)
        flat[: t.numel()] = t.flatten()  # [numel] -> [part * world], zero padded at the end
        parts[name] = flat[rank * part:(rank + 1) * part].clone()
        shapes[name] = list(t.shape)
    save_file(parts, os.path.join(tag_dir, f"teacher_fp32_rank{rank}.safetensors"),
              metadata={"zero3_shapes": json.dumps(shapes)})


def run_stage(stage: int, out_root: str, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(stage)
    model = TinyAlice()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage))
    teacher = full_fp32_student(engine)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.rand(1, 1, ROI, ROI, ROI, generator=gen).to(torch.bfloat16)
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        student = full_fp32_student(engine)
        teacher = {n: TEACHER_MOMENTUM * t + (1 - TEACHER_MOMENTUM) * student[n] for n, t in teacher.items()}

    run_dir = os.path.join(out_root, f"zero{stage}")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = f"step_{steps}"
    engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)
    tag_dir = os.path.join(ckpt_dir, tag)
    write_teacher_shards(tag_dir, teacher, stage, rank, world)
    student = full_fp32_student(engine)
    dist.barrier()
    if rank == 0:
        state = {"step": steps, "world_size": world, "zero_stage": stage, "alice_ds_version": "0.1.0",
                 "config": {"model": {"feature_size": FEATURE_SIZE, "use_v2": False},
                            "data": {"roi": [ROI] * 3, "spacing": [1.5, 1.5, 2.0],
                                     "hu_window": [-125.0, 225.0]}}}
        with open(os.path.join(tag_dir, "alice_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        with open(os.path.join(ckpt_dir, "latest"), "w") as f:
            f.write(tag)
        ref = {f"student.{n}": t for n, t in student.items()}
        ref.update({f"teacher.{n}": t for n, t in teacher.items()})
        save_file(ref, os.path.join(run_dir, "reference.safetensors"))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="root folder; one zero<S>/ run folder per stage")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], help="ZeRO stages to write")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before the checkpoint")
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in args.stages:
        run_stage(stage, args.out, args.steps)


if __name__ == "__main__":
    main()
