"""Teachers as teachers.py reads them: the published files in each publisher's layout (timm, DINO, DeiT, DINOv2,
OpenAI CLIP's TorchScript archives, open_clip, torchvision, EsViT, Hugging Face transformers folders of CLIP, SigLIP
and DINOv2), checked against forwards written here from the raw tensors and against the libraries themselves; their
input statistics; bad files and failed downloads; model files of this project used as teachers. transformers is a
test-only dependency (`pip install transformers`); the tests that need it skip without it.
"""
import argparse
import collections
import hashlib
import json
import math
import pathlib
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diagnose
import distill
import finetune
import teachers
from conftest import (ESVIT_TINY, MICRO, REPO, distill_cli_in_process, export_command, layer_norm, normalise, parse,
                      reference_window_attention, scaled, timm_layout, vit)
from models import Classifier, SwinTransformer, VisionTransformer, build_student
from teachers import build_from_arch, esvit_to_swin, load_model_file, load_pretrained, load_teacher


# ----------------------------------------------------------------------------- published layouts, written here
# Published layouts written here from each publisher's own naming (OpenAI clip/model.py, torchvision, EsViT; timm's
# and DINOv2's in conftest.py), not from teachers.py.
def openai_clip_layout(width, layers, patch, grid, text_width, text_layers, embed, context=77, vocab=49408,
                       make=torch.randn):
    """The state dict of an OpenAI CLIP file, text tower included."""
    sd = {"positional_embedding": make(context, text_width), "text_projection": make(text_width, embed),
          "logit_scale": make(1).reshape(()), "visual.class_embedding": make(width),
          "visual.positional_embedding": make(1 + grid * grid, width), "visual.proj": make(width, embed),
          "visual.conv1.weight": make(width, 3, patch, patch), "visual.ln_pre.weight": make(width),
          "visual.ln_pre.bias": make(width)}

    def blocks(prefix, w, n):
        for i in range(n):
            p = f"{prefix}resblocks.{i}."
            sd.update({p + "ln_1.weight": make(w), p + "ln_1.bias": make(w), p + "attn.in_proj_weight": make(3 * w, w),
                       p + "attn.in_proj_bias": make(3 * w), p + "attn.out_proj.weight": make(w, w),
                       p + "attn.out_proj.bias": make(w), p + "ln_2.weight": make(w), p + "ln_2.bias": make(w),
                       p + "mlp.c_fc.weight": make(4 * w, w), p + "mlp.c_fc.bias": make(4 * w),
                       p + "mlp.c_proj.weight": make(w, 4 * w), p + "mlp.c_proj.bias": make(w)})
    blocks("visual.transformer.", width, layers)
    sd.update({"visual.ln_post.weight": make(width), "visual.ln_post.bias": make(width)})
    blocks("transformer.", text_width, text_layers)
    sd.update({"token_embedding.weight": make(vocab, text_width), "ln_final.weight": make(text_width),
               "ln_final.bias": make(text_width)})
    return sd


def torchvision_layout(width, depth, patch, grid, classes=1000, make=torch.randn):
    sd = {"class_token": make(1, 1, width), "conv_proj.weight": make(width, 3, patch, patch),
          "conv_proj.bias": make(width), "encoder.pos_embedding": make(1, 1 + grid * grid, width)}
    for i in range(depth):
        p = f"encoder.layers.encoder_layer_{i}."
        sd.update({p + "ln_1.weight": make(width), p + "ln_1.bias": make(width),
                   p + "self_attention.in_proj_weight": make(3 * width, width),
                   p + "self_attention.in_proj_bias": make(3 * width),
                   p + "self_attention.out_proj.weight": make(width, width),
                   p + "self_attention.out_proj.bias": make(width), p + "ln_2.weight": make(width),
                   p + "ln_2.bias": make(width), p + "mlp.0.weight": make(4 * width, width),
                   p + "mlp.0.bias": make(4 * width), p + "mlp.3.weight": make(width, 4 * width),
                   p + "mlp.3.bias": make(width)})
    sd.update({"encoder.ln.weight": make(width), "encoder.ln.bias": make(width),
               "heads.head.weight": make(classes, width), "heads.head.bias": make(classes)})
    return sd


def esvit_backbone_layout(img_size, patch_size, embed_dim, depths, num_heads, window_size):
    """Key -> shape of EsViT's Swin backbone (official layout, index tables included)."""
    shapes = {"patch_embed.proj.weight": (embed_dim, 3, patch_size, patch_size),
              "patch_embed.proj.bias": (embed_dim,), "patch_embed.norm.weight": (embed_dim,),
              "patch_embed.norm.bias": (embed_dim,)}
    size = img_size // patch_size
    for i, depth in enumerate(depths):
        dim, w = embed_dim * 2 ** i, min(window_size, size)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shapes.update({
                p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, num_heads[i]),
                p + "attn.relative_position_index": (w * w, w * w),
                p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (4 * dim, dim), p + "mlp.fc1.bias": (4 * dim,),
                p + "mlp.fc2.weight": (dim, 4 * dim), p + "mlp.fc2.bias": (dim,)})
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            shapes.update({p + "reduction.weight": (2 * dim, 4 * dim), p + "norm.weight": (4 * dim,),
                           p + "norm.bias": (4 * dim,)})
        size //= 2
    final = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({"norm.weight": (final,), "norm.bias": (final,)})
    return shapes


def meta(*shape):
    return torch.empty(shape, device="meta")


PUBLISHED_LAYOUTS = {  # full-size key layouts of the published files, as meta tensors (no memory)
    "clip": lambda: openai_clip_layout(768, 12, 16, 14, 512, 12, 512, make=meta),
    "clip_l14": lambda: openai_clip_layout(1024, 24, 14, 16, 768, 12, 768, make=meta),
    "dino": lambda: timm_layout(768, 12, 16, 14, make=meta),
    "deit": lambda: {"model": timm_layout(768, 12, 16, 14, classes=1000, make=meta)},
    "dinov2_vitb14": lambda: timm_layout(768, 12, 14, 37, dinov2=True, make=meta),
    "dinov2_vitb14_reg4": lambda: timm_layout(768, 12, 14, 37, dinov2=True, registers=4, make=meta),
    "tv_vit_b_16": lambda: torchvision_layout(768, 12, 16, 14, make=meta),
    "tv_vit_l_16": lambda: torchvision_layout(1024, 24, 16, 14, make=meta),
}


def write_safetensors(tensors, path):
    codes = {torch.float32: "F32", torch.float16: "F16"}
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


# ----------------------------------------------------------------------------- reference forwards
# Input statistics typed in from their sources, never read from the project they check:
# ImageNet's as timm (timm/data/constants.py), torchvision (its ViT weights' transforms) and DINO use them;
# OpenAI's CLIP's from clip/clip.py, _transform.
IMAGENET_MEAN_REF, IMAGENET_STD_REF = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN_REF, CLIP_STD_REF = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def reference_vit(sd, images, heads, mean=IMAGENET_MEAN_REF, std=IMAGENET_STD_REF, eps=1e-6, registers=0):
    """A ViT forward from the raw tensors of a timm / DINO / DINOv2-layout state dict: the tokens
    after the final norm, class token and patches (registers dropped)."""
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    weight = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, weight, sd.get("patch_embed.proj.bias"), stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    if registers:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(len(x), -1, -1), x[:, 1:]], 1)
    (b, t, c), d = x.shape, x.shape[-1] // heads
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
        h = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
        h = h.transpose(1, 2).reshape(b, t, c) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + h * sd.get(p + "ls1.gamma", 1.0)
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h * sd.get(p + "ls2.gamma", 1.0)
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], eps)
    return torch.cat([x[:, :1], x[:, 1 + registers:]], 1)


class QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenAIBlock(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(collections.OrderedDict(c_fc=torch.nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                                               c_proj=torch.nn.Linear(4 * width, width)))

    def forward(self, x):  # (tokens, batch, width), as OpenAI's code
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyOpenAICLIP(torch.nn.Module):
    """OpenAI's CLIP with its attribute names (so its TorchScript archive has the published layout),
    small. forward gives the FD target: every image token after ln_post."""

    def __init__(self, width=128, heads=2, patch=16, grid=2, text_width=64, embed=32):
        super().__init__()
        self.visual = torch.nn.Module()
        v = self.visual
        v.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        v.class_embedding = torch.nn.Parameter(0.05 * torch.randn(width))
        v.positional_embedding = torch.nn.Parameter(0.05 * torch.randn(1 + grid * grid, width))
        v.ln_pre, v.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        v.transformer = torch.nn.Module()
        v.transformer.resblocks = torch.nn.Sequential(*[OpenAIBlock(width, heads) for _ in range(2)])
        v.proj = torch.nn.Parameter(torch.randn(width, embed))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.Sequential(*[OpenAIBlock(text_width, 2) for _ in range(2)])
        self.token_embedding = torch.nn.Embedding(100, text_width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(8, text_width))
        self.ln_final = torch.nn.LayerNorm(text_width)
        self.text_projection = torch.nn.Parameter(torch.randn(text_width, embed))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))

    def forward(self, images):
        v = self.visual
        x = (images - torch.tensor(CLIP_MEAN_REF).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD_REF).view(1, 3, 1, 1)
        x = v.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding
        x = v.transformer.resblocks(v.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return v.ln_post(x)


def reference_swin_v1(state, images, depths, heads, window, eps=1e-6):
    """EsViT's Swin V1 forward from the raw tensors: pre-norm blocks, patch merging (norm, then
    reduction) after every stage but the last, final norm."""
    mean, std = torch.tensor(IMAGENET_MEAN_REF).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD_REF).view(1, 3, 1, 1)
    x = F.conv2d((images - mean) / std, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=4)
    x = layer_norm(x.permute(0, 2, 3, 1), state, "patch_embed.norm", eps)
    for i, depth in enumerate(depths):
        size = x.shape[1]
        w = min(window, size)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            shift = w // 2 if j % 2 and size > window else 0
            table = state[p + "attn.relative_position_bias_table"].view(2 * w - 1, 2 * w - 1, -1)
            x = x + reference_window_attention(
                layer_norm(x, state, p + "norm1", eps), w, shift, heads[i], state[p + "attn.qkv.weight"],
                state[p + "attn.qkv.bias"], state[p + "attn.proj.weight"], state[p + "attn.proj.bias"], table)
            hidden = F.gelu(layer_norm(x, state, p + "norm2", eps) @ state[p + "mlp.fc1.weight"].T
                            + state[p + "mlp.fc1.bias"])
            x = x + hidden @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        if i < len(depths) - 1:
            p = f"layers.{i}.downsample."
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
            x = layer_norm(x, state, p + "norm", eps) @ state[p + "reduction.weight"].T
    return layer_norm(x.flatten(1, 2), state, "norm", eps)


# ----------------------------------------------------------------------------- tiny Hugging Face folders
# Input statistics, typed in from their sources.
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # openai/CLIP clip/clip.py
SIGLIP_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # google/siglip-base-patch16-224 preprocessor_config.json
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # facebook/dinov2-base preprocessor_config.json
ODD_STATS = ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3))  # a preprocessor_config.json of our own: it must be read

WIDTH, DEPTH, HEADS, MLP = 64, 2, 2, 128
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=8)


def save_safetensors(tensors, path):
    """The safetensors format: an 8-byte little-endian header length, a JSON header, the raw data. Written here, not
    with export.write_safetensors: the fixtures must not share a mistake with the reader they test."""
    codes = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().numpy().tobytes()
        header[name] = dict(dtype=codes[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blob)])
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def encoder_layers(prefix, width, depth, mlp):
    """CLIP's and SigLIP's encoder layers (transformers' modeling_clip.py / modeling_siglip.py names)."""
    shapes = {}
    for i in range(depth):
        p = f"{prefix}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{proj}.weight": (width, width), f"{p}self_attn.{proj}.bias": (width,)})
        shapes.update({f"{p}layer_norm1.weight": (width,), f"{p}layer_norm1.bias": (width,),
                       f"{p}mlp.fc1.weight": (mlp, width), f"{p}mlp.fc1.bias": (mlp,),
                       f"{p}mlp.fc2.weight": (width, mlp), f"{p}mlp.fc2.bias": (width,),
                       f"{p}layer_norm2.weight": (width,), f"{p}layer_norm2.bias": (width,)})
    return shapes


def clip_like_layout(family, full, grid=2, patch=16):
    """CLIPVisionModel / SiglipVisionModel keys; with `full`, CLIPModel / SiglipModel: the same under vision_model.,
    plus the text tower, its projections and the logit scale (and bias)."""
    v = "vision_model." if full else ""
    shapes = {f"{v}embeddings.class_embedding": (WIDTH,)} if family == "clip" else {}
    shapes[f"{v}embeddings.patch_embedding.weight"] = (WIDTH, 3, patch, patch)
    if family == "siglip":
        shapes[f"{v}embeddings.patch_embedding.bias"] = (WIDTH,)
    shapes[f"{v}embeddings.position_embedding.weight"] = ((family == "clip") + grid * grid, WIDTH)
    if family == "clip":
        shapes.update({f"{v}pre_layrnorm.weight": (WIDTH,), f"{v}pre_layrnorm.bias": (WIDTH,)})
    shapes.update(encoder_layers(v, WIDTH, DEPTH, MLP))
    shapes.update({f"{v}post_layernorm.weight": (WIDTH,), f"{v}post_layernorm.bias": (WIDTH,)})
    if family == "siglip":  # the attention-pooling head (MAP), after the FD target
        shapes.update({f"{v}head.probe": (1, 1, WIDTH), f"{v}head.attention.in_proj_weight": (3 * WIDTH, WIDTH),
                       f"{v}head.attention.in_proj_bias": (3 * WIDTH,), f"{v}head.attention.out_proj.weight":
                       (WIDTH, WIDTH), f"{v}head.attention.out_proj.bias": (WIDTH,),
                       f"{v}head.layernorm.weight": (WIDTH,), f"{v}head.layernorm.bias": (WIDTH,),
                       f"{v}head.mlp.fc1.weight": (MLP, WIDTH), f"{v}head.mlp.fc1.bias": (MLP,),
                       f"{v}head.mlp.fc2.weight": (WIDTH, MLP), f"{v}head.mlp.fc2.bias": (WIDTH,)})
    if full:
        t = TEXT["hidden_size"]
        shapes.update({"text_model.embeddings.token_embedding.weight": (TEXT["vocab_size"], t),
                       "text_model.embeddings.position_embedding.weight": (TEXT["max_position_embeddings"], t)})
        shapes.update(encoder_layers("text_model.", t, TEXT["num_hidden_layers"], TEXT["intermediate_size"]))
        shapes.update({"text_model.final_layer_norm.weight": (t,), "text_model.final_layer_norm.bias": (t,)})
        if family == "clip":
            shapes.update({"visual_projection.weight": (16, WIDTH), "text_projection.weight": (16, t),
                           "logit_scale": ()})
        else:
            shapes.update({"text_model.head.weight": (t, t), "text_model.head.bias": (t,), "logit_scale": (1,),
                           "logit_bias": (1,)})
    return shapes


