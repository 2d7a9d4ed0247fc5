"""Models for Feature Distillation: the ViT student with one shared relative position bias, and
the frozen teacher that gives the distillation target.

Reading order: building blocks (drop path, MLP, relative position bias, attention, block), the
Vision Transformer that both student and teacher are made of, named sizes, then the builders
(`build_student`), our own model files, then the published teachers: their architectures, key
conversions, the readers of their files (pickles, TorchScript archives, safetensors) and
`load_teacher`.

Every model takes images in [0, 1] and normalises them itself, so that each teacher can bring its
own input statistics (CLIP's differ from ImageNet's) while the data pipeline stays the same.
"""
import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from einops import rearrange

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DropPath(nn.Module):
    """Stochastic depth: skip the residual branch for a random subset of the samples."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with (not nn.GELU)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, act="gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(grid_h, grid_w):
    """Index (1+N, 1+N) into a BEiT relative-position table for a grid of N patches plus a class
    token in front. Two patches share an entry exactly when their (row, column) offsets are equal;
    the table's last three rows are for class->token, token->class and class->class."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij"))
    coords = coords.flatten(1)  # (2, N), row and column of every patch in raster order
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, N, N), query minus key
    num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w
    index = torch.empty(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = (offsets[0] + grid_h - 1) * (2 * grid_w - 1) + (offsets[1] + grid_w - 1)
    index[0, 1:] = num_offsets  # class token attending to patches
    index[1:, 0] = num_offsets + 1  # patches attending to the class token
    index[0, 0] = num_offsets + 2
    return index


def resize_grid(values, old_grid, new_grid):
    """Bicubically resample values laid out on a grid, (h*w, C) -> (h'*w', C), in raster order: how
    absolute position embeddings and relative position tables follow a change of resolution."""
    if tuple(old_grid) == tuple(new_grid):
        return values
    grid = rearrange(values, "(h w) c -> 1 c h w", h=old_grid[0], w=old_grid[1])
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> (h w) c").to(values.dtype)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """Absolute position embeddings (1, 1+N, C) resampled to another grid, the class token's kept."""
    patches = resize_grid(pos_embed[0, 1:], old_grid, new_grid)
    return torch.cat([pos_embed[:, :1], patches[None]], dim=1)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, added to the attention logits (BEiT layout).
    The student shares one of these across all blocks during distillation (PAPER.md §1.3)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        self.grid = tuple(grid)
        num_rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads))
        # Derived from the grid, so it never enters a checkpoint.
        self.register_buffer("index", relative_position_index(*grid), persistent=False)

    def forward(self):
        return self.relative_position_bias_table[self.index].permute(2, 0, 1)  # (heads, 1+N, 1+N)


def qkv_heads(x, qkv, q_bias, v_bias, num_heads):
    """x (B, N, C) -> q, k, v (B, heads, N, d). With separate q and v biases (BEiT, SwinV2) the k
    bias is zero: it would cancel in the softmax."""
    bias = qkv.bias if q_bias is None else torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    return rearrange(F.linear(x, qkv.weight, bias), "b n (three h d) -> three b h n d", three=3, h=num_heads)


class Attention(nn.Module):
    """Multi-head self-attention. `qv_bias=True` is the BEiT form used by the student: one qkv
    matrix without bias plus separate q and v biases (a k bias would cancel in the softmax)."""

    def __init__(self, dim, num_heads, qv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=not qv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, return_attn=False):
        """x (B, N, C), bias (heads, N, N) or None -> (B, N, C) and, with return_attn, the
        attention probabilities (B, heads, N, N); otherwise None in their place."""
        q, k, v = qkv_heads(x, self.qkv, self.q_bias, self.v_bias, self.num_heads)
        if bias is not None:
            # Contiguous: the GPU's fused SDPA kernels refuse a mask whose last dimension is strided
            # (a permuted bias table), and PyTorch then falls back to the unfused math kernel
            # (ViT-B FD step on one H100: 1,599 instead of 1,937 img/s).
            bias = bias.to(q.dtype).contiguous()
        attn = None
        if return_attn:
            # The explicit path, for diagnosis: softmax(q k^T / sqrt(d) + bias) in full precision.
            logits = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)
            if bias is not None:
                logits = logits + bias.float()
            attn = logits.softmax(dim=-1)
            out = (attn @ v.float()).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), attn


class Block(nn.Module):
    """Pre-norm transformer block, optionally with LayerScale and a relative position bias of its
    own (used when fine-tuning: the shared table is copied into every block)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qv_bias=True, layer_scale=None,
                 drop_path=0.0, norm_eps=1e-6, rel_pos_grid=None, act="gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.drop_path = DropPath(drop_path)
        self.rel_pos_bias = RelativePositionBias(rel_pos_grid, num_heads) if rel_pos_grid else None
        if layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, bias=None, return_attn=False):
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        y, attn = self.attn(self.norm1(x), bias, return_attn)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        return x, attn


def run_block(block, checkpointed, *args):
    """block(*args); with `checkpointed`, its activations are recomputed in the backward pass
    instead of stored (activation checkpointing: less memory for about a third more compute).
    The RNG state is replayed, so drop path draws the same samples both times."""
    if checkpointed:
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_grad_checkpointing(model, enabled=True):
    for module in model.modules():
        if hasattr(module, "grad_checkpointing"):
            module.grad_checkpointing = enabled


class Encoder(nn.Module):
    """What VisionTransformer and SwinTransformer share: forward is forward_features, then the
    final norm."""

    def forward(self, images, return_attn=False):
        """images (B, 3, H, W) in [0, 1] -> tokens after the final norm (B, [1 +] N, C); with
        return_attn also every block's attention probabilities (see forward_features)."""
        if return_attn:
            x, attns = self.forward_features(images, return_attn=True)
            return self.norm(x), attns
        return self.norm(self.forward_features(images))


