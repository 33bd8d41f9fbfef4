"""A 3D Swin encoder-decoder whose weights are MONAI `SwinUNETR` weights, with SimMIM-style masking.

`SwinBackbone(F).state_dict()` has exactly the keys and shapes of
`monai.networks.nets.SwinUNETR(in_channels=1, out_channels=1, feature_size=F, use_v2=...)` plus
`mask_token`, so pretrained weights load into MONAI with `strict=True` once `mask_token` is dropped.

What is reused from MONAI and what is ours:
- reused as is: `PatchEmbed`, `PatchMerging` (Swin downsampling), `MLPBlock`, the convolutional
  `UnetrBasicBlock` / `UnetrUpBlock` / `UnetOutBlock`, and MONAI's window helpers
  (`window_partition`, `window_reverse`, `get_window_size`, `compute_mask`);
- ours: the Swin block, its window attention and the stage loop. Attention goes through
  `F.scaled_dot_product_attention` with the relative position bias (plus, for shifted windows, the
  -100 region mask of `compute_mask`) as one additive mask; the shift mask is built once per grid
  and cached instead of once per stage call; activation checkpointing wraps whole blocks.
The numerics are MONAI's (same padding, same -100 shift mask, same bias indexing for windows
shrunk to small grids), so with `mask=None` the output equals MONAI's to fp32 rounding.

Frames: inputs are `[B, C, X, Y, Z]` (RAS, MONAI axis order); token sequences flatten the spatial
grid in C order, `[B, C, x, y, z] -> [B, x*y*z, C]`, so token `i` is voxel `np.unravel_index(i, (x, y, z))`
of that stage's grid.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from monai.networks.blocks import MLPBlock, PatchEmbed, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers import trunc_normal_
from monai.networks.nets.swin_unetr import PatchMerging, compute_mask, get_window_size, window_partition, window_reverse
from torch import nn

PATCH_SIZE = 2
"""Voxels per patch edge: the mask grid is the input grid divided by this."""
NUM_STAGES = 4
SIDE_DIVISOR = PATCH_SIZE ** (NUM_STAGES + 1)
"""Each input side must be divisible by 32: patch embedding then four 2x mergings."""
DEPTHS = (2, 2, 2, 2)
NUM_HEADS = (3, 6, 12, 24)
WINDOW_SIZE = (7, 7, 7)
MLP_RATIO = 4.0
INIT_STD = 0.02
"""Truncated-normal std of the relative position tables (MONAI) and of the mask token (SimMIM)."""
MASKED_VOXEL_VALUE = 0.0
"""What the full-resolution conv skip sees at masked voxels (the bottom of the [0, 1] HU window)."""
RECON_CHANNELS = 1
"""The output reconstructs the (single-channel) CT crop."""
NORM_NAME = "instance"
"""Normalisation of the convolutional encoder/decoder blocks (MONAI's default)."""

SDPA_ALIGN = 8
"""On CUDA a window of n tokens is padded to a multiple of this (the extra keys masked with -inf,
the extra queries dropped), so the additive bias SDPA receives has an aligned last dimension: on an
H200 343-token windows with a learned bias fell back to the math kernel, and aligned masks are what
the memory-efficient kernel takes (not yet checked on a GPU: benchmarks/sdpa_windows.py does). The
output is the unpadded attention's (exp(-inf) = 0; tests/test_models.py)."""

PRESETS = {"tiny": 12, "B": 48, "L": 96, "H": 192}
"""Named feature sizes F. Widths per stage are F, 2F, 4F, 8F, 16F."""


class BackboneOutput(NamedTuple):
    """What one backbone forward returns (F = feature_size, L_s = number of stride-s tokens)."""

    global_feat: torch.Tensor
    """[B, 16F] mean over the deepest (stride-32) Swin stage, layer-normalised as MONAI feeds it on."""
    enc_tokens: torch.Tensor
    """[B, L16, 8F] stride-16 Swin stage (MONAI `hidden_states_out[3]`), tokens in C order."""
    dec_tokens: torch.Tensor
    """[B, L8, 4F] stride-8 decoder stage (output of MONAI `decoder4`), tokens in C order."""
    recon: torch.Tensor | None
    """[B, 1, X, Y, Z] the network output (what MONAI `SwinUNETR.forward` returns); None from
    `forward(..., recon=False)`."""

    def split(self, size: int) -> list[BackboneOutput]:
        """Per-chunk outputs of a forward of stacked inputs: chunks of `size` samples each."""
        parts = [t.split(size) if t is not None else None for t in self]
        return [BackboneOutput(*(p[i] if p is not None else None for p in parts))
                for i in range(len(parts[0]))]


class WindowAttention(nn.Module):
    """Windowed multi-head self-attention with a learned relative position bias, through SDPA.

    Parameter/buffer names and shapes are MONAI's `WindowAttention` (`relative_position_bias_table`,
    persistent `relative_position_index`, `qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wx, wy, wz = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wx - 1) * (2 * wy - 1) * (2 * wz - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wx), torch.arange(wy), torch.arange(wz),
                                            indexing="ij")).flatten(1)  # [3, n]
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [n, n, 3], offsets in -(w-1)..w-1
        rel = rel + torch.tensor([wx - 1, wy - 1, wz - 1])
        index = (rel[..., 0] * (2 * wy - 1) + rel[..., 1]) * (2 * wz - 1) + rel[..., 2]  # [n, n]
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.align: int | None = None
        """Token multiple windows are padded to: None = SDPA_ALIGN on CUDA, 1 (no padding) elsewhere."""
        trunc_normal_(self.relative_position_bias_table, std=INIT_STD)

    def position_bias(self, n: int) -> torch.Tensor:
        """[heads, n, n] bias for windows of n tokens. Windows shrunk to a small grid (n < 7^3)
        read the top-left n x n of the full index, exactly as MONAI does, so weights stay exchangeable."""
        idx = self.relative_position_index[:n, :n].reshape(-1)
        return self.relative_position_bias_table[idx].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B*nW, n, C] window tokens; shift_mask [nW, n, n] (0 or -100) or None -> [B*nW, n, C]."""
        bw, n, c = x.shape
        # [B*nW, n, 3C] -> [3, B*nW, heads, n, C/heads]
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.position_bias(n)  # [heads, n, n]
        if shift_mask is not None:
            nw = shift_mask.shape[0]
            bias = bias.unsqueeze(0) + shift_mask.unsqueeze(1)  # [nW, heads, n, n]
            # [nW, heads, n, n] -> [B*nW, heads, n, n] (a view when B = 1)
            bias = bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        bias = bias.to(q.dtype)
        pad = -n % (self.align or (SDPA_ALIGN if x.is_cuda else 1))
        if pad:  # [..., n, d] -> [..., n + pad, d]; padded keys masked out, padded queries dropped below
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            keys = torch.zeros(n + pad, dtype=q.dtype, device=q.device)
            keys[n:] = float("-inf")
            bias = F.pad(bias, (0, pad, 0, pad)) + keys  # [..., n + pad, n + pad]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)[:, :, :n]
        out = out.transpose(1, 2).reshape(bw, n, c)  # [B*nW, heads, n, C/heads] -> [B*nW, n, C]
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block (window attention + MLP, both residual); MONAI `SwinTransformerBlock` keys."""

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int, int],
                 shift_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * MLP_RATIO), act="GELU", dropout_mode="swin")

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, X, Y, Z, C] channel-last stage grid -> same shape."""
        b, dx, dy, dz, c = x.shape
        window, shift = get_window_size((dx, dy, dz), self.window_size, self.shift_size)
        h = self.norm1(x)
        # zero-pad each side up to a multiple of the window (after the norm, as MONAI does)
        pads = [(w - d % w) % w for d, w in zip((dx, dy, dz), window)]
        h = F.pad(h, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = h.shape[1:4]
        shifted = any(s > 0 for s in shift)
        if shifted:
            h = torch.roll(h, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition(h, window)  # [B, X', Y', Z', C] -> [B*nW, n, C]
        windows = self.attn(windows, shift_mask if shifted else None)
        h = window_reverse(windows.view(-1, *window, c), window, [b, *padded])  # -> [B, X', Y', Z', C]
        if shifted:
            h = torch.roll(h, shifts=shift, dims=(1, 2, 3))
        h = h[:, :dx, :dy, :dz]
        x = x + h
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    """Swin blocks (alternating plain and shifted windows) then 2x patch merging: MONAI `BasicLayer` keys."""

    def __init__(self, dim: int, depth: int, num_heads: int, checkpoint_activations: bool) -> None:
        super().__init__()
        self.window_size = WINDOW_SIZE
        self.shift_size = tuple(w // 2 for w in WINDOW_SIZE)
        self.checkpoint_activations = checkpoint_activations
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, WINDOW_SIZE, (0, 0, 0) if i % 2 == 0 else self.shift_size)
            for i in range(depth))
        self.downsample = PatchMerging(dim=dim, norm_layer=nn.LayerNorm, spatial_dims=3)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def shift_mask(self, dims: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """[nW, n, n] additive region mask for shifted windows on a grid of `dims` (cached per grid)."""
        window, shift = get_window_size(dims, self.window_size, self.shift_size)
        padded = [-(-d // w) * w for d, w in zip(dims, window)]
        key = (tuple(padded), window, shift, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = compute_mask(padded, window, shift, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, X, Y, Z] -> [B, 2C, X/2, Y/2, Z/2]."""
        x = x.permute(0, 2, 3, 4, 1)  # [B, C, X, Y, Z] -> [B, X, Y, Z, C]
        mask = self.shift_mask(tuple(x.shape[1:4]), x.device)
        for blk in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        x = self.downsample(x)  # [B, X, Y, Z, C] -> [B, X/2, Y/2, Z/2, 2C]
        return x.permute(0, 4, 1, 2, 3).contiguous()  # -> [B, 2C, X/2, Y/2, Z/2]


def _stage_norm(x: torch.Tensor) -> torch.Tensor:
    """Channel layer norm without affine on [B, C, X, Y, Z] (MONAI `SwinTransformer.proj_out`)."""
    return F.layer_norm(x.permute(0, 2, 3, 4, 1), [x.shape[1]]).permute(0, 4, 1, 2, 3)


def _res_block(channels: int) -> UnetrBasicBlock:
    return UnetrBasicBlock(spatial_dims=3, in_channels=channels, out_channels=channels, kernel_size=3,
                           stride=1, norm_name=NORM_NAME, res_block=True)


class SwinViT(nn.Module):
    """The Swin encoder (MONAI `SwinTransformer` keys) with a mask-token hook after patch embedding."""

    def __init__(self, in_channels: int, feature_size: int, use_v2: bool, checkpoint_activations: bool) -> None:
        super().__init__()
        self.use_v2 = use_v2
        self.patch_embed = PatchEmbed(patch_size=PATCH_SIZE, in_chans=in_channels, embed_dim=feature_size,
                                      norm_layer=None, spatial_dims=3)
        for i in range(NUM_STAGES):
            dim = feature_size * 2 ** i
            setattr(self, f"layers{i + 1}", nn.ModuleList(
                [SwinStage(dim, DEPTHS[i], NUM_HEADS[i], checkpoint_activations)]))
            if use_v2:
                setattr(self, f"layers{i + 1}c", nn.ModuleList([_res_block(dim)]))

    def forward(self, x: torch.Tensor, mask_token: torch.Tensor | None = None,
                patch_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x [B, C_in, X, Y, Z]; patch_mask [B, 1, X/2, Y/2, Z/2] bool (True = masked) with
        mask_token [F] -> five normalised stage outputs, stride 2..32, widths F..16F."""
        h = self.patch_embed(x)  # [B, F, X/2, Y/2, Z/2]
        if patch_mask is not None:
            h = torch.where(patch_mask, mask_token.to(h.dtype).view(1, -1, 1, 1, 1), h)
        outs = [_stage_norm(h)]
        for i in range(NUM_STAGES):
            if self.use_v2:
                h = getattr(self, f"layers{i + 1}c")[0](h.contiguous())
            h = getattr(self, f"layers{i + 1}")[0](h.contiguous())
            outs.append(_stage_norm(h))
        return outs


class SwinBackbone(nn.Module):
    """MONAI `SwinUNETR(in_channels, out_channels=1, feature_size, use_v2)` with masked-image input.

    `mask` is `[B, X/2, Y/2, Z/2]` on the patch grid, bool or 0/1, `1 = masked`. Masked patches enter
    the Swin encoder as the learned `mask_token` (SimMIM); the full-resolution convolutional skip
    (`encoder1`) sees the masked voxels as `MASKED_VOXEL_VALUE`, otherwise the reconstruction could copy them through
    the skip. An all-zero mask gives exactly the `mask=None` result.

    `seed`: when given, parameters are initialised from this seed without touching the global RNG,
    so two builds with the same seed (e.g. student and teacher) are identical.
    """

    def __init__(self, feature_size: int, in_channels: int = 1, use_v2: bool = False,
                 checkpoint_activations: bool = False, seed: int | None = None) -> None:
        super().__init__()
        if feature_size <= 0 or feature_size % 12:
            raise ValueError(f"feature_size must be a positive multiple of 12 (MONAI SwinUNETR), got {feature_size}")
        self.feature_size = feature_size
        self.in_channels = in_channels
        self.use_v2 = use_v2
        self.checkpoint_activations = checkpoint_activations
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self._build(feature_size, in_channels)

    def _build(self, fs: int, in_channels: int) -> None:
        self.swinViT = SwinViT(in_channels, fs, self.use_v2, self.checkpoint_activations)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3,
                                upsample_kernel_size=2, norm_name=NORM_NAME, res_block=True)

        self.encoder1 = UnetrBasicBlock(spatial_dims=3, in_channels=in_channels, out_channels=fs, kernel_size=3,
                                        stride=1, norm_name=NORM_NAME, res_block=True)
        self.encoder2 = _res_block(fs)
        self.encoder3 = _res_block(2 * fs)
        self.encoder4 = _res_block(4 * fs)
        self.encoder10 = _res_block(16 * fs)
        self.decoder5 = up(16 * fs, 8 * fs)
        self.decoder4 = up(8 * fs, 4 * fs)
        self.decoder3 = up(4 * fs, 2 * fs)
        self.decoder2 = up(2 * fs, fs)
        self.decoder1 = up(fs, fs)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=RECON_CHANNELS)
        self.mask_token = nn.Parameter(torch.zeros(fs))  # [F]: 1-D, so optimizers group it with norms (no decay)
        trunc_normal_(self.mask_token, std=INIT_STD)

    def _call(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            return torch_checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Raise ValueError naming the bad shape (sides must be divisible by 32, mask on the patch grid)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be [B, {self.in_channels}, X, Y, Z], got {tuple(x.shape)}")
        sides = tuple(x.shape[2:])
        if any(s % SIDE_DIVISOR for s in sides):
            raise ValueError(f"input sides must be divisible by {SIDE_DIVISOR}, got {sides}")
        if mask is not None:
            want = (x.shape[0], *(s // PATCH_SIZE for s in sides))
            if tuple(mask.shape) != want:
                raise ValueError(f"mask must be [B, X/{PATCH_SIZE}, Y/{PATCH_SIZE}, Z/{PATCH_SIZE}] = {want}, "
                                 f"got {tuple(mask.shape)}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, recon: bool = True) -> BackboneOutput:
        """x [B, C_in, X, Y, Z] (each side divisible by 32); mask [B, X/2, Y/2, Z/2] (1 = masked) or None.

        `recon=False` stops the decoder at the stride-8 tokens: the full-resolution skip, the three
        shallow skips, the last three decoder stages and the output layer are not run (the teacher
        reads only `global_feat`, `enc_tokens`, `dec_tokens`; an Alice step of preset B at 96^3 counts
        4.03 instead of 5.15 TFLOP per pair)."""
        self.check_input(x, mask)
        patch_mask = None
        x_skip = x
        if mask is not None:
            patch_mask = mask.bool().unsqueeze(1)  # [B, 1, X/2, Y/2, Z/2]
            voxel_mask = patch_mask
            for axis in (2, 3, 4):
                voxel_mask = voxel_mask.repeat_interleave(PATCH_SIZE, dim=axis)  # -> [B, 1, X, Y, Z]
            x_skip = torch.where(voxel_mask, torch.full((), MASKED_VOXEL_VALUE, dtype=x.dtype, device=x.device), x)
        hidden = self.swinViT(x, self.mask_token, patch_mask)
        enc3 = self._call(self.encoder4, hidden[2])
        dec4 = self._call(self.encoder10, hidden[4])
        dec3 = self._call(self.decoder5, dec4, hidden[3])
        dec2 = self._call(self.decoder4, dec3, enc3)  # [B, 4F, X/8, Y/8, Z/8]
        if recon:
            enc0 = self._call(self.encoder1, x_skip)
            enc1 = self._call(self.encoder2, hidden[0])
            enc2 = self._call(self.encoder3, hidden[1])
            dec1 = self._call(self.decoder3, dec2, enc2)
            dec0 = self._call(self.decoder2, dec1, enc1)
            out = self._call(self.decoder1, dec0, enc0)
            recon = self.out(out)
        else:
            recon = None
        return BackboneOutput(
            global_feat=hidden[4].mean(dim=(2, 3, 4)),  # [B, 16F, X/32, Y/32, Z/32] -> [B, 16F]
            enc_tokens=hidden[3].flatten(2).transpose(1, 2),  # [B, 8F, x, y, z] -> [B, L16, 8F]
            dec_tokens=dec2.flatten(2).transpose(1, 2),  # [B, 4F, x, y, z] -> [B, L8, 4F]
            recon=recon,
        )

    def monai_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without `mask_token`: loads into MONAI `SwinUNETR` with strict=True."""
        return {k: v for k, v in self.state_dict().items() if k != "mask_token"}


def parameter_count(feature_size: int | str, use_v2: bool = False) -> int:
    """Trainable parameters of MONAI `SwinUNETR(in_channels=1, out_channels=1, feature_size=F, use_v2)`
    (= ours without `mask_token`). `feature_size` may be a preset name. Counted on the meta device,
    so no memory is allocated even for H (F=192)."""
    if isinstance(feature_size, str):
        if feature_size not in PRESETS:
            raise ValueError(f"unknown preset {feature_size!r}, choose one of {sorted(PRESETS)}")
        feature_size = PRESETS[feature_size]
    with torch.device("meta"):
        model = SwinBackbone(feature_size, use_v2=use_v2)
    return sum(p.numel() for name, p in model.named_parameters() if name != "mask_token")
