"""Models for Feature Distillation: the ViT student with one shared relative position bias, and
the frozen teacher that gives the distillation target.

Reading order: building blocks (drop path, MLP, relative position bias, attention, block), the
Vision Transformer that both student and teacher are made of, named sizes, then the builders
(`build_student`, `build_teacher`) and our own model files.

Every model takes images in [0, 1] and normalises them itself, so that each teacher can bring its
own input statistics (CLIP's differ from ImageNet's) while the data pipeline stays the same.
"""
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
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


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
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
        qkv_bias = self.qkv.bias
        if self.q_bias is not None:
            qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if bias is not None:
            bias = bias.to(q.dtype)
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
                 drop_path=0.0, norm_eps=1e-6, rel_pos_grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
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


class VisionTransformer(nn.Module):
    """A ViT that maps images in [0, 1] (B, 3, H, W) to its output tokens (B, 1+N, C) after the
    final norm, class token first.

    The FD student (the defaults) has no absolute position embedding and one relative position
    bias shared by all blocks; `rel_pos="per_block"` gives every block its own (fine-tuning).
    The plain ViT teacher uses `abs_pos=True, rel_pos=None, qv_bias=False, layer_scale=None`.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, rel_pos="shared", abs_pos=False, qv_bias=True, layer_scale=0.1,
                 drop_path=0.0, norm_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if rel_pos not in ("shared", "per_block", None):
            raise ValueError(f"rel_pos must be 'shared', 'per_block' or None, not {rel_pos!r}")
        # Everything needed to build this model again, as plain data: it is saved with the weights.
        self.arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, rel_pos=rel_pos, abs_pos=abs_pos,
                         qv_bias=qv_bias, layer_scale=layer_scale, drop_path=drop_path,
                         norm_eps=norm_eps, mean=list(mean), std=list(std))
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.num_prefix_tokens = 1  # the class token in front of the patch tokens
        self.grid = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid[0] * self.grid[1]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim)) if abs_pos else None
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if rel_pos == "shared" else None
        drop_rates = torch.linspace(0, drop_path, depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qv_bias, layer_scale, drop_rates[i], norm_eps,
                  rel_pos_grid=self.grid if rel_pos == "per_block" else None)
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
        if self.pos_embed is not None:
            trunc_normal(self.pos_embed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, images, return_attn=False):
        """images (B, 3, H, W) in [0, 1] -> tokens after the final norm (B, 1+N, C); with
        return_attn also a list with each block's attention probabilities (B, heads, 1+N, 1+N)."""
        x, attns = self.forward_features(images, return_attn=True) if return_attn else (
            self.forward_features(images), None)
        x = self.norm(x)
        return (x, attns) if return_attn else x

    def forward_features(self, images, return_attn=False):
        """Like forward, without the final norm (fine-tuning pools these tokens instead)."""
        x = self.patch_embed((images - self.mean) / self.std)  # (B, C, h, w)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"this model was built for {self.grid[0] * self.patch_size} px images, "
                             f"got {tuple(images.shape[-2:])}")
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        # The shared bias is gathered from its table once per forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        attns = []
        for block in self.blocks:
            x, attn = block(x, bias, return_attn)
            attns.append(attn)
        return (x, attns) if return_attn else x


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


def vit_size(name):
    """'vit_small_patch16' -> dict(embed_dim=384, depth=12, num_heads=6, patch_size=16)."""
    match = re.fullmatch(r"vit_(\w+)_patch(\d+)", name)
    if not match or match[1] not in VIT_SIZES:
        sizes = ", ".join(f"vit_{s}_patch16" for s in VIT_SIZES)
        raise ValueError(f"unknown ViT name {name!r}: expected one of {sizes} (or patch 14, 8, ...)")
    embed_dim, depth, num_heads = VIT_SIZES[match[1]]
    return dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=int(match[2]))


def build_student(name, img_size, drop_path=0.0):
    """A randomly initialised FD student, e.g. build_student('vit_base_patch16', 224, 0.2)."""
    if name.startswith("swin"):
        raise NotImplementedError(f"--student {name}: the SwinV2 student is not written yet; "
                                  f"pick a ViT student such as --student vit_base_patch16")
    return VisionTransformer(img_size=img_size, drop_path=drop_path, **vit_size(name))


def plain_vit(name, img_size):
    """A plain ViT (absolute position embedding, qkv bias, no LayerScale): the built-in teacher."""
    return VisionTransformer(img_size=img_size, rel_pos=None, abs_pos=True, qv_bias=False,
                             layer_scale=None, **vit_size(name))


def load_model_file(path):
    """Rebuild a model from a file this project wrote ({'arch': ..., 'model': state_dict}), such as
    a distilled `student.pth`. Loads with weights_only=True and strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: not a model file written by this project (expected the keys "
                         f"'arch' and 'model', found {found})")
    model = build_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model


def build_from_arch(arch):
    """The model described by an `arch` dict saved with its weights (an encoder or a Classifier)."""
    if "encoder" in arch:
        return Classifier(build_from_arch(arch["encoder"]), arch["num_classes"], arch["linear_probe"])
    return VisionTransformer(**arch)


# The teachers of the paper's recipes. Reading their published checkpoints (OpenAI CLIP's TorchScript
# archive, DINO/DeiT/EsViT pickles) is not written yet; until then they must come as model files.
PUBLISHED_TEACHERS = ("clip", "clip_l14", "dino", "deit", "esvit")


def load_pretrained(name, weights=None, img_size=None):
    """A pretrained encoder to fine-tune or analyse (trainable, in train mode): a teacher name
    with optional weights file, or a model file this project wrote."""
    model = build_teacher(name, img_size or 224, weights)
    return model.train().requires_grad_(True)


def build_teacher(name, img_size, weights=None):
    """The frozen teacher, in eval mode: images in [0, 1] (B, 3, H, W) -> its output tokens after
    its own final norm (B, 1+N, C), class token included, before whitening.

    `name` is a plain ViT such as 'vit_tiny_patch16'. Without `weights` it has random weights drawn
    from a fixed seed, so every process of a distributed run builds the same teacher; with
    `weights`, a model file this project wrote gives both the architecture and the weights.
    """
    if weights:
        teacher = load_model_file(weights)
    elif name in PUBLISHED_TEACHERS:
        raise NotImplementedError(
            f"--teacher {name}: loading the published {name} checkpoint is not supported yet. Give "
            f"--teacher-weights FILE (a model file this project wrote) to use its recipe, or pick a plain "
            f"ViT teacher such as --teacher vit_base_patch16 (random weights)")
    else:
        with torch.random.fork_rng(devices=[]):  # a fixed teacher without disturbing the caller's RNG
            torch.manual_seed(0)
            teacher = plain_vit(name, img_size)
    teacher.eval().requires_grad_(False)
    return teacher