class VisionTransformer(Encoder):
    """A ViT that maps images in [0, 1] (B, 3, H, W) to its output tokens (B, 1+N, C) after the
    final norm, class token first.

    The FD student (the defaults) has no absolute position embedding and one relative position
    bias shared by all blocks; `rel_pos="per_block"` gives every block its own (fine-tuning).
    The teachers are the same model with other options (see TEACHERS): absolute position
    embedding, a full qkv bias, no LayerScale (DINOv2 has one), QuickGELU and a LayerNorm before
    the blocks (`norm_pre`, OpenAI CLIP's ln_pre), no patch-embedding bias (CLIP), and register
    tokens (DINOv2): extra tokens after the class token that the output drops.
    """
    grad_checkpointing = False  # see set_grad_checkpointing

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, rel_pos="shared", abs_pos=False, qv_bias=True, layer_scale=0.1,
                 drop_path=0.0, norm_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD, act="gelu",
                 norm_pre=False, patch_bias=True, num_registers=0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if rel_pos not in ("shared", "per_block", None):
            raise ValueError(f"rel_pos must be 'shared', 'per_block' or None, not {rel_pos!r}")
        # Everything needed to build this model again, as plain data: it is saved with the weights.
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, rel_pos=rel_pos, abs_pos=abs_pos,
                         qv_bias=qv_bias, layer_scale=layer_scale, drop_path=drop_path,
                         norm_eps=norm_eps, mean=list(mean), std=list(std), act=act, norm_pre=norm_pre,
                         patch_bias=patch_bias, num_registers=num_registers)
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_prefix_tokens = 1  # the class token in front of the patch tokens
        self.num_registers = num_registers  # after the class token in the blocks (and their attention maps)
        self.grid = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid[0] * self.grid[1]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim)) if abs_pos else None
        self.reg_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_pre else None
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if rel_pos == "shared" else None
        drop_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qv_bias, layer_scale, drop_rates[i], norm_eps,
                  rel_pos_grid=self.grid if rel_pos == "per_block" else None, act=act)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self._init_weights()

    def _init_weights(self):
        # The official FD student's initialisation (PAPER.md §6): a normal of std .02 truncated at
        # one standard deviation (as VisionTransformerForFD does; the effective std is about .011)
        # for every Linear and the patch embedding, zero biases, and each block's output projections
        # shrunk with depth so that the residual stream does not grow with the number of blocks.
        def trunc_normal(tensor, std=0.02):
            nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)

        trunc_normal(self.cls_token)
        for param in (self.pos_embed, self.reg_tokens):
            if param is not None:
                trunc_normal(param)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward_features(self, images, return_attn=False):
        """images (B, 3, H, W) in [0, 1] -> tokens before the final norm (B, 1+N, C), which
        fine-tuning pools; with return_attn also each block's attention probabilities
        (B, heads, T, T), T = 1 + registers + N."""
        x = self.patch_embed((images - self.mean) / self.std)  # (B, C, h, w)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"this model was built for {self.grid[0] * self.patch_size} px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.reg_tokens is not None:  # registers have no position (DINOv2)
            x = torch.cat([x[:, :1], self.reg_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        # The shared bias is gathered from its table once per forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        attns = []
        for block in self.blocks:
            x, attn = run_block(block, self.grad_checkpointing and self.training, x, bias, return_attn)
            attns.append(attn)
        if self.reg_tokens is not None:
            x = torch.cat([x[:, :1], x[:, 1 + self.reg_tokens.shape[1]:]], dim=1)
        return (x, attns) if return_attn else x


# ----------------------------------------------------------------------------- Swin
# Swin Transformer: V1 is the EsViT teacher, V2 the FD student distilled from it (PAPER.md §6).
#
# Both work on feature maps (B, H, W, C) cut into non-overlapping windows of w x w tokens; every
# other block shifts the windows by w/2 so that information crosses window borders. Stages halve
# the map and double the width. V1 and V2 differ only inside the block:
#   V1 (Liu et al. 2021): pre-norm, scaled dot-product attention, a learned bias table per block.
#   V2 (Liu et al. 2022): residual post-norm, cosine attention with a learned temperature, and a
#       continuous position bias: a small MLP of the log-spaced offset. The FD student shares one
#       such MLP per stage during distillation; fine-tuning gives every block its own copy.
# Parameter names follow the official code, so an EsViT checkpoint loads strictly once its prefix,
# heads and index tables are removed (`esvit_to_swin`). One exception: V2's per-block bias MLP sits
# at `layers.i.blocks.j.rel_pos_bias.rpe_mlp` (official: `...blocks.j.attn.rpe_mlp`), mirroring
# the shared `layers.i.rel_pos_bias.rpe_mlp`, as the ViT's per-block tables mirror its shared one.


def window_partition(x, window):
    """(B, H, W, C) -> (B * num_windows, window * window, C); windows in raster order, so the
    windows of one image are consecutive."""
    return rearrange(x, "b (h wh) (w ww) c -> (b h w) (wh ww) c", wh=window, ww=window)


def window_reverse(windows, window, height, width):
    """The inverse of window_partition: (B * num_windows, window * window, C) -> (B, H, W, C)."""
    return rearrange(windows, "(b h w) (wh ww) c -> b (h wh) (w ww) c",
                     h=height // window, w=width // window, wh=window)


def cyclic_shift(x, shift):
    """Roll the map (B, H, W, C) up and left by `shift` (down and right to undo, with -shift)."""
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift else x


def shifted_window_mask(height, width, window, shift):
    """Additive mask (num_windows, w*w, w*w) for the shifted windows: after the cyclic shift, the
    windows along the bottom and right edges hold tokens that were far apart in the image. Label
    the up to 3 x 3 regions that were contiguous before the roll; tokens of different regions must
    not see each other. -inf (not the official -100) so that their probabilities are exactly 0:
    V2's logits can differ by up to 2 x 100 + 16, which -100 would not hide."""
    labels = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[:, rows, cols] = 3 * i + j
    labels = window_partition(labels, window).squeeze(-1)  # (num_windows, w*w)
    different = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(different.shape).masked_fill(different, float("-inf"))


def window_position_index(window):
    """(w*w, w*w) index into a table of the (2w-1)^2 offsets inside a window, row offset major:
    the ViT's index without its class-token rows (the same layout as Swin's)."""
    return relative_position_index(window, window)[1:, 1:]


def log_spaced_offsets(window, scale_window=None):
    """((2w-1)^2, 2) input of V2's position-bias MLP, rows in the order of window_position_index:
    each (row, column) offset scaled to [-8, 8], then sign(x) * log2(1 + |x|) / 3, so that a
    model can move to larger windows with little extrapolation (SwinV2 §3.3, 'norm8_log').
    A model moved to larger windows keeps the scale of the window it was trained with
    (`scale_window`, the official `pretrained_window_size`): the same offset, the same input."""
    steps = torch.arange(-(window - 1), window, dtype=torch.float32) * 8 / max((scale_window or window) - 1, 1)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.sign(offsets) * torch.log2(offsets.abs() + 1.0) / math.log2(8)


class ContinuousPositionBias(nn.Module):
    """V2's relative position bias: an MLP (2 -> 512 -> heads) of the log-spaced offset, bounded
    by 16 * sigmoid. Lives in the stage (shared by its blocks) or in every block."""

    def __init__(self, window, num_heads, scale_window=None, hidden_dim=512):
        super().__init__()
        self.rpe_mlp = nn.Sequential(nn.Linear(2, hidden_dim), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_dim, num_heads, bias=False))
        # Both follow from the window size, so neither enters a checkpoint.
        self.register_buffer("relative_coords_table", log_spaced_offsets(window, scale_window), persistent=False)
        self.register_buffer("relative_position_index", window_position_index(window), persistent=False)

    def forward(self):
        table = self.rpe_mlp(self.relative_coords_table)  # ((2w-1)^2, heads)
        return 16 * torch.sigmoid(table[self.relative_position_index].permute(2, 0, 1))  # (heads, N, N)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a relative position bias.
    V1 (`cosine=False`): softmax(q k^T / sqrt(d) + bias) with a qkv bias and its own bias table.
    V2 (`cosine=True`): softmax(cos(q, k) * temperature + bias), the temperature learned per head
    and capped at 100; q and v biases only (a k bias cancels in the softmax); the caller brings
    the bias."""

    def __init__(self, dim, num_heads, window, cosine):
        super().__init__()
        self.num_heads = num_heads
        if cosine:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        else:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
            self.register_buffer("relative_position_index", window_position_index(window), persistent=False)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.q_bias = self.v_bias = self.logit_scale = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, mask=None, return_attn=False):
        """x (B*nW, N, C): the N = w*w tokens of each window; bias (heads, N, N) for V2; mask
        (nW, N, N) or None -> (B*nW, N, C) and the probabilities (B*nW, heads, N, N) or None."""
        if self.logit_scale is None:
            bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        q, k, v = qkv_heads(x, self.qkv, self.q_bias, self.v_bias, self.num_heads)
        if return_attn:  # the explicit path, for diagnosis, works in full precision
            q, k, v = q.float(), k.float(), v.float()
        scale = q.shape[-1] ** -0.5
        if self.logit_scale is not None:
            # Temperature times unit vectors: then it is ordinary attention with scale 1.
            temperature = self.logit_scale.clamp(max=math.log(100.0)).exp()  # (heads, 1, 1)
            q = F.normalize(q, dim=-1) * temperature.to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        # The windows of one image are consecutive: folding them into the head axis lets a
        # (windows * heads, N, N) bias + mask broadcast over the batch instead of being copied.
        windows = 1 if mask is None else mask.shape[0]
        attn_bias = bias if mask is None else bias + mask[:, None]  # (heads or nW x heads, N, N)
        # (nW*heads, N, N), contiguous for the fused SDPA kernels (see Attention.forward)
        attn_bias = attn_bias.reshape(-1, *attn_bias.shape[-2:]).to(q.dtype).contiguous()
        q, k, v = (rearrange(t, "(b w) h n d -> b (w h) n d", w=windows) for t in (q, k, v))
        attn = None
        if return_attn:
            attn = ((q * scale) @ k.transpose(-2, -1) + attn_bias).softmax(dim=-1)
            out = (attn @ v).to(x.dtype)
            attn = rearrange(attn, "b (w h) n m -> (b w) h n m", w=windows)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        return self.proj(rearrange(out, "b (w h) n d -> (b w) n (h d)", w=windows)), attn


class SwinBlock(nn.Module):
    """Window attention and MLP, each a residual branch. V1 normalises the branch input (pre-norm);
    V2 normalises its output (res-post-norm), which keeps deep, wide models stable (SwinV2 §3.1)."""

    def __init__(self, dim, num_heads, resolution, window, shift, version, drop_path, norm_eps,
                 own_position_bias, scale_window=None):
        super().__init__()
        self.window, self.shift, self.post_norm = window, shift, version == 2
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window, cosine=version == 2)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)
        self.rel_pos_bias = ContinuousPositionBias(window, num_heads, scale_window) if own_position_bias else None
        mask = shifted_window_mask(*resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)  # EsViT saves none either

    def forward(self, x, bias=None, return_attn=False):
        """x (B, H, W, C), bias (heads, w*w, w*w) shared by the stage or None -> x, probabilities."""
        height, width = x.shape[1:3]
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        y = cyclic_shift(x if self.post_norm else self.norm1(x), self.shift)
        y, attn = self.attn(window_partition(y, self.window), bias, self.attn_mask, return_attn)
        y = cyclic_shift(window_reverse(y, self.window, height, width), -self.shift)  # (B, H, W, C)
        if self.post_norm:
            x = x + self.drop_path(self.norm1(y))
            return x + self.drop_path(self.norm2(self.mlp(x))), attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn


class PatchMerging(nn.Module):
    """Halve the map and double the width: concatenate each 2 x 2 neighbourhood (4C) and project it
    to 2C. V1 normalises the 4C input of the projection, V2 its 2C output."""

    def __init__(self, dim, version, norm_eps):
        super().__init__()
        self.norm_after = version == 2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if self.norm_after else 4 * dim, eps=norm_eps)

    def forward(self, x):
        # The official order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        # (B, H/2, W/2, 4C)
        return self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a strided conv) and a LayerNorm: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size, embed_dim, norm_eps):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, images):
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """`depth` blocks at one resolution, every second one with shifted windows, then the patch
    merging (official layout: the downsample ends stages 0-2). A window as large as the map
    covers everything: nothing is shifted."""
    grad_checkpointing = False  # see set_grad_checkpointing

    def __init__(self, dim, depth, num_heads, resolution, window, version, drop_rates, norm_eps,
                 position_bias, downsample, scale_window=None):
        super().__init__()
        shift = 0 if window == min(resolution) else window // 2
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"a {resolution[0]}x{resolution[1]} map does not split into "
                             f"{window}x{window} windows")
        self.window = window
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, resolution, window, shift if j % 2 else 0, version, drop_rates[j],
                      norm_eps, own_position_bias=version == 2 and position_bias == "per_block",
                      scale_window=scale_window)
            for j in range(depth)])
        self.downsample = PatchMerging(dim, version, norm_eps) if downsample else None
        shared = version == 2 and position_bias == "shared"
        self.rel_pos_bias = ContinuousPositionBias(window, num_heads, scale_window) if shared else None

    def forward(self, x, return_attn=False):
        # The shared bias is computed once per stage and forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        attns = []
        for block in self.blocks:
            x, attn = run_block(block, self.grad_checkpointing and self.training, x, bias, return_attn)
            attns.append(attn)
        if self.downsample is not None:
            x = self.downsample(x)
        return x, attns


class SwinTransformer(Encoder):
    """Swin V1 (`version=1`, the EsViT teacher) or V2 (`version=2`, the FD student): images in
    [0, 1] (B, 3, H, W) -> the last stage's tokens after the final norm (B, N, C), no class token.

    `position_bias`: V2 shares one bias MLP per stage ('shared', distillation) or gives every
    block its own ('per_block', fine-tuning; see `swin_shared_to_per_block`). V1 always has a
    table per block ('per_block')."""

    def __init__(self, version=2, img_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=14, position_bias="shared", drop_path=0.0,
                 norm_eps=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, pretrained_windows=None):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"Swin version must be 1 or 2, not {version!r}")
        if position_bias not in ("shared", "per_block") or (version == 1 and position_bias == "shared"):
            raise ValueError(f"position_bias {position_bias!r}: V2 takes 'shared' or 'per_block', "
                             f"V1 only 'per_block'")
        num_stages = len(depths)
        if img_size % (patch_size * 2 ** (num_stages - 1)):
            raise ValueError(f"image size {img_size} does not halve {num_stages - 1} times after "
                             f"{patch_size} px patches")
        self.arch = dict(version=version, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depths=list(depths), num_heads=list(num_heads), window_size=window_size,
                         position_bias=position_bias, drop_path=drop_path, norm_eps=norm_eps,
                         mean=list(mean), std=list(std), pretrained_windows=pretrained_windows)
        self.img_size = img_size
        self.embed_dim = embed_dim * 2 ** (num_stages - 1)  # the width of the output tokens
        side = img_size // patch_size // 2 ** (num_stages - 1)
        self.grid = (side, side)
        self.num_prefix_tokens = 0
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.patch_embed = PatchEmbed(patch_size, embed_dim, norm_eps)
        drop_rates = [drop_path * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # deeper blocks drop more
        self.layers = nn.ModuleList()
        windows = swin_stage_windows(self.arch)
        for i, depth in enumerate(depths):
            resolution = (img_size // patch_size // 2 ** i,) * 2
            first = sum(depths[:i])
            self.layers.append(SwinStage(
                embed_dim * 2 ** i, depth, num_heads[i], resolution, windows[i], version,
                drop_rates[first:first + depth], norm_eps, position_bias, downsample=i < num_stages - 1,
                scale_window=pretrained_windows[i] if pretrained_windows else None))
        self.norm = nn.LayerNorm(self.embed_dim, eps=norm_eps)
        self._init_weights(version)

    def _init_weights(self, version):
        # Official: normal of std .02 for Linear and conv weights (timm's trunc_normal_ cuts at
        # +-2, i.e. practically untruncated), zero biases, LayerNorm 1 and 0, V1 tables .02.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention) and version == 1:
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        if version == 2:
            # The official V2 starts every block's post-norm gain at 1e-5 (`init_values`): each
            # block begins near the identity, like LayerScale. (Its rescaling of the output
            # projections by depth is omitted: a post-norm undoes any scaling of its input.)
            for stage in self.layers:
                for block in stage.blocks:
                    nn.init.constant_(block.norm1.weight, 1e-5)
                    nn.init.constant_(block.norm2.weight, 1e-5)

    def forward_features(self, images, return_attn=False):
        """images (B, 3, H, W) in [0, 1] -> the last stage's tokens before the final norm (B, N, C),
        which fine-tuning pools; with return_attn also every block's attention probabilities per
        window (B * windows, heads, w*w, w*w)."""
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this model was built for {self.img_size} px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = self.patch_embed((images - self.mean) / self.std)  # (B, H/4, W/4, C)
        attns = []
        for stage in self.layers:
            x, stage_attns = stage(x, return_attn)  # (B, H/8, W/8, 2C), ... (B, H/32, W/32, 8C)
            attns += stage_attns
        x = x.flatten(1, 2)  # (B, N, C)
        return (x, attns) if return_attn else x


# Named sizes: (embed dim, depths, heads). "micro" exists for tests.
SWIN_SIZES = {"micro": (32, (2, 2), (2, 4)),
              "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
              "base": (128, (2, 2, 18, 2), (4, 8, 16, 32))}


def swin_arch(name, img_size=224, drop_path=0.0):
    """The arch of a named Swin, e.g. 'swinv2_base_window14': the FD student (V2, one position-bias
    MLP per stage), or 'swin_base_window14': the EsViT teacher (V1)."""
    match = re.fullmatch(r"(swin|swinv2)_(\w+)_window(\d+)", name)
    if not match or match[2] not in SWIN_SIZES:
        sizes = ", ".join(f"swinv2_{s}_window7" for s in SWIN_SIZES)
        raise ValueError(f"unknown Swin name {name!r}: expected one of {sizes}, another window, "
                         f"or 'swin_' in front for version 1")
    embed_dim, depths, num_heads = SWIN_SIZES[match[2]]
    version = 2 if match[1] == "swinv2" else 1
    # EsViT trained its V1 with LayerNorm eps 1e-6 (FD's rebuild keeps the 1e-5 default, a
    # negligible difference); the official V2 uses 1e-5.
    return dict(version=version, img_size=img_size, patch_size=4, embed_dim=embed_dim, depths=list(depths),
                num_heads=list(num_heads), window_size=int(match[3]),
                position_bias="shared" if version == 2 else "per_block", drop_path=drop_path,
                norm_eps=1e-5 if version == 2 else 1e-6, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def swin_stage_windows(arch, img_size=None):
    """The window of every stage of a Swin `arch` at img_size (its own by default): the arch's
    window, shrunk to a stage's map when the map is smaller (one window then covers the map)."""
    side = (img_size or arch["img_size"]) // arch["patch_size"]
    return [min(arch["window_size"], side // 2 ** i) for i in range(len(arch["depths"]))]


def swin_shared_to_per_block(state_dict):
    """A V2 state dict with one position-bias MLP per stage (`layers.i.rel_pos_bias.*`) -> one
    copy in every block of that stage (`layers.i.blocks.j.rel_pos_bias.*`), for fine-tuning a
    model built with position_bias='per_block'. The function of the model does not change."""
    depths = {}
    for key in state_dict:
        match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    converted = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"layers\.(\d+)\.rel_pos_bias\.(.+)", key)
        if match is None:
            converted[key] = value
            continue
        for j in range(depths[match[1]]):
            converted[f"layers.{match[1]}.blocks.{j}.rel_pos_bias.{match[2]}"] = value.clone()
    return converted


def esvit_to_swin(state_dict):
    """EsViT's checkpoint['student'] -> our V1 keys: remove the DDP prefix 'module.', the DINO heads
    ('head.*' for the image, 'head_dense.*' for the regions) and the index tables, which we derive
    from the window size (EsViT saves them; they are checked against ours here). Everything else
    is left to a strict load."""
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(("head.", "head_dense.")):
            continue
        if key.endswith("attn.relative_position_index"):
            window = math.isqrt(value.shape[0])
            if not torch.equal(value.cpu().long(), window_position_index(window)):
                raise ValueError(f"{key}: not the Swin relative position layout this model assumes")
            continue
        converted[key] = value
    return converted


class Classifier(nn.Module):
    """An encoder with a classification head, for fine-tuning (PAPER.md §6): the mean of the patch
    tokens before the encoder's final norm, then `fc_norm` and a Linear head initialised small.
    The encoder's final norm has no use here and is removed. `linear_probe=True` instead puts a
    BatchNorm without affine parameters before the head (MAE's linear probe)."""

    def __init__(self, encoder, num_classes, linear_probe=False):
        super().__init__()
        self.arch = dict(encoder=encoder.arch, num_classes=num_classes, linear_probe=linear_probe)
        eps = encoder.norm.eps
        encoder.norm = nn.Identity()
        self.encoder = encoder
        self.fc_norm = (nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6) if linear_probe
                        else nn.LayerNorm(encoder.embed_dim, eps=eps))
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            self.head.weight.mul_(0.001)
            nn.init.zeros_(self.head.bias)

    def forward(self, images):
        tokens = self.encoder.forward_features(images)  # (B, prefix + N, C)
        return self.head(self.fc_norm(tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)))


# Named sizes: (embed dim, depth, heads). "micro" exists for tests.
VIT_SIZES = {"micro": (32, 2, 2), "tiny": (192, 12, 3), "small": (384, 12, 6),
             "base": (768, 12, 12), "large": (1024, 24, 16)}


def parse_vit_name(name):
    """'vit_small_patch16' -> ('small', 16)."""
    match = re.fullmatch(r"vit_(\w+)_patch(\d+)", name)
    if not match or match[1] not in VIT_SIZES:
        sizes = ", ".join(f"vit_{s}_patch16" for s in VIT_SIZES)
        raise ValueError(f"unknown ViT name {name!r}: expected one of {sizes} (or patch 14, 8, ...)")
    return match[1], int(match[2])


def build_student(name, img_size, drop_path=0.0):
    """A randomly initialised FD student, e.g. build_student('vit_base_patch16', 224, 0.2) or
    build_student('swinv2_base_window14', 224, 0.3)."""
    if name.startswith("swin"):
        return SwinTransformer(**swin_arch(name, img_size, drop_path))
    size, patch_size = parse_vit_name(name)
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, drop_path=drop_path)


