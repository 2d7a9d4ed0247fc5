"""Models for Feature Distillation (Wei et al., 2022, arXiv 2205.14141).

The ViT student, with one relative position bias shared by all its blocks (this first section needs only
torch and einops: it runs when copied alone into a notebook); Swin V1 and V2; the frozen teacher wrapper; the
classifier of fine-tuning; named sizes and the student's builder. Every model takes images in [0, 1] and
normalises them with its own input statistics (CLIP's are not ImageNet's). The published ViTs that serve as
teachers, with their options, are teachers.py's PretrainedViT; build_from_arch rebuilds any model from its arch.
"""
import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from einops.layers.torch import Rearrange

# ============================================================================= the ViT student
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DropPath(nn.Module):
    """Stochastic depth: skip the residual branch for a random subset of the samples, and scale
    the kept ones by 1/keep so that the expected output is unchanged."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def mlp(dim, hidden_dim):
    """The MLP of a transformer block: fc1, GELU, fc2."""
    return nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden_dim), act=nn.GELU(), fc2=nn.Linear(hidden_dim, dim)))


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


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, added to the attention logits (BEiT layout).
    The student shares one of these across all its blocks during distillation (the paper's
    'shared relative position bias'); fine-tuning copies it into every block."""

    def __init__(self, grid, num_heads):
        super().__init__()
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


def explicit_attention(module, q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v written out in fp32, keeping the probabilities in
    module.probs (B, heads, N, N): the path diagnosis reads attention maps from. The fused
    F.scaled_dot_product_attention computes the same, without materialising them."""
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    module.probs = (logits if bias is None else logits + bias.float()).softmax(dim=-1)
    return (module.probs @ v.float()).to(v.dtype)


class Attention(nn.Module):
    """Multi-head self-attention. `qv_bias=True` is the BEiT form the student uses: one qkv matrix
    without bias plus separate q and v biases. Set `keep_probs` to keep the attention probabilities
    of the next forward in `.probs` (diagnose.py does)."""
    keep_probs = False

    def __init__(self, dim, num_heads, qv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        """x (B, N, C), bias (heads, N, N) or None -> (B, N, C)."""
        q, k, v = qkv_heads(x, self.qkv, self.q_bias, self.v_bias, self.num_heads)  # (B, heads, N, d)
        if bias is not None:
            # Contiguous: the GPU's fused SDPA kernels refuse a mask whose last dimension is strided
            # (a permuted bias table), and PyTorch then falls back to the slow math kernel.
            bias = bias.to(q.dtype).contiguous()
        if self.keep_probs:
            out = explicit_attention(self, q, k, v, bias, q.shape[-1] ** -0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale, and a relative position bias of its own when
    fine-tuning (`rel_pos_grid`); during distillation the shared bias comes from the model."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, layer_scale=None, drop_path=0.0, rel_pos_grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.rel_pos_bias = RelativePositionBias(rel_pos_grid, num_heads) if rel_pos_grid else None
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None

    def forward(self, x, bias=None):
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        y = self.attn(self.norm1(x), bias)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


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


class VisionTransformer(nn.Module):
    """The FD student: images in [0, 1] (B, 3, H, W) -> its output tokens after the final norm
    (B, 1+N, C), class token first. No absolute position embedding; one relative position bias
    shared by all blocks (`rel_pos="shared"`), or one per block (`"per_block"`, fine-tuning)."""
    grad_checkpointing = False  # see set_grad_checkpointing

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 rel_pos="shared", layer_scale=0.1, drop_path=0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if rel_pos not in ("shared", "per_block", None):
            raise ValueError(f"rel_pos must be 'shared', 'per_block' or None, not {rel_pos!r}")
        # Everything needed to build this model again, as plain data: it is saved with the weights.
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, rel_pos=rel_pos, layer_scale=layer_scale,
                         drop_path=drop_path)
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_prefix_tokens = 1  # the class token in front of the patch tokens
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)  # the input statistics
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if rel_pos == "shared" else None
        drop_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # deeper blocks drop more
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, layer_scale, drop_rates[i],
                  rel_pos_grid=self.grid if rel_pos == "per_block" else None)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):
        # The official student's initialisation (models/vision_transformer.py): a normal of std .02
        # truncated at one standard deviation (the effective std is about .011) for every Linear and
        # the patch embedding, zero biases, and each block's output projections shrunk with depth so
        # that the residual stream does not grow with the number of blocks.
        for param in [self.cls_token] + [m.weight for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]:
            nn.init.trunc_normal_(param, std=0.02, a=-0.02, b=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def embed(self, images):
        """images (B, 3, H, W) in [0, 1] -> the class token and the patch embeddings (B, 1+N, C)."""
        x = self.patch_embed((images - self.mean) / self.std)  # (B, C, h, w)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"this model was built for {self.grid[0] * self.patch_size} px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)

    def forward_features(self, images):
        """images (B, 3, H, W) in [0, 1] -> tokens before the final norm (B, 1+N, C), which fine-tuning pools."""
        x = self.embed(images)
        # The shared bias is gathered from its table once per forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing and self.training, x, bias)
        return x

    def forward(self, images):
        return self.norm(self.forward_features(images))  # (B, 1+N, C)


# ============================================================================= Swin
# V1 (Liu et al. 2021) is the EsViT teacher: pre-norm, scaled dot-product attention, a bias table per block.
# V2 (Liu et al. 2022) is the FD student distilled from it: residual post-norm, cosine attention with a learned
# temperature, a bias that is an MLP of the log-spaced offset, in every block or shared per stage. Both attend
# within windows of w x w tokens, shifted by w/2 in every other block so that information crosses window borders;
# stages halve the map and double the width. Names are the official code's (an EsViT file loads strictly), but
# V2's per-block MLP is `layers.i.blocks.j.rel_pos_bias.rpe_mlp` (official: `attn.rpe_mlp`), as the shared one.


def window_partition(x, window):
    """(B, H, W, C) -> (B * num_windows, window * window, C), the windows of an image consecutive, in raster order."""
    return rearrange(x, "b (h wh) (w ww) c -> (b h w) (wh ww) c", wh=window, ww=window)


def window_reverse(windows, window, height, width):
    """The inverse of window_partition: (B * num_windows, window * window, C) -> (B, H, W, C)."""
    return rearrange(windows, "(b h w) (wh ww) c -> b (h wh) (w ww) c",
                     h=height // window, w=width // window, wh=window)


def cyclic_shift(x, shift):
    """Roll the map (B, H, W, C) up and left by `shift` (down and right to undo, with -shift)."""
    return torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)) if shift else x


def shifted_window_mask(height, width, window, shift):
    """Additive mask (num_windows, w*w, w*w) for the shifted windows, whose tokens along the bottom and right edges
    were far apart before the roll: tokens of different regions must not see each other. -inf, not the official -100,
    so that their probabilities are exactly 0: V2's logits can differ by 2 x 100 + 16, which -100 would not hide."""
    labels = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bands):
        for j, cols in enumerate(bands):
            labels[:, rows, cols] = 3 * i + j
    labels = window_partition(labels, window).squeeze(-1)  # (num_windows, w*w)
    return torch.where(labels[:, :, None] == labels[:, None, :], 0.0, float("-inf"))