def dinov2_layout(registers=0, published_names=True, grid=2, patch=14):
    """Dinov2Model / Dinov2WithRegistersModel keys: as the published facebook/dinov2-* files name the attention
    (attention.attention.query, ..., attention.output.dense), or as transformers 5 names it (q_proj, ..., o_proj)."""
    shapes = {"embeddings.cls_token": (1, 1, WIDTH), "embeddings.mask_token": (1, WIDTH),
              "embeddings.position_embeddings": (1, 1 + grid * grid, WIDTH)}
    if registers:
        shapes["embeddings.register_tokens"] = (1, registers, WIDTH)
    shapes.update({"embeddings.patch_embeddings.projection.weight": (WIDTH, 3, patch, patch),
                   "embeddings.patch_embeddings.projection.bias": (WIDTH,)})
    names = (["attention.attention.query", "attention.attention.key", "attention.attention.value",
              "attention.output.dense"] if published_names else
             ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"])
    for i in range(DEPTH):
        p = f"encoder.layer.{i}."
        shapes.update({f"{p}norm1.weight": (WIDTH,), f"{p}norm1.bias": (WIDTH,)})
        for name in names:
            shapes.update({f"{p}{name}.weight": (WIDTH, WIDTH), f"{p}{name}.bias": (WIDTH,)})
        shapes.update({f"{p}layer_scale1.lambda1": (WIDTH,), f"{p}norm2.weight": (WIDTH,), f"{p}norm2.bias": (WIDTH,),
                       f"{p}mlp.fc1.weight": (MLP, WIDTH), f"{p}mlp.fc1.bias": (MLP,), f"{p}mlp.fc2.weight":
                       (WIDTH, MLP), f"{p}mlp.fc2.bias": (WIDTH,), f"{p}layer_scale2.lambda1": (WIDTH,)})
    shapes.update({"layernorm.weight": (WIDTH,), "layernorm.bias": (WIDTH,)})
    return shapes


def fill(shapes, seed=0):
    """Random tensors of a trained model's scale: norms near 1, LayerScale near 0.1, the rest small."""
    g = torch.Generator().manual_seed(seed)
    def make(name, shape):
        x = torch.randn(shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            return 1 + 0.1 * x
        return 0.1 + 0.02 * x if name.endswith("lambda1") else 0.1 * x
    return {name: make(name, shape) for name, shape in shapes.items()}


def vision_config(family, registers=0):
    """config.json of a tiny tower, the keys transformers writes for these models."""
    if family == "dinov2":
        return dict(model_type="dinov2_with_registers" if registers else "dinov2", hidden_size=WIDTH, mlp_ratio=2,
                    num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=28, patch_size=14,
                    hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0, qkv_bias=True,
                    use_swiglu_ffn=False, **(dict(num_register_tokens=registers) if registers else {}))
    return dict(model_type=f"{family}_vision_model", hidden_size=WIDTH, intermediate_size=MLP,
                num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=32, patch_size=16,
                hidden_act="quick_gelu" if family == "clip" else "gelu_pytorch_tanh",
                layer_norm_eps=1e-5 if family == "clip" else 1e-6)


# name: (family, full model file, registers, DINOv2 published names, stats in preprocessor_config.json, stats used)
CASES = {"clip_vision": ("clip", False, 0, True, CLIP_STATS, CLIP_STATS),
         "clip_full": ("clip", True, 0, True, None, CLIP_STATS),  # no preprocessor_config.json: CLIP's defaults
         "siglip_vision": ("siglip", False, 0, True, ODD_STATS, ODD_STATS),
         "siglip_full": ("siglip", True, 0, True, None, SIGLIP_STATS),
         "dinov2": ("dinov2", False, 0, True, IMAGENET_STATS, IMAGENET_STATS),
         "dinov2_reg4": ("dinov2", False, 4, False, None, IMAGENET_STATS)}


def write_model(folder, case, seed=0, published_names=None):
    """A transformers model folder: config.json, model.safetensors, maybe preprocessor_config.json. -> raw tensors.
    `published_names` overrides the case's choice of DINOv2 names."""
    family, full, registers, case_names, stats, _ = CASES[case]
    published_names = case_names if published_names is None else published_names
    folder.mkdir(parents=True, exist_ok=True)
    shapes = (dinov2_layout(registers, published_names) if family == "dinov2" else clip_like_layout(family, full))
    sd = fill(shapes, seed)
    config = vision_config(family, registers)
    if full:  # a CLIPModel / SiglipModel config nests its towers' configs
        text_config = dict(TEXT, model_type=f"{family}_text_model")
        config = dict(model_type=family, vision_config=config, text_config=text_config,
                      **(dict(projection_dim=16) if family == "clip" else {}))
        if family == "clip":  # older published files kept this buffer
            sd["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    (folder / "config.json").write_text(json.dumps(config))
    if stats:
        (folder / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=stats[0], image_std=stats[1])))
    save_safetensors(sd, folder / "model.safetensors")
    return sd


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
               "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
               "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + torch.tanh((2 / math.pi) ** 0.5 * (x + 0.044715 * x**3)))}


def reference_forward(sd, case, images, grid):
    """Every output token after the tower's final norm, from the file's tensors by their names: CLIP and SigLIP as
    in transformers' modeling_clip.py / modeling_siglip.py (CLIP's post_layernorm on all tokens), DINOv2 as in
    modeling_dinov2.py (bicubically resized positions, registers dropped from the output)."""
    family, _, registers, _, _, (mean, std) = CASES[case]
    v = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    def get(*names):  # the first of names that the file holds (DINOv2's two namings)
        return next(v[n] for n in names if n in v)
    def layer_norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], v[name + ".weight"], v[name + ".bias"], eps)
    eps, act = {"clip": (1e-5, "quick_gelu"), "siglip": (1e-6, "gelu_pytorch_tanh"), "dinov2": (1e-6, "gelu")}[family]
    x = normalise(images, mean, std)
    w = get("embeddings.patch_embedding.weight", "embeddings.patch_embeddings.projection.weight")
    b = v.get("embeddings.patch_embedding.bias", v.get("embeddings.patch_embeddings.projection.bias"))
    x = F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)  # (B, N, C)
    pos = get("embeddings.position_embedding.weight", "embeddings.position_embeddings").reshape(-1, WIDTH)
    cls = get("embeddings.class_embedding", "embeddings.cls_token").reshape(1, 1, WIDTH) if family != "siglip" else None
    prefix = 0 if cls is None else 1
    side = math.isqrt(pos.shape[0] - prefix)
    if side != grid:
        patches = pos[prefix:].reshape(1, side, side, WIDTH).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:prefix], patches.permute(0, 2, 3, 1).reshape(grid * grid, WIDTH)])
    if cls is not None:
        x = torch.cat([cls.expand(len(x), -1, -1), x], dim=1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], v["embeddings.register_tokens"].expand(len(x), -1, -1), x[:, 1:]], dim=1)
    if family == "clip":
        x = layer_norm(x, "pre_layrnorm", eps)
    for i in range(DEPTH):
        if family == "dinov2":
            p = f"encoder.layer.{i}."
            norm1, norm2 = p + "norm1", p + "norm2"
            q, k, val, o = [p + n for n in (("attention.attention.query", "attention.attention.key",
                            "attention.attention.value", "attention.output.dense") if p + "attention.attention.query"
                            ".weight" in v else ("attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                 "attention.o_proj"))]
            scale1, scale2 = v[p + "layer_scale1.lambda1"], v[p + "layer_scale2.lambda1"]
        else:
            p = f"encoder.layers.{i}."
            norm1, norm2 = p + "layer_norm1", p + "layer_norm2"
            q, k, val, o = [p + f"self_attn.{n}_proj" for n in ("q", "k", "v", "out")]
            scale1 = scale2 = 1.0
        h = layer_norm(x, norm1, eps)
        heads = [F.linear(h, v[n + ".weight"], v[n + ".bias"]).unflatten(-1, (HEADS, -1)).transpose(1, 2)
                 for n in (q, k, val)]  # (B, heads, T, d)
        probs = (heads[0] @ heads[1].transpose(-2, -1) / math.sqrt(WIDTH // HEADS)).softmax(-1)
        attended = (probs @ heads[2]).transpose(1, 2).flatten(2)
        x = x + scale1 * F.linear(attended, v[o + ".weight"], v[o + ".bias"])
        h = layer_norm(x, norm2, eps)
        h = ACTIVATIONS[act](F.linear(h, v[p + "mlp.fc1.weight"], v[p + "mlp.fc1.bias"]))
        x = x + scale2 * F.linear(h, v[p + "mlp.fc2.weight"], v[p + "mlp.fc2.bias"])
    x = layer_norm(x, "layernorm" if family == "dinov2" else "post_layernorm", eps)
    return torch.cat([x[:, :1], x[:, 1 + registers:]], dim=1) if registers else x


TRANSFORMERS_MODELS = {"clip_vision": "CLIPVisionModel", "clip_full": "CLIPModel", "siglip_vision": "SiglipVisionModel",
                       "siglip_full": "SiglipModel", "dinov2": "Dinov2Model", "dinov2_reg4": "Dinov2WithRegistersModel"}


# ----------------------------------------------------------------------------- published files
@pytest.mark.parametrize("name", sorted(PUBLISHED_LAYOUTS))
def test_published_layout_fits_the_teacher_architecture_exactly(name):
    published = teachers.unwrap_state_dict(PUBLISHED_LAYOUTS[name](), name)
    converted = teachers.CONVERTERS[teachers.TEACHERS[name]["layout"]](published)
    with torch.device("meta"):
        expected = teachers.build_from_arch(teachers.TEACHERS[name]["arch"]).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


@pytest.mark.parametrize("layout", ["dino", "deit_full_checkpoint", "dinov2_registers", "timm_registers"])
def test_timm_and_dinov2_files_match_an_independent_forward(tmp_path, layout):
    registers = 4 if "registers" in layout else 0
    sd = scaled(timm_layout(128, 2, 16, 2, classes=10 if "deit" in layout else 0, dinov2="dinov2" in layout,
                            registers=registers if "dinov2" in layout else 0))
    saved = sd
    if layout == "deit_full_checkpoint":  # DeiT: {'model': ..., 'optimizer': ..., 'epoch': ...}
        saved = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299, "args": argparse.Namespace(lr=1e-3)}
    if layout == "timm_registers":  # timm keeps no class position and folds it into cls_token
        sd = dict(scaled(timm_layout(128, 2, 16, 2)), register_tokens=torch.randn(1, 4, 128) * 0.05)
        saved = {k: v for k, v in sd.items() if k not in ("register_tokens", "pos_embed", "cls_token")}
        saved.update(reg_token=sd["register_tokens"], pos_embed=sd["pos_embed"][:, 1:],
                     cls_token=sd["cls_token"] + sd["pos_embed"][:, :1])
    torch.save(saved, tmp_path / "teacher.pth")
    teacher = load_teacher("timm", tmp_path / "teacher.pth", grid=2)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(teacher(images), reference_vit(sd, images, heads=2, registers=registers),
                               rtol=1e-4, atol=1e-4)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_openai_clip_torchscript_archive_read_without_jit_matches_the_original(tmp_path):
    torch.manual_seed(0)
    clip = TinyOpenAICLIP().eval()
    with torch.no_grad():  # OpenAI stores convolutions, linears and projections in fp16
        for param in clip.parameters():
            param.add_(0.02 * torch.randn_like(param))
        for module in clip.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.MultiheadAttention)):
                module.half().float()
        clip.visual.proj.copy_(clip.visual.proj.half().float())
    images = torch.rand(2, 3, 32, 32)
    expected = clip(images)
    archive = torch.jit.trace(clip, images)
    for name, param in archive.named_parameters():  # as OpenAI's convert_weights: not the norms and embeddings
        if not any(part in name for part in ("ln_", "embedding", "logit_scale")):
            param.data = param.data.half()
    archive.save(str(tmp_path / "ViT-tiny.pt"))

    with zipfile.ZipFile(tmp_path / "ViT-tiny.pt") as zf:
        tensors = teachers.read_torchscript(zf)
    reference = torch.jit.load(str(tmp_path / "ViT-tiny.pt")).state_dict()
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) and tensors[k].dtype == reference[k].dtype for k in reference)
    assert tensors["visual.conv1.weight"].dtype == torch.float16

    teacher = load_teacher("open_clip_quickgelu", tmp_path / "ViT-tiny.pt", grid=2)
    torch.testing.assert_close(teacher(images), expected, rtol=1e-4, atol=1e-4)
    # With GELU instead of QuickGELU the tokens are measurably off: the activation matters.
    wrong = load_teacher("open_clip", tmp_path / "ViT-tiny.pt", grid=2)
    assert (wrong(images) - expected).abs().max() > 1e-3