def load_model_file(path):
    """Rebuild a model from a file this project wrote ({'arch': ..., 'model': state_dict}), such as
    a distilled `student.pth`. Loads with weights_only=True and strictly."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a model file written by this project (expected the keys "
                         f"'arch' and 'model', found {found})")
    model = build_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model


def read_encoder_file(path):
    """(arch, state dict, description) of the encoder in a file this project wrote: a model file
    (a distilled student.pth; a fine-tuned Classifier, whose encoder is taken without its head)
    or a distillation checkpoint.pth (its student)."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and "arch" in state and "student" in state:
        return state["arch"], state["student"], f"the student of distillation checkpoint {path} (step {state['step']})"
    if isinstance(state, dict) and "arch" in state and "model" in state:
        if "encoder" in state["arch"]:
            encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
            return state["arch"]["encoder"], encoder, f"the encoder of classifier {path}"
        return state["arch"], state["model"], f"model file {path}"
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path}: expected a model file of this project ('arch', 'model') or a distillation "
                     f"checkpoint ('arch', 'student'), found {found}; for a published checkpoint name its layout "
                     f"with --teacher ({', '.join(TEACHERS)})")


def build_from_arch(arch):
    """The model described by an `arch` dict saved with its weights (an encoder or a Classifier)."""
    if "encoder" in arch:
        return Classifier(build_from_arch(arch["encoder"]), arch["num_classes"], arch["linear_probe"])
    return SwinTransformer(**arch) if "depths" in arch else VisionTransformer(**arch)


