"""AliceLoss: the three Alice training losses (Jiang et al., ICCV 2023, §3; DESIGN §4.6).

- cls: cross-view DINO cross-entropy H(softmax((t_q − c)/τt), log_softmax(s_v/τs)), averaged over
  ordered view pairs q ≠ v and over the batch;
- patch: same-view CASA cross-entropy per token, H(softmax((casa_t − c₂)/τp), log_softmax(casa_s/τs)),
  averaged over tokens (optionally weighted) and views;
- recon: MSE between the student's reconstruction and the unmasked input, over masked voxels
  (SimMIM-style, default) or all voxels (`recon_on="all"`, the reference code's choice);
- total = λ1·cls + λ2·patch + λ3·recon.

Centers follow DINO (Caron et al. 2021, eq. 4): c ← m·c + (1 − m)·mean of the *raw* teacher head
outputs over the batch (all views, all ranks); c₂ likewise over all teacher CASA tokens (iBOT's
patch center). They are updated after the loss is computed, so a step's loss uses the previous
centers.
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
                step: int, patch_weights=None, update_centers: bool = True) -> dict:
        """One entry per view in every list: `student_cls`/`teacher_cls` [B, K] head logits,
        `student_patch`/`teacher_patch` [B, L, Kp] CASA token logits, `recon`/`target`
        [B, 1, X, Y, Z], `masks` [B, X/2, Y/2, Z/2] (1 = masked; may be None with recon_on="all"),
        `patch_weights` optional [B, L] token weights (e.g. 1 on masked tokens only)."""
        nv = len(student_cls)
        lists = dict(teacher_cls=teacher_cls, student_patch=student_patch,
                     teacher_patch=teacher_patch, recon=recon, target=target)
        if masks is not None:
            lists["masks"] = masks
        if patch_weights is not None:
            lists["patch_weights"] = patch_weights
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
        n_tokens = 0
        for v in range(nv):
            bsz, ntok, _ = student_patch[v].shape
            rows = centered_cross_entropy(
                student_patch[v].reshape(bsz * ntok, kp),           # [B, L, Kp] -> [B·L, Kp]
                teacher_patch[v].detach().reshape(bsz * ntok, kp),
                self.center2, self.student_temp, tp, teacher_sum=patch_sum)
            n_tokens += bsz * ntok
            if patch_weights is None:
                patch_terms.append(rows.mean())
            else:
                w = patch_weights[v].detach().reshape(-1).float()  # [B, L] -> [B·L]
                patch_terms.append((rows * w).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny))
        loss_patch = torch.stack(patch_terms).mean()

        recon_terms = []
        for v in range(nv):
            m = masks[v] if self.recon_on == "masked" else None
            recon_terms.append(masked_mse(recon[v], target[v].detach(), m, self.mask_cell))
        loss_recon = torch.stack(recon_terms).mean()

        l1, l2, l3 = self.lambdas
        loss = l1 * loss_cls + l2 * loss_patch + l3 * loss_recon

        with torch.no_grad():
            t_all = torch.cat([t.detach().float() for t in teacher_cls])  # [V·B, K]
            logits_t = (t_all - self.center) / tt
            entropy = -(F.softmax(logits_t, -1) * F.log_softmax(logits_t, -1)).sum(-1).mean()
            hits = [(student_cls[v].detach().argmax(-1) == logits_t.view(nv, -1, k)[q].argmax(-1))
                    for q in range(nv) for v in range(nv) if v != q]
            agreement = torch.cat(hits).float().mean()
            if update_centers:
                m = self.center_momentum
                batch_cls = all_reduce_mean(cls_sum / t_all.shape[0])           # [K]
                batch_patch = all_reduce_mean(patch_sum / n_tokens)             # [Kp]
                self.center.mul_(m).add_(batch_cls.to(self.center.dtype)[None], alpha=1 - m)
                self.center2.mul_(m).add_(batch_patch.to(self.center2.dtype)[None], alpha=1 - m)

        return {"loss": loss, "cls": loss_cls.detach(), "patch": loss_patch.detach(),
                "recon": loss_recon.detach(), "teacher_entropy": entropy, "agreement": agreement,
                "teacher_temp": tt, "teacher_patch_temp": tp}