def test_open_clip_bin_and_safetensors_files_load_the_same_teacher(tmp_path):
    sd = scaled(openai_clip_layout(128, 2, 16, 2, 64, 1, 32, context=8, vocab=50))
    sd = {k: v.half() if k.endswith("weight") and v.ndim == 2 else v for k, v in sd.items()}
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    write_safetensors(sd, tmp_path / "open_clip_model.safetensors")
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "epoch_32.pt")
    images = torch.rand(2, 3, 32, 32)
    outputs = [load_teacher("open_clip", tmp_path / f, grid=2)(images)
               for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "epoch_32.pt")]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_torchvision_vit_file_matches_torchvision(tmp_path):
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                              hidden_dim=128, mlp_dim=512, num_classes=10).eval()
    with torch.no_grad():
        for param in tv.parameters():
            param.add_(0.02 * torch.randn_like(param))
    torch.save(tv.state_dict(), tmp_path / "vit_tiny.pth")
    images = torch.rand(2, 3, 32, 32)
    x = tv._process_input((images - torch.tensor(IMAGENET_MEAN_REF).view(1, 3, 1, 1))
                          / torch.tensor(IMAGENET_STD_REF).view(1, 3, 1, 1))
    with torch.no_grad():
        expected = tv.encoder(torch.cat([tv.class_token.expand(2, -1, -1), x], 1))
    torch.testing.assert_close(load_teacher("torchvision", tmp_path / "vit_tiny.pth", grid=2)(images), expected,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["clip", "clip_l14"])
