"""alice_ds.models: MONAI SwinUNETR as the oracle for the backbone, plain PyTorch for head and CASA."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from alice_ds.models import CASA, PRESETS, AliceHead, SwinBackbone, parameter_count

ATOL = 1e-5
"""fp32 tolerance for ours vs MONAI: SDPA scales q and k separately, so the sums round differently."""


def _hidden_states(model, x):
    """Run model(x) and capture the five stage outputs its `swinViT` returns."""
    captured = []
    handle = model.swinViT.register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    return out, captured[0]


def _assert_matches(ours_out, ours_hidden, monai_out, monai_hidden):
    assert len(ours_hidden) == len(monai_hidden) == 5
    for i, (a, b) in enumerate(zip(ours_hidden, monai_hidden)):
        assert a.shape == b.shape, i
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"swinViT stage {i}")
    torch.testing.assert_close(ours_out.recon, monai_out, atol=ATOL, rtol=0)
    # the Alice outputs are views of the same tensors
    torch.testing.assert_close(ours_out.global_feat, monai_hidden[4].mean(dim=(2, 3, 4)), atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_out.enc_tokens, monai_hidden[3].flatten(2).transpose(1, 2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("feature_size,side", [(12, 64), (24, 96)])
def test_equivalence_with_monai_both_directions(feature_size, side):
    """Ours -> MONAI and MONAI -> ours, both strict; then one forward pair on the shared weights."""
    ours = SwinBackbone(feature_size, seed=200).eval()
    torch.manual_seed(100)
    monai_net = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size).eval()
    monai_net.load_state_dict(ours.monai_state_dict(), strict=True)  # our weights into MONAI
    ours_again = SwinBackbone(feature_size, seed=300).eval()
    state = dict(monai_net.state_dict(), mask_token=ours_again.mask_token.detach().clone())
    ours_again.load_state_dict(state, strict=True)  # and MONAI's back into ours
    for name, value in ours.monai_state_dict().items():
        assert torch.equal(ours_again.state_dict()[name], value), name

    x = torch.rand(1, 1, side, side, side, generator=torch.Generator().manual_seed(feature_size))
    monai_out, monai_hidden = _hidden_states(monai_net, x)
    ours_out, ours_hidden = _hidden_states(ours_again, x)
    assert ours_out.recon.shape == (1, 1, side, side, side)
    assert ours_out.global_feat.shape == (1, 16 * feature_size)
    assert ours_out.enc_tokens.shape == (1, (side // 16) ** 3, 8 * feature_size)
    assert ours_out.dec_tokens.shape == (1, (side // 8) ** 3, 4 * feature_size)
    _assert_matches(ours_out, ours_hidden, monai_out, monai_hidden)


def test_state_dict_layout_matches_monai_v2():
    """use_v2 adds the residual conv blocks `swinViT.layers{i}c`; keys and shapes stay MONAI's."""
    ours = SwinBackbone(12, use_v2=True, seed=0).state_dict()
    ref = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True).state_dict()
    assert set(ours) - set(ref) == {"mask_token"}
    assert set(ref) <= set(ours)
    assert {k: tuple(v.shape) for k, v in ref.items()} == {k: tuple(ours[k].shape) for k in ref}
    assert any(k.startswith("swinViT.layers1c.") for k in ours)


def _monai_count(feature_size, use_v2=False):
    net = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, use_v2=use_v2)
    return sum(p.numel() for p in net.parameters())


def test_preset_parameter_counts_match_monai():
    assert PRESETS == {"tiny": 12, "B": 48, "L": 96, "H": 192}
    monai = {f: _monai_count(f) for f in (12, 24, 36, 48)}
    # tiny and B: against MONAI directly
    assert parameter_count("tiny") == monai[12] == 4_078_051
    assert parameter_count("B") == monai[48] == 62_186_659
    # L and H would allocate 1 and 4 GB in MONAI. Every weight is quadratic in F, every bias/norm
    # linear, the position tables constant, so MONAI's count is a quadratic in F: fit it at
    # F = 12, 24, 36 and check that it predicts B before trusting it for L and H.
    fs = np.array([12, 24, 36], dtype=np.float64)
    coeffs = np.linalg.solve(np.vander(fs, 3), np.array([monai[12], monai[24], monai[36]], dtype=np.float64))

    def predict(f):
        return int(round(float(np.polyval(coeffs, f))))

    assert predict(48) == monai[48]
    assert parameter_count("L") == predict(96) == 248_089_315
    assert parameter_count("H") == predict(192) == 991_635_811
    assert parameter_count("tiny", use_v2=True) == _monai_count(12, use_v2=True)
    with pytest.raises(ValueError, match="XL"):
        parameter_count("XL")


