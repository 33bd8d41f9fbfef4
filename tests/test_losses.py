"""The CPU (chunked PyTorch) loss path against the reference, fp32 and bf16; AliceLoss against values
worked out by hand; the center update across 2 gloo ranks."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alice_ds.losses import AliceLoss, centered_cross_entropy, functional, masked_mse, reference
from alice_ds.losses.alice import warmup_temp

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
CE_TOL = dict(atol=1e-4, rtol=1e-5)       # fp32: see tests/test_kernels.py
GRAD_TOL = dict(atol=5e-5, rtol=1e-4)
# bf16 inputs: the loss is accumulated in fp32 from the same bf16 values as the reference, so it
# stays tight; the stored gradient is bf16 (8 mantissa bits: relative error up to 2^-8 ≈ 0.4%).
BF16_GRAD_TOL = dict(atol=2e-2, rtol=8e-3)
SMALL_CHUNK = 300  # elements per chunk: forces several chunks on the small test shapes


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(functional, "CHUNK_ELEMS", SMALL_CHUNK)


@pytest.mark.parametrize("n,k", [(1, 7), (37, 50), (9, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centered_ce_chunked_matches_reference(n, k, dtype, small_chunks):
    g = torch.Generator().manual_seed(n + k)
    s = (torch.randn(n, k, generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, k, generator=g) * 3).to(dtype)
    c = torch.randn(k, generator=g) * 0.5
    s0, t0 = s.detach().clone(), t.clone()
    w = torch.rand(n, generator=g) + 0.5
    tsum = torch.zeros(k)
    loss = centered_cross_entropy(s, t, c, STUDENT_TEMP, TEACHER_TEMP, teacher_sum=tsum, impl="chunked")
    (loss * w).sum().backward()
    grad = s.grad.clone()
    s.grad = None
    ref = reference.centered_cross_entropy(s, t, c, STUDENT_TEMP, TEACHER_TEMP)
    (ref * w).sum().backward()
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, ref.detach(), **CE_TOL)
    torch.testing.assert_close(grad.float(), s.grad.float(),
                               **(GRAD_TOL if dtype == torch.float32 else BF16_GRAD_TOL))
    torch.testing.assert_close(tsum, t.float().sum(0), atol=1e-3, rtol=1e-5)
    assert torch.equal(s.detach(), s0) and torch.equal(t, t0), "inputs were modified in place"


def test_centered_ce_auto_on_cpu_is_chunked_and_single_backward():
    s = torch.randn(3, 5, requires_grad=True)
    loss = centered_cross_entropy(s, torch.randn(3, 5), torch.zeros(5), 0.1, 0.04)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.sum().backward()


def test_centered_ce_errors_name_the_value():
    with pytest.raises(ValueError, match=r"\(4, 5\) and \(4, 6\)"):
        centered_cross_entropy(torch.zeros(4, 5), torch.zeros(4, 6), torch.zeros(5), 0.1, 0.04)
    with pytest.raises(ValueError, match="K=5"):
        centered_cross_entropy(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(6), 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_temp=0"):
        centered_cross_entropy(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(5), 0.1, 0)
    with pytest.raises(ValueError, match="'cuda-ish'"):
        centered_cross_entropy(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(5), 0.1, 0.04,
                               impl="cuda-ish")


@pytest.mark.parametrize("shape,block", [((2, 1, 8, 10, 6), 2), ((1, 1, 7, 9, 5), 2),
                                         ((2, 1, 12, 16, 9), 4)])
@pytest.mark.parametrize("kind", ["random", "all", "none", "unmasked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mse_chunked_matches_reference(shape, block, kind, dtype, small_chunks):
    g = torch.Generator().manual_seed(sum(shape))
    p = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    t = torch.randn(*shape, generator=g).to(dtype)
    mshape = (shape[0],) + tuple(-(-x // block) for x in shape[2:])
    m = {"random": (torch.rand(*mshape, generator=g) < 0.6).float(), "all": torch.ones(mshape),
         "none": torch.zeros(mshape), "unmasked": None}[kind]
    loss = masked_mse(p, t, m, block, impl="chunked")
    (2.0 * loss).backward()
    grad = p.grad.clone()
    p.grad = None
    ref = reference.masked_mse(p, t, m, block)
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-5)
    gtol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
    torch.testing.assert_close(grad.float(), p.grad.float(), **gtol)
    if kind == "none":
        assert loss.item() == 0.0


def test_masked_mse_bad_mask_shape_names_shapes():
    p = torch.zeros(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"\[2, 4, 4, 4\].*got \[2, 4, 4\]"):
        masked_mse(p, p, torch.zeros(2, 4, 4), 2)
    with pytest.raises(ValueError, match=r"\[2, 1, 8, 8\]"):
        masked_mse(p[..., 0], p[..., 0], None, 2)


# ---- AliceLoss on a hand-built case ---------------------------------------------------------------
# Logit rows are "one-hot": value h at one index, 0 elsewhere. For K classes and temperature τ,
# softmax of such a row puts q(h/τ) = e^(h/τ) / (e^(h/τ) + K - 1) on the hot index and
# (1 - q)/(K - 1) on each other. For a teacher row hot at j (centered by 0) and a student row hot at
# i with a = h_s/τs: CE = logsumexp(student/τs) - Σ_k p_k a_k = log(e^a + K - 1) - a·p_i.

K, KP, B, L = 4, 3, 2, 5
H_T, H_S = 0.1, 0.3          # teacher and student hot values
WARMUP = dict(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_patch_temp=0.03,
              teacher_patch_temp=0.07, warmup_teacher_temp_steps=10)


def _p_hot(h, tau, k):
    e = math.exp(h / tau)
    return e / (e + k - 1)


def _ce_hand(k, tau_t, i, j):
    """CE of a teacher row hot at j (value H_T) and a student row hot at i (value H_S)."""
    a = H_S / STUDENT_TEMP
    pj = _p_hot(H_T, tau_t, k)
    p_i = pj if i == j else (1 - pj) / (k - 1)
    return math.log(math.exp(a) + k - 1) - a * p_i


def _entropy_hand(k, tau_t):
    """Entropy of a teacher row hot at one index (value H_T) over k prototypes."""
    pj = _p_hot(H_T, tau_t, k)
    po = (1 - pj) / (k - 1)
    return -(pj * math.log(pj) + (k - 1) * po * math.log(po))


def _onehot(rows, k, hot, value):
    x = torch.zeros(rows, k)
    x[torch.arange(rows), torch.as_tensor(hot)] = value
    return x


def _hand_inputs():
    t_hot = [[2, 1], [0, 3]]                 # teacher cls view 0 / view 1, per row
    s_hot = [[0, 1], [2, 2]]                 # student cls view 0 / view 1
    teacher_cls = [_onehot(B, K, h, H_T) for h in t_hot]
    student_cls = [_onehot(B, K, h, H_S).requires_grad_() for h in s_hot]
    tp_hot = [[0, 1, 2, 0, 1] * B, [2] * (B * L)]
    sp_hot = [[0, 1, 2, 0, 1] * B, [1] * (B * L)]   # view 0 agrees everywhere, view 1 nowhere
    teacher_patch = [_onehot(B * L, KP, h, H_T).reshape(B, L, KP) for h in tp_hot]
    student_patch = [_onehot(B * L, KP, h, H_S).reshape(B, L, KP).requires_grad_() for h in sp_hot]
    # recon: error 0.5 on masked voxels, 0 elsewhere; exactly half of the 4³ mask cells masked
    mask = torch.zeros(B, 4, 4, 4)
    mask[:, :2] = 1
    target = [torch.full((B, 1, 8, 8, 8), 0.25) for _ in range(2)]
    full = reference.expand_block_mask(mask, 2, (8, 8, 8))
    recon = [(tg + 0.5 * full).requires_grad_() for tg in target]
    return (student_cls, teacher_cls, student_patch, teacher_patch, recon, target, [mask, mask],
            t_hot, s_hot, tp_hot, sp_hot)


@pytest.mark.parametrize("recon_on", ["masked", "all"])
def test_alice_loss_hand_computed(recon_on):
    step = 5
    tau_t, tau_p = 0.04, 0.05                     # halfway through the 10-step warmups
    loss_fn = AliceLoss(K, KP, recon_on=recon_on, **WARMUP)
    sc, tc, sp, tp, rec, tgt, masks, t_hot, s_hot, tp_hot, sp_hot = _hand_inputs()
    out = loss_fn(sc, tc, sp, tp, rec, tgt, masks, step=step)

    pairs = [(0, 1), (1, 0)]                      # (teacher view q, student view v)
    cls = sum(_ce_hand(K, tau_t, s_hot[v][r], t_hot[q][r]) for q, v in pairs for r in range(B))
    cls /= 2 * B
    patch_v0 = _ce_hand(KP, tau_p, 0, 0)          # same hot index on every token
    patch_v1 = _ce_hand(KP, tau_p, 1, 2)
    patch = (patch_v0 + patch_v1) / 2
    recon = 0.25 if recon_on == "masked" else 0.25 / 2
    assert out["teacher_temp"] == pytest.approx(tau_t) and out["teacher_patch_temp"] == pytest.approx(tau_p)
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(patch, rel=1e-5)
    assert out["recon"].item() == pytest.approx(recon, rel=1e-6)
    assert out["loss"].item() == pytest.approx(cls + patch + 10 * recon, rel=1e-5)
    # student v0 [0, 1] vs teacher q1 [0, 3]; student v1 [2, 2] vs teacher q0 [2, 1]
    assert out["agreement"].item() == pytest.approx(0.5)
    # monitors: teacher rows hot at 2, 1, 0, 3 (cls) and at 0, 1, 2 and 2 (patch, 2·B·L tokens)
    pj, pjp = _p_hot(H_T, tau_t, K), _p_hot(H_T, tau_p, KP)
    cls_mean = torch.full((K,), (pj + 3 * (1 - pj) / (K - 1)) / 4)  # each index hot in one of 4 rows
    assert out["cls_batch_entropy"].item() == pytest.approx(-(cls_mean * cls_mean.log()).sum().item(), rel=1e-5)
    assert out["cls_distinct"].item() == 4 and out["patch_distinct"].item() == 3
    hot_share = torch.tensor([4.0, 4.0, 12.0]) / (2 * B * L)  # tokens hot at each patch index
    patch_mean = hot_share * pjp + (1 - hot_share) * (1 - pjp) / (KP - 1)
    assert out["patch_batch_entropy"].item() == pytest.approx(-(patch_mean * patch_mean.log()).sum().item(),
                                                              rel=1e-5)
    assert out["cls_kl"].item() == pytest.approx(cls - _entropy_hand(K, tau_t), rel=1e-4)
    assert out["patch_kl"].item() == pytest.approx(patch - _entropy_hand(KP, tau_p), rel=1e-4)

    # centers: untouched by the forward; update_centers moves them to 0.9·0 + 0.1·mean of the raw
    # teacher rows (all views, all rows / tokens)
    assert torch.count_nonzero(loss_fn.center) == 0 and torch.count_nonzero(loss_fn.center2) == 0
    loss_fn.update_centers(**out["center_sums"])
    want_c = torch.zeros(K)
    for h in t_hot[0] + t_hot[1]:
        want_c[h] += 0.1 * H_T / (2 * B)
    want_c2 = torch.zeros(KP)
    for h in tp_hot[0] + tp_hot[1]:
        want_c2[h] += 0.1 * H_T / (2 * B * L)
    torch.testing.assert_close(loss_fn.center[0], want_c, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(loss_fn.center2[0], want_c2, atol=1e-7, rtol=1e-6)

    # gradients: cls term d/ds_v = (softmax(s_v/τs) - p_q)/τs / (pairs · B); recon 10·2·e/N_masked
    out["loss"].backward()
    q_hot = _p_hot(H_S, STUDENT_TEMP, K)  # student softmax on its hot index
    p_hot = _p_hot(H_T, tau_t, K)
    r = 0  # student view 1, row 0: hot 2, teacher view 0 row 0 hot 2 -> same index
    assert sc[1].grad[r, 2].item() == pytest.approx((q_hot - p_hot) / STUDENT_TEMP / (2 * B), rel=1e-4)
    n_rec = rec[0].numel() / (2 if recon_on == "masked" else 1)
    masked_voxel = rec[0].grad[0, 0, 0, 0, 0].item()  # x < 4 lies in a masked cell
    assert masked_voxel == pytest.approx(10 * 2 * 0.5 / n_rec / 2, rel=1e-5)
    assert rec[0].grad[0, 0, 7, 0, 0].item() == 0.0


def test_alice_loss_second_step_uses_new_center():
    loss_fn = AliceLoss(K, KP, **WARMUP)
    sc, tc, sp, tp, rec, tgt, masks, *_ = _hand_inputs()
    loss_fn.center.fill_(0.05)  # a nonzero center centers the teacher: compare with the reference
    loss_fn.center[0, 2] = -0.1
    out = loss_fn(sc, tc, sp, tp, rec, tgt, masks, step=100)
    ref = torch.stack([reference.centered_cross_entropy(sc[v], tc[q], loss_fn.center, 0.1, 0.06).mean()
                       for q, v in [(0, 1), (1, 0)]]).mean()
    assert out["cls"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_warmup_temp_is_linear_then_constant():
    assert warmup_temp(0, 0.008, 0.01, 100) == pytest.approx(0.008)
    assert warmup_temp(25, 0.008, 0.01, 100) == pytest.approx(0.0085)
    assert warmup_temp(100, 0.008, 0.01, 100) == pytest.approx(0.01)
    assert warmup_temp(10_000, 0.008, 0.01, 100) == pytest.approx(0.01)
    assert warmup_temp(3, 0.008, 0.01, 0) == pytest.approx(0.01)


def test_alice_loss_rejects_bad_settings_by_name():
    with pytest.raises(ValueError, match="recon_on.*'voxels'"):
        AliceLoss(8, 8, recon_on="voxels")
    with pytest.raises(ValueError, match="teacher_temp must be > 0, got 0"):
        AliceLoss(8, 8, teacher_temp=0)
    sc, tc, sp, tp, rec, tgt, masks, *_ = _hand_inputs()
    with pytest.raises(ValueError, match="recon_on='masked' needs masks"):
        AliceLoss(K, KP)(sc, tc, sp, tp, rec, tgt, None, step=0)
    with pytest.raises(ValueError, match="teacher_cls has 1 views"):
        AliceLoss(K, KP)(sc, tc[:1], sp, tp, rec, tgt, masks, step=0)


# ---- center update across 2 gloo ranks -----------------------------------------------------------

def _rank_teacher(rank):
    """Rank-dependent teacher outputs: cls [2 views][B, K], patch [2 views][B, L, KP]."""
    g = torch.Generator().manual_seed(100 + rank)
    return ([torch.randn(B, K, generator=g) + rank for _ in range(2)],
            [torch.randn(B, L, KP, generator=g) - rank for _ in range(2)])


def _center_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tc, tp = _rank_teacher(rank)
        sc = [torch.randn(B, K, requires_grad=True) for _ in range(2)]
        sp = [torch.randn(B, L, KP, requires_grad=True) for _ in range(2)]
        rec = [torch.rand(B, 1, 8, 8, 8, requires_grad=True) for _ in range(2)]
        loss_fn = AliceLoss(K, KP, recon_on="all", center_momentum=0.9)
        out = loss_fn(sc, tc, sp, tp, rec, [r.detach() for r in rec], None, step=0)
        out["loss"].backward()
        loss_fn.update_centers(**out["center_sums"])
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"center": loss_fn.center[0].tolist(),
                       "center2": loss_fn.center2[0].tolist()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_center_update_is_mean_over_two_gloo_ranks(tmp_path, free_port):
    mp.spawn(_center_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    teachers = [_rank_teacher(r) for r in range(2)]
    mean_cls = torch.cat([torch.cat(tc) for tc, _ in teachers]).mean(0)            # [K]
    mean_patch = torch.cat([torch.cat(tp).reshape(-1, KP) for _, tp in teachers]).mean(0)
    for r in range(2):
        torch.testing.assert_close(torch.tensor(got[r]["center"]), 0.1 * mean_cls, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(got[r]["center2"]), 0.1 * mean_patch, atol=1e-6,
                                   rtol=1e-5)
    # the ranks saw different teachers, so a rank-local mean would differ from the global one
    local0 = torch.cat(teachers[0][0]).mean(0)
    assert (0.1 * local0 - torch.tensor(got[0]["center"])).abs().max() > 1e-2


def test_alice_loss_matches_reference_composition_and_gradients():
    """Random fp32 case: AliceLoss's total and its student gradients equal the same loss built
    from the reference functions."""
    g = torch.Generator().manual_seed(5)
    nv, k, kp, ntok = 2, 16, 8, 6
    loss_fn = AliceLoss(k, kp, warmup_teacher_temp_steps=0, teacher_temp=0.05, teacher_patch_temp=0.06)
    loss_fn.center.normal_(generator=g)
    loss_fn.center2.normal_(generator=g)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()
    sc = [leaf(B, k) for _ in range(nv)]
    tc = [torch.randn(B, k, generator=g) for _ in range(nv)]
    sp = [leaf(B, ntok, kp) for _ in range(nv)]
    tp = [torch.randn(B, ntok, kp, generator=g) for _ in range(nv)]
    rec = [leaf(B, 1, 6, 6, 6) for _ in range(nv)]
    tgt = [torch.randn(B, 1, 6, 6, 6, generator=g) for _ in range(nv)]
    masks = [torch.rand(B, 3, 3, 3, generator=g) < 0.5 for _ in range(nv)]
    c, c2 = loss_fn.center.clone(), loss_fn.center2.clone()
    out = loss_fn(sc, tc, sp, tp, rec, tgt, masks, step=0)
    out["loss"].backward()
    got = [x.grad.clone() for x in sc + sp + rec]
    for x in sc + sp + rec:
        x.grad = None

    cls = torch.stack([reference.centered_cross_entropy(sc[v], tc[q], c, 0.1, 0.05).mean()
                       for q in range(nv) for v in range(nv) if q != v]).mean()
    patch = torch.stack([reference.centered_cross_entropy(sp[v].reshape(-1, kp), tp[v].reshape(-1, kp),
                                                          c2, 0.1, 0.06).mean() for v in range(nv)]).mean()
    recon = torch.stack([reference.masked_mse(rec[v], tgt[v], masks[v], 2) for v in range(nv)]).mean()
    total = cls + patch + 10 * recon
    total.backward()
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    for a, x in zip(got, sc + sp + rec):
        torch.testing.assert_close(a, x.grad, atol=1e-6, rtol=1e-4)


def test_all_reduce_mean_without_process_group_is_identity():
    from alice_ds.dist import all_reduce_mean, is_dist, world_size
    t = torch.arange(3.0)
    assert not is_dist() and world_size() == 1
    assert all_reduce_mean(t) is t


def test_mixed_dtypes_bf16_student_fp32_teacher(small_chunks):
    """Under autocast the student may be bf16 while the target/teacher is fp32."""
    g = torch.Generator().manual_seed(9)
    s = torch.randn(6, 40, generator=g).bfloat16().requires_grad_()
    t = torch.randn(6, 40, generator=g)
    loss = centered_cross_entropy(s, t, torch.zeros(40), STUDENT_TEMP, TEACHER_TEMP)
    loss.sum().backward()
    ref_s = s.detach().float().requires_grad_()
    ref = reference.centered_cross_entropy(ref_s, t, torch.zeros(40), STUDENT_TEMP, TEACHER_TEMP)
    ref.sum().backward()
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref.detach(), **CE_TOL)
    torch.testing.assert_close(s.grad.float(), ref_s.grad, **BF16_GRAD_TOL)

    p = torch.rand(1, 1, 6, 6, 6, generator=g).bfloat16().requires_grad_()
    tg = torch.rand(1, 1, 6, 6, 6, generator=g)
    m = torch.rand(1, 3, 3, 3, generator=g) < 0.5
    loss = masked_mse(p, tg, m, 2)
    loss.backward()
    ref_p = p.detach().float().requires_grad_()
    ref = reference.masked_mse(ref_p, tg, m, 2)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p.grad.float(), ref_p.grad, atol=1e-4, rtol=8e-3)


def test_no_grad_call_allocates_no_gradient():
    """Under torch.no_grad (validation) neither loss builds its full-size gradient: the largest
    single allocation the profiler sees stays below one [N, K] / volume-sized fp32 tensor."""
    from torch.profiler import ProfilerActivity, profile
    n, k = 256, 4096
    s = torch.randn(n, k, requires_grad=True)
    t = torch.randn(n, k)
    p = torch.rand(1, 1, 64, 64, 64, requires_grad=True)
    target = p.detach() * 0.5

    def largest_alloc(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.cpu_memory_usage for e in prof.events())

    def ce():
        return centered_cross_entropy(s, t, torch.zeros(k), STUDENT_TEMP, TEACHER_TEMP)

    def mse():
        return masked_mse(p, target, None, 2)

    with torch.no_grad():
        no_grad_ce, no_grad_mse = largest_alloc(ce), largest_alloc(mse)
        assert ce().allclose(reference.centered_cross_entropy(s, t, torch.zeros(k), 0.1, 0.04))
    assert no_grad_ce < n * k * 4 <= largest_alloc(ce)
    assert no_grad_mse < p.numel() * 4 <= largest_alloc(mse)