def test_clip_teachers_normalise_with_clip_statistics(name):
    # OpenAI's clip/clip.py, _transform: Normalize((0.48145466, 0.4578275, 0.40821073),
    # (0.26862954, 0.26130258, 0.27577711)); a one-block tower of the teacher's arch keeps them.
    tower = build_from_arch(dict(teachers.TEACHERS[name]["arch"], depth=1, embed_dim=64, num_heads=1))
    assert tower.mean.flatten().tolist() == pytest.approx(CLIP_MEAN_REF, abs=1e-7)
    assert tower.std.flatten().tolist() == pytest.approx(CLIP_STD_REF, abs=1e-7)


def test_teacher_of_another_grid_resizes_positions_and_input_to_the_student_grid(tmp_path):
    sd = scaled(timm_layout(128, 2, 14, 4))  # patch 14, 56 px: a 4x4 grid, like CLIP-L/14 for a /16 student
    torch.save(sd, tmp_path / "teacher.pth")
    teacher = load_teacher("timm", tmp_path / "teacher.pth", grid=3)
    assert teacher.input_size == 42 and teacher.encoder.grid == (3, 3)
    pos = sd["pos_embed"][0]
    grid = pos[1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(9, 128)
    torch.testing.assert_close(teacher.encoder.pos_embed[0], torch.cat([pos[:1], resized]))
    images = torch.rand(2, 3, 48, 48)  # a student with patch 16 at 48 px also has a 3x3 grid
    assert teacher(images).shape == (2, 10, 128)


def test_loading_a_timm_layout_teacher_at_another_size_warns_nothing(tmp_path):
    # timm's layout (vision_transformer.py): ours but for patch_embed.proj; a 64 px file for a 32 px student.
    native = build_from_arch(dict(teachers.teacher_arch("micro", 16, img_size=64), embed_dim=64, num_heads=1))
    torch.save({k.replace("patch_embed.", "patch_embed.proj."): v for k, v in native.state_dict().items()},
               tmp_path / "timm.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. load_state_dict's 'copying ... to a meta parameter ..., which is a no-op'
        teacher = load_teacher("timm", tmp_path / "timm.pth", grid=2)
    assert teacher.encoder.pos_embed.shape == (1, 5, 64)
    torch.testing.assert_close(teacher.encoder.cls_token, native.cls_token)


def test_distill_with_a_published_layout_teacher_records_its_checksum(tmp_path):
    torch.save(scaled(timm_layout(128, 1, 8, 4)), tmp_path / "dino_tiny.pth")
    args = parse(*MICRO, "--teacher", "timm", "--teacher-weights", str(tmp_path / "dino_tiny.pth"), "--epochs", "1",
                 "--out", str(tmp_path / "run"))
    distill.main(args)
    saved = torch.load(tmp_path / "run" / "student.pth", weights_only=True)
    assert saved["teacher"][0]["sha256"] == hashlib.sha256((tmp_path / "dino_tiny.pth").read_bytes()).hexdigest()
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["projector"]["weight"].shape == (128, 32)  # student width 32 -> teacher width 128


# ----------------------------------------------------------------------------- EsViT
def test_esvit_checkpoint_loads_strictly_and_matches_an_independent_forward(tmp_path, monkeypatch):
    layout = esvit_backbone_layout(**ESVIT_TINY)
    torch.manual_seed(0)
    backbone = {}
    for key, shape in layout.items():
        if key.endswith("relative_position_index"):  # the official offsets -> table row
            w = math.isqrt(shape[0])
            cells = [(r, c) for r in range(w) for c in range(w)]
            backbone[key] = torch.tensor([[(r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)
                                           for r2, c2 in cells] for r1, c1 in cells])
        elif "norm" in key and key.endswith("weight"):
            backbone[key] = 1 + 0.3 * torch.randn(shape)
        else:
            backbone[key] = 0.3 * torch.randn(shape)
    heads = {f"{head}.{name}": torch.randn(shape) for head in ("head", "head_dense") for name, shape in [
        ("mlp.0.weight", (64, 256)), ("mlp.0.bias", (64,)), ("mlp.4.weight", (16, 64)),
        ("last_layer.weight_g", (128, 1)), ("last_layer.weight_v", (128, 16))]}
    student = {"module." + k: v for k, v in {**backbone, **heads}.items()}
    teacher = {k: torch.zeros_like(v) for k, v in {**backbone, **heads}.items()}  # the EMA teacher: not used by FD
    torch.save({"student": student, "teacher": teacher, "epoch": 300, "args": argparse.Namespace(arch="swin_base")},
               tmp_path / "checkpoint.pth")

    model = SwinTransformer(version=1, position_bias="per_block", norm_eps=1e-6, **ESVIT_TINY).eval()
    expected_keys = [(k, s) for k, s in layout.items() if not k.endswith("relative_position_index")]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected_keys
    with pytest.raises(pickle.UnpicklingError):  # the pickled Namespace needs the safe way around
        torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    loaded = teachers.read_checkpoint(tmp_path / "checkpoint.pth")["student"]
    model.load_state_dict(esvit_to_swin(loaded))  # strict
    images = torch.rand(2, 3, 64, 64)
    expected = reference_swin_v1(backbone, images, ESVIT_TINY["depths"], ESVIT_TINY["num_heads"], 4)
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    assert model(images).shape == (2, 4, 256)
    # The same file through the teacher loader, as `--teacher esvit` reads it (with a tiny architecture).
    tiny = dict(teachers.TEACHERS["esvit"], arch=dict(model.arch, img_size=64))
    monkeypatch.setitem(teachers.TEACHERS, "esvit", tiny)
    torch.testing.assert_close(load_teacher("esvit", tmp_path / "checkpoint.pth")(images), expected,
                               rtol=1e-4, atol=1e-4)

    bad = dict(loaded)
    bad["module.layers.0.blocks.0.attn.relative_position_index"] = backbone[
        "layers.0.blocks.0.attn.relative_position_index"].T
    with pytest.raises(ValueError, match="relative position layout"):
        esvit_to_swin(bad)


def test_esvit_swin_b_layout_fits_the_teacher_architecture_exactly():
    layout = esvit_backbone_layout(224, 4, 128, [2, 2, 18, 2], [4, 8, 16, 32], 14)
    with torch.device("meta"):
        teacher = teachers.build_from_arch(teachers.TEACHERS["esvit"]["arch"])
    assert {k: tuple(v.shape) for k, v in teacher.state_dict().items()} == {
        k: shape for k, shape in layout.items() if not k.endswith("relative_position_index")}
    assert sum(v.numel() for v in teacher.state_dict().values()) == 86_917_944  # timm's Swin-B/W14 count


# ----------------------------------------------------------------------------- Hugging Face teachers
@pytest.mark.parametrize("case", CASES)
def test_hf_teacher_matches_an_independent_forward(tmp_path, case):
    sd = write_model(tmp_path / case, case)
    family, patch = CASES[case][0], 14 if CASES[case][0] == "dinov2" else 16
    torch.manual_seed(0)
    for grid in (2, 3):  # the file's own grid, and another one: positions resized
        teacher = load_teacher("hf", tmp_path / case, grid=grid)
        assert teacher.input_size == grid * patch and teacher.embed_dim == WIDTH
        assert teacher.num_prefix_tokens == (family != "siglip")  # SigLIP has no class token
        assert teacher.source == str(tmp_path / case / "model.safetensors")
        images = torch.rand(2, 3, grid * patch, grid * patch)
        with torch.no_grad():
            tokens = teacher(images)
        assert tokens.shape == (2, (family != "siglip") + grid * grid, WIDTH)
        torch.testing.assert_close(tokens, reference_forward(sd, case, images, grid), rtol=1e-4, atol=1e-4)
    # The target pairs tokens: no class token in a SigLIP target, patches on the student's grid.
    target = distill.distillation_target(teacher, images, (grid, grid), with_cls=family != "siglip")
    assert target.shape == tokens.shape


@pytest.mark.parametrize("case", CASES)
def test_hf_teacher_matches_transformers(tmp_path, case):
    """transformers loads the very folder with nothing missing or left over (so the tiny files are in the published
    layout) and gives the same tokens: CLIP's last_hidden_state after post_layernorm, SigLIP's and DINOv2's
    last_hidden_state (without DINOv2's registers)."""
    transformers = pytest.importorskip("transformers")
    # The hub's names, which every transformers 5 loads (5.17, for one, knows no q_proj names for DINOv2).
    write_model(tmp_path / case, case, published_names=True)
    family, _, registers, _, _, (mean, std) = CASES[case]
    model, info = getattr(transformers, TRANSFORMERS_MODELS[case]).from_pretrained(
        tmp_path / case, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.endswith("position_ids") for k in info["unexpected_keys"]), info
    tower = model.vision_model if case.endswith("_full") else model
    # At another grid, transformers' Dinov2Model resizes its positions as we do (bicubic); Dinov2WithRegistersModel
    # resizes them with antialiasing, as the official DINOv2 code does for its register models; we do not.
    grids = (2, 3) if case == "dinov2" else (2,)
    patch = 14 if family == "dinov2" else 16
    for grid in grids:
        images = torch.rand(2, 3, grid * patch, grid * patch)
        pixels = normalise(images, mean, std)
        with torch.no_grad():
            expected = tower.eval()(pixel_values=pixels).last_hidden_state
            if family == "clip":  # transformers normalises only the pooled class token; FD's target is all tokens
                expected = (tower.vision_model if hasattr(tower, "vision_model") else tower).post_layernorm(expected)
            if registers:
                expected = torch.cat([expected[:, :1], expected[:, 1 + registers:]], dim=1)
            tokens = load_teacher("hf", tmp_path / case, grid=grid)(images)
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)


def test_weights_as_a_file_a_bin_and_in_fp16(tmp_path):
    sd = write_model(tmp_path / "siglip", "siglip_vision")
    images = torch.rand(2, 3, 32, 32)
    expected = load_teacher("hf", tmp_path / "siglip", grid=2)(images)
    # the .safetensors file named directly, config.json beside it
    torch.testing.assert_close(load_teacher("hf", tmp_path / "siglip" / "model.safetensors", grid=2)(images), expected,
                               rtol=0, atol=0)
    (tmp_path / "bin").mkdir()  # an older folder: pytorch_model.bin (read with weights_only=True)
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / "bin" / name).write_bytes((tmp_path / "siglip" / name).read_bytes())
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    teacher = load_teacher("hf", tmp_path / "bin", grid=2)
    assert teacher.source == str(tmp_path / "bin" / "pytorch_model.bin")
    torch.testing.assert_close(teacher(images), expected, rtol=0, atol=0)
    save_safetensors({k: v.half() for k, v in sd.items()}, tmp_path / "siglip" / "model.safetensors")  # fp16 file
    torch.testing.assert_close(load_teacher("hf", tmp_path / "siglip", grid=2)(images), expected, rtol=0, atol=2e-2)