SHAPE = (64, 32, 32)
"""Input of the unit tests: small, yet the deepest grid (2, 1, 1) still has more than one voxel,
which instance norm needs in training."""
GRID = tuple(s // 2 for s in SHAPE)


def _input(batch=1, seed=0):
    return torch.rand(batch, 1, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _block_mask(batch, seed, ratio=0.75, block=4):
    """[B, *GRID] bool, whole cubes of `block` patches masked until `ratio` of them is reached."""
    gen = torch.Generator().manual_seed(seed)
    nb = tuple(g // block for g in GRID)
    count = int(np.prod(nb))
    blocks = torch.zeros(batch, count, dtype=torch.bool)
    for b in range(batch):
        blocks[b, torch.randperm(count, generator=gen)[: int(round(ratio * count))]] = True
    blocks = blocks.view(batch, *nb)
    for axis in (1, 2, 3):
        blocks = blocks.repeat_interleave(block, dim=axis)
    return blocks


def test_masking_hides_masked_content_and_zero_mask_is_identity():
    net = SwinBackbone(12, seed=1).eval()
    x = _input()
    mask = _block_mask(1, seed=2)
    voxel_mask = mask[:, None].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    x_other = torch.where(voxel_mask, torch.rand_like(x), x)  # differs from x only under the mask
    with torch.no_grad():
        plain = net(x)
        zero = net(x, torch.zeros(1, *GRID, dtype=torch.uint8))
        masked = net(x, mask)
        masked_other = net(x_other, mask.float())
        # a constant shift of the token is removed by the layer norms; move it in a random direction
        net.mask_token.add_(torch.randn(net.mask_token.shape, generator=torch.Generator().manual_seed(3)))
        masked_new_token = net(x, mask)
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)
    # masked positions change every output
    for a, b in zip(plain, masked):
        assert (a - b).abs().max() > 1e-3
    # what lies under the mask cannot reach any output (no leak through the full-resolution skip)
    assert (x_other - x).abs().max() > 0.1
    for a, b in zip(masked, masked_other):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # masked patches are the learned token
    assert (masked_new_token.recon - masked.recon).abs().max() > 1e-3


def test_input_errors_name_the_value():
    net = SwinBackbone(12, seed=0)
    with pytest.raises(ValueError, match="80"):
        net(torch.zeros(1, 1, 64, 80, 64))
    with pytest.raises(ValueError, match=r"\(1, 32, 32, 32\)"):
        net(torch.zeros(1, 1, 64, 64, 64), torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="13"):
        SwinBackbone(13)
    with pytest.raises(ValueError, match="-1"):
        AliceHead(-1, 8, 4)
    with pytest.raises(ValueError, match="1.5"):
        CASA(32, dropout=1.5)


def _student_step(backbone, head, casa, teacher_backbone, teacher_head, x, masks):
    """One Alice student step with the losses written out plainly (DESIGN §4 step 6)."""
    tau_s, tau_t = 0.1, 0.04
    s = backbone(x, masks)  # views stacked on the batch axis: [2B, ...]
    with torch.no_grad():
        t = teacher_backbone(x)
        t_cls = F.softmax(teacher_head.forward_cls(t.global_feat) / tau_t, dim=-1)
    s_cls = F.log_softmax(head.forward_cls(s.global_feat) / tau_s, dim=-1)
    half = x.shape[0] // 2
    cls = -(t_cls[:half] * s_cls[half:]).sum(-1).mean() - (t_cls[half:] * s_cls[:half]).sum(-1).mean()
    query = head.embed_enc(s.enc_tokens)
    aligned = head.forward_patch(casa(query, head.embed_dec(s.dec_tokens)))
    with torch.no_grad():
        target = head.forward_patch(casa(query, teacher_head.embed_dec(t.dec_tokens)))
    patch = -(F.softmax(target / tau_t, dim=-1) * F.log_softmax(aligned / tau_s, dim=-1)).sum(-1).mean()
    vm = masks[:, None].repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4).float()
    recon = ((s.recon - x) ** 2 * vm).sum() / vm.sum()
    return cls + patch + 10 * recon


def test_every_parameter_gets_a_gradient_in_a_student_step():
    """norm_last_layer=False is the superset: it also trains the weight-norm gains."""
    sizes = dict(out_dim=64, patch_out_dim=48, hidden_dim=128, bottleneck_dim=32, norm_last_layer=False)
    backbone = SwinBackbone(12, seed=5)
    teacher = SwinBackbone(12, seed=5).requires_grad_(False)
    head = AliceHead.for_backbone(12, seed=6, **sizes)
    teacher_head = AliceHead.for_backbone(12, seed=6, **sizes).requires_grad_(False)
    casa = CASA(head.in_dim, dropout=0.1, seed=7)
    x = _input(batch=2, seed=3)  # one sample, two views
    masks = _block_mask(2, seed=4)
    _student_step(backbone, head, casa, teacher, teacher_head, x, masks).backward()
    named = [(f"backbone.{n}", p) for n, p in backbone.named_parameters()]
    named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    named += [(f"casa.{n}", p) for n, p in casa.named_parameters()]
    assert "head.last_layer.weight_g" in dict(named)
    missing = [n for n, p in named if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in teacher_head.parameters())
    # norm_last_layer=True (the default): the gains are fixed buffers, not parameters without gradient
    frozen = AliceHead.for_backbone(12, out_dim=64, patch_out_dim=48, hidden_dim=128, bottleneck_dim=32)
    assert {"last_layer.weight_g", "patch_last_layer.weight_g"} <= dict(frozen.named_buffers()).keys()
    assert not any(n.endswith("weight_g") for n, _ in frozen.named_parameters())


def test_checkpointed_activations_give_the_same_gradients():
    x = _input(seed=8)
    mask = _block_mask(1, seed=9)
    grads = []
    for ckpt in (False, True):
        net = SwinBackbone(12, checkpoint_activations=ckpt, seed=10)
        out = net(x, mask)
        (out.recon.square().mean() + out.global_feat.sum() + out.dec_tokens.mean()).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_seeded_builds_are_identical_and_leave_global_rng_alone():
    rng = torch.get_rng_state()
    for build in (lambda s: SwinBackbone(12, seed=s), lambda s: AliceHead.for_backbone(12, seed=s),
                  lambda s: CASA(96, seed=s)):
        a, b, c = build(11).state_dict(), build(11).state_dict(), build(12).state_dict()
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(rng, torch.get_rng_state())


def test_head_is_cosine_to_weight_normalised_prototypes():
    head = AliceHead(in_dim=40, enc_dim=24, dec_dim=12, out_dim=30, patch_out_dim=20, hidden_dim=64,
                     bottleneck_dim=16, seed=0)
    g = torch.Generator().manual_seed(1)
    feat, tokens = torch.randn(3, 40, generator=g), torch.randn(3, 5, 40, generator=g)
    z = head.mlp(feat)
    expected = (z / z.norm(dim=-1, keepdim=True)) @ F.normalize(head.last_layer.weight_v, dim=1).T
    torch.testing.assert_close(head.forward_cls(feat), expected, atol=1e-6, rtol=1e-5)
    assert head.forward_cls(feat).abs().max() <= 1 + 1e-6  # cosines: g is fixed at 1
    assert head.forward_patch(tokens).shape == (3, 5, 20)
    assert head.embed_enc(torch.randn(3, 7, 24)).shape == (3, 7, 40)
    assert head.embed_dec(torch.randn(3, 9, 12)).shape == (3, 9, 40)
    # learned norm: logits scale with g row by row
    learned = AliceHead(40, 24, 12, out_dim=30, patch_out_dim=20, hidden_dim=64, bottleneck_dim=16,
                        norm_last_layer=False, seed=0)
    with torch.no_grad():
        learned.last_layer.weight_g.mul_(3.0)
    torch.testing.assert_close(learned.forward_cls(feat), 3.0 * expected, atol=1e-5, rtol=1e-5)


def test_casa_matches_written_out_attention():
    casa = CASA(dim=32, num_heads=8, head_dim=64, ffn_dim=2048, dropout=0.0, seed=0).eval()
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(2, 5, 32, generator=g), torch.randn(2, 11, 32, generator=g)

    def split(t):  # [B, L, 512] -> [B, 8, L, 64]
        return t.view(t.shape[0], t.shape[1], 8, 64).transpose(1, 2)

    scores = split(casa.q_proj(q)) @ split(casa.k_proj(kv)).transpose(-1, -2) / 8.0  # sqrt(d_k) = 8
    attn = (scores.softmax(-1) @ split(casa.v_proj(kv))).transpose(1, 2).reshape(2, 5, 512)
    h = F.layer_norm(q + casa.out_proj(attn), (32,), casa.norm1.weight, casa.norm1.bias)
    ffn = casa.ffn[2](torch.relu(casa.ffn[0](h)))
    expected = F.layer_norm(h + ffn, (32,), casa.norm2.weight, casa.norm2.bias)
    torch.testing.assert_close(casa(q, kv), expected, atol=1e-5, rtol=1e-5)
    # dropout acts in training only
    casa_drop = CASA(32, dropout=0.5, seed=0)
    assert not torch.allclose(casa_drop.train()(q, kv), casa_drop(q, kv))
    torch.testing.assert_close(casa_drop.eval()(q, kv), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
def test_padded_windows_give_the_unpadded_attention(shifted):
    """On CUDA windows are padded to SDPA_ALIGN tokens (masked keys, dropped queries) for the fused
    kernel; forced here on CPU: outputs and gradients equal the unpadded attention's."""
    from alice_ds.models.swin import SDPA_ALIGN, WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(24, 3, (7, 7, 7))
    n, nw = 343, 2
    assert n % SDPA_ALIGN
    x = torch.randn(2 * nw, n, 24, requires_grad=True)
    mask = torch.where(torch.rand(nw, n, n) < 0.3, -100.0, 0.0) if shifted else None
    results = []
    for align in (1, SDPA_ALIGN):
        attn.align = align
        out = attn(x, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), attn.relative_position_bias_table.grad.clone()))
        x.grad, attn.relative_position_bias_table.grad = None, None
        attn.zero_grad()
    for plain, padded in zip(*results):
        assert torch.isfinite(padded).all()
        torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