# ----------------------------------------------------------------------------- teachers
# The published teachers. Each entry: the architecture of its image tower (our VisionTransformer's
# options), the layout of its file, where it is published and its SHA-256 (or the prefix of it
# that the publisher put in the file name). Facts from the original code: ../shared/ref/CHECKPOINTS.md.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def teacher_arch(size, patch_size, img_size=224, **options):
    """The arch of a plain teacher ViT: absolute positions, a full qkv bias, no LayerScale."""
    embed_dim, depth, num_heads = VIT_SIZES[size]
    arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                rel_pos=None, abs_pos=True, qv_bias=False, layer_scale=None, norm_eps=1e-6)
    return dict(arch, **options)


# OpenAI CLIP's image tower: QuickGELU, ln_pre, LayerNorm eps 1e-5, no patch bias, its own statistics.
OPENAI_CLIP = dict(act="quick_gelu", norm_pre=True, patch_bias=False, norm_eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD)
DINOV2 = dict(img_size=518, layer_scale=1.0)  # LayerScale values come from the file
TEACHERS = {
    "clip": dict(layout="openai_clip", arch=teacher_arch("base", 16, **OPENAI_CLIP),
                 url="https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
                 sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "clip_l14": dict(layout="openai_clip", arch=teacher_arch("large", 14, **OPENAI_CLIP),
                     url="https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
                     sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "dino": dict(layout="timm", arch=teacher_arch("base", 16),
                 url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "deit": dict(layout="timm", arch=teacher_arch("base", 16),
                 url="https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth", sha256="b5f2ef4d"),
    "dinov2_vitb14": dict(layout="timm", arch=teacher_arch("base", 14, **DINOV2),
                          url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
    "dinov2_vitb14_reg4": dict(layout="timm", arch=teacher_arch("base", 14, num_registers=4, **DINOV2),
                               url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
    "tv_vit_b_16": dict(layout="torchvision", arch=teacher_arch("base", 16),
                        url="https://download.pytorch.org/models/vit_b_16-c867db91.pth", sha256="c867db91"),
    "tv_vit_l_16": dict(layout="torchvision", arch=teacher_arch("large", 16),
                        url="https://download.pytorch.org/models/vit_l_16-852ce7e3.pth", sha256="852ce7e3"),
    # EsViT's full training checkpoint: Swin-B with window 14; FD distils its student, not its EMA teacher.
    "esvit": dict(layout="esvit", arch=swin_arch("swin_base_window14"), state_key="student",
                  url="https://chunyleu.blob.core.windows.net/output/ckpts/esvit/swin/swin_base/"
                      "bl_lr0.0005_nodes4_gpu16_bs8_multicrop_epoch300_dino_aug_window14_lv/"
                      "continued_from_epoch0200_dense_norm_true/checkpoint_best.pth"),
    # Any file of these layouts, its architecture read from the tensor shapes (heads = width / 64).
    "timm": dict(layout="timm", act="gelu"),
    "open_clip": dict(layout="openai_clip", act="gelu"),  # open_clip's own models use nn.GELU
    "open_clip_quickgelu": dict(layout="openai_clip", act="quick_gelu"),  # OpenAI weights in open_clip files
    "torchvision": dict(layout="torchvision", act="gelu"),
}


# Key conversions: pure functions from a published state dict to our names. Towers and heads the
# FD target does not use are dropped by name; anything else unknown is left for the strict load.
def rename(key, renames):
    for old, new in renames:
        key = key.replace(old, new)
    return key


CLIP_TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "positional_embedding", "text_projection",
                   "logit_scale", "visual.proj")  # visual.proj maps to the text space, after the FD target


def convert_openai_clip(state):
    renames = [("visual.", ""), ("conv1.", "patch_embed."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
               ("transformer.resblocks.", "blocks."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
               (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.fc1."),
               (".mlp.c_proj.", ".mlp.fc2.")]
    out = {}
    for key, value in state.items():
        if key.startswith(CLIP_TEXT_TOWER):
            continue
        if key == "visual.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        else:
            out[rename(key, renames)] = value
    return out


def convert_timm(state):
    """timm's layout (DINO, DeiT, timm checkpoints) and the official DINOv2 one."""
    renames = [("patch_embed.proj.", "patch_embed."), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2")]
    registers = {"register_tokens": "reg_tokens", "reg_token": "reg_tokens"}  # DINOv2's name, timm's name
    out = {registers.get(k) or rename(k, renames): v for k, v in state.items()
           if not k.startswith(("head.", "mask_token"))}  # classifier / CLIP projection; DINOv2's MIM token
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # timm's DINOv2-with-registers layout keeps no class position (it is folded into cls_token)
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return out


def convert_torchvision(state):
    renames = [("class_token", "cls_token"), ("conv_proj.", "patch_embed."), ("encoder.pos_embedding", "pos_embed"),
               ("encoder.layers.encoder_layer_", "blocks."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
               (".self_attention.in_proj_", ".attn.qkv."), (".self_attention.out_proj.", ".attn.proj."),
               (".mlp.0.", ".mlp.fc1."), (".mlp.3.", ".mlp.fc2."), ("encoder.ln.", "norm.")]
    return {rename(k, renames): v for k, v in state.items() if not k.startswith("heads.")}


CONVERTERS = {"openai_clip": convert_openai_clip, "timm": convert_timm, "torchvision": convert_torchvision,
              "esvit": esvit_to_swin}


# No tensor shape gives the number of heads. Published ViTs use 64 channels per head, except
# these widths (ViT-H/14, ViT-g/14, ViT-bigG/14: 16 heads each).
HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def infer_vit_arch(state, act="gelu"):
    """The architecture of a converted ViT state dict, from its tensor shapes."""
    embed_dim = state["cls_token"].shape[-1]
    num_heads = HEADS_BY_WIDTH.get(embed_dim) or embed_dim // 64
    if embed_dim not in HEADS_BY_WIDTH and embed_dim % 64:
        raise ValueError(f"a ViT of width {embed_dim}: its number of heads is unknown (not 64 channels per head)")
    patch_size = state["patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    clip_like = "norm_pre.weight" in state  # CLIP towers: LayerNorm eps 1e-5 and CLIP statistics
    stats = dict(mean=CLIP_MEAN, std=CLIP_STD) if clip_like else {}
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
                depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}), num_heads=num_heads,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, rel_pos=None, abs_pos=True,
                qv_bias=False, layer_scale=1.0 if "blocks.0.gamma_1" in state else None,
                norm_eps=1e-5 if clip_like else 1e-6, act=act, norm_pre=clip_like,
                patch_bias="patch_embed.bias" in state,
                num_registers=state["reg_tokens"].shape[1] if "reg_tokens" in state else 0, **stats)


# ----------------------------------------------------------------------------- reading checkpoint files
DATA_ONLY_GLOBALS = {"argparse.Namespace": argparse.Namespace}  # pickled training arguments (EsViT, DINO)


def read_checkpoint(path):
    """Whatever a checkpoint file holds, read without running code from it: a zip or legacy pickle
    through torch.load(weights_only=True), a TorchScript archive by reading its tensors, or a
    safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return read_torchscript(archive)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        globals_ = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        refused = [g for g in globals_ if g not in DATA_ONLY_GLOBALS]
        if refused:
            raise ValueError(f"{path}: refused: unpickling it would call {', '.join(refused)}, which can run code. "
                             f"Nothing from it was executed. If you trust the file, re-save its tensors as a plain "
                             f"state dict") from None
        with torch.serialization.safe_globals([DATA_ONLY_GLOBALS[g] for g in globals_]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable checkpoint, probably truncated ({str(error).split('.')[0]}): "
                         f"download or copy it again") from None


class _ScriptModule:
    """Stands in for a TorchScript module while unpickling: only holds its attributes."""


STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def read_torchscript(archive):
    """The tensors of a TorchScript archive (OpenAI CLIP's .pt files), by name as in its
    state_dict(), without torch.jit: its data.pkl is unpickled with every global refused except
    module placeholders, tensor rebuilding and OrderedDict, so no code from the file runs."""
    root = archive.namelist()[0].split("/")[0]
    storages = {}

    def rebuild_tensor(storage, offset, size, stride, *_):
        return storage.as_strided(size, stride, offset)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("__torch__"):
                return _ScriptModule
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild_tensor
            if module == "torch" and name in STORAGE_DTYPES:
                return STORAGE_DTYPES[name]
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"refused to load {module}.{name} from a TorchScript archive")

        def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
            _, dtype, key, _, numel = pid
            if key not in storages:
                raw = bytearray(archive.read(f"{root}/data/{key}"))
                storages[key] = torch.frombuffer(raw, dtype=dtype)[:numel] if numel else torch.empty(0, dtype=dtype)
            return storages[key]

    tensors = {}

    def collect(obj, prefix):
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptModule):
                collect(value, f"{prefix}{name}.")

    collect(Unpickler(io.BytesIO(archive.read(f"{root}/data.pkl"))).load(), "")
    return tensors


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """A safetensors file: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the data."""
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors


WRAPPER_KEYS = ("model", "state_dict", "teacher", "student", "module")


def unwrap_state_dict(checkpoint, path, prefer=WRAPPER_KEYS):
    """The state dict inside a checkpoint: the first of `prefer` that a nested dict is found
    under, with the prefixes of wrappers removed (DDP's module., torch.compile's _orig_mod., DINO's
    backbone., whose projection head is dropped)."""
    state = checkpoint
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in prefer if isinstance(state.get(k), dict)), None)
        if key is None:
            raise ValueError(f"{path}: no state dict found: expected tensors, or one of the entries "
                             f"{', '.join(prefer)}; found {', '.join(map(str, state))}")
        state = state[key]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_strict(model, state, source):
    """load_state_dict, with an error listing every missing and unexpected key and every shape
    that differs: a silently half-loaded teacher would ruin a long run."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
        problems = [f"{label}: {show(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("different shapes", shapes)) if keys]
        raise ValueError(f"{source} does not fit this model ({'; '.join(problems)}). Is it the file of another "
                         f"model? Check --teacher / --init and the weights file")
    model.load_state_dict(state)  # casts fp16 weights (OpenAI CLIP) to the model's dtype


def sha256sum(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_weights_file(name):
    """The cached published file of a teacher, downloaded and checked on first use."""
    spec = TEACHERS[name]
    if "url" not in spec:
        raise ValueError(f"--teacher {name} reads any file of its layout: give it with --teacher-weights FILE")
    url = spec["url"]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {name} teacher from {url} to {path}")
        try:  # writes to a temporary file, checks the hash prefix, then renames
            torch.hub.download_url_to_file(url, str(path), hash_prefix=spec.get("sha256"))
        except Exception as error:
            raise RuntimeError(f"could not download the {name} teacher ({error}). Fetch {url} yourself and put it at "
                               f"{path}, or pass it with --teacher-weights FILE") from None
    return path


# ----------------------------------------------------------------------------- building teachers
def load_pretrained(name, weights=None, img_size=None, grid=None):
    """A pretrained encoder (trainable, in train mode) that maps images in [0, 1] to its tokens:

    - a teacher of TEACHERS, from `weights` (a file in its published layout), from its published
      file (downloaded into the torch hub cache) when `weights` is None, or with random weights
      when `weights == "random"` (tests and benchmarks);
    - a plain ViT name such as 'vit_tiny_patch16' (random weights from a fixed seed, so that every
      process of a distributed run builds the same model) or a model file this project wrote.

    `img_size`, or `grid` (tokens per side), sets the input resolution: absolute position
    embeddings are resized bicubically when it differs from the checkpoint's.
    """
    source, final_norm = name, True
    if name in TEACHERS:
        spec = TEACHERS[name]
        state = None
        if weights != "random":
            path = Path(weights) if weights else teacher_weights_file(name)
            prefer = (spec["state_key"], *WRAPPER_KEYS) if "state_key" in spec else WRAPPER_KEYS
            state = CONVERTERS[spec["layout"]](unwrap_state_dict(read_checkpoint(path), path, prefer))
            source = f"{path}"
        if "arch" in spec:
            arch = dict(spec["arch"])
        elif state is not None:
            try:
                arch = infer_vit_arch(state, spec["act"])
            except KeyError as error:
                raise ValueError(f"{source} does not fit the {spec['layout']} layout of --teacher {name} (missing: "
                                 f"{error.args[0]}; the file has {', '.join(list(state)[:8])}, ...)") from None
        else:
            raise ValueError(f"--teacher {name} has no fixed architecture: give a weights file")
    elif weights not in (None, "random"):
        arch, state, _ = read_encoder_file(weights)
        source = str(weights)
        final_norm = any(k.startswith("norm.") for k in state)  # a fine-tuned classifier pools before any
    else:  # a plain ViT of a named size, random weights
        try:
            arch, state = teacher_arch(*parse_vit_name(name)), None
        except ValueError:
            raise ValueError(f"unknown teacher {name!r}: expected one of {', '.join(TEACHERS)}, a plain ViT such as "
                             f"vit_base_patch16 (random weights), or a model file of this project as weights") from None

    # Only absolute position embeddings follow a new grid; models with relative positions (our
    # students, Swin) keep their resolution, and distill.py resizes their output tokens instead.
    resizable = arch.get("abs_pos") and not arch.get("rel_pos")
    if grid is not None and resizable:
        img_size = grid * arch["patch_size"]
    if img_size and img_size != arch["img_size"] and resizable:
        if state is not None:
            old_grid, new_grid = (arch["img_size"] // arch["patch_size"],) * 2, (img_size // arch["patch_size"],) * 2
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid)
        arch["img_size"] = img_size
    with torch.random.fork_rng(devices=[]):  # the same random weights on every process
        torch.manual_seed(0)
        model = build_from_arch(arch)
    if not final_norm:  # the encoder of a fine-tuned classifier: its tokens are used as they come
        model.norm = nn.Identity()
    if state is not None:
        load_strict(model, state, source)
    model.source = source
    return model


class Teacher(nn.Module):
    """A frozen teacher: images in [0, 1] (B, 3, H, W) -> its output tokens after its own final
    norm (B, 1+N, C), class token included (Swin has none), before whitening. Images are resized to the
    teacher's input size when it differs (a teacher with patch 14 for a student with patch 16)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.embed_dim, self.num_prefix_tokens = encoder.embed_dim, encoder.num_prefix_tokens
        self.input_size = encoder.arch["img_size"]
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always in eval mode: no drop path, fixed norms

    def forward(self, images):
        if images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        return self.encoder(images)


def load_teacher(name, weights=None, grid=None):
    """The frozen FD teacher (see load_pretrained for `name` and `weights`) at the resolution that
    gives `grid` x `grid` output tokens, the student's grid; teachers whose grid cannot change
    (relative position bias) keep their own, and the target is resized instead."""
    encoder = load_pretrained(name, weights, grid=grid)
    teacher = Teacher(encoder)
    teacher.source = encoder.source
    return teacher