def window_position_index(window):
    """(w*w, w*w) index into a table of the (2w-1)^2 offsets in a window: the ViT's, without the class token."""
    return relative_position_index(window, window)[1:, 1:]


def log_spaced_offsets(window, scale_window=None):
    """((2w-1)^2, 2) input of V2's position-bias MLP, in the order of window_position_index: each (row, column) offset
    scaled to [-8, 8], then sign(x) * log2(1 + |x|) / 3, so that larger windows need little extrapolation (SwinV2
    §3.3). `scale_window` (official: `pretrained_window_size`) keeps the scale a model was trained with."""
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
    """Self-attention inside each window plus a relative position bias: V1 (`cosine=False`) softmax(q k^T / sqrt(d)
    + bias) with its own bias table; V2 softmax(cos(q, k) * temperature + bias), the temperature learned per head,
    capped at 100, the bias brought by the caller. `keep_probs` as for Attention. Parameters in the official order."""
    keep_probs = False

    def __init__(self, dim, num_heads, window, cosine):
        super().__init__()
        self.num_heads = num_heads
        if not cosine:  # V1's own bias table
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
            self.register_buffer("relative_position_index", window_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=not cosine)  # V2: separate q and v biases (qkv_heads)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if cosine else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if cosine else None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0))) if cosine else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, mask=None):
        """x (B*nW, N, C): the N = w*w tokens of each window; bias (heads, N, N) for V2; mask
        (nW, N, N) or None -> (B*nW, N, C). With keep_probs, .probs is (B*nW, heads, N, N)."""
        q, k, v = qkv_heads(x, self.qkv, self.q_bias, self.v_bias, self.num_heads)
        if self.keep_probs:  # diagnosis: the explicit path works in fp32 throughout
            q, k, v = q.float(), k.float(), v.float()
        if self.logit_scale is None:
            bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
            scale = q.shape[-1] ** -0.5
        else:  # temperature times unit vectors: then it is ordinary attention, scale 1
            temperature = self.logit_scale.clamp(max=math.log(100.0)).exp()  # (heads, 1, 1)
            q = F.normalize(q, dim=-1) * temperature.to(q.dtype)
            k = F.normalize(k, dim=-1)
            scale = 1.0
        # The windows of one image are consecutive: folding them into the head axis lets a
        # (windows * heads, N, N) bias + mask broadcast over the batch instead of being copied.
        windows = 1 if mask is None else mask.shape[0]
        # (heads or nW*heads, N, N), contiguous for the fused SDPA kernels (see Attention.forward)
        attn_bias = (bias if mask is None else (bias + mask[:, None]).flatten(0, 1)).to(q.dtype).contiguous()
        q, k, v = (rearrange(t, "(b w) h n d -> b (w h) n d", w=windows) for t in (q, k, v))
        if self.keep_probs:
            out = explicit_attention(self, q, k, v, attn_bias, scale).to(x.dtype)
            self.probs = rearrange(self.probs, "b (w h) n m -> (b w) h n m", w=windows)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
        return self.proj(rearrange(out, "b (w h) n d -> (b w) n (h d)", w=windows))


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
        self.mlp = mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)
        self.rel_pos_bias = ContinuousPositionBias(window, num_heads, scale_window) if own_position_bias else None
        mask = shifted_window_mask(*resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)  # EsViT saves none either

    def forward(self, x, bias=None):
        """x (B, H, W, C), bias (heads, w*w, w*w) shared by the stage, or None -> (B, H, W, C)."""
        if self.rel_pos_bias is not None:
            bias = self.rel_pos_bias()
        y = cyclic_shift(x if self.post_norm else self.norm1(x), self.shift)
        y = self.attn(window_partition(y, self.window), bias, self.attn_mask)
        y = cyclic_shift(window_reverse(y, self.window, *x.shape[1:3]), -self.shift)  # (B, H, W, C)
        x = x + self.drop_path(self.norm1(y) if self.post_norm else y)
        y = self.mlp(x if self.post_norm else self.norm2(x))
        return x + self.drop_path(self.norm2(y) if self.post_norm else y)