def test_bad_hf_folders_give_clear_errors(tmp_path):
    sd = write_model(tmp_path / "clip", "clip_vision")
    (tmp_path / "no_config").mkdir()
    save_safetensors(sd, tmp_path / "no_config" / "model.safetensors")
    for path in (tmp_path / "no_config", tmp_path / "no_config" / "model.safetensors"):
        with pytest.raises(FileNotFoundError, match=r"no_config/config.json: no such file.*beside model.safetensors"):
            load_teacher("hf", path)
    def with_config(name, **config):
        (tmp_path / name).mkdir()
        save_safetensors(sd, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name
    with pytest.raises(ValueError, match=r"config.json: model_type 'beit' is not a layout the hf teacher reads"):
        load_teacher("hf", with_config("beit", model_type="beit"))
    with pytest.raises(ValueError, match=r"SigLIP 2 NaFlex model \(siglip2\) has no fixed patch grid"):
        load_teacher("hf", with_config("naflex", model_type="siglip2"))
    with pytest.raises(ValueError, match=r"activation 'relu' is not supported"):
        load_teacher("hf", with_config("relu", **dict(vision_config("clip"), hidden_act="relu")))
    # CLIP weights under a SigLIP config: the strict load names what does not fit
    with pytest.raises(ValueError, match=r"model.safetensors does not fit this model \(missing: patch_embed.bias; "
                                         r"unexpected: cls_token, norm_pre.bias"):
        load_teacher("hf", with_config("wrong", **vision_config("siglip")))
    with pytest.raises(ValueError, match=r"does not fit this model \(missing: blocks.2.attn"):  # a deeper config
        load_teacher("hf", with_config("deeper", **dict(vision_config("clip"), num_hidden_layers=3)))
    (tmp_path / "clip" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip/model.safetensors: no such file"):
        load_teacher("hf", tmp_path / "clip")
    with pytest.raises(ValueError, match=r"--teacher hf reads any file of its layout: give it with --teacher-weights"):
        load_teacher("hf")
    with pytest.raises(ValueError, match=r"--teacher hf has no fixed architecture"):
        load_teacher("hf", "random")


def test_hf_encoders_for_finetuning_and_diagnosis(tmp_path):
    write_model(tmp_path / "siglip", "siglip_vision")
    write_model(tmp_path / "dinov2", "dinov2_reg4")
    images = torch.rand(2, 3, 48, 48)
    for name in ("siglip", "dinov2"):
        encoder = load_pretrained("hf", tmp_path / name, img_size=48 if name == "siglip" else 42)
        rebuilt = build_from_arch(encoder.arch)  # the arch is plain data that rebuilds the same model
        rebuilt.load_state_dict(encoder.state_dict())
        assert rebuilt.arch == encoder.arch and rebuilt.num_prefix_tokens == encoder.num_prefix_tokens
        x = images[..., :encoder.arch["img_size"], :encoder.arch["img_size"]]
        torch.testing.assert_close(rebuilt(x), encoder(x), rtol=0, atol=0)
    # finetune.py --init hf --init-weights FOLDER: a classifier on the SigLIP tower (mean of its patch tokens)
    args = finetune.apply_recipe(finetune.get_args_parser().parse_args(
        ["--init", "hf", "--init-weights", str(tmp_path / "siglip"), "--img-size", "48"]))
    classifier = finetune.build_classifier(args, num_classes=5, verbose=False)
    assert classifier(images).shape == (2, 5) and classifier.encoder.num_prefix_tokens == 0
    # diagnose.py --model SigLIP=hf:FOLDER: attention maps over the 3x3 patches alone
    [(label, _, model)], img_size = diagnose.load_models([f"SigLIP=hf:{tmp_path / 'siglip'}"], 48)
    tokens, maps = diagnose.attention_maps(model, images)
    assert label == "SigLIP" and tokens.shape == (2, 9, WIDTH) and maps[0].shape == (2, HEADS, 9, 9)


@pytest.mark.parametrize("case", ["siglip_vision", "dinov2_reg4"])
def test_distill_with_an_hf_teacher_folder(tmp_path, case):
    write_model(tmp_path / case, case)
    args = distill.get_args_parser().parse_args([
        "--teacher", "hf", "--teacher-weights", str(tmp_path / case), "--student", "vit_micro_patch8",
        "--img-size", "16", "--synthetic-images", "16", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--amp", "fp32", "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu", "--out", str(tmp_path / "run")])
    distill.main(args)
    saved = torch.load(tmp_path / "run" / "student.pth", weights_only=True)
    weights = tmp_path / case / "model.safetensors"
    assert saved["teacher"][0]["weights"] == str(weights)
    assert saved["teacher"][0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(entry["loss"]) for entry in log)
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["projector"]["weight"].shape == (WIDTH, 32)  # student width 32 -> teacher width 64


# ----------------------------------------------------------------------------- model files of this project as teachers
def test_encoders_of_classifiers_and_checkpoints_serve_as_teachers(distilled, tmp_path):
    student = load_model_file(distilled / "student.pth").eval()
    classifier = Classifier(load_model_file(distilled / "student.pth"), 10)
    torch.save({"arch": classifier.arch, "model": classifier.state_dict()}, tmp_path / "classifier.pth")
    images = torch.rand(2, 3, 32, 32)
    from_checkpoint = load_teacher("mine", distilled / "checkpoint.pth", grid=4)
    torch.testing.assert_close(from_checkpoint(images), student(images))
    from_classifier = load_teacher("mine", tmp_path / "classifier.pth", grid=4)
    torch.testing.assert_close(from_classifier.encoder.forward_features(images), student.forward_features(images))
    huge = teachers.convert_timm(timm_layout(1280, 1, 14, 2, make=meta))
    assert teachers.infer_vit_arch(huge)["num_heads"] == 16
    with pytest.raises(ValueError, match="width 100: its number of heads is unknown"):
        teachers.infer_vit_arch(teachers.convert_timm(timm_layout(100, 1, 14, 2, make=meta)))


def test_a_model_file_of_another_architecture_than_its_name_is_refused(tmp_path):
    torch.save({"arch": vit().arch, "model": vit().state_dict()}, tmp_path / "student.pth")
    with pytest.raises(ValueError, match=r"student.pth holds a ViT of width 32, depth 2, patch 16, but the name it is "
                                         r"given with, vit_base_patch16, is a ViT of width 768, depth 12, patch 16"):
        load_teacher("vit_base_patch16", tmp_path / "student.pth")
    with pytest.raises(ValueError, match=r"is a Swin of width 32, depths \[2, 2\], window 4"):
        load_teacher("swinv2_micro_window4", tmp_path / "student.pth")
    assert load_teacher("vit_micro_patch16", tmp_path / "student.pth").embed_dim == 32  # its own name, or a label:
    assert load_teacher("my_teacher", tmp_path / "student.pth").embed_dim == 32  # accepted


def test_a_model_file_with_a_missing_and_an_extra_key_is_refused(tmp_path):
    state = torch.load(REPO / "testdata" / "student.pth", weights_only=True)
    del state["model"]["norm.bias"]
    state["model"]["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="norm.bias") as error:
        load_model_file(tmp_path / "bad.pth")
    assert "extra.weight" in str(error.value)


# ----------------------------------------------------------------------------- bad files and downloads, in one line
def test_bad_teacher_files_give_clear_errors_and_run_no_code(tmp_path, monkeypatch):
    torch.save(timm_layout(64, 1, 16, 2), tmp_path / "dino.pth")
    with pytest.raises(ValueError, match=r"dino.pth does not fit.*missing: .*blocks.0.attn.qkv.weight"):
        load_teacher("dino", tmp_path / "dino.pth")  # the file of a smaller model
    with pytest.raises(ValueError, match="dino.pth does not fit the openai_clip layout .*missing: patch_embed"):
        load_teacher("open_clip", tmp_path / "dino.pth")  # another layout
    data = (tmp_path / "dino.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth: not a readable checkpoint, probably truncated"):
        load_teacher("timm", tmp_path / "truncated.pth")
    # A pickle whose payload would call pathlib.Path.touch on a canary file. The attempt is detected without
    # running anything: Path.touch is replaced by a spy that only records (unpickling looks the global up by
    # name, so even a reader that allowed it would call the spy), and the reader must refuse the global.
    canary, attempts = tmp_path / "canary", []

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (canary,)
    torch.save({"model": timm_layout(64, 1, 16, 2), "payload": Payload()}, tmp_path / "evil.pth")
    monkeypatch.setattr(pathlib.Path, "touch", lambda *args, **kwargs: attempts.append(args))
    with pytest.raises(ValueError, match=r"evil.pth: refused: .*builtins.getattr, .*pathlib.Path.*"
                                         r"Nothing from it was executed"):
        load_teacher("timm", tmp_path / "evil.pth")
    assert attempts == [] and not canary.exists()
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_teacher("timm", tmp_path / "nowhere.pth")
    # A fixed-architecture teacher given the file of a smaller model, for a student of another grid: the
    # key list, before any position embedding is resized.
    torch.save(torchvision_layout(64, 1, 16, 2), tmp_path / "tv_small.pth")
    with pytest.raises(ValueError, match=r"tv_small.pth does not fit this model \(missing: blocks.1.*"
                                           r"pos_embed \(1, 5, 64\) \(model \(1, 197, 768\)\)"):
        load_teacher("tv_vit_b_16", tmp_path / "tv_small.pth", grid=3)
    # Files named .safetensors that are not: text, a renamed .pth, a truncated download.
    good = tmp_path / "good.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good.write_bytes(len(header).to_bytes(8, "little") + header + torch.arange(4.0).numpy().tobytes())
    assert torch.equal(teachers.read_checkpoint(good)["w"], torch.arange(4.0).view(2, 2))
    (tmp_path / "text.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\n")
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "dino.pth").read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-4])
    for name in ("text", "renamed", "cut"):
        with pytest.raises(ValueError, match=rf"{name}.safetensors: not a readable checkpoint"):
            load_teacher("timm", tmp_path / f"{name}.safetensors")

    def offline(url, dst, hash_prefix=None):
        raise OSError("network unreachable")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    path = tmp_path / "cache" / "hub" / "checkpoints" / "dino_vitbase16_pretrain.pth"
    with pytest.raises(OSError, match=f"fetch https://dl.fbaipublicfiles.com/dino/.*pth yourself and put it at {path}"):
        load_teacher("dino")


def test_a_text_file_named_pth_is_one_line_for_distill_and_export(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.pth"
    notes.write_text("hello\nnot weights\n")  # read as a legacy pickle, its bytes are opcodes: KeyError 101 ('e')
    # Both commands in this process (conftest.py); distill.py with a micro student, which it builds before reading the
    # teacher (the default, a ViT-B at 224 px, would only add seconds).
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, "--teacher", "timm", "--teacher-weights", str(notes), "--student",
                               "vit_micro_patch8", "--img-size", "32", "--device", "cpu", "--out", str(tmp_path / "o"))
    error = capsys.readouterr().err
    assert status.value.code == 2 and len(error.splitlines()) == 1, error
    assert error.startswith(f"distill.py: error: {notes}: ") and "not a readable checkpoint" in error
    done = export_command(notes, "--out", tmp_path / "x")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"export.py: error: {notes}: ") and "not a readable checkpoint" in done.stderr


def test_an_offline_download_is_one_line_naming_the_url_and_the_way_out(tmp_path, monkeypatch, capsys):
    import urllib.error

    def offline(url, path, hash_prefix=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, "--teacher", "clip", "--student", "vit_micro_patch8", "--img-size", "32",
                               "--out", str(tmp_path / "run"))
    error = capsys.readouterr().err
    assert status.value.code == 2 and len(error.splitlines()) == 1, error
    assert error.startswith("distill.py: error: could not download the clip teacher (<urlopen error")
    assert teachers.TEACHERS["clip"]["url"] in error and "or pass it with --teacher-weights FILE" in error


# ----------------------------------------------------------------------------- the encoder as fine-tuned
TABLE = "rel_pos_bias.relative_position_bias_table"  # the student's shared table


def test_shared_bias_copied_into_every_block_keeps_the_encoder_output():
    torch.manual_seed(0)
    student = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        student.rel_pos_bias.relative_position_bias_table.normal_()
    source = student.state_dict()
    state = teachers.encoder_for_finetuning(source, student.arch, 32)
    for i in range(2):
        assert torch.equal(state[f"blocks.{i}.{TABLE}"], source[TABLE])
    assert TABLE in source and TABLE not in state and "norm.weight" not in state  # pure: the input is unchanged
    state[f"blocks.0.{TABLE}"].add_(1)  # each block owns its copy
    assert torch.equal(state[f"blocks.1.{TABLE}"], source[TABLE])
    state[f"blocks.0.{TABLE}"].sub_(1)
    per_block = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  rel_pos="per_block").eval()
    result = per_block.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["norm.bias", "norm.weight"] and not result.unexpected_keys
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(per_block.forward_features(images), student.forward_features(images))


