"""AliceLoss: the three Alice training losses (Jiang et al., ICCV 2023, §3; DESIGN §4.6).

- cls: cross-view DINO cross-entropy H(softmax((t_q − c)/τt), log_softmax(s_v/τs)), averaged over
  ordered view pairs q ≠ v and over the batch;
- patch: CASA cross-entropy per token, H(softmax((casa_t − c₂)/τp), log_softmax(casa_s/τs)),
  averaged over tokens and views;
- recon: MSE between the student's reconstruction and the clean view (augmented but not noised),
  over masked voxels (SimMIM-style, default) or all voxels (`recon_on="all"`). The reference code
  averages over all voxels and then halves the term: `recon_on="all"` with λ3 = 5 reproduces its
  weight (its λ3 = 10 on a halved term);
- total = λ1·cls + λ2·patch + λ3·recon.

Centers follow DINO (Caron et al. 2021, eq. 4): c ← m·c + (1 − m)·mean of the *raw* teacher head
outputs over the batch (all views, all ranks); c₂ likewise over all teacher patch tokens (iBOT's
patch center). `forward` only returns the column sums; the trainer applies them once per optimizer
step from the finite micro-batches (`update_centers`), so a step's loss uses the previous centers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from alice_ds.dist import all_reduce_mean
from alice_ds.losses.functional import centered_cross_entropy, masked_mse
from alice_ds.models.swin import PATCH_SIZE

STUDENT_TEMP = 0.1
# Teacher temperatures of the Alice reference code (DESIGN §4.7): linear warmup 0.008 -> 0.01, for
# both the cls and the patch temperature. DINO uses 0.04 -> 0.04..0.07 over 30 epochs; iBOT 0.04 -> 0.07
# for the patch temperature. All are constructor arguments.
TEACHER_TEMP = 0.01
WARMUP_TEACHER_TEMP = 0.008
WARMUP_TEACHER_TEMP_STEPS = 1000
CENTER_MOMENTUM = 0.9
LAMBDAS = (1.0, 1.0, 10.0)
RECON_ON = ("masked", "all")


def warmup_temp(step: int, start: float, end: float, steps: int) -> float:
    """Linear warmup from `start` (step 0) to `end` (step `steps` and after); a pure function of the
    step, so the only schedule state a checkpoint needs is the step."""
    if steps <= 0 or step >= steps:
        return end
    return start + (end - start) * max(step, 0) / steps


class AliceLoss(nn.Module):
    """See the module docstring. Buffers `center` [1, out_dim] and `center2` [1, patch_out_dim] are in
    `state_dict()`; checkpoint them for an exact resume."""

    def __init__(self, out_dim: int, patch_out_dim: int, student_temp: float = STUDENT_TEMP,
                 teacher_temp: float = TEACHER_TEMP, warmup_teacher_temp: float = WARMUP_TEACHER_TEMP,
                 teacher_patch_temp: float = TEACHER_TEMP,
                 warmup_teacher_patch_temp: float = WARMUP_TEACHER_TEMP,
                 warmup_teacher_temp_steps: int = WARMUP_TEACHER_TEMP_STEPS,
                 center_momentum: float = CENTER_MOMENTUM,
                 lambdas: tuple[float, float, float] = LAMBDAS, recon_on: str = "masked",
                 mask_cell: int = PATCH_SIZE):
        super().__init__()
        for name, v in [("out_dim", out_dim), ("patch_out_dim", patch_out_dim),
                        ("mask_cell", mask_cell)]:
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, v in [("student_temp", student_temp), ("teacher_temp", teacher_temp),
                        ("warmup_teacher_temp", warmup_teacher_temp),
                        ("teacher_patch_temp", teacher_patch_temp),
                        ("warmup_teacher_patch_temp", warmup_teacher_patch_temp)]:
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if warmup_teacher_temp_steps < 0:
            raise ValueError(f"warmup_teacher_temp_steps must be >= 0, got {warmup_teacher_temp_steps}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if len(lambdas) != 3 or any(x < 0 for x in lambdas):
            raise ValueError(f"lambdas must be 3 non-negative weights (cls, patch, recon), got {lambdas}")
        if recon_on not in RECON_ON:
            raise ValueError(f"recon_on must be one of {RECON_ON}, got {recon_on!r}")
        self.student_temp = float(student_temp)
        self.teacher_temp = float(teacher_temp)
        self.warmup_teacher_temp = float(warmup_teacher_temp)
        self.teacher_patch_temp = float(teacher_patch_temp)
        self.warmup_teacher_patch_temp = float(warmup_teacher_patch_temp)
        self.warmup_teacher_temp_steps = int(warmup_teacher_temp_steps)
        self.center_momentum = float(center_momentum)
        self.lambdas = tuple(float(x) for x in lambdas)
        self.recon_on = recon_on
        self.mask_cell = int(mask_cell)  # voxels per mask entry: masks live on the patch grid
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, patch_out_dim))

    def teacher_temps(self, step: int) -> tuple[float, float]:
        """(cls, patch) teacher temperatures at `step`."""
        n = self.warmup_teacher_temp_steps
        return (warmup_temp(step, self.warmup_teacher_temp, self.teacher_temp, n),
                warmup_temp(step, self.warmup_teacher_patch_temp, self.teacher_patch_temp, n))

    def forward(self, student_cls, teacher_cls, student_patch, teacher_patch, recon, target, masks,
                step: int) -> dict:
        """One entry per view in every list: `student_cls`/`teacher_cls` [B, K] head logits,
        `student_patch`/`teacher_patch` [B, L, Kp] patch token logits, `recon`/`target`
        [B, 1, X, Y, Z], `masks` [B, X/2, Y/2, Z/2] (1 = masked; may be None with recon_on="all").

        Returns the loss and its parts, the monitors (`MONITORS`) and the teacher column sums the
        centers are updated from (`center_sums`: `update_centers` applies them once per optimizer
        step, so a micro-batch that is later skipped never moves them)."""
        nv = len(student_cls)
        lists = dict(teacher_cls=teacher_cls, student_patch=student_patch,
                     teacher_patch=teacher_patch, recon=recon, target=target)
        if masks is not None:
            lists["masks"] = masks
        for name, lst in lists.items():
            if len(lst) != nv:
                raise ValueError(f"{name} has {len(lst)} views, student_cls has {nv}")
        if nv < 2:
            raise ValueError(f"the cross-view cls term needs at least 2 views, got {nv}")
        if self.recon_on == "masked" and masks is None:
            raise ValueError("recon_on='masked' needs masks; pass masks or use recon_on='all'")
        tt, tp = self.teacher_temps(step)
        k, kp = self.center.shape[1], self.center2.shape[1]
        dev = student_cls[0].device
        cls_sum = torch.zeros(k, dtype=torch.float32, device=dev)   # Σ raw teacher cls logits
        patch_sum = torch.zeros(kp, dtype=torch.float32, device=dev)

        cls_terms = []
        for q in range(nv):
            first_v = 1 if q == 0 else 0  # collect teacher view q's column sums exactly once
            for v in range(nv):
                if v == q:
                    continue
                rows = centered_cross_entropy(student_cls[v], teacher_cls[q].detach(), self.center,
                                              self.student_temp, tt,
                                              teacher_sum=cls_sum if v == first_v else None)
                cls_terms.append(rows.mean())
        loss_cls = torch.stack(cls_terms).mean()

        patch_terms = []
        for v in range(nv):
            bsz, ntok, _ = student_patch[v].shape
            rows = centered_cross_entropy(
                student_patch[v].reshape(bsz * ntok, kp),           # [B, L, Kp] -> [B·L, Kp]
                teacher_patch[v].detach().reshape(bsz * ntok, kp),
                self.center2, self.student_temp, tp, teacher_sum=patch_sum)
            patch_terms.append(rows.mean())
        loss_patch = torch.stack(patch_terms).mean()

        recon_terms = []
        for v in range(nv):
            m = masks[v] if self.recon_on == "masked" else None
            recon_terms.append(masked_mse(recon[v], target[v].detach(), m, self.mask_cell))
        loss_recon = torch.stack(recon_terms).mean()

        l1, l2, l3 = self.lambdas
        loss = l1 * loss_cls + l2 * loss_patch + l3 * loss_recon
        with torch.no_grad():
            t_cls = torch.cat([t.detach().float() for t in teacher_cls])  # [V·B, K]
            t_patch = torch.cat([t.detach().float().reshape(-1, kp) for t in teacher_patch])  # [V·B·L, Kp]
            monitors = {**_teacher_monitors("cls", t_cls, self.center, tt, loss_cls),
                        **_teacher_monitors("patch", t_patch, self.center2, tp, loss_patch)}
            logits_t = ((t_cls - self.center) / tt).view(nv, -1, k)
            hits = [(student_cls[v].detach().argmax(-1) == logits_t[q].argmax(-1))
                    for q in range(nv) for v in range(nv) if v != q]
            monitors["agreement"] = torch.cat(hits).float().mean()
        return {"loss": loss, "cls": loss_cls.detach(), "patch": loss_patch.detach(),
                "recon": loss_recon.detach(), **monitors, "teacher_temp": tt, "teacher_patch_temp": tp,
                "center_sums": {"cls_sum": cls_sum, "cls_rows": t_cls.shape[0], "patch_sum": patch_sum,
                                "patch_rows": t_patch.shape[0]}}

    @torch.no_grad()
    def update_centers(self, cls_sum: torch.Tensor, cls_rows: float, patch_sum: torch.Tensor,
                       patch_rows: float) -> None:
        """c <- m·c + (1 - m)·(batch mean of the raw teacher outputs), over every rank (one
        all-reduce): `*_sum` are column sums of raw teacher logits over `*_rows` rows (tokens for the
        patch center), accumulated over the finite micro-batches of one optimizer step."""
        k = cls_sum.numel()
        dev = self.center.device
        stats = torch.cat([cls_sum.float().to(dev), torch.tensor([float(cls_rows)], device=dev),
                           patch_sum.float().to(dev), torch.tensor([float(patch_rows)], device=dev)])
        stats = all_reduce_mean(stats)  # [K + 1 + Kp + 1]: a mean of sums over the mean of counts
        m = self.center_momentum
        self.center.mul_(m).add_((stats[:k] / stats[k])[None], alpha=1 - m)
        self.center2.mul_(m).add_((stats[k + 1:-1] / stats[-1])[None], alpha=1 - m)


MONITORS = ("cls_batch_entropy", "cls_distinct", "cls_kl", "patch_batch_entropy", "patch_distinct", "patch_kl",
            "agreement")
"""Collapse and learning monitors (reduced over ranks each micro-batch; `metrics.jsonl`):
`<term>_batch_entropy`: entropy (nats) of the batch-mean teacher distribution, log K when the batch
uses every prototype alike, 0 when every row picks the same one (collapse); `<term>_distinct`: how
many prototypes are some row's (token's) teacher argmax; `<term>_kl`: KL(teacher || student), the
term's loss minus the teacher's own entropy (at τt ≈ 0.01 the teacher is near one-hot, so its
per-row entropy is ~0 and says nothing); `agreement`: fraction of cross-view cls rows whose student
and teacher argmaxes agree."""


def _teacher_monitors(term: str, teacher: torch.Tensor, center: torch.Tensor, temp: float,
                      loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """teacher [N, K] raw logits -> the `MONITORS` of one term (see there)."""
    p = F.softmax((teacher - center) / temp, dim=-1)  # [N, K]
    mean = p.mean(0)  # [K]
    row_entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1).mean()
    return {f"{term}_batch_entropy": -(mean * torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))).sum(),
            f"{term}_distinct": torch.zeros(p.shape[-1], device=p.device).scatter_(0, p.argmax(-1), 1.0).sum(),
            f"{term}_kl": loss.detach() - row_entropy}
