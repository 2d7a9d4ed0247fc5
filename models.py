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


class VisionTransformer(nn.Module):
    """A ViT that maps images in [0, 1] (B, 3, H, W) to its output tokens (B, 1+N, C) after the
    final norm, class token first.

    The FD student (the defaults) has no absolute position embedding and one relative position
    bias shared by all blocks; `rel_pos="per_block"` gives every block its own (fine-tuning).
    The teachers are the same model with other options (see TEACHERS): absolute position
    embedding, a full qkv bias, no LayerScale (DINOv2 has one), QuickGELU and a LayerNorm before
    the blocks (`norm_pre`, OpenAI CLIP's ln_pre), no patch-embedding bias (CLIP), and register
    tokens (DINOv2): extra tokens after the class token that the output drops.
    """

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
        if self.reg_tokens is not None:  # registers have no position (DINOv2)
            x = torch.cat([x[:, :1], self.reg_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        # The shared bias is gathered from its table once per forward, not once per block.
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        attns = []
        for block in self.blocks:
            x, attn = block(x, bias, return_attn)
            attns.append(attn)
        if self.reg_tokens is not None:
            x = torch.cat([x[:, :1], x[:, 1 + self.reg_tokens.shape[1]:]], dim=1)
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


def parse_vit_name(name):
    """'vit_small_patch16' -> ('small', 16)."""
    match = re.fullmatch(r"vit_(\w+)_patch(\d+)", name)
    if not match or match[1] not in VIT_SIZES:
        sizes = ", ".join(f"vit_{s}_patch16" for s in VIT_SIZES)
        raise ValueError(f"unknown ViT name {name!r}: expected one of {sizes} (or patch 14, 8, ...)")
    return match[1], int(match[2])


def build_student(name, img_size, drop_path=0.0):
    """A randomly initialised FD student, e.g. build_student('vit_base_patch16', 224, 0.2)."""
    if name.startswith("swin"):
        raise NotImplementedError(f"--student {name}: the SwinV2 student is not written yet; "
                                  f"pick a ViT student such as --student vit_base_patch16")
    size, patch_size = parse_vit_name(name)
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, drop_path=drop_path)


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
    # Any file of these layouts, its architecture read from the tensor shapes (heads = width / 64).
    "timm": dict(layout="timm", act="gelu"),
    "open_clip": dict(layout="openai_clip", act="gelu"),  # open_clip's own models use nn.GELU
    "open_clip_quickgelu": dict(layout="openai_clip", act="quick_gelu"),  # OpenAI weights in open_clip files
    "torchvision": dict(layout="torchvision", act="gelu"),
}
PAPER_TEACHERS = ("clip", "clip_l14", "dino", "deit", "esvit")


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


CONVERTERS = {"openai_clip": convert_openai_clip, "timm": convert_timm, "torchvision": convert_torchvision}


def infer_vit_arch(state, act="gelu"):
    """The architecture of a converted ViT state dict, from its tensor shapes."""
    embed_dim = state["cls_token"].shape[-1]
    patch_size = state["patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    clip_like = "norm_pre.weight" in state  # CLIP towers: LayerNorm eps 1e-5 and CLIP statistics
    stats = dict(mean=CLIP_MEAN, std=CLIP_STD) if clip_like else {}
    return dict(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim,
                depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}), num_heads=embed_dim // 64,
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
    source = name
    if name in TEACHERS:
        spec = TEACHERS[name]
        state = None
        if weights != "random":
            path = Path(weights) if weights else teacher_weights_file(name)
            prefer = ("student",) + WRAPPER_KEYS if name == "esvit" else WRAPPER_KEYS
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
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and "arch" in state):
            raise ValueError(f"{weights}: not a model file of this project; for a published checkpoint name its "
                             f"layout with --teacher ({', '.join(TEACHERS)})")
        arch, state, source = state["arch"], state["model"], str(weights)
    else:  # a plain ViT of a named size, random weights
        try:
            arch, state = teacher_arch(*parse_vit_name(name)), None
        except ValueError:
            raise ValueError(f"unknown teacher {name!r}: expected one of {', '.join(TEACHERS)}, a plain ViT such as "
                             f"vit_base_patch16 (random weights), or a model file of this project as weights") from None

    if grid is not None:
        img_size = grid * arch["patch_size"]
    if img_size and img_size != arch["img_size"] and arch.get("abs_pos") and not arch.get("rel_pos"):
        if state is not None:
            old_grid, new_grid = (arch["img_size"] // arch["patch_size"],) * 2, (img_size // arch["patch_size"],) * 2
            pos = state["pos_embed"][0]
            state["pos_embed"] = torch.cat([pos[:1], resize_grid(pos[1:], old_grid, new_grid)])[None]
        arch["img_size"] = img_size
    with torch.random.fork_rng(devices=[]):  # the same random weights on every process
        torch.manual_seed(0)
        model = build_from_arch(arch)
    if state is not None:
        load_strict(model, state, source)
    model.source = source
    return model


class Teacher(nn.Module):
    """A frozen teacher: images in [0, 1] (B, 3, H, W) -> its output tokens after its own final
    norm (B, 1+N, C), class token included, before whitening. Images are resized to the
    teacher's input size when it differs (a teacher with patch 14 for a student with patch 16)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.embed_dim = encoder.embed_dim
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