def test_relative_position_table_resized_bicubically_keeping_class_rows():
    heads = 3
    table = torch.randn((2 * 3 - 1) * (2 * 4 - 1) + 3, heads)  # a 3 x 4 grid of patches
    assert torch.equal(teachers.resize_rel_pos_table(table, (3, 4), (3, 4)), table)
    resized = teachers.resize_rel_pos_table(table, (3, 4), (5, 6))
    assert resized.shape == ((2 * 5 - 1) * (2 * 6 - 1) + 3, heads)
    # Independent reference: the offsets as a (heads, 5, 7) image, row offset major (relative_position_index).
    image = table[:-3].T.reshape(1, heads, 5, 7)
    expected = F.interpolate(image, size=(9, 11), mode="bicubic", align_corners=False).reshape(heads, -1).T
    torch.testing.assert_close(resized[:-3], expected)
    assert torch.equal(resized[-3:], table[-3:])


def test_absolute_position_embedding_resized_keeping_the_class_token():
    pos_embed = torch.randn(1, 1 + 4 * 4, 8)
    assert torch.equal(teachers.resize_pos_embed(pos_embed, (4, 4), (4, 4)), pos_embed)
    resized = teachers.resize_pos_embed(pos_embed, (4, 4), (6, 6))
    assert resized.shape == (1, 1 + 36, 8) and torch.equal(resized[:, 0], pos_embed[:, 0])
    image = pos_embed[0, 1:].T.reshape(1, 8, 4, 4)
    expected = F.interpolate(image, size=(6, 6), mode="bicubic", align_corners=False).reshape(8, 36).T
    torch.testing.assert_close(resized[0, 1:], expected)


