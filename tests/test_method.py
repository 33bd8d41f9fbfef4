"""AliceMetaArch (alice_ds.method): which tokens the patch term compares under each switch, the clean
reconstruction target, the CASA monitor, and the centers left to the optimizer step."""

import pytest
import torch

from alice_ds.engine.config import LossConfig, ModelConfig
from alice_ds.method import AliceMetaArch

R = 64
SMALL = dict(preset="tiny", out_dim=32, patch_out_dim=24, head_hidden_dim=64, head_bottleneck_dim=16, casa_heads=2,
             casa_ffn_dim=32)


def _batch(seed=0, target=False):
    g = torch.Generator().manual_seed(seed)
    side = R // 2
    b = {"query": torch.rand(1, 1, R, R, R, generator=g), "anchor": torch.rand(1, 1, R, R, R, generator=g),
         "query_mask": torch.rand(1, side, side, side, generator=g) < 0.75,
         "anchor_mask": torch.rand(1, side, side, side, generator=g) < 0.75}
    if target:
        b["query_target"] = torch.rand(1, 1, R, R, R, generator=g)
        b["anchor_target"] = torch.rand(1, 1, R, R, R, generator=g)
    return b


def _module(**model):
    torch.manual_seed(0)
    return AliceMetaArch(ModelConfig(**SMALL, **model), LossConfig()).train()


@pytest.fixture(scope="module")
def shared():
    """Backbone outputs of one batch (the switches leave backbones and heads as they are), with a
    teacher perturbed away from the student so that student and target differ."""
    m = _module()
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        batch = _batch()
        so = [m.student.backbone(batch[v], batch[f"{v}_mask"]) for v in ("query", "anchor")]
        to = [m.teacher.backbone(batch[v], None) for v in ("query", "anchor")]
    return m.state_dict(), so, to


def _expected_patch(m: AliceMetaArch, so, to):
    """The patch logits written out from DESIGN §4.5 and the switches' docstrings."""
    cfg, s, t = m.cfg, m.student, m.teacher
    with torch.no_grad():
        q = [s.head.embed_enc(o.enc_tokens) for o in so]
        if not cfg.casa:
            return ([s.head.forward_patch(x) for x in q],
                    [t.head.forward_patch(t.head.embed_enc(o.enc_tokens)) for o in to])
        other = {"within": [0, 1], "cross": [1, 0]}[cfg.casa_views]
        tq = [t.head.embed_enc(o.enc_tokens) for o in to] if cfg.casa_queries == "teacher" else q
        student = [s.head.forward_patch(m.casa(q[v], s.head.embed_dec(so[other[v]].dec_tokens))) for v in range(2)]
        target = [t.head.forward_patch(m.casa(tq[v], t.head.embed_dec(to[other[v]].dec_tokens))) for v in range(2)]
    return student, target


OFFICIAL = {"casa_views": "within", "casa_queries": "student"}
"""The official code's CASA wiring: the target branch reads the student's queries, same view."""


@pytest.mark.parametrize("switches", [OFFICIAL, {}, {"casa_views": "cross"}, {"casa": False}],
                         ids=["official", "default-teacher-queries", "cross", "casa-off"])
def test_patch_logits_follow_the_switches(shared, switches):
    state, so, to = shared
    m = _module(**switches)
    m.load_state_dict(state, strict=False)  # the perturbed teacher; no CASA weights when it is off
    with torch.no_grad():
        student, target, extra = m._patch_logits(so, to)
    want_s, want_t = _expected_patch(m, so, to)
    for got, want in zip(student + target, want_s + want_t):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ("casa_attn_ratio" in extra) == m.cfg.casa and (m.casa is None) == (not m.cfg.casa)
    if m.cfg.casa:
        assert 0.0 < float(extra["casa_attn_ratio"]) < 10.0
    if switches != OFFICIAL:  # the variants really differ from the official wiring
        ref = _module(**OFFICIAL)
        ref.load_state_dict(state)
        ref_s, ref_t = _expected_patch(ref, so, to)
        assert any((a - b).abs().max() > 1e-4 for a, b in zip(student + target, ref_s + ref_t))


def test_forward_reconstructs_the_clean_targets_and_leaves_the_centers():
    m = _module()
    batch = _batch(target=True)
    out = m(batch, step=0)
    recon_clean = float(out["recon"])
    noisy = {k: v for k, v in batch.items() if not k.endswith("_target")}
    assert float(m(noisy, step=0)["recon"]) != pytest.approx(recon_clean, rel=1e-3)  # targets were used
    assert torch.count_nonzero(m.loss.center) == 0  # the trainer moves them once per optimizer step
    sums = out["center_sums"]
    assert sums["cls_rows"] == 2 and sums["patch_rows"] == 2 * (R // 16) ** 3
    m.loss.update_centers(**sums)
    assert torch.count_nonzero(m.loss.center) > 0


@pytest.mark.slow  # three forward and backward passes of the whole step
def test_every_trained_parameter_gets_a_gradient_in_each_variant():
    for switches in ({}, OFFICIAL, {"casa": False}):
        m = _module(**switches)
        m(_batch(), step=0)["loss"].backward()
        unused = {"head.dec_proj.weight", "head.dec_proj.bias"} if not m.cfg.casa else set()
        missing = [n for g in m.param_groups() for p in g["params"] for n, q in m.named_parameters()
                   if q is p and (p.grad is None or p.grad.abs().sum() == 0)]
        assert {n.removeprefix("student.") for n in missing} == unused, switches


def test_batched_lean_forward_equals_the_per_view_computation():
    """forward() stacks the views into one call per backbone and stops the teacher's decoder at the
    stride-8 tokens; losses and every student/CASA gradient equal those of one full call per view.
    In float64: in fp32 the other summation order alone moves some conv gradients by ~3e-4 relative
    (instance norms over 2^3 voxels amplify it), which would hide a real difference."""
    m = _module().double()
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch(seed=3, target=True).items()}
    out = m(batch, step=5)
    out["loss"].backward()
    lean = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)

    views = [batch[v] for v in ("query", "anchor")]
    masks = [batch[f"{v}_mask"] for v in ("query", "anchor")]
    with torch.no_grad():
        t_out = [m.teacher.backbone(x, None) for x in views]  # full decoder, one view at a time
    s_out = [m.student.backbone(x, k) for x, k in zip(views, masks)]
    s_patch, t_patch, _ = m._patch_logits(s_out, t_out)
    ref = m.loss([m.student.head.forward_cls(o.global_feat) for o in s_out],
                 [m.teacher.head.forward_cls(o.global_feat) for o in t_out], s_patch, t_patch,
                 recon=[o.recon for o in s_out], target=[batch["query_target"], batch["anchor_target"]],
                 masks=masks, step=5)
    ref["loss"].backward()
    for k in ("loss", "cls", "patch", "recon"):
        torch.testing.assert_close(out[k], ref[k], atol=1e-12, rtol=1e-10)
    assert set(lean) == {n for n, p in m.named_parameters() if p.grad is not None}
    assert not any(n.startswith("teacher.") for n in lean)
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert (lean[n] - p.grad).norm() <= 1e-9 * p.grad.norm() + 1e-15, n
    with torch.no_grad():  # the lean teacher's outputs are the full ones
        t_lean = m.teacher.backbone(torch.cat(views), None, recon=False).split(1)
    for a, b in zip(t_lean, t_out):
        assert a.recon is None
        for name in ("global_feat", "enc_tokens", "dec_tokens"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-12, rtol=1e-10)