class PatchMerging(nn.Module):
    """Halve the map and double the width: concatenate each 2 x 2 neighbourhood (4C) and project it
    to 2C. V1 normalises the 4C input of the projection, V2 its 2C output."""

    def __init__(self, dim, version, norm_eps):
        super().__init__()
        self.norm_after = version == 2
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim if self.norm_after else 4 * dim, eps=norm_eps)

    def forward(self, x):
        # (B, H/2, W/2, 4C) in the official order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x)) if self.norm_after else self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """`depth` blocks at one resolution, every second one with shifted windows (none where a window covers the map),
    then the patch merging (official layout: the downsample ends stages 0-2)."""
    grad_checkpointing = False  # see set_grad_checkpointing

    def __init__(self, dim, depth, num_heads, resolution, window, version, drop_rates, norm_eps,
                 position_bias, downsample, scale_window=None):
        super().__init__()
        shift = 0 if window == min(resolution) else window // 2
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"a {resolution[0]}x{resolution[1]} map does not split into {window}x{window} windows")
        self.window = window
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, resolution, window, shift if j % 2 else 0, version, drop_rates[j], norm_eps,
                      own_position_bias=version == 2 and position_bias == "per_block", scale_window=scale_window)
            for j in range(depth)])
        self.downsample = PatchMerging(dim, version, norm_eps) if downsample else None
        shared = version == 2 and position_bias == "shared"
        self.rel_pos_bias = ContinuousPositionBias(window, num_heads, scale_window) if shared else None

    def forward(self, x):
        # The shared bias is computed once per stage and forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing and self.training, x, bias)
        return x if self.downsample is None else self.downsample(x)


class SwinTransformer(nn.Module):
    """Swin V1 (`version=1`, the EsViT teacher) or V2 (the FD student): images in [0, 1] (B, 3, H, W) -> the last
    stage's tokens after the final norm (B, N, C), no class token. V2's `position_bias`: an MLP in every block
    ('per_block', the official FD-EsViT student) or one per stage ('shared', the paper's shared bias)."""

    def __init__(self, version=2, img_size=224, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=14, position_bias="per_block", drop_path=0.0,
                 norm_eps=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, pretrained_windows=None):
        super().__init__()
        if version not in (1, 2):
            raise ValueError(f"Swin version must be 1 or 2, not {version!r}")
        if position_bias not in ("shared", "per_block") or (version == 1 and position_bias == "shared"):
            raise ValueError(f"position_bias {position_bias!r}: V2 takes 'shared' or 'per_block', V1 only 'per_block'")
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
        self.grid = (img_size // patch_size // 2 ** (num_stages - 1),) * 2
        self.num_prefix_tokens = 0
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        # Non-overlapping patches (a strided conv) and a LayerNorm: (B, 3, H, W) -> (B, H/p, W/p, C).
        self.patch_embed = nn.Sequential(OrderedDict(
            proj=nn.Conv2d(3, embed_dim, patch_size, stride=patch_size),
            channels_last=Rearrange("b c h w -> b h w c"), norm=nn.LayerNorm(embed_dim, eps=norm_eps)))
        drop_rates = [drop_path * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # deeper blocks drop more
        self.layers, windows = nn.ModuleList(), swin_stage_windows(self.arch)
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.layers.append(SwinStage(
                embed_dim * 2 ** i, depth, num_heads[i], (img_size // patch_size // 2 ** i,) * 2, windows[i], version,
                drop_rates[first:first + depth], norm_eps, position_bias, downsample=i < num_stages - 1,
                scale_window=pretrained_windows[i] if pretrained_windows else None))
        self.norm = nn.LayerNorm(self.embed_dim, eps=norm_eps)
        self._init_weights(version)

    def _init_weights(self, version):
        # Official: normal of std .02 for Linear and conv weights (timm's trunc_normal_ cuts at +-2, i.e. practically
        # untruncated), zero biases, V1 tables .02; LayerNorms as built (1 and 0).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention) and version == 1:
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        if version == 2:
            # The official V2 starts every post-norm gain at 1e-5 (`init_values`: each block begins near the identity)
            # and divides block i's output projections by sqrt(2 i) (`fix_init`, i from 1 across stages).
            for i, block in enumerate((block for stage in self.layers for block in stage.blocks), start=1):
                nn.init.constant_(block.norm1.weight, 1e-5)
                nn.init.constant_(block.norm2.weight, 1e-5)
                block.attn.proj.weight.data.div_(math.sqrt(2 * i))
                block.mlp.fc2.weight.data.div_(math.sqrt(2 * i))

    def forward_features(self, images):
        """images (B, 3, H, W) in [0, 1] -> the last stage's tokens before the final norm (B, N, C)."""
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"this model was built for {self.img_size} px images, got {tuple(images.shape[-2:])}")
        x = self.patch_embed((images - self.mean) / self.std)  # (B, H/4, W/4, C)
        for stage in self.layers:
            x = stage(x)  # (B, H/8, W/8, 2C), ... (B, H/32, W/32, 8C)
        return x.flatten(1, 2)  # (B, N, C)

    def forward(self, images):
        return self.norm(self.forward_features(images))  # (B, N, C)


# ============================================================================= the frozen teacher
class Teacher(nn.Module):
    """A frozen teacher: images in [0, 1] (B, 3, H, W) -> its output tokens after its own final norm (B, 1+N, C),
    class token included (Swin has none), before whitening; images resized to its input size (patch 14 for 16)."""

    def __init__(self, encoder, source="random weights"):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.embed_dim, self.num_prefix_tokens = encoder.embed_dim, encoder.num_prefix_tokens
        self.input_size = encoder.arch["img_size"]
        self.source = source  # where its weights came from, recorded with the student
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # always in eval mode: no drop path, fixed norms

    def compute_in(self, dtype):
        """Store the linear and convolution weights in the autocast dtype, None for fp32 (norms stay fp32): autocast
        caches only the casts of weights that require grad, and would cast these again every step, to the same bits."""
        for module in self.modules():
            if dtype is not None and isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
        return self

    def forward(self, images):
        if images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size,) * 2, mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        return self.encoder(images)


# ============================================================================= fine-tuning
class Classifier(nn.Module):
    """An encoder with a linear head, pooled as the official code pools: a ViT (main_finetune.py) the patch tokens'
    mean before the final norm (removed), then a fresh `fc_norm`; a Swin (swin_transformer_v2.py) the mean after its
    own final norm. `linear_probe`: a BatchNorm without affine parameters before the head (MAE's linear probe).
    `pooling` is recorded: files of earlier versions, whose Swin classifiers pooled as the ViT, rebuild as trained."""

    def __init__(self, encoder, num_classes, linear_probe=False, pooling=None):
        super().__init__()
        pooling = pooling or ("norm_then_mean" if "depths" in encoder.arch else "mean_then_fc_norm")
        self.arch = dict(encoder=encoder.arch, num_classes=num_classes, linear_probe=linear_probe, pooling=pooling)
        self.encoder = encoder  # registered first: the parameter order, hence the optimizer's state, as ever
        self.fc_norm = nn.Identity()
        if pooling == "mean_then_fc_norm":
            self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=encoder.norm.eps)
            encoder.norm = nn.Identity()
        if linear_probe:
            self.fc_norm = nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        with torch.no_grad():  # the ViT's head starts 1000 times smaller (init_scale), the official Swin's does not
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            self.head.weight.mul_(1.0 if "depths" in encoder.arch else 0.001)
            nn.init.zeros_(self.head.bias)

    def forward(self, images):
        tokens = self.encoder(images)  # (B, prefix + N, C), after the final norm when it is kept
        return self.head(self.fc_norm(tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1)))