def test_swin_v1_tables_follow_a_window_that_grows_with_the_image():
    torch.manual_seed(0)
    teacher = SwinTransformer(version=1, img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=8,
                              position_bias="per_block")  # stage maps 8 and 4: the second window clipped to 4
    state = teachers.encoder_for_finetuning(teacher.state_dict(), teacher.arch, 64)  # maps 16 and 8: windows 8, 8
    model = build_from_arch(teachers.finetuning_arch(teacher.arch, 64, 0.0))
    model.load_state_dict(dict(state, **{k: v for k, v in model.state_dict().items() if k.startswith("norm.")}))
    table = teacher.state_dict()["layers.1.blocks.0.attn.relative_position_bias_table"]  # (7 x 7, heads)
    expected = F.interpolate(table.T.reshape(1, 2, 7, 7), size=(15, 15), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["layers.1.blocks.0.attn.relative_position_bias_table"],
                               expected.reshape(2, 225).T)
    assert torch.equal(state["layers.0.blocks.0.attn.relative_position_bias_table"],
                       teacher.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"])


def test_swinv2_keeps_its_offset_scale_when_its_window_grows():
    student = build_student("swinv2_micro_window8_shared", 32)  # stage windows 8 and 4 (clipped to the 4x4 map)
    arch = teachers.finetuning_arch(student.arch, 64, 0.0)  # at 64 px: windows 8 and 8
    model = build_from_arch(arch)
    assert arch["pretrained_windows"] == [8, 4] and model.layers[1].window == 8
    grown = model.layers[1].blocks[0].rel_pos_bias.relative_coords_table.view(15, 15, 2)
    trained = student.layers[1].rel_pos_bias.relative_coords_table.view(7, 7, 2)
    assert torch.equal(grown[4:11, 4:11], trained)  # offsets up to 3: the inputs the MLP was trained on
    assert grown.abs().max() > trained.abs().max()  # larger offsets extrapolate beyond them
