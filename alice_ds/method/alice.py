"""The Alice meta-architecture (Jiang et al., ICCV 2023; DESIGN §4 steps 3-6).

One `nn.Module` holds `student` (backbone + AliceHead), `teacher` (the same, frozen, updated only by
the EMA in `alice_ds.engine.ema`), `casa` and the loss, so ZeRO partitions student and teacher the
same way. `forward(batch, step)` returns the loss dict; the training loop never branches on which loss
is which. Every parameter of student and CASA receives a gradient each step (no
`find_unused_parameters`): the cls path trains `last_layer` and the deepest stage, the patch path
trains `enc_proj`, `dec_proj`, `patch_last_layer` and CASA, the reconstruction trains the decoder,
the masked views train `mask_token`.

Both views go through each backbone in one call (stacked on the batch axis: every layer of the
backbone is per-sample, so this is the per-view computation), and the teacher stops its decoder at
the stride-8 tokens the loss reads (`SwinBackbone.forward(recon=False)`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from alice_ds.losses import AliceLoss
from alice_ds.models import CASA, AliceHead, SwinBackbone
from alice_ds.views import VIEWS

LAST_LAYER_NAMES = ("last_layer", "patch_last_layer")
"""Head layers frozen for the first steps (`optim.freeze_last_layer_steps`)."""


class Branch(nn.Module):
    """Backbone + head: one of student or teacher."""

    def __init__(self, backbone: SwinBackbone, head: AliceHead):
        super().__init__()
        self.backbone = backbone
        self.head = head


class AliceMetaArch(nn.Module):
    """Student, teacher, CASA and AliceLoss. `model_cfg`/`loss_cfg` are `alice_ds.engine.config`
    sections (plain dataclasses, no DeepSpeed)."""

    def __init__(self, model_cfg, loss_cfg):
        super().__init__()
        f = model_cfg.feature_size
        backbone = SwinBackbone(f, in_channels=1, use_v2=model_cfg.use_v2,
                                checkpoint_activations=model_cfg.checkpoint_activations)
        head = AliceHead.for_backbone(f, out_dim=model_cfg.out_dim, patch_out_dim=model_cfg.patch_out_dim,
                                      hidden_dim=model_cfg.head_hidden_dim,
                                      bottleneck_dim=model_cfg.head_bottleneck_dim)
        self.student = Branch(backbone, head)
        self.teacher = copy.deepcopy(self.student)  # initialised equal to the student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = model_cfg
        self.casa = (CASA(head.in_dim, num_heads=model_cfg.casa_heads, ffn_dim=model_cfg.casa_ffn_dim)
                     if model_cfg.casa else None)
        self.loss = AliceLoss(model_cfg.out_dim, model_cfg.patch_out_dim, student_temp=loss_cfg.student_temp,
                              teacher_temp=loss_cfg.teacher_temp,
                              warmup_teacher_temp=loss_cfg.warmup_teacher_temp,
                              teacher_patch_temp=loss_cfg.teacher_patch_temp,
                              warmup_teacher_patch_temp=loss_cfg.warmup_teacher_patch_temp,
                              warmup_teacher_temp_steps=loss_cfg.warmup_teacher_temp_steps,
                              center_momentum=loss_cfg.center_momentum, lambdas=loss_cfg.lambdas,
                              recon_on=loss_cfg.recon_on)

    def train(self, mode: bool = True) -> AliceMetaArch:
        """The teacher always runs in eval mode (it is a target, not a trained network)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: dict, step: int) -> dict:
        """`batch`: the pair sampler's collated dict (`query`, `anchor` [B, 1, R, R, R] in [0, 1];
        `query_mask`, `anchor_mask` bool [B, R/2, R/2, R/2], True = masked; optional `query_target`,
        `anchor_target`: the clean views the reconstruction aims at, else the views themselves).
        `step` drives the teacher temperature warmup. Returns `AliceLoss`'s dict plus
        `casa_attn_ratio` (with CASA on)."""
        views = [batch[v] for v in VIEWS]
        masks = [batch[f"{v}_mask"] for v in VIEWS]
        targets = [batch.get(f"{v}_target", x) for v, x in zip(VIEWS, views)]
        s_head, t_head = self.student.head, self.teacher.head

        b = views[0].shape[0]
        x = torch.cat(views)  # [2B, 1, R, R, R]: both views through each backbone in one call
        with torch.no_grad():  # teacher: unmasked views, never differentiated, no reconstruction
            t_out = self.teacher.backbone(x, None, recon=False).split(b)
            t_cls = [t_head.forward_cls(o.global_feat) for o in t_out]              # [B, K]

        s_out = self.student.backbone(x, torch.cat(masks)).split(b)
        s_cls = [s_head.forward_cls(o.global_feat) for o in s_out]                  # [B, K]
        s_patch, t_patch, extra = self._patch_logits(s_out, t_out)                  # [B, L16, Kp] each
        out = self.loss(s_cls, t_cls, s_patch, t_patch, recon=[o.recon for o in s_out], target=targets,
                        masks=masks, step=step)
        return {**out, **extra}

    def _patch_logits(self, s_out, t_out) -> tuple[list, list, dict]:
        """Student and target patch logits per view (the patch term compares them token by token).
        CASA (DESIGN §4.5): the student's masked encoder tokens query decoder tokens: the student's
        own (the aligned tokens) or the teacher's (the target), same CASA weights; `casa_views`
        `cross` reads the other view's decoder tokens; `casa_queries` `teacher` gives the target
        branch the teacher's unmasked encoder tokens as queries. Without CASA the student's encoder
        tokens are compared with the teacher's at the same positions."""
        s_head, t_head, cfg = self.student.head, self.teacher.head, self.cfg
        queries = [s_head.embed_enc(o.enc_tokens) for o in s_out]                   # [B, L16, D]
        with torch.no_grad():
            t_queries = ([t_head.embed_enc(o.enc_tokens) for o in t_out] if cfg.casa_queries == "teacher"
                         or not cfg.casa else [q.detach() for q in queries])
        if not cfg.casa:
            with torch.no_grad():
                t_patch = [t_head.forward_patch(q) for q in t_queries]
            return [s_head.forward_patch(q) for q in queries], t_patch, {}
        kv_view = [len(queries) - 1 - v if cfg.casa_views == "cross" else v for v in range(len(queries))]
        s_kv = [s_head.embed_dec(o.dec_tokens) for o in s_out]                       # [B, L8, D]
        aligned = [self.casa(q, s_kv[kv_view[v]], return_attn_ratio=True) for v, q in enumerate(queries)]
        with torch.no_grad():
            t_kv = [t_head.embed_dec(o.dec_tokens) for o in t_out]
            t_patch = [t_head.forward_patch(self.casa(q, t_kv[kv_view[v]])) for v, q in enumerate(t_queries)]
        ratio = torch.stack([r for _, r in aligned]).mean()
        return [s_head.forward_patch(a) for a, _ in aligned], t_patch, {"casa_attn_ratio": ratio}

    def param_groups(self) -> list[dict]:
        """AdamW groups over student + CASA: no weight decay on biases, norms and other 1-D (or
        smaller) tensors; the heads' last layers in their own groups so their lr can be zeroed while
        frozen (works with ZeRO-partitioned gradients, unlike zeroing `.grad`). Each group carries
        `apply_wd` and `last_layer` flags; the trainer reads them once, before DeepSpeed wraps the
        optimizer, and sets each group's lr and weight decay every step."""
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if not name.startswith(("student.", "casa.")):
                raise ValueError(f"unexpected trainable parameter {name} (only student.* and casa.* train)")
            apply_wd = not (name.endswith(".bias") or p.ndim <= 1 or "norm" in name)
            last = any(f".{n}." in name for n in LAST_LAYER_NAMES)
            groups.setdefault((apply_wd, last), []).append(p)
        return [{"params": ps, "apply_wd": wd, "last_layer": last} for (wd, last), ps in sorted(groups.items())]