# ============================================================================= named sizes, builders
# (embed dim, depth, heads[, mlp ratio, else 4]) and (embed dim, depths, heads); "micro" is for tests. ViT "giant" is
# EVA's and timm's ViT-g/14 (MLP 48/11 x 1408), not DINOv2's SwiGLU one; Swin "giant" is SwinV2-G (SwinV2, Table 1).
VIT_SIZES = {"micro": (32, 2, 2), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
             "large": (1024, 24, 16), "huge": (1280, 32, 16), "giant": (1408, 40, 16, 48 / 11)}
SWIN_SIZES = {"micro": (32, (2, 2), (2, 4)), "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
              "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)), "giant": (512, (2, 2, 42, 4), (16, 32, 64, 128))}


def parse_vit_name(name):
    """'vit_small_patch16' -> ('small', 16)."""
    match = re.fullmatch(r"vit_(\w+)_patch(\d+)", name)
    if not match or match[1] not in VIT_SIZES:
        sizes = ", ".join(f"vit_{s}_patch16" for s in VIT_SIZES)
        raise ValueError(f"unknown ViT name {name!r}: expected one of {sizes} (or patch 14, 8, ...)")
    return match[1], int(match[2])


def swin_arch(name, img_size=224, drop_path=0.0):
    """The arch of a named Swin: 'swinv2_base_window14', the FD-EsViT student (a bias MLP per block, as the official
    config: USE_SHARED_RPB False), 'swinv2_base_window14_shared' (one per stage), 'swin_base_window14' (EsViT's V1)."""
    match = re.fullmatch(r"(swin|swinv2)_(\w+?)_window(\d+)(_shared)?", name)
    if not match or match[2] not in SWIN_SIZES or (match[4] and match[1] == "swin"):
        sizes = ", ".join(f"swinv2_{s}_window7" for s in SWIN_SIZES)
        raise ValueError(f"unknown Swin name {name!r}: expected one of {sizes}, another window, '_shared' at the "
                         f"end for one position-bias MLP per stage, or 'swin_' in front for version 1")
    embed_dim, depths, num_heads = SWIN_SIZES[match[2]]
    version = 2 if match[1] == "swinv2" else 1
    # LayerNorm eps: EsViT trained its V1 with 1e-6 (FD's rebuild keeps 1e-5, a negligible difference); V2 uses 1e-5.
    return dict(version=version, img_size=img_size, patch_size=4, embed_dim=embed_dim, depths=list(depths),
                num_heads=list(num_heads), window_size=int(match[3]),
                position_bias="shared" if match[4] else "per_block", drop_path=drop_path,
                norm_eps=1e-5 if version == 2 else 1e-6, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def swin_stage_windows(arch, img_size=None):
    """The window of every stage of a Swin `arch` at img_size (its own by default), shrunk to a smaller map."""
    side = (img_size or arch["img_size"]) // arch["patch_size"]
    return [min(arch["window_size"], side // 2 ** i) for i in range(len(arch["depths"]))]


def build_student(name, img_size, drop_path=0.0):
    """A randomly initialised FD student, e.g. ('vit_base_patch16', 224, 0.2) or ('swinv2_base_window14', 224, 0.3)."""
    if name.startswith("swin"):
        return SwinTransformer(**swin_arch(name, img_size, drop_path))
    size, patch_size = parse_vit_name(name)
    return VisionTransformer(img_size, patch_size, *VIT_SIZES[size], drop_path=drop_path)
