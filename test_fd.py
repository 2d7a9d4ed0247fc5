"""Smoke and correctness tests on micro models: python -m pytest -q test_fd.py

Each test checks behaviour against an independent computation written here, not against the code
under test; subprocess tests run the real torchrun.
"""
import argparse
import collections
import colorsys
import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import checkpoints
import diagnose
import distill
import finetune
import models
import training
from conftest import distill_cli_in_process, stop_signals_restored
from checkpoints import esvit_to_swin, load_model_file, load_pretrained, load_teacher, shared_bias_to_per_block
from data import SeededTransform, SyntheticShapes, fd_transform, image_dataset
from diagnose import attention_maps
from models import (Attention, Classifier, SWIN_SIZES, SwinTransformer, VisionTransformer, build_from_arch,
                    build_student, log_spaced_offsets, relative_position_index, window_partition,
                    window_position_index, window_reverse)

REPO = Path(__file__).resolve().parent
# The micro runs train on the CPU, also on a GPU machine: they are compared with CPU computations here.
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32",
         "--synthetic-images", "64", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--amp", "fp32",
         "--warmup-epochs", "0.5", "--device", "cpu"]
# The GPU tier: tests of the paths only a GPU takes (at the end of this file), skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier: needs a CUDA GPU")


def parse(*argv):
    return distill.get_args_parser().parse_args(list(argv))


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def micro_pair(drop_path=0.0, seed=0):
    torch.manual_seed(seed)
    teacher = load_teacher("vit_micro_patch8", grid=4)
    model = distill.FDStudent(build_student("vit_micro_patch8", 32, drop_path), [teacher.embed_dim])
    return teacher, model


@contextlib.contextmanager
def crash_at_call(monkeypatch, module, name, n):
    """Within the block, the n-th call of module.name raises KeyboardInterrupt, as a crash would; with
    one loss per optimizer step, a crash at step n."""
    real, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, crashing)
    try:
        yield
    finally:
        monkeypatch.setattr(module, name, real)


def fd_closure(teacher):
    """The loss distill.main computes for the micro ViT pair (every token, class token included)."""
    return lambda model, images: distill.fd_loss(model(images)[0], distill.distillation_target(teacher, images, (4, 4)))


# ----------------------------------------------------------------------------- models
def test_relative_position_index_layout():
    h, w = 3, 4
    index = relative_position_index(h, w)
    num_offsets = (2 * h - 1) * (2 * w - 1)
    assert index.shape == (1 + h * w, 1 + h * w)
    assert (index[0, 1:] == num_offsets).all()  # class -> token
    assert (index[1:, 0] == num_offsets + 1).all()  # token -> class
    assert index[0, 0] == num_offsets + 2
    # Patch pairs share an entry exactly when their (row, column) offsets are equal.
    cells = [(r, c) for r in range(h) for c in range(w)]
    entry_of_offset = {}
    for i, (ri, ci) in enumerate(cells):
        for j, (rj, cj) in enumerate(cells):
            entry = entry_of_offset.setdefault((ri - rj, ci - cj), index[1 + i, 1 + j].item())
            assert index[1 + i, 1 + j] == entry
    assert len(set(entry_of_offset.values())) == num_offsets == len(entry_of_offset)
    assert min(entry_of_offset.values()) == 0 and max(entry_of_offset.values()) == num_offsets - 1


def test_sdpa_path_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    dim, heads, n = 32, 4, 10
    attn = Attention(dim, heads, qv_bias=True)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x, bias = torch.randn(2, n, dim), torch.randn(heads, n, n)
    # Independent reference: softmax(Q K^T / sqrt(d) + B) V with q and v biases, k unbiased.
    w = attn.qkv.weight
    q = x @ w[:dim].T + attn.q_bias
    k = x @ w[dim:2 * dim].T
    v = x @ w[2 * dim:].T + attn.v_bias
    split = lambda t: t.view(2, n, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads) + bias, dim=-1)
    reference = attn.proj((probs @ v).transpose(1, 2).reshape(2, n, dim))

    fused = attn(x, bias)
    attn.keep_probs = True  # the explicit path, which keeps the probabilities
    explicit, returned = attn(x, bias), attn.probs
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returned, probs, atol=1e-6, rtol=1e-5)


def test_model_attention_path_returns_probabilities_and_same_tokens():
    torch.manual_seed(0)
    model = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.rand(2, 3, 32, 32)
    tokens, attns = attention_maps(model, images)
    torch.testing.assert_close(tokens, model(images), atol=1e-5, rtol=1e-5)
    assert tokens.shape == (2, 1 + 16, 32) and len(attns) == 2
    assert attns[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attns[1].sum(-1), torch.ones(2, 2, 17))
    with pytest.raises(ValueError, match="32 px"):
        model(torch.rand(1, 3, 48, 48))


def test_shared_bias_copied_into_every_block_keeps_the_function():
    # Fine-tuning gives every block its own table, each starting as a copy of the shared one.
    torch.manual_seed(0)
    shared = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        shared.rel_pos_bias.relative_position_bias_table.normal_()
    per_block = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  rel_pos="per_block").eval()
    state = shared.state_dict()
    table = state.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(2):
        state[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"] = table.clone()
    per_block.load_state_dict(state)
    assert per_block.rel_pos_bias is None
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(per_block(images), shared(images))


def test_official_initialisation():
    model = build_student("vit_tiny_patch16", 224)
    table = model.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 14 - 1) ** 2 + 3, 3) and (table == 0).all()
    assert (model.blocks[5].gamma_1 == 0.1).all() and not hasattr(model, "pos_embed")
    assert "rel_pos_bias.index" not in model.state_dict()  # index tables are not saved
    # Output projections shrink as 1/sqrt(2 (i+1)): block 3's are half as large as block 0's.
    ratio = model.blocks[0].mlp.fc2.weight.std() / model.blocks[3].mlp.fc2.weight.std()
    assert abs(ratio - 2.0) < 0.05
    # A normal of std .02 truncated at one std (the official FD student): std .02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
    phi1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    expected_std = 0.02 * math.sqrt(1 - 2 * phi1 / mass)
    for weight in (model.blocks[0].attn.qkv.weight, model.patch_embed.weight):
        assert abs(weight.std() - expected_std) < 0.0003 and weight.abs().max() <= 0.02
    assert (model.patch_embed.bias == 0).all()
    rates = [block.drop_path.p for block in build_student("vit_tiny_patch16", 224, 0.2).blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_every_student_parameter_gets_a_gradient():
    teacher, model = micro_pair(drop_path=0.1)
    fd_closure(teacher)(model, torch.rand(4, 3, 32, 32)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


# ----------------------------------------------------------------------------- the FD objective
# ----------------------------------------------------------------------------- teachers
# Published layouts written here from each publisher's own naming (OpenAI clip/model.py, timm, torchvision,
# DINOv2, EsViT), not from checkpoints.py.
def timm_layout(width, depth, patch, grid, classes=0, dinov2=False, registers=0, bias=True, make=torch.randn):
    """DINO / DeiT / timm ViT state dict (with dinov2=True: the official DINOv2 layout)."""
    sd = {"cls_token": make(1, 1, width), "pos_embed": make(1, 1 + grid * grid, width),
          "patch_embed.proj.weight": make(width, 3, patch, patch)}
    if bias:
        sd["patch_embed.proj.bias"] = make(width)
    if dinov2:
        sd["mask_token"] = make(1, width)
        if registers:
            sd["register_tokens"] = make(1, registers, width)
    for i in range(depth):
        for name, shape in [("norm1.weight", (width,)), ("norm1.bias", (width,)), ("attn.qkv.weight", (3 * width, width)),
                            ("attn.qkv.bias", (3 * width,)), ("attn.proj.weight", (width, width)),
                            ("attn.proj.bias", (width,)), ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                            ("mlp.fc1.weight", (4 * width, width)), ("mlp.fc1.bias", (4 * width,)),
                            ("mlp.fc2.weight", (width, 4 * width)), ("mlp.fc2.bias", (width,))]:
            sd[f"blocks.{i}.{name}"] = make(*shape)
        if dinov2:
            sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = make(width), make(width)
    sd["norm.weight"], sd["norm.bias"] = make(width), make(width)
    if classes:
        sd["head.weight"], sd["head.bias"] = make(classes, width), make(classes)
    return sd


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


@pytest.mark.parametrize("name", sorted(PUBLISHED_LAYOUTS))
def test_published_layout_fits_the_teacher_architecture_exactly(name):
    published = checkpoints.unwrap_state_dict(PUBLISHED_LAYOUTS[name](), name)
    converted = checkpoints.CONVERTERS[checkpoints.TEACHERS[name]["layout"]](published)
    with torch.device("meta"):
        expected = models.build_from_arch(checkpoints.TEACHERS[name]["arch"]).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}


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
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)
        h = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v
        h = h.transpose(1, 2).reshape(b, t, c) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + h * sd.get(p + "ls1.gamma", 1.0)
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + h * sd.get(p + "ls2.gamma", 1.0)
    x = F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], eps)
    return torch.cat([x[:, :1], x[:, 1 + registers:]], 1)


def scaled(sd, noise=0.05):
    """Random weights of a sensible scale: norms near 1, the rest small."""
    torch.manual_seed(0)
    return {k: (1 + noise * torch.randn_like(v)) if "norm" in k and k.endswith("weight") else noise * torch.randn_like(v)
            for k, v in sd.items()}


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
        tensors = checkpoints.read_torchscript(zf)
    reference = torch.jit.load(str(tmp_path / "ViT-tiny.pt")).state_dict()
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[k], reference[k]) and tensors[k].dtype == reference[k].dtype for k in reference)
    assert tensors["visual.conv1.weight"].dtype == torch.float16

    teacher = load_teacher("open_clip_quickgelu", tmp_path / "ViT-tiny.pt", grid=2)
    torch.testing.assert_close(teacher(images), expected, rtol=1e-4, atol=1e-4)
    # With GELU instead of QuickGELU the tokens are measurably off: the activation matters.
    wrong = load_teacher("open_clip", tmp_path / "ViT-tiny.pt", grid=2)
    assert (wrong(images) - expected).abs().max() > 1e-3


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
    with pytest.raises(ValueError, match=r"evil.pth: refused: .*builtins.getattr, .*pathlib.Path.*Nothing from it was executed"):
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
    assert torch.equal(checkpoints.read_checkpoint(good)["w"], torch.arange(4.0).view(2, 2))
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


def test_distill_with_a_published_layout_teacher_records_its_checksum(tmp_path):
    torch.save(scaled(timm_layout(128, 1, 8, 4)), tmp_path / "dino_tiny.pth")
    args = parse(*MICRO, "--teacher", "timm", "--teacher-weights", str(tmp_path / "dino_tiny.pth"), "--epochs", "1",
                 "--out", str(tmp_path / "run"))
    distill.main(args)
    saved = torch.load(tmp_path / "run" / "student.pth", weights_only=True)
    assert saved["teacher"][0]["sha256"] == hashlib.sha256((tmp_path / "dino_tiny.pth").read_bytes()).hexdigest()
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["projector"]["weight"].shape == (128, 32)  # student width 32 -> teacher width 128


# ----------------------------------------------------------------------------- Swin
def build_swin(name, img_size, drop_path=0.0):
    return SwinTransformer(**models.swin_arch(name, img_size, drop_path))


# The tiny EsViT-layout Swin of the checkpoint test: Swin-B/W14 at 224 in miniature (stage maps
# 16, 8, 4, 2: shifted windows in stages 0-1, window == map in stage 2, window clipped in stage 3).
ESVIT_TINY = dict(img_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16],
                  window_size=4)


def randomise_(model, seed=0):
    """Parameters far from their initial values, so that a wrong wiring cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):  # temperatures from 3 to 300: the cap at 100 matters
                p.copy_(torch.linspace(math.log(3.0), math.log(300.0), p.numel()).view_as(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def reference_window_attention(y, window, shift, heads, qkv_w, qkv_b, proj_w, proj_b, offset_bias,
                               temperature=None):
    """Shifted-window attention written as a loop over windows. y (B, H, W, C); offset_bias
    (2w-1, 2w-1, heads) indexed by (row offset, column offset) + w - 1; temperature (heads,) for
    cosine attention, None for scaled dot products. After rolling the map up-left by `shift`, two
    tokens of a window may attend to each other only if both or neither wrapped round, per axis."""
    B, H, W, C = y.shape
    d = C // heads
    rolled = torch.roll(y, (-shift, -shift), (1, 2))
    out = torch.empty_like(rolled)
    cells = [(r, c) for r in range(window) for c in range(window)]
    bias = torch.stack([torch.stack([offset_bias[r1 - r2 + window - 1, c1 - c2 + window - 1]
                                     for r2, c2 in cells]) for r1, c1 in cells]).permute(2, 0, 1)
    for top in range(0, H, window):
        for left in range(0, W, window):
            tokens = rolled[:, top:top + window, left:left + window].reshape(B, -1, C)
            q, k, v = (tokens @ qkv_w.T + qkv_b).split(C, dim=-1)
            q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
            if temperature is None:
                logits = q @ k.transpose(-1, -2) / math.sqrt(d)
            else:
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
                logits = logits * temperature.view(-1, 1, 1)
            logits = logits + bias
            if shift:
                wrapped = [(top + r >= H - shift, left + c >= W - shift) for r, c in cells]
                allowed = torch.tensor([[a == b for b in wrapped] for a in wrapped])
                logits = logits.masked_fill(~allowed, float("-inf"))
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, window, window, C)
            out[:, top:top + window, left:left + window] = o @ proj_w.T + proj_b
    return torch.roll(out, (shift, shift), (1, 2))


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


def test_window_partition_round_trip_and_order():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 3)
    torch.testing.assert_close(windows[1], x[0, 0:4, 4:8].reshape(16, 3), rtol=0, atol=0)  # raster order
    torch.testing.assert_close(windows[6 + 5], x[1, 4:8, 8:12].reshape(16, 3), rtol=0, atol=0)
    torch.testing.assert_close(window_reverse(windows, 4, 8, 12), x, rtol=0, atol=0)


def test_relative_index_and_log_spaced_offsets_against_offset_map():
    w = 3
    index, coords = window_position_index(w), log_spaced_offsets(w)
    cells = [(r, c) for r in range(w) for c in range(w)]
    assert index.shape == (w * w, w * w) and coords.shape == ((2 * w - 1) ** 2, 2)
    log8 = lambda t: math.copysign(math.log2(1 + abs(t) * 8 / (w - 1)) / 3, t)
    for i, (r1, c1) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            dr, dc = r1 - r2, c1 - c2
            assert index[i, j] == (dr + w - 1) * (2 * w - 1) + (dc + w - 1)
            assert coords[index[i, j]].tolist() == pytest.approx([log8(dr), log8(dc)], abs=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_shifted_windows_give_zero_probability_across_regions(version):
    # At initialisation every visible pair has a clearly positive probability (randomised
    # weights with V2's temperature of 100 can push some below the smallest float).
    torch.manual_seed(0)
    model = build_swin(f"swin{'v2' if version == 2 else ''}_micro_window4", 32).eval()
    _, attns = attention_maps(model, torch.rand(2, 3, 32, 32))
    H, shift = 8, 2
    for block, probs in enumerate(attns[:2]):  # stage 0: an 8x8 map in 2x2 windows of 4x4
        assert probs.shape == (2 * 4, model.arch["num_heads"][0], 16, 16)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        for window in range(4):
            top, left = 4 * (window // 2), 4 * (window % 2)
            wrapped = [(top + r >= H - shift, left + c >= H - shift) for r in range(4) for c in range(4)]
            allowed = torch.tensor([[a == b for b in wrapped] for a in wrapped])
            if block == 0:  # no shift: everything is visible
                allowed[:] = True
            for image in range(2):
                p = probs[image * 4 + window]  # (heads, 16, 16)
                assert (p[:, ~allowed] == 0).all() and (p[:, allowed] > 0).all()
    assert block == 1 and not allowed.all()  # the last window really was masked


def test_window_shrinks_to_the_map_and_then_does_not_shift():
    def layout(model):
        return [(stage.window, stage.blocks[1].shift, stage.blocks[1].attn_mask is not None)
                for stage in model.layers]

    assert layout(SwinTransformer(version=1, position_bias="per_block", **ESVIT_TINY)) == [
        (4, 2, True), (4, 2, True), (4, 0, False), (2, 0, False)]  # maps 16, 8, 4, 2
    narrow_w14 = SwinTransformer(version=1, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1],
                                 window_size=14, position_bias="per_block")  # EsViT's at 224 px
    assert layout(narrow_w14) == [(14, 7, True), (14, 7, True), (14, 0, False), (7, 0, False)]
    # maps 56, 28, 14, 7
    assert layout(build_swin("swinv2_micro_window7", 224)) == [(7, 3, True), (7, 3, True)]
    with pytest.raises(ValueError, match="windows"):
        build_swin("swin_micro_window5", 64)  # a 16x16 map does not split into 5x5 windows


def test_shapes_through_all_stages():
    model = build_swin("swinv2_tiny_window7", 224).eval()
    with torch.no_grad():
        tokens, attns = attention_maps(model, torch.rand(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 768) and model.grid == (7, 7) and model.embed_dim == 768
    expected = [(64, 3)] * 2 + [(16, 6)] * 2 + [(4, 12)] * 6 + [(1, 24)] * 2  # (windows, heads)
    assert [tuple(a.shape) for a in attns] == [(n, h, 49, 49) for n, h in expected]
    micro = build_swin("swin_micro_window4", 32)
    images = torch.rand(3, 3, 32, 32)
    features = micro.forward_features(images)
    assert features.shape == (3, 16, 64) and micro.grid == (4, 4) and micro.num_prefix_tokens == 0
    torch.testing.assert_close(micro.norm(features), micro(images))  # forward = features + final norm


@pytest.mark.parametrize("version", [1, 2])
def test_block_fast_and_explicit_paths_equal_a_loop_over_windows(version):
    torch.manual_seed(1)
    model = randomise_(build_swin("swinv2_micro_window4_shared" if version == 2 else "swin_micro_window4", 32)).eval()
    stage, eps, w, heads = model.layers[0], model.norm.eps, 4, model.arch["num_heads"][0]
    x = torch.randn(2, 8, 8, 32)
    state = {k: v for k, v in stage.state_dict().items()}
    if version == 2:  # the stage's bias MLP evaluated on every (row, column) offset
        steps = [math.copysign(math.log2(1 + abs(t) * 8 / (w - 1)) / 3, t) for t in range(1 - w, w)]
        grid = torch.tensor([[[a, b] for b in steps] for a in steps])  # (2w-1, 2w-1, 2)
        hidden = torch.relu(grid @ state["rel_pos_bias.rpe_mlp.0.weight"].T
                            + state["rel_pos_bias.rpe_mlp.0.bias"])
        offset_bias_v2 = 16 * torch.sigmoid(hidden @ state["rel_pos_bias.rpe_mlp.2.weight"].T)
    for j, shift in enumerate([0, 2]):
        p = f"blocks.{j}."
        if version == 1:
            y = layer_norm(x, state, p + "norm1", eps)
            y = x + reference_window_attention(
                y, w, shift, heads, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"],
                state[p + "attn.proj.weight"], state[p + "attn.proj.bias"],
                state[p + "attn.relative_position_bias_table"].view(2 * w - 1, 2 * w - 1, -1))
            mlp_in = layer_norm(y, state, p + "norm2", eps)
        else:
            qkv_bias = torch.cat([state[p + "attn.q_bias"], torch.zeros(32), state[p + "attn.v_bias"]])
            temperature = state[p + "attn.logit_scale"].flatten().exp().clamp(max=100)
            y = reference_window_attention(
                x, w, shift, heads, state[p + "attn.qkv.weight"], qkv_bias, state[p + "attn.proj.weight"],
                state[p + "attn.proj.bias"], offset_bias_v2, temperature)
            y = x + layer_norm(y, state, p + "norm1", eps)
            mlp_in = y
        mlp = F.gelu(mlp_in @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        mlp = mlp @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        expected = y + (mlp if version == 1 else layer_norm(mlp, state, p + "norm2", eps))
        bias = stage.rel_pos_bias() if version == 2 else None
        fast = stage.blocks[j](x, bias)
        stage.blocks[j].attn.keep_probs = True
        explicit, probs = stage.blocks[j](x, bias), stage.blocks[j].attn.probs
        assert probs.shape == (8, heads, 16, 16)
        torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(explicit, expected, rtol=1e-4, atol=1e-4)


def test_v2_shared_bias_copied_into_every_block_keeps_the_function():
    shared = randomise_(build_swin("swinv2_micro_window4", 32)).eval()
    per_block = SwinTransformer(**dict(shared.arch, position_bias="per_block")).eval()
    converted = shared_bias_to_per_block(shared.state_dict())
    assert not any(".rel_pos_bias." in k and ".blocks." not in k for k in converted)
    per_block.load_state_dict(converted)  # strict
    assert sum(".blocks.1.rel_pos_bias.rpe_mlp.0.weight" in k for k in converted) == 2
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(per_block(images), shared(images))


@pytest.mark.parametrize("name", ["swin_micro_window4", "swinv2_micro_window4"])
def test_every_swin_parameter_gets_a_gradient(name):
    model = build_swin(name, 32, drop_path=0.1).train()
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), key


def test_swin_official_initialisation():
    torch.manual_seed(0)
    v1, v2 = build_swin("swin_micro_window4", 32), build_swin("swinv2_micro_window4", 32)
    block1, block2 = v1.layers[0].blocks[0], v2.layers[0].blocks[0]
    assert block1.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert (block1.attn.qkv.bias == 0).all() and (block1.norm1.weight == 1).all() and v1.norm.eps == 1e-6
    assert block1.attn.relative_position_bias_table.std().item() == pytest.approx(0.02, rel=0.3)
    assert (block2.norm1.weight == 1e-5).all() and (block2.norm2.weight == 1e-5).all()  # post-norm gains
    assert (v2.norm.weight == 1).all() and v2.norm.eps == 1e-5
    torch.testing.assert_close(block2.attn.logit_scale.exp(), torch.full((2, 1, 1), 10.0))
    assert (block2.attn.q_bias == 0).all() and not hasattr(block2.attn, "k_bias")
    # fix_init_weight (models/swin_transformer_v2.py): block i of 4, counted from 1 across stages, has its
    # attn.proj and mlp.fc2 weights divided by sqrt(2 i); V1 has no such rescaling.
    for i, block in enumerate([b for stage in v2.layers for b in stage.blocks], start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * i), rel=0.1)
    assert v1.layers[1].blocks[1].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # The classifier's head: trunc-normal .02 for Swin (its _init_weights), 1000 times smaller for the ViT.
    assert Classifier(v2, 1000).head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    vit = Classifier(build_student("vit_micro_patch8", 32), 1000)
    assert vit.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)


def test_names_and_rebuild_from_arch():
    model = randomise_(build_swin("swinv2_micro_window4_shared", 32, drop_path=0.2))
    assert model.arch["version"] == 2 and model.arch["position_bias"] == "shared"
    # Without the suffix, the official FD-EsViT student: a bias MLP in every block, none per stage.
    per_block = build_swin("swinv2_micro_window4", 32)
    assert per_block.arch["position_bias"] == "per_block" and per_block.layers[0].rel_pos_bias is None
    assert all(block.rel_pos_bias is not None for stage in per_block.layers for block in stage.blocks)
    assert model.arch["window_size"] == 4 and model.arch["drop_path"] == 0.2
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])  # linear over all blocks
    v1 = build_swin("swin_micro_window2", 16)
    assert (v1.arch["version"], v1.arch["window_size"], v1.arch["position_bias"]) == (1, 2, "per_block")
    assert SWIN_SIZES["base"] == (128, (2, 2, 18, 2), (4, 8, 16, 32))  # Swin-B, EsViT's and FD's
    assert SWIN_SIZES["tiny"] == (96, (2, 2, 6, 2), (3, 6, 12, 24))
    rebuilt = SwinTransformer(**model.arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), model.eval()(images))
    for bad in ("swin_huge_window7", "swinv2_base", "vit_base_patch16", "swin_micro_window4_shared"):
        with pytest.raises(ValueError, match="unknown Swin name"):
            models.swin_arch(bad, 224)


def vit_student_params(c, depth, heads, patch, hidden, grid):
    """The FD ViT student's parameter count from its description (BEiT layout, no head): per block two
    LayerNorms, qkv without bias plus q and v biases, proj, the GELU MLP, two LayerScale vectors; then the
    patch embedding, class token, one shared relative position table ((2g-1)^2 + 3 rows) and the final norm."""
    block = 4 * c + 3 * c * c + 2 * c + c * c + c + 2 * c * hidden + hidden + c + 2 * c
    return depth * block + 3 * patch * patch * c + c + c + ((2 * grid - 1) ** 2 + 3) * heads + 2 * c


def swinv2_student_params(c, depths, heads):
    """SwinV2's count from the official swin_transformer_v2.py layout (no head): per block two post-norms,
    qkv without bias plus q and v biases, a per-head logit scale, the continuous position bias MLP
    (2 -> 512 -> heads), proj, the MLP (ratio 4); patch merging (4C -> 2C, no bias, norm on 2C); 4 px
    patch embedding with its norm; the final norm."""
    total = 3 * 16 * c + c + 2 * c
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = c * 2 ** i
        total += depth * (4 * d + 3 * d * d + 2 * d + h + (2 * 512 + 512 + 512 * h) + d * d + d + 8 * d * d + 5 * d)
        if i < len(depths) - 1:
            total += 8 * d * d + 4 * d
    return total + 2 * c * 2 ** (len(depths) - 1)


def test_large_student_sizes_match_published_parameter_counts():
    """ViT-B to ViT-g and SwinV2-G built on the meta device (no memory): exactly the count written out
    from the architecture, and within 1% of the published ones. Our students differ from the published
    models by: no classification head, no absolute position embedding (ViT-H/14 at 224: 257 x 1280 = 0.33M)
    but one shared relative position table (964 x 16 = 15k), no k bias, two LayerScale vectors per block;
    together under 0.5% for every ViT. SwinV2-G's 3.0B (SwinV2 paper, Table 1) may count a head (4096 x 1000,
    0.14%) and has an extra LayerNorm every 6 blocks of SwinV2-H/G (about 29k); we build neither."""
    # (name, published count, its source): rounded as published, hence the 1% tolerance.
    published = [("vit_base_patch16", 86e6, "ViT paper (arXiv 2010.11929) Table 1, ViT-B"),
                 ("vit_large_patch16", 304e6, "timm vit_large_patch16_224: 304.3M (303.3M without head)"),
                 ("vit_huge_patch14", 632e6, "ViT paper Table 1, ViT-H; timm vit_huge_patch14_224: 630.8M, no head"),
                 ("vit_giant_patch14", 1011e6, "EVA (arXiv 2211.07636) ViT-g/14; timm vit_giant_patch14_224: "
                                               "1012.6M with a 1000-class head, 1011.2M without"),
                 ("swinv2_giant_window7", 3.0e9, "SwinV2 paper (arXiv 2111.09883) Table 1, SwinV2-G")]
    expected = {"vit_base_patch16": vit_student_params(768, 12, 12, 16, 3072, 14),  # 85,665,360
                "vit_large_patch16": vit_student_params(1024, 24, 16, 16, 4096, 14),  # 303,136,192
                "vit_huge_patch14": vit_student_params(1280, 32, 16, 14, 5120, 16),  # 630,492,224
                "vit_giant_patch14": vit_student_params(1408, 40, 16, 14, 6144, 16),  # 1,010,912,320
                "swinv2_giant_window7": swinv2_student_params(512, (2, 2, 42, 4), (16, 32, 64, 128))}  # 2,997,815,008
    # The timm layout of ViT-H/14 without head (qkv bias, absolute positions, no LayerScale) gives the 630.8M above.
    c, hidden = 1280, 5120
    timm_huge = 32 * (4 * c + 4 * c * c + 4 * c + 2 * c * hidden + hidden + c) + 3 * 14 * 14 * c + 259 * c + 2 * c
    assert timm_huge == 630_764_800
    with torch.device("meta"):
        for name, count, source in published:
            model = build_student(name, 224)
            n = sum(p.numel() for p in model.parameters())
            assert n == expected[name], name
            assert abs(n - count) / count < 0.01, f"{name}: {n:,} vs {count:,.0f} ({source})"
            if name == "vit_giant_patch14":  # the 48/11 MLP ratio survives the arch round trip
                assert model.blocks[0].mlp.fc1.out_features == 6144
                assert build_from_arch(model.arch).blocks[-1].mlp.fc1.out_features == 6144
    assert checkpoints.teacher_arch("giant", 14)["mlp_ratio"] == 48 / 11  # a plain ViT-g teacher too


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
    loaded = checkpoints.read_checkpoint(tmp_path / "checkpoint.pth")["student"]
    model.load_state_dict(esvit_to_swin(loaded))  # strict
    images = torch.rand(2, 3, 64, 64)
    expected = reference_swin_v1(backbone, images, ESVIT_TINY["depths"], ESVIT_TINY["num_heads"], 4)
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    assert model(images).shape == (2, 4, 256)
    # The same file through the teacher loader, as `--teacher esvit` reads it (with a tiny architecture).
    tiny = dict(checkpoints.TEACHERS["esvit"], arch=dict(model.arch, img_size=64))
    monkeypatch.setitem(checkpoints.TEACHERS, "esvit", tiny)
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
        teacher = models.build_from_arch(checkpoints.TEACHERS["esvit"]["arch"])
    assert {k: tuple(v.shape) for k, v in teacher.state_dict().items()} == {
        k: shape for k, shape in layout.items() if not k.endswith("relative_position_index")}
    assert sum(v.numel() for v in teacher.state_dict().values()) == 86_917_944  # timm's Swin-B/W14 count


# ----------------------------------------------------------------------------- speed options keep the maths
@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("name", ["vit_micro_patch8", "teacher"])
def test_every_attention_backend_equals_the_explicit_computation(backend, name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = (load_teacher("vit_micro_patch8", grid=4).encoder.requires_grad_(True) if name == "teacher"
             else build_student(name, 32)).to(device)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))  # a non-zero position bias, LayerScale off 0.1
    images = torch.rand(2, 3, 32, 32, device=device)
    explicit, _ = attention_maps(model, images)
    explicit.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            fused = model(images)
            fused.square().mean().backward()
    except RuntimeError as error:
        pytest.skip(f"{backend} has no kernel for this case on {device}: {str(error)[:60]}")
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["vit_micro_patch8", "swinv2_micro_window4", "swin_v1"])
def test_position_biases_reach_sdpa_contiguous(name, monkeypatch):
    """The GPU's fused SDPA kernels refuse a mask with a strided last dimension: the student would
    silently run the unfused math kernel."""
    model = (SwinTransformer(version=1, position_bias="per_block", **ESVIT_TINY) if name == "swin_v1"
             else build_student(name, 64))
    strides = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        strides.append(attn_mask.stride(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model(torch.rand(2, 3, 64, 64))
    assert strides and set(strides) == {1}


@pytest.mark.parametrize("name", ["vit_micro_patch8", "swinv2_micro_window4"])
def test_activation_checkpointing_gives_identical_gradients(name):
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_student(name, 32, drop_path=0.2).train()
        models.set_grad_checkpointing(model, checkpointed)
        torch.manual_seed(1)  # the same drop-path draws
        model(torch.rand(2, 3, 32, 32)).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bench_finds_the_largest_batch_that_fits(monkeypatch):
    import bench
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench.gc, "collect", lambda: 0)  # a full collection per try: half a minute in this process
    monkeypatch.setattr(bench, "random_images", lambda batch_size, cfg, device: batch_size)
    for capacity in (8, 13, 100, 130, 1000):
        def step(batch_size):
            if batch_size > capacity:
                raise torch.cuda.OutOfMemoryError("out of memory")
        for start, limit in ((8, 4096), (16, 128), (8, 64)):
            cfg = argparse.Namespace(batch_size=start, max_batch=limit)
            if start > capacity:
                with pytest.raises(SystemExit, match="does not fit"):
                    bench.largest_batch(step, cfg, None)
                continue
            found = bench.largest_batch(step, cfg, None)
            assert found <= min(capacity, limit) and (found == limit or found + 8 > capacity), (capacity, start, limit)


def test_bench_times_the_distill_step_and_the_data_pipeline(capsys):
    import bench
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8", "--img-size", "32", "--batch-size", "4",
            "--steps", "2", "--warmup", "1", "--amp", "bf16", "--compare"]
    bench.main(bench.get_args_parser().parse_args(argv))
    last = dict(field.split("=") for field in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert set(last) == {"img/s", "step_ms", "peak_mem_mb", "mfu", "ratio"}
    assert float(last["img/s"]) > 0 and float(last["ratio"]) > 0
    assert float(last["img/s"]) == pytest.approx(4 * 1000 / float(last["step_ms"]), rel=0.01)
    bench.bench_data_pipeline(bench.get_args_parser().parse_args(["--img-size", "32"]), count=4)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("data img/s_per_worker=") and "device_decode_img/s=" in last


def test_bf16_autocast_tracks_fp32_and_the_bf16_teacher_is_exact():
    teacher, model = micro_pair()
    images = torch.rand(8, 3, 32, 32)
    compute_loss = fd_closure(teacher)
    fp32 = compute_loss(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compute_loss(model, images)
        target = distill.distillation_target(teacher, images, (4, 4))
        training.prepare_teacher(teacher, torch.bfloat16)
        assert teacher.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        assert torch.equal(distill.distillation_target(teacher, images, (4, 4)), target)
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()  # bf16 keeps 8 bits of mantissa


def test_fd_loss_equals_independent_computation():
    torch.manual_seed(0)
    teacher_tokens = torch.randn(3, 17, 24) * 5 + 2
    prediction = torch.randn(3, 17, 24) * 3
    mean = teacher_tokens.mean(-1, keepdim=True)
    var = ((teacher_tokens - mean) ** 2).mean(-1, keepdim=True)
    whitened = (teacher_tokens - mean) / torch.sqrt(var + 1e-5)
    diff = (prediction - whitened).abs()
    expected = torch.where(diff <= 2.0, 0.5 * diff ** 2 / 2.0, diff - 1.0).mean()
    teacher = lambda images: teacher_tokens  # noqa: E731
    teacher.num_prefix_tokens = 1
    target = distill.distillation_target(teacher, None, (4, 4))
    torch.testing.assert_close(distill.fd_loss(prediction, target), expected)
    assert (diff > 2).any() and (diff <= 2).any()  # both branches of smooth L1 exercised


def test_teacher_tokens_resized_to_student_grid():
    tokens = torch.randn(2, 16 * 16, 8)
    assert distill.resize_tokens(tokens, (16, 16)) is tokens
    ramp = torch.arange(4.0).repeat_interleave(2).repeat(8)  # 8x8 map, constant in pairs of columns
    resized = distill.resize_tokens(ramp.view(1, 64, 1), (4, 4))
    expected = F.interpolate(ramp.view(1, 1, 8, 8), size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized.view(4, 4), expected.view(4, 4))
    torch.testing.assert_close(resized.view(4, 4)[0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


@pytest.mark.parametrize("student_name, teacher_name, tokens", [
    ("vit_micro_patch8", "vit", 1 + 16), ("vit_micro_patch8", "swin", 16), ("swinv2_micro_window4", "vit", 16)])
def test_loss_of_main_is_smooth_l1_on_projected_tokens_class_token_only_when_both_have_one(
        tmp_path, monkeypatch, student_name, teacher_name, tokens):
    # One step of distill.main at lr 0 (the weights stay as initialised), its loss recomputed here from
    # the images it saw, the student it returns and the projector it saved.
    if teacher_name == "swin":  # a Swin V1 teacher with a 4x4 output grid and no class token
        swin = models.SwinTransformer(version=1, img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                      window_size=4, position_bias="per_block")
        monkeypatch.setattr(distill, "load_teacher", lambda *args, **kwargs: models.Teacher(swin))
    seen, real_loss, real_target = {}, distill.fd_loss, distill.distillation_target

    def target_spy(teacher, images, grid, with_cls=True):
        seen.update(teacher=teacher, images=images)
        return real_target(teacher, images, grid, with_cls)

    def loss_spy(prediction, target):
        seen["loss"] = real_loss(prediction, target)
        return seen["loss"]
    monkeypatch.setattr(distill, "distillation_target", target_spy)
    monkeypatch.setattr(distill, "fd_loss", loss_spy)
    argv = [*MICRO, "--student", student_name, "--synthetic-images", "8", "--epochs", "1", "--drop-path", "0",
            "--lr", "0", "--min-lr", "0", "--warmup-lr", "0", "--out", str(tmp_path)]
    student = distill.main(parse(*argv)).eval()
    projector = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["projector"]
    images, teacher = seen["images"], seen["teacher"]
    with torch.no_grad():
        teacher_tokens = teacher(images)  # (B, [1 +] 16, C): a 4x4 grid for every pairing here
        student_tokens = student(images) @ projector["weight"].T + projector["bias"]
    target = teacher_tokens[:, teacher_tokens.shape[1] - tokens:]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=False, keepdim=True)
    whitened = (target - mean) / torch.sqrt(var + 1e-5)  # a LayerNorm without scale or bias, eps 1e-5
    diff = (student_tokens[:, student_tokens.shape[1] - tokens:] - whitened).abs()
    expected = torch.where(diff < 2.0, 0.5 * diff ** 2 / 2.0, diff - 1.0).mean()  # smooth L1, beta 2
    torch.testing.assert_close(seen["loss"], expected, rtol=1e-5, atol=1e-6)
    assert read_log(tmp_path)[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- several teachers
CPU_ONLY = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # subprocesses on the CPU, on any machine


def test_one_teacher_is_a_list_of_one_and_trains_bitwise_as_before(tmp_path):
    # testdata/one_teacher_run.pt: the losses and weights of this command as the version before several teachers
    # wrote them (CPU, one thread). A single teacher must give them bit for bit.
    argv = [*MICRO, "--epochs", "1", "--accum", "2", "--batch-size", "4", "--lr", "0.5", "--out", str(tmp_path)]
    subprocess.run([sys.executable, str(REPO / "distill.py"), *argv], check=True, capture_output=True, env=CPU_ONLY)
    before = torch.load(REPO / "testdata" / "one_teacher_run.pt", weights_only=True)
    log, state = read_log(tmp_path), torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert [r["loss"] for r in log] == before["losses"]
    assert [r["loss_terms"] for r in log] == [[loss] for loss in before["losses"]]
    for key in ("student", "projector"):
        assert list(state[key]) == list(before[key])
        assert all(torch.equal(state[key][k], v) for k, v in before[key].items()), key


def test_two_teachers_loss_is_the_weighted_mean_of_each_ones_smooth_l1(tmp_path, monkeypatch):
    # One step of distill.main at lr 0 with a ViT teacher (class token kept, width 32) and a Swin teacher (no class
    # token, an 8x8 map of width 24 resized to the student's 4x4), loss weights 1 and 0.5: the logged loss and terms
    # recomputed here from the images seen, the student returned and the row blocks of the projector saved.
    swin = models.SwinTransformer(version=1, img_size=32, embed_dim=24, depths=[2], num_heads=[2], window_size=4,
                                  position_bias="per_block")
    real_teacher, real_target, seen = distill.load_teacher, distill.distillation_target, {"teachers": []}
    monkeypatch.setattr(distill, "load_teacher", lambda name, weights, grid: models.Teacher(swin) if name == "swin"
                        else real_teacher(name, weights, grid=grid))

    def target_spy(teacher, images, grid, with_cls=True):
        seen["teachers"].append(teacher)
        seen["images"] = images
        return real_target(teacher, images, grid, with_cls)
    monkeypatch.setattr(distill, "distillation_target", target_spy)
    argv = [*MICRO, "--teacher", "vit_micro_patch8,swin", "--teacher-loss-weights", "1,0.5", "--synthetic-images", "8",
            "--epochs", "1", "--drop-path", "0", "--lr", "0", "--min-lr", "0", "--warmup-lr", "0",
            "--out", str(tmp_path)]
    student = distill.main(parse(*argv)).eval().cpu()
    projector = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["projector"]
    images, (vit, swin_teacher) = seen["images"].cpu(), [teacher.cpu() for teacher in seen["teachers"]]
    with torch.no_grad():
        features = student(images)  # (B, 1 + 16, 32)
        swin_map = swin_teacher(images).transpose(1, 2).reshape(len(images), 24, 8, 8)
        swin_tokens = F.interpolate(swin_map, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).mT
        terms = []
        for rows, target in ((slice(0, 32), vit(images)), (slice(32, 56), swin_tokens)):
            tokens = features[:, features.shape[1] - target.shape[1]:]  # 1 + 16 for the ViT, 16 for the Swin
            prediction = tokens @ projector["weight"][rows].T + projector["bias"][rows]
            mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=False, keepdim=True)
            diff = (prediction - (target - mean) / torch.sqrt(var + 1e-5)).abs()
            terms.append(torch.where(diff < 2.0, 0.5 * diff ** 2 / 2.0, diff - 1.0).mean().item())
    assert projector["weight"].shape == (56, 32) and len(seen["teachers"]) == 2
    record = read_log(tmp_path)[0]
    assert record["loss_terms"] == pytest.approx(terms, rel=1e-5)
    assert record["loss"] == pytest.approx((1 * terms[0] + 0.5 * terms[1]) / 1.5, rel=1e-5)
    recorded = torch.load(tmp_path / "student.pth", weights_only=True)["teacher"]
    assert [teacher["name"] for teacher in recorded] == ["vit_micro_patch8", "swin"]


def test_each_projector_learns_from_its_own_teacher_only_and_the_student_from_both():
    # The gradients of a two-teacher loss against those of separate Linears holding each projector's rows, each
    # trained on its own teacher's smooth-L1 alone.
    torch.manual_seed(0)
    model, images = distill.FDStudent(build_student("vit_micro_patch8", 32), [32, 48]), torch.rand(2, 3, 32, 32)
    targets, weights = [torch.randn(2, 17, 32), torch.randn(2, 17, 48)], [2 / 3, 1 / 3]
    sum(w * distill.fd_loss(p, t) for w, p, t in zip(weights, model(images), targets)).backward()
    grads, alone = {name: p.grad.clone() for name, p in model.named_parameters()}, []
    for rows, target, weight in zip((slice(0, 32), slice(32, 80)), targets, weights):
        linear = torch.nn.Linear(32, target.shape[-1])
        linear.load_state_dict({k: v[rows] for k, v in model.projector.state_dict().items()})
        model.zero_grad()
        F.smooth_l1_loss(linear(model.student(images)), target, beta=2.0).backward()
        torch.testing.assert_close(grads["projector.weight"][rows], weight * linear.weight.grad)
        torch.testing.assert_close(grads["projector.bias"][rows], weight * linear.bias.grad)
        alone.append({name: p.grad.clone() for name, p in model.student.named_parameters()})
    for name, _ in model.student.named_parameters():
        assert alone[0][name].abs().sum() > 0 and alone[1][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[f"student.{name}"], weights[0] * alone[0][name] + weights[1] * alone[1][name])


def test_two_teachers_resume_exactly_record_each_teacher_and_refuse_another_list(tmp_path, monkeypatch):
    torch.manual_seed(1)
    wide = build_from_arch(dict(build_student("vit_micro_patch8", 32).arch, embed_dim=48))  # a teacher of width 48
    torch.save({"arch": wide.arch, "model": wide.state_dict()}, tmp_path / "wide.pth")
    argv = [*MICRO, "--teacher", "vit_micro_patch8,mine", "--teacher-weights", f",{tmp_path / 'wide.pth'}",
            "--teacher-loss-weights", "1,3", "--epochs", "2", "--save-every", "5"]  # 16 steps
    full = distill.main(parse(*argv, "--out", str(tmp_path / "full")))
    crashed = tmp_path / "crashed"
    with crash_at_call(monkeypatch, distill, "fd_loss", 2 * 6 + 1), pytest.raises(KeyboardInterrupt):  # in step 7
        distill.main(parse(*argv, "--out", str(crashed)))
    assert torch.load(crashed / "checkpoint.pth", weights_only=True)["step"] == 5
    resumed = distill.main(parse(*argv, "--out", str(crashed)))
    full_log = {r["step"]: r for r in read_log(tmp_path / "full")}
    assert [r["step"] for r in read_log(crashed)] == list(range(1, 17))
    for record in read_log(crashed):
        assert (record["loss"], record["loss_terms"]) == (full_log[record["step"]]["loss"],
                                                          full_log[record["step"]]["loss_terms"])
    final = [torch.load(out / "checkpoint.pth", weights_only=True) for out in (tmp_path / "full", crashed)]
    assert final[0]["projector"]["weight"].shape == (32 + 48, 32)
    for key in ("student", "projector"):
        assert all(torch.equal(final[0][key][k], final[1][key][k]) for k in final[0][key])
    # Every teacher recorded; the student file reads as ever (finetune.py, diagnose.py, export), its recipe the first's.
    saved = torch.load(crashed / "student.pth", weights_only=True)
    sha256 = hashlib.sha256((tmp_path / "wide.pth").read_bytes()).hexdigest()
    assert [(t["name"], t["sha256"]) for t in saved["teacher"]] == [("vit_micro_patch8", None), ("mine", sha256)]
    rebuilt = load_model_file(crashed / "student.pth")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), full.state_dict().values()))
    torch.save({"teacher": [dict(name="dino"), dict(name="clip")]}, tmp_path / "two.pth")
    assert finetune.recipe_of(str(tmp_path / "two.pth")) == "dino"
    # Another list of teachers, or another file for one of them, is refused.
    with pytest.raises(ValueError, match=r"--teacher vit_micro_patch8,mine -> mine,vit_micro_patch8"):
        distill.main(parse(*argv, "--teacher", "mine,vit_micro_patch8", "--teacher-weights",
                           f"{tmp_path / 'wide.pth'},", "--out", str(crashed)))
    with pytest.raises(ValueError, match=r"--teacher vit_micro_patch8,mine -> vit_micro_patch8\)"):
        distill.main(parse(*MICRO, "--epochs", "2", "--out", str(crashed)))
    torch.save({"arch": wide.arch, "model": build_from_arch(wide.arch).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"distilled from teacher weights .*wide.pth \(sha256 .*\), not .*other.pth"):
        distill.main(parse(*argv, "--teacher-weights", f",{tmp_path / 'other.pth'}", "--epochs", "3", "--out",
                           str(crashed)))


@pytest.fixture(scope="module")
def two_teachers_two_ranks(tmp_path_factory):
    """One distillation from two teachers, run twice: on 2 torchrun CPU ranks, each with 2 micro-batches of 2 (the
    driver counts DDP's gradient all-reduces and saves each rank's student), and in one process with batches of 8:
    the same global batch. One launch serves the tests of torchrun's ranks with gradient accumulation and of several
    teachers on several ranks; the one-process run goes alongside (two cores)."""
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    out = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import distill\n"
        "from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook\n"
        "reductions = []\n"
        "import training\n"
        "class CountingDDP(training.DistributedDataParallel):  # counts the gradient all-reduces\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        self.register_comm_hook(None, lambda state, bucket: reductions.append(1) or "
        "allreduce_hook(state, bucket))\n"
        "training.DistributedDataParallel = CountingDDP\n"
        "student = distill.main(distill.get_args_parser().parse_args(sys.argv[1:]))\n"
        f"torch.save(dict(student.state_dict(), reductions=torch.tensor(len(reductions))), "
        f"os.path.join({str(out)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    argv = [*MICRO, "--teacher", "vit_micro_patch8,vit_micro_patch4", "--teacher-loss-weights", "2,1", "--drop-path",
            "0", "--epochs", "1"]
    one = subprocess.Popen([sys.executable, str(REPO / "distill.py"), *argv, "--out", str(tmp_path / "one")],
                           env=CPU_ONLY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(driver), *argv, "--accum", "2", "--batch-size", "2", "--out", str(out)]
    result = subprocess.run(cmd, env=CPU_ONLY, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = one.communicate(timeout=240)[1]
    assert one.returncode == 0, stderr[-3000:]
    return tmp_path / "one", out, result


def test_two_teachers_on_two_torchrun_ranks_train_as_one_process(two_teachers_two_ranks):
    one_out, two_out, result = two_teachers_two_ranks
    assert "2 process(es) x 2 images x 2 micro-steps = 8 images per step" in result.stdout
    for a, b in zip(read_log(one_out), read_log(two_out), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss_terms"] == pytest.approx(b["loss_terms"], rel=1e-5)
    one, two = (torch.load(out / "checkpoint.pth", weights_only=True) for out in (one_out, two_out))
    for key in ("student", "projector"):
        for name in one[key]:
            torch.testing.assert_close(one[key][name], two[key][name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_teacher_lists_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch):
    torch.save(timm_layout(64, 1, 16, 2), tmp_path / "small_dino.pth")  # not a ViT-B/16: not the dino teacher's file
    two, out = ["--teacher", "vit_micro_patch8,vit_micro_patch4"], tmp_path / "run"
    for flags, message in [
            ([*two, "--teacher-weights", "a.pth"], r"^--teacher names 2 teacher\(s\), --teacher-weights 1, "),
            ([*two, "--teacher-loss-weights", "1,2,3"], r"^--teacher names .*, --teacher-loss-weights 3: give one of"),
            (["--teacher", "vit_micro_patch8,vit_nano_patch4"], r"^unknown teacher 'vit_nano_patch4'"),
            (["--teacher", "vit_micro_patch8,dino", "--teacher-weights", f",{tmp_path / 'small_dino.pth'}"],
             r"small_dino.pth does not fit this model \(missing: "),
            ([*two, "--teacher-mean", "0.5", "0.5", "0.5"], r"^--teacher-mean and --teacher-std are for one teacher")]:
        with pytest.raises(ValueError, match=message) as error:
            distill.main(parse(*MICRO, *flags, "--out", str(out)))
        assert "\n" not in str(error.value) and not out.exists(), flags
    for weights, expected in [("1,0", "0 is out of range"), ("1,-2", "-2 is out of range"), ("1,a", "'a' is not a")]:
        with pytest.raises(SystemExit):
            parse(*two, "--teacher-loss-weights", weights)
        assert f"argument --teacher-loss-weights: {expected}" in capsys.readouterr().err
    # From the command line: that line alone on stderr, exit status 2.
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *MICRO, *two, "--teacher-weights", ",,", "--out", str(out))
    assert status.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "distill.py: error: --teacher names 2 teacher(s), --teacher-weights 3, --teacher-loss-weights 2: give one of "
        "each per teacher, comma-separated (FD_TRACEBACK=1 shows where)"]


def test_bench_times_several_teachers_at_once(capsys):
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8,vit_micro_patch4", "--img-size", "32",
            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--amp", "fp32"]
    bench.main(bench.get_args_parser().parse_args(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "distill: vit_micro_patch8 + vit_micro_patch8,vit_micro_patch4 teachers, 32 px" in lines[-2]
    last = dict(field.split("=") for field in lines[-1].split()[1:])
    assert float(last["img/s"]) == pytest.approx(4 * 1000 / float(last["step_ms"]), rel=0.01)
    assert float(last["peak_mem_mb"]) > 0


def test_overfitting_one_batch_drives_the_loss_down(tmp_path):
    # distill.main on the same 8 images for 40 steps, no drop path and whole-image crops: the step learns.
    argv = [*MICRO, "--synthetic-images", "8", "--epochs", "40", "--warmup-epochs", "0", "--lr", "0.1",
            "--min-lr", "0.1", "--drop-path", "0", "--min-crop-scale", "1", "--out", str(tmp_path)]
    distill.main(parse(*argv))
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 40 and losses[-1] < 0.3 * losses[0], losses


def test_gradient_accumulation_equals_one_step_on_the_double_batch(tmp_path):
    # 2 micro-batches of 4 and one batch of 8: the same images, losses and weights, step by step.
    argv = [*MICRO, "--epochs", "1", "--drop-path", "0"]
    whole = distill.main(parse(*argv, "--out", str(tmp_path / "whole")))
    accumulated = distill.main(parse(*argv, "--batch-size", "4", "--accum", "2", "--out", str(tmp_path / "accum")))
    for a, b in zip(read_log(tmp_path / "whole"), read_log(tmp_path / "accum"), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    torch.manual_seed(0)
    start = build_student("vit_micro_patch8", 32)  # the runs' initialisation: training moved the weights
    assert not torch.equal(whole.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)


def test_weight_decay_groups_and_lr_schedule():
    _, model = micro_pair()
    groups = training.param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {f"student.blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} | {
        "student.patch_embed.weight", "projector.weight"}
    # Warmup from warmup_lr to lr, then cosine to min_lr, by hand.
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, warmup_lr=0.0)
    assert training.lr_at(0, **kw) == 0.0 and training.lr_at(5, **kw) == 0.5
    assert training.lr_at(10, **kw) == 1.0 and training.lr_at(110, **kw) == pytest.approx(0.1)
    assert training.lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)


def test_compiled_run_matches_eager_and_saves_plain_keys(tmp_path):
    # A cold torch.compile takes about a minute on a 2-core CPU: the one compile in the suite.
    argv = [*MICRO, "--epochs", "1"]
    eager = distill.main(parse(*argv, "--out", str(tmp_path / "eager")))
    distill.main(parse(*argv, "--compile", "--out", str(tmp_path / "compiled")))
    state = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)
    assert set(state["student"]) == set(eager.state_dict())  # no _orig_mod. prefixes
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_presets_fill_unset_flags_and_flags_override():
    args = distill.apply_preset(parse("--teacher", "clip"))
    assert (args.student, args.drop_path, args.lr, args.epochs, args.img_size) == ("vit_base_patch16", 0.2, 3e-4,
                                                                                   300, 224)
    args = distill.apply_preset(parse("--teacher", "esvit", "--lr", "1e-3", "--drop-path", "0"))
    assert (args.lr, args.drop_path, args.min_lr) == (1e-3, 0.0, 1e-5)
    # The official FD-EsViT student (configs/pretrain/fd_pretrain__esvit_swin_base__img224__300ep.yaml leaves
    # MODEL.SWIN.USE_SHARED_RPB at config.py's False): SwinV2-B, window 14, a bias MLP in every one of 24 blocks.
    with torch.device("meta"):
        student = build_student(args.student, args.img_size)
    assert (student.arch["version"], student.arch["embed_dim"], student.arch["window_size"]) == (2, 128, 14)
    per_block = [block.rel_pos_bias for stage in student.layers for block in stage.blocks]
    assert len(per_block) == 24 and None not in per_block and {stage.rel_pos_bias for stage in student.layers} == {None}
    args = distill.apply_preset(parse("--teacher", "vit_small_patch16"))  # no preset: the paper's recipe
    assert (args.student, args.lr, args.epochs, args.img_size) == ("vit_small_patch16", 3e-4, 300, 224)


# ----------------------------------------------------------------------------- data
def test_synthetic_dataset_is_deterministic_labelled_and_split():
    train, val = SyntheticShapes(40, 64), SyntheticShapes(40, 64, split="val")
    a, label = train[7]
    assert a.size == (64, 64) and a.mode == "RGB" and label == 7
    assert a.tobytes() == train[7][0].tobytes() != val[7][0].tobytes()
    assert sorted(train[i][1] for i in range(40)) == sorted(list(range(10)) * 4)
    seeded = SeededTransform(train, fd_transform(32), seed=1)
    torch.manual_seed(123)
    first = seeded[3][0]
    state = torch.get_rng_state()
    assert torch.equal(first, seeded[3][0]) and torch.equal(state, torch.get_rng_state())
    seeded.epoch = 1
    assert first.shape == (3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert not torch.equal(first, seeded[3][0])  # a new epoch, a new crop


def write_images(folder, count, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folders_and_clear_errors(tmp_path):
    write_images(tmp_path / "imnet" / "train" / "cat", 5)
    write_images(tmp_path / "imnet" / "train" / "dog", 5)
    write_images(tmp_path / "flat", 6)
    labelled = image_dataset(tmp_path / "imnet")
    assert len(labelled) == 10 and labelled.classes == ["cat", "dog"] and labelled[9][1] == 1
    flat = image_dataset(tmp_path / "flat")
    assert len(flat) == 6 and flat[0][1] == -1 and flat[0][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="--data .*missing"):
        image_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data .*no images"):
        image_dataset(tmp_path / "empty")
    (tmp_path / "empty_classes" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="--data .*empty_classes: no images found"):
        image_dataset(tmp_path / "empty_classes")
    write_images(tmp_path / "imnet" / "train" / "bird", 1)
    (tmp_path / "imnet" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="--data .*train: no images in the class folders empty"):
        image_dataset(tmp_path / "imnet", labelled=True)


def test_folders_as_people_have_them(tmp_path):
    # photos/ with loose images and an edited/ subfolder, a symlinked folder, Jupyter's checkpoints and
    # macOS's ._ files: every image is used, hidden files and folders never.
    photos = tmp_path / "photos"
    write_images(photos, 3)
    write_images(photos / "edited", 2)
    write_images(tmp_path / "elsewhere", 4)
    (photos / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (photos / "edited" / "up").symlink_to(photos, target_is_directory=True)  # a loop: followed once, not forever
    (photos / ".ipynb_checkpoints").mkdir()
    (photos / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(photos / ".thumbnails", 2)
    dataset = image_dataset(photos)
    names = sorted(str(f.relative_to(photos)) for f in dataset.files)
    assert names == sorted(["img0.jpg", "img1.png", "img2.jpg", "edited/img0.jpg", "edited/img1.png",
                            "linked/img0.jpg", "linked/img1.png", "linked/img2.jpg", "linked/img3.png"])
    assert {label for _, label in [dataset[0], dataset[8]]} == {-1}  # loose images: unlabelled
    assert dataset.summary == f"9 images in {photos} (no class folders: unlabelled)"
    with pytest.raises(ValueError, match=r"photos: 3 images lie outside class subfolders"):
        image_dataset(photos, labelled=True)  # fine-tuning needs a class for every image
    write_images(tmp_path / "imnet" / "cat", 2)
    write_images(tmp_path / "imnet" / "dog", 1)
    (tmp_path / "imnet" / ".ipynb_checkpoints").mkdir()
    classes = image_dataset(tmp_path / "imnet", labelled=True)
    assert classes.classes == ["cat", "dog"] and classes.summary.endswith(f"3 images in {tmp_path / 'imnet'}, 2 classes")
    out = tmp_path / "run"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        distill.main(parse(*MICRO, "--data", str(photos), "--epochs", "1", "--batch-size", "3", "--out", str(out)))
    assert f"data: 9 images in {photos}" in captured.getvalue()
    assert len(read_log(out)) == 3 and torch.load(out / "student.pth", weights_only=True)["data"].startswith("9 images")


# ----------------------------------------------------------------------------- end to end
def write_odd_and_bad_images(folder):
    """Readable images in every awkward form, and three unreadable files."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((40, 48), 65535, np.uint16)).save(folder / "white16.png")  # 16-bit greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:8, :8]).save(folder / "tiny.png")  # smaller than the crop
    for i in range(10):
        Image.fromarray(np.roll(rgb, i, axis=0)).save(folder / f"plain{i}.jpg")
    data = (folder / "plain0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")


def test_odd_images_load_and_unreadable_ones_are_skipped_counted_and_bounded(tmp_path, capsys, monkeypatch):
    from data import UnreadableImage, load_rgb
    folder = tmp_path / "odd"
    write_odd_and_bad_images(folder)
    assert load_rgb(folder / "white16.png").getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert load_rgb(folder / "rotated.jpg").size == (40, 48)  # EXIF orientation applied
    assert all(load_rgb(folder / f).mode == "RGB" for f in ("grey.png", "cmyk.jpg", "rgba.png", "palette.png"))
    for name in ("truncated.jpg", "empty.jpg", "notes.png"):
        with pytest.raises(UnreadableImage, match=name):
            load_rgb(folder / name)
    # 20 files, 3 unreadable: skipped with a warning naming them, counted in the log.
    argv = [*MICRO, "--data", str(folder), "--batch-size", "4", "--epochs", "1", "--log-every", "100"]
    with pytest.warns(UserWarning, match="skipping an unreadable image: .*(truncated|empty|notes)"):
        distill.main(parse(*argv, "--max-bad-frac", "0.5", "--out", str(tmp_path / "run")))
    assert sum(r["bad_images"] for r in read_log(tmp_path / "run")) == 3  # 5 batches of 4: every file drawn
    # Past the bound (one image of 20 is more than 0.01): the run stops in that step, before its checkpoint, the
    # message on a line of its own after the progress bar. Each step is saved (--save-every: a tenth of 5 steps).
    strict = tmp_path / "strict"
    capsys.readouterr()
    with pytest.raises(SystemExit) as status, pytest.warns(UserWarning, match="skipping an unreadable image"):
        distill_cli_in_process(monkeypatch, *argv, "--max-bad-frac", "0.01", "--out", str(strict))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    assert stderr.rstrip().split("\n")[-1].startswith("distill.py: error: epoch 0: 1 of its 20 images were "
                                                       "unreadable, more than --max-bad-frac 0.01")
    assert torch.load(strict / "checkpoint.pth", weights_only=True)["step"] < 5  # not the epoch's end: stopped early
    # A folder of nothing but unreadable files, read by a worker process: one line naming one of them.
    (tmp_path / "bad").mkdir()
    for name in ("notes.png", "empty.jpg", "truncated.jpg"):
        for i in range(3):
            (tmp_path / "bad" / f"{i}{name}").write_bytes((folder / name).read_bytes())
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *argv, "--workers", "1", "--data", str(tmp_path / "bad"), "--out",
                        str(tmp_path / "bad_run"))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]  # the worker may still warn after it
    assert len(errors) == 1 and re.fullmatch(rf"distill.py: error: all 4 images of a batch are unreadable, as "
                                             rf"{tmp_path / 'bad'}/\S+: .*is --data the folder you meant\? Fix or "
                                             rf"remove the files the warnings name .*", errors[0])


def test_distill_on_image_folder_writes_checkpoint_student_and_log(tmp_path):
    write_images(tmp_path / "flat", 16)
    out = tmp_path / "run"
    student = distill.main(parse(*MICRO, "--data", str(tmp_path / "flat"), "--epochs", "2", "--out", str(out))).cpu()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(set(r) >= {"step", "epoch", "loss", "lr", "img_per_s"} for r in log)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and state["args"]["teacher"] == "vit_micro_patch8"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["student"])
    # The distilled student is a model file: it rebuilds, and can even serve as a teacher.
    rebuilt = load_model_file(out / "student.pth")
    images = torch.rand(2, 3, 32, 32)
    student.eval()
    torch.testing.assert_close(rebuilt.eval()(images), student(images))
    as_teacher = load_teacher("ignored", weights=out / "student.pth", grid=4)
    torch.testing.assert_close(as_teacher(images), student(images))
    with pytest.raises(ValueError, match="checkpoint.pth: not a model file"):
        load_model_file(out / "checkpoint.pth")


@pytest.mark.parametrize("student_name", ["swinv2_micro_window4", "swinv2_micro_window4_shared"])
def test_swin_teacher_distils_into_a_swinv2_student(tmp_path, student_name):
    # A micro EsViT-like teacher (Swin V1, saved as a model file) and a micro SwinV2 student with a
    # position-bias MLP in every block (the official FD-EsViT student) or one per stage.
    torch.manual_seed(1)
    teacher = SwinTransformer(version=1, img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
                              position_bias="per_block", norm_eps=1e-6)
    torch.save({"arch": teacher.arch, "model": teacher.state_dict()}, tmp_path / "swin_teacher.pth")
    out = tmp_path / "run"
    student = distill.main(parse(*MICRO, "--teacher", "esvit_micro", "--teacher-weights", str(tmp_path / "swin_teacher.pth"),
                                 "--student", student_name, "--epochs", "2", "--lr", "0.3", "--warmup-epochs", "0",
                                 "--out", str(out))).cpu()
    losses = [line["loss"] for line in read_log(out)]
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]) / 2  # 0.33 at the start, under 0.08 at the end
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["projector"]["weight"].shape == (32, 64)  # student width 64 -> teacher width 32
    mlps = sorted({k.split(".rpe_mlp.")[0] for k in state["student"] if ".rpe_mlp." in k})
    assert mlps == ([f"layers.{i}.rel_pos_bias" for i in (0, 1)] if student_name.endswith("_shared") else
                    [f"layers.{i}.blocks.{j}.rel_pos_bias" for i in (0, 1) for j in (0, 1)])
    rebuilt = load_model_file(out / "student.pth").eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), student.eval()(images))


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    argv = [*MICRO, "--epochs", "2", "--save-every", "5"]  # 8 steps per epoch, 16 in all
    full = distill.main(parse(*argv, "--out", str(tmp_path / "full")))

    with crash_at_call(monkeypatch, distill, "fd_loss", 7), pytest.raises(KeyboardInterrupt):
        distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pth", weights_only=True)["step"] == 5
    resumed = distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))

    steps = [r["step"] for r in read_log(tmp_path / "crashed")]
    assert steps == list(range(1, 17))  # step 6 was logged, then redone: logged once
    discarded = (tmp_path / "crashed" / "log.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in discarded] == [6]  # the first run's step 6, kept aside
    full_log = {r["step"]: r for r in read_log(tmp_path / "full")}
    for record in read_log(tmp_path / "crashed")[5:]:
        assert record["lr"] == full_log[record["step"]]["lr"]
        assert record["loss"] == full_log[record["step"]]["loss"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--student vit_micro_patch8 -> vit_tiny_patch8"):
        distill.main(parse(*argv, "--student", "vit_tiny_patch8", "--out", str(tmp_path / "crashed")))
    with pytest.raises(ValueError, match="--batch-size 8 -> 4"):
        distill.main(parse(*argv, "--batch-size", "4", "--out", str(tmp_path / "crashed")))


def test_sigkill_mid_epoch_then_the_same_command_gives_the_uninterrupted_weights(tmp_path):
    import signal
    import time
    command = [sys.executable, str(REPO / "distill.py"), *MICRO, "--epochs", "2", "--save-every", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The uninterrupted reference runs alongside the run to be killed (two cores).
    reference = subprocess.Popen([*command, "--out", str(tmp_path / "straight")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    while not (killed / "checkpoint.pth").exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: as a preempted job
    assert process.wait() == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0
    step = torch.load(killed / "checkpoint.pth", weights_only=True)["step"]
    assert 3 <= step < 16 and step % 3 == 0  # killed mid-run; the checkpoint on disk is whole
    subprocess.run([*command, "--out", str(killed)], check=True, capture_output=True, env=env)
    straight = torch.load(tmp_path / "straight" / "student.pth", weights_only=True)["model"]
    resumed = torch.load(killed / "student.pth", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_corrupt_files_are_reported(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "run"
    argv = [*MICRO, "--epochs", "1", "--save-every", "2", "--keep", "2", "--out", str(out)]
    real_save, saves = torch.save, []

    class FullDisk:  # a file whose writes fail past its first 1000 bytes, as on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 1000:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

    def disk_full_on_the_third_save(obj, f):  # torch's writer then fails too, with 'unexpected pos'
        saves.append(1)
        real_save(obj, FullDisk(f) if len(saves) == 3 else f)

    monkeypatch.setattr(torch, "save", disk_full_on_the_third_save)
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *argv)
    printed = capsys.readouterr()
    assert status.value.code == 2 and "Traceback" not in printed.err and "8 steps (1 epoch of 8)" in printed.out
    assert printed.err.rstrip().split("\n")[-1] == (
        f"distill.py: error: cannot write {out / 'checkpoint.pth'} ([Errno 28] No space left on device); "
        f"nothing was replaced: free some space on its disk (or use another --out), then run the same command again "
        f"(FD_TRACEBACK=1 shows where)")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2  # the previous one, whole
    assert not list(out.glob("*.tmp"))
    distill.main(parse(*argv[:-4], "--epochs", "2", "--save-every", "2", "--keep", "2", "--out", str(out)))
    assert "resuming with changed settings: --epochs 1 -> 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0000014.pth", "checkpoint-0000016.pth"]
    (out / "checkpoint.pth").write_bytes((out / "checkpoint.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"checkpoint.pth cannot be read .*the newest snapshot is "
                                           r".*checkpoint-0000016.pth: copy it to"):
        distill.main(parse(*argv[:-4], "--epochs", "3", "--out", str(out)))
    # checkpoint.pth deleted, snapshots kept: the run resumes from the newest one and says so.
    (out / "checkpoint.pth").unlink()
    capsys.readouterr()
    distill.main(parse(*argv[:-4], "--epochs", "3", "--save-every", "2", "--keep", "2", "--out", str(out)))
    assert f"{out / 'checkpoint.pth'} is missing: resuming from the newest snapshot, {out / 'checkpoint-0000016.pth'}" \
        in capsys.readouterr().out
    steps = [r["step"] for r in read_log(out)]
    assert steps == list(range(1, 25))  # each step once: nothing restarted from 0, nothing logged twice


@pytest.mark.parametrize("script, flag, value, expected", [
    ("distill", "--epochs", "0", "expected a value in (0, inf)"),
    ("finetune", "--epochs", "-1", "expected a value in (0, inf)"),
    ("distill", "--epochs", "inf", "'inf' is not a number"),
    ("distill", "--save-every", "0", "[1, inf)"), ("distill", "--log-every", "0", "[1, inf)"),
    ("distill", "--drop-path", "1.5", "[0.0, 1.0)"), ("distill", "--min-crop-scale", "2", "(0.0, 1.0]"),
    ("distill", "--img-size", "0", "[1, inf)"), ("distill", "--lr", "-1", "-1 is out of range"),
    ("finetune", "--synthetic-val-images", "0", "[1, inf)"), ("finetune", "--mixup", "-1", "[0.0, inf)"),
    ("distill", "--batch-size", "two", "'two' is not an integer"), ("bench", "--steps", "0", "[1, inf)"),
    ("distill", "--clip-grad", "nan", "nan is out of range")])
def test_flag_values_are_checked_when_parsed(script, flag, value, expected, capsys):
    parser = {"distill": distill, "finetune": finetune, "bench": bench}[script].get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([flag, value])
    error = capsys.readouterr().err
    assert f"{script}.py: error: argument {flag}: " in error and expected in error  # the README's words


def test_run_length_and_sizes_are_checked_before_training(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"--img-size 30 is not a multiple of the student's patch size 8"):
        distill.main(parse(*MICRO, "--img-size", "30", "--out", str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"--warmup-epochs 2 is not shorter than --epochs 2: the lr would never"):
        distill.main(parse(*MICRO, "--epochs", "2", "--warmup-epochs", "2", "--out", str(tmp_path / "b")))
    assert not (tmp_path / "b" / "student.pth").exists()
    # A user's error from the command line: one line on stderr, exit status 2, no traceback.
    capsys.readouterr()
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *MICRO, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"distill.py: error: --data {tmp_path / 'nowhere'}: no such folder "
                                                  f"(give an ImageFolder root, a folder with train/ and val/, or a "
                                                  f"folder of images) (FD_TRACEBACK=1 shows where)"]


def test_the_default_run_saves_a_checkpoint_every_tenth_of_the_way():
    args = distill.apply_preset(parse())  # the built-in default: 2 epochs of 64 steps
    training.schedule(args, batches_per_epoch=64, world_size=1)
    assert args.save_every == 12  # 128 steps // 10: resumable within a minute
    long = distill.apply_preset(parse("--teacher", "clip"))
    training.schedule(long, batches_per_epoch=1251, world_size=8)
    assert long.save_every == 1000 and parse("--save-every", "50").save_every == 50


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib, training; "
                               "training.lock_out(pathlib.Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
                               str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"--out {out}: another run is writing to it \(pid {holder.pid} on "):
            distill.main(parse(*MICRO, "--epochs", "1", "--out", str(out)))
    finally:
        holder.kill()
        holder.wait()
    distill.main(parse(*MICRO, "--epochs", "1", "--out", str(out)))  # the lock went with its process
    assert (out / "student.pth").is_file()


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    training.lock_out(tmp_path)
    assert f"warning: cannot lock {tmp_path} ([Errno 37] No locks available)" in capsys.readouterr().out


def test_resume_compares_the_teacher_by_checksum_and_keeps_the_seed(tmp_path, capsys):
    teacher = build_student("vit_micro_patch8", 32)
    torch.save({"arch": teacher.arch, "model": teacher.state_dict()}, tmp_path / "teacher.pth")
    argv = [*MICRO, "--teacher", "mine", "--epochs", "1", "--save-every", "4", "--out", str(tmp_path / "run")]
    distill.main(parse(*argv, "--teacher-weights", str(tmp_path / "teacher.pth")))
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "teacher.pth").write_bytes((tmp_path / "teacher.pth").read_bytes())
    longer = [*argv, "--epochs", "2"]
    distill.main(parse(*longer, "--teacher-weights", str(tmp_path / "moved" / "teacher.pth")))  # same SHA-256
    assert "resuming from" in capsys.readouterr().out
    torch.save({"arch": teacher.arch, "model": build_student("vit_micro_patch8", 32).state_dict()},
               tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"run was distilled from teacher weights .*moved/teacher.pth \(sha256 "):
        distill.main(parse(*longer, "--epochs", "3", "--teacher-weights", str(tmp_path / "other.pth")))
    with pytest.raises(ValueError, match=r"--seed 0 -> 1"):
        distill.main(parse(*longer, "--epochs", "3", "--seed", "1", "--teacher-weights", str(tmp_path / "teacher.pth")))


def test_teacher_statistics_are_shown_and_can_be_set(tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(parse(*MICRO, "--epochs", "1", "--teacher-mean", "0.5", "0.5", "0.5", "--teacher-std", "0.5", "0.25",
                       "0.5", "--out", str(out)))
    assert "input mean 0.5 0.5 0.5 std 0.5 0.25 0.5" in capsys.readouterr().out
    recorded = torch.load(out / "student.pth", weights_only=True)["teacher"][0]
    assert (recorded["mean"], recorded["std"]) == ([0.5] * 3, [0.5, 0.25, 0.5])
    distill.main(parse(*MICRO, "--epochs", "1", "--out", str(tmp_path / "own")))
    assert "input mean 0.485 0.456 0.406 std 0.229 0.224 0.225" in capsys.readouterr().out  # timm's ImageNet values


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, monkeypatch):
    real_loss, calls = distill.fd_loss, []

    def nan_at(steps):
        def loss(prediction, target):
            calls.append(1)
            value = real_loss(prediction, target)
            return value * float("nan") if len(calls) in steps else value
        return loss

    # One NaN (optimizer step 3): skipped, weights unchanged by it, counted in the log; the run goes on.
    monkeypatch.setattr(distill, "fd_loss", nan_at({3}))
    out = tmp_path / "one_nan"
    student = distill.main(parse(*MICRO, "--epochs", "1", "--log-every", "4", "--out", str(out)))
    log = read_log(out)
    assert [r["skipped"] for r in log] == [1, 0] and all(math.isfinite(r["loss"]) for r in log)
    assert all(torch.isfinite(p).all() for p in student.parameters())

    # NaN from step 3 on, --max-nonfinite 3: steps 3, 4, 5 skipped, then the run stops. The checkpoint
    # saved at step 4 holds the weights of step 2 (skipped steps change nothing), all finite.
    calls.clear()
    monkeypatch.setattr(distill, "fd_loss", nan_at(set(range(3, 100))))
    out = tmp_path / "nan"
    argv = [*MICRO, "--epochs", "1", "--save-every", "2", "--max-nonfinite", "3", "--out", str(out)]
    with pytest.raises(FloatingPointError, match="step 5: 3 steps in a row .*checkpoint.pth holds the last good"):
        distill.main(parse(*argv))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_torchrun_two_cpu_ranks_with_accumulation_hold_identical_weights(two_teachers_two_ranks):
    _, out, result = two_teachers_two_ranks  # 2 ranks x 2 images x 2 micro-steps, as the fixture says
    assert "2 process(es) x 2 images x 2 micro-steps = 8 images per step" in result.stdout
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))  # 64 images / 8 per step
    assert rank0["reductions"] == 8  # one all-reduce per optimizer step (one bucket), not one per micro-batch
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == 8
    torch.manual_seed(0)
    start = build_student("vit_micro_patch8", 32)  # the initialisation of the run: training moved it
    assert not torch.equal(rank0["blocks.0.attn.qkv.weight"], start.state_dict()["blocks.0.attn.qkv.weight"])


def test_a_rank_that_dies_takes_the_job_down_instead_of_hanging(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import distill\n"
        "real_loss, calls = distill.fd_loss, []\n"
        "def failing_loss(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 2:\n"
        "        raise RuntimeError('simulated failure on rank 1')\n"
        "    return real_loss(*args, **kwargs)\n"
        "distill.fd_loss = failing_loss\n"
        "distill.main(distill.get_args_parser().parse_args(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(driver), *MICRO, "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=180)  # rank 0 waits in an all-reduce: torchrun must end it
    assert result.returncode != 0 and "simulated failure on rank 1" in result.stderr


# ----------------------------------------------------------------------------- finetune.py
FT_MICRO = ["--recipe", "vit_tiny_patch16", "--model", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
            "64", "--synthetic-val-images", "25", "--batch-size", "8", "--workers", "0", "--log-every", "1",
            "--amp", "fp32", "--device", "cpu"]
TABLE = "rel_pos_bias.relative_position_bias_table"


def ft_parse(*argv):
    return finetune.get_args_parser().parse_args(list(argv))


def ft_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A micro FD run (one epoch): its folder holds student.pth and checkpoint.pth."""
    out = tmp_path_factory.mktemp("fd")
    distill.main(distill.get_args_parser().parse_args([*MICRO, "--epochs", "1", "--out", str(out)]))
    return out


# ----------------------------------------------------------------------------- conversions
def test_shared_bias_copied_into_every_block_keeps_the_encoder_output():
    torch.manual_seed(0)
    student = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        student.rel_pos_bias.relative_position_bias_table.normal_()
    source = student.state_dict()
    state = finetune.encoder_for_finetuning(source, student.arch, 32)
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
    assert torch.equal(finetune.resize_rel_pos_table(table, (3, 4), (3, 4)), table)
    resized = finetune.resize_rel_pos_table(table, (3, 4), (5, 6))
    assert resized.shape == ((2 * 5 - 1) * (2 * 6 - 1) + 3, heads)
    # Independent reference: the offsets as a (heads, 5, 7) image, row offset major (relative_position_index).
    image = table[:-3].T.reshape(1, heads, 5, 7)
    expected = F.interpolate(image, size=(9, 11), mode="bicubic", align_corners=False).reshape(heads, -1).T
    torch.testing.assert_close(resized[:-3], expected)
    assert torch.equal(resized[-3:], table[-3:])


def test_absolute_position_embedding_resized_keeping_the_class_token():
    pos_embed = torch.randn(1, 1 + 4 * 4, 8)
    assert torch.equal(checkpoints.resize_pos_embed(pos_embed, (4, 4), (4, 4)), pos_embed)
    resized = checkpoints.resize_pos_embed(pos_embed, (4, 4), (6, 6))
    assert resized.shape == (1, 1 + 36, 8) and torch.equal(resized[:, 0], pos_embed[:, 0])
    image = pos_embed[0, 1:].T.reshape(1, 8, 4, 4)
    expected = F.interpolate(image, size=(6, 6), mode="bicubic", align_corners=False).reshape(8, 36).T
    torch.testing.assert_close(resized[0, 1:], expected)


def test_layer_decay_scales_every_parameter_group():
    encoder = models.PretrainedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                   rel_pos="per_block", abs_pos=True)
    model = Classifier(encoder, 10)
    groups = training.param_groups(model, 0.05, finetune.layer_decay_scale(encoder.arch, 0.5))

    def by_hand(name):  # depth 2: ids 0 (embeddings), 1 and 2 (blocks), 3 (head, fc_norm); scale 0.5^(3 - id)
        if name in ("encoder.cls_token", "encoder.pos_embed") or name.startswith("encoder.patch_embed."):
            return 0.125
        if name.startswith("encoder.blocks.0."):
            return 0.25
        if name.startswith("encoder.blocks.1."):
            return 0.5
        assert name.startswith(("fc_norm.", "head.")), name
        return 1.0

    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())
    for group in groups:
        for param in group["params"]:
            assert group["lr_scale"] == by_hand(names[id(param)]), names[id(param)]
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    assert "head.weight" in decayed and "head.bias" not in decayed and "encoder.blocks.0.rel_pos_bias." \
        "relative_position_bias_table" not in decayed and "encoder.pos_embed" not in decayed


# ----------------------------------------------------------------------------- objective and metrics
def test_mixup_cutmix_targets_sum_to_one_and_match_the_images():
    args = finetune.apply_recipe(ft_parse(*FT_MICRO))
    mixer = finetune.mixup_cutmix(args, 10)
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([3, 1, 4, 0, 5, 9])
    kinds = set()
    for _ in range(12):
        mixed, targets = finetune.soft_targets(images, labels, 10, mixer, 0.1)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        assert targets.min() >= 0.01 - 1e-7  # smoothing 0.1 over 10 classes
        # Each image is mixed with the previous one of the batch, with the weight its target shows.
        lam = (targets[0, labels[0]] - 0.01) / 0.9
        partner = images.roll(1, 0)
        if torch.allclose(mixed, lam * images + (1 - lam) * partner, atol=1e-6):
            kinds.add("mixup")
        else:  # cutmix: every pixel from one of the two images, the own image's share being lam
            own = (mixed == images).all(dim=1)
            assert (own | (mixed == partner).all(dim=1)).all()
            assert own[0].float().mean().item() == pytest.approx(lam.item(), abs=1e-6)
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}
    logits = torch.randn(6, 10)
    _, targets = finetune.soft_targets(images, labels, 10, None, 0.1)
    torch.testing.assert_close(finetune.soft_cross_entropy(logits, targets),
                               F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_topk_counts_and_shards_cover_the_validation_set_once():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4, 0.5],   # label 0: top-1
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],   # label 4: 5th, top-5 only
                           [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3],   # label 5: 6th, neither
                           [0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]])  # label 2: top-1
    hits = finetune.topk_correct(logits, torch.tensor([0, 4, 5, 2]))
    assert hits.tolist() == [2.0, 3.0]
    assert finetune.topk_correct(logits[:, :3], torch.tensor([0, 1, 2, 2])).tolist() == [2.0, 4.0]  # k capped
    dataset = [(torch.tensor(i), i) for i in range(7)]
    seen = [int(x) for rank in range(2) for batch, _, _ in finetune.val_loader(dataset, 2, 0, rank, 2) for x in batch]
    assert sorted(seen) == list(range(7)) and len(seen) == 7  # 4 + 3: nothing padded or dropped


# ----------------------------------------------------------------------------- end to end
def write_colour_classes(root, per_class, seed):
    """An ImageFolder split of 10 classes told apart by hue, with noise and a grey distractor square:
    learnable in seconds, unlike SyntheticShapes, which a micro ViT from scratch cannot learn quickly."""
    rng = torch.Generator().manual_seed(seed)
    for label in range(10):
        (root / f"class{label}").mkdir(parents=True)
        rgb = torch.tensor(colorsys.hsv_to_rgb(label / 10, 0.9, 0.8)) * 255
        for i in range(per_class):
            pixels = (rgb[:, None, None] + 25 * torch.randn(3, 32, 32, generator=rng)).clamp(0, 255)
            x, y = torch.randint(0, 20, (2,), generator=rng).tolist()
            pixels[:, y:y + 12, x:x + 12] = 128
            Image.fromarray(pixels.byte().permute(1, 2, 0).numpy()).save(root / f"class{label}" / f"{i}.png")


def test_short_finetune_beats_chance_and_eval_only_reproduces_the_logged_top1(tmp_path):
    write_colour_classes(tmp_path / "data" / "train", 16, seed=0)
    write_colour_classes(tmp_path / "data" / "val", 5, seed=1)
    out = tmp_path / "scratch"
    argv = [*FT_MICRO, "--data", str(tmp_path / "data"), "--batch-size", "16", "--randaug-ops", "0", "--mixup", "0",
            "--cutmix", "0"]
    model, last = finetune.main(ft_parse(*argv, "--epochs", "3", "--lr", "0.1", "--out", str(out)))
    evals = [r for r in ft_log(out) if "top1" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and all(r["images"] == 50 for r in evals)
    best = max(evals, key=lambda r: r["top1"])
    assert best["top1"] >= 50, evals  # chance is 10%
    _, metrics = finetune.main(ft_parse(*argv, "--eval-only", "--init", str(out / "best.pth")))
    assert metrics["top1"] == best["top1"] and metrics["top5"] == best["top5"] and metrics["images"] == 50
    assert isinstance(load_model_file(out / "checkpoint.pth"), Classifier)  # the last state is a model file too


def test_init_from_distilled_student_checkpoint_and_teacher(distilled, tmp_path, capsys):
    student = load_model_file(distilled / "student.pth").eval()
    images = torch.rand(2, 3, 32, 32)
    for init in (distilled / "student.pth", distilled / "checkpoint.pth"):
        model = finetune.build_classifier(finetune.apply_recipe(ft_parse(*FT_MICRO, "--init", str(init),
                                                                         "--drop-path", "0")), num_classes=10)
        report = capsys.readouterr().out
        assert "removed ['norm.bias', 'norm.weight', 'rel_pos_bias.relative_position_bias_table']" in report
        assert "added 2 per-block" in report and "new: fc_norm.weight, fc_norm.bias, head.weight, head.bias" in report
        for block in model.encoder.blocks:
            assert torch.equal(block.rel_pos_bias.relative_position_bias_table, student.state_dict()[TABLE])
        torch.testing.assert_close(model.eval().encoder.forward_features(images), student.forward_features(images))
    # At another resolution the tables are resized, and the student fine-tunes.
    out = tmp_path / "fd48"
    finetune.main(ft_parse(*FT_MICRO, "--init", str(distilled / "student.pth"), "--img-size", "48", "--epochs", "1",
                           "--out", str(out)))
    assert "resized from 32 to 48 px: 2 relative position tables;" in capsys.readouterr().out
    assert [r["images"] for r in ft_log(out) if "top1" in r] == [25]
    # The baseline: the teacher itself, a plain ViT with an absolute position embedding.
    model, _ = finetune.main(ft_parse(*FT_MICRO, "--init", "vit_micro_patch8", "--epochs", "1", "--out",
                                      str(tmp_path / "teacher")))
    report = capsys.readouterr().out
    assert "init: vit_micro_patch8 (random weights from a fixed seed)" in report
    assert "removed ['norm.bias', 'norm.weight']" in report and "added 0 per-block" in report
    teacher = load_pretrained("vit_micro_patch8", img_size=32)
    assert model.encoder.pos_embed is not None and model.encoder.blocks[0].rel_pos_bias is None
    assert not torch.equal(model.encoder.pos_embed, teacher.pos_embed)  # trained from the teacher's weights
    assert len([r for r in ft_log(tmp_path / "teacher") if "top1" in r]) == 1


def test_init_from_a_timm_file_of_another_resolution_says_it_was_resized(tmp_path, capsys):
    # As a DINOv2 file (518 px) fine-tuned at 112 px: here a 64 px file (8x8 patches of 8) fine-tuned at 32 px.
    torch.save(scaled(timm_layout(64, 1, 8, 8)), tmp_path / "timm.pth")
    args = finetune.apply_recipe(ft_parse(*FT_MICRO, "--init", "timm", "--init-weights", str(tmp_path / "timm.pth")))
    model = finetune.build_classifier(args, num_classes=10)
    assert "; resized from 64 to 32 px: pos_embed;" in capsys.readouterr().out
    assert model.encoder.pos_embed.shape == (1, 1 + 4 * 4, 64)


def test_finetuning_on_one_class_is_refused(tmp_path):
    for split in ("train", "val"):  # every image right: top-1 100% and a loss of 0, for nothing learnt
        write_images(tmp_path / "data" / split / "cats", 4)
    with pytest.raises(ValueError, match=r"one class folder \(cats\); fine-tuning a classifier needs two classes"):
        finetune.main(ft_parse(*FT_MICRO, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")))


def test_a_fraction_of_an_epoch_distils_and_finetunes(tmp_path, capsys):
    # 64 images in batches of 8: half an epoch is 4 steps; fine-tuning evaluates at the run's end.
    distill.main(parse(*MICRO, "--epochs", "0.5", "--warmup-epochs", "0.25", "--out", str(tmp_path / "fd")))
    assert [r["step"] for r in read_log(tmp_path / "fd")] == [1, 2, 3, 4]
    assert "4 steps (0.5 epochs of 8)" in capsys.readouterr().out
    finetune.main(ft_parse(*FT_MICRO, "--epochs", "0.5", "--warmup-epochs", "0.25", "--out", str(tmp_path / "ft")))
    assert [r["step"] for r in ft_log(tmp_path / "ft") if "top1" in r] == [4]
    assert torch.load(tmp_path / "ft" / "best.pth", weights_only=True)["step"] == 4


def test_loading_errors_list_missing_and_unexpected_keys(distilled, tmp_path):
    state = torch.load(distilled / "student.pth", weights_only=True)
    del state["model"]["blocks.1.mlp.fc2.weight"]
    state["model"]["projector.weight"] = torch.zeros(32, 32)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys: \['encoder.blocks.1.mlp.fc2.weight'\]; "
                                         r"unexpected keys: \['encoder.projector.weight'\]"):
        finetune.main(ft_parse(*FT_MICRO, "--init", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "a")))
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: expected a model file .*found \['weights'\]"):
        finetune.main(ft_parse(*FT_MICRO, "--init", str(tmp_path / "other.pth"), "--out", str(tmp_path / "b")))
    with pytest.raises(FileNotFoundError, match="--init missing.pth: no such file"):
        finetune.main(ft_parse(*FT_MICRO, "--init", "missing.pth", "--out", str(tmp_path / "c")))
    with pytest.raises(ValueError, match="holds an encoder without a head"):
        finetune.main(ft_parse(*FT_MICRO, "--eval-only", "--init", str(distilled / "student.pth")))
    data = (distilled / "student.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pth: not a readable checkpoint, probably truncated"):
        finetune.main(ft_parse(*FT_MICRO, "--init", str(tmp_path / "truncated.pth"), "--out", str(tmp_path / "d")))


def test_linear_probe_trains_only_the_head(distilled, tmp_path):
    model, metrics = finetune.main(ft_parse(*FT_MICRO, "--linear-probe", "--init", str(distilled / "student.pth"),
                                            "--epochs", "1", "--out", str(tmp_path / "lin")))
    student = torch.load(distilled / "student.pth", weights_only=True)["model"]
    for name, value in model.encoder.state_dict().items():
        source = student[TABLE] if name.endswith(TABLE) else student[name]
        assert torch.equal(value, source), name
    assert isinstance(model.fc_norm, torch.nn.BatchNorm1d) and model.fc_norm.num_batches_tracked == 8
    assert model.head.weight.abs().max() > 1e-3  # moved from its init of about 2e-5
    assert metrics["images"] == 25


def test_finetune_resume_after_a_crash_or_a_sigterm_continues_exactly(tmp_path, monkeypatch, capsys):
    argv = [*FT_MICRO, "--epochs", "2", "--save-every", "3", "--lr", "0.1"]  # 8 steps per epoch; mixup, drop path,
    # RandAugment and erasing on: their random draws must continue as in the uninterrupted run
    full, _ = finetune.main(ft_parse(*argv, "--out", str(tmp_path / "full")))

    with crash_at_call(monkeypatch, finetune, "soft_cross_entropy", 11), pytest.raises(KeyboardInterrupt):
        finetune.main(ft_parse(*argv, "--out", str(tmp_path / "crashed")))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pth", weights_only=True)["step"] == 9
    resumed, _ = finetune.main(ft_parse(*argv, "--out", str(tmp_path / "crashed")))

    def without_speed(out):
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in ft_log(out)]

    # A cluster's SIGTERM in step 5 (a loss per step): the step is finished and saved, the run leaves with 128 + 15.
    real, calls = finetune.soft_cross_entropy, []
    monkeypatch.setattr(finetune, "soft_cross_entropy", lambda *a: (calls.append(1), len(calls) == 5 and os.kill(
        os.getpid(), signal.SIGTERM), real(*a))[-1])
    with stop_signals_restored(), pytest.raises(SystemExit) as leaving:
        training.run_cli(finetune.main, ft_parse(*argv, "--out", str(tmp_path / "stopped")))
    monkeypatch.setattr(finetune, "soft_cross_entropy", real)
    assert leaving.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 5: rerun the same command to resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)["step"] == 5
    stopped, _ = finetune.main(ft_parse(*argv, "--out", str(tmp_path / "stopped")))

    full_log = without_speed(tmp_path / "full")
    for run, model in (("crashed", resumed), ("stopped", stopped)):
        assert without_speed(tmp_path / run) == full_log  # a step logged, then redone: logged once
        for a, b in zip(full.state_dict().values(), model.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--img-size 32 -> 48"):
        finetune.main(ft_parse(*argv, "--img-size", "48", "--out", str(tmp_path / "crashed")))


def write_class_folders(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")


def test_val_classes_must_equal_train_classes(tmp_path):
    write_class_folders(tmp_path / "data" / "train", ["cat", "dog"])
    write_class_folders(tmp_path / "data" / "val", ["bird", "cat"])
    with pytest.raises(ValueError, match=r"different classes \(only in train/: \['dog'\]; only in val/: \['bird'\]"):
        finetune.main(ft_parse(*FT_MICRO, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")))


def test_recipes_fill_unset_flags_and_help_covers_every_flag(distilled):
    args = finetune.apply_recipe(ft_parse("--init", "clip"))
    assert (args.recipe, args.lr, args.layer_decay, args.drop_path, args.epochs, args.mixup) == (
        "clip", 1.25e-3, 0.6, 0.3, 100, 0.8)
    args = finetune.apply_recipe(ft_parse("--init", "clip_l14", "--lr", "1e-3", "--linear-probe"))
    assert (args.lr, args.min_lr, args.epochs, args.weight_decay, args.mixup, args.layer_decay) == (
        1e-3, 0.0, 50, 0.0, 0.0, 1.0)
    assert finetune.apply_recipe(ft_parse()).recipe == "vit_tiny_patch16"
    assert finetune.apply_recipe(ft_parse("--init", str(distilled / "student.pth"))).recipe == "paper"
    assert all(action.help for action in finetune.get_args_parser()._actions)


def test_torchrun_two_ranks_evaluate_an_uneven_val_set_like_one_process(finetuned_with_ddp_on_two_ranks):
    # The fine-tuning of conftest.py on 2 ranks: 17 validation images, 9 on rank 0 and 8 on rank 1; 2 epochs.
    out, result = finetuned_with_ddp_on_two_ranks
    assert "2 process(es) x 4 images x 1 micro-step = 8 images per step" in result.stdout
    logged = [r for r in ft_log(out) if "top1" in r]
    assert [r["epoch"] for r in logged] == [0, 1] and all(r["images"] == 17 for r in logged)  # none dropped or repeated
    # Independent count in this one process, over the whole val set, of the last evaluation's model.
    model = load_model_file(out / "checkpoint.pth").eval()
    val = SeededTransform(SyntheticShapes(17, split="val"), finetune.eval_transform(32))
    images, labels = torch.stack([val[i][0] for i in range(17)]), torch.tensor([val[i][1] for i in range(17)])
    with torch.no_grad():
        logits = model(images)
    top1 = 100 * (logits.argmax(1) == labels).sum().item() / 17
    top5 = 100 * (logits.topk(5, 1).indices == labels[:, None]).any(1).sum().item() / 17
    assert logged[-1]["top1"] == pytest.approx(top1) and logged[-1]["top5"] == pytest.approx(top5)
    assert logged[-1]["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_swin_v1_tables_follow_a_window_that_grows_with_the_image():
    torch.manual_seed(0)
    teacher = SwinTransformer(version=1, img_size=32, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=8,
                              position_bias="per_block")  # stage maps 8 and 4: the second window clipped to 4
    state = finetune.encoder_for_finetuning(teacher.state_dict(), teacher.arch, 64)  # maps 16 and 8: windows 8, 8
    model = build_from_arch(finetune.finetuning_arch(teacher.arch, 64, 0.0))
    model.load_state_dict(dict(state, **{k: v for k, v in model.state_dict().items() if k.startswith("norm.")}))
    table = teacher.state_dict()["layers.1.blocks.0.attn.relative_position_bias_table"]  # (7 x 7, heads)
    expected = F.interpolate(table.T.reshape(1, 2, 7, 7), size=(15, 15), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["layers.1.blocks.0.attn.relative_position_bias_table"],
                               expected.reshape(2, 225).T)
    assert torch.equal(state["layers.0.blocks.0.attn.relative_position_bias_table"],
                       teacher.state_dict()["layers.0.blocks.0.attn.relative_position_bias_table"])


def test_resuming_with_a_student_of_another_architecture_is_refused(tmp_path):
    # A SwinV2 run from when one bias MLP per stage was the default: the same name now means one per block.
    argv = [*MICRO, "--student", "swinv2_micro_window4_shared", "--epochs", "1", "--out", str(tmp_path / "run")]
    distill.main(parse(*argv))
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    state["args"]["student"] = "swinv2_micro_window4"  # the name it had then
    torch.save(state, tmp_path / "run" / "checkpoint.pth")
    argv[argv.index("swinv2_micro_window4_shared")] = "swinv2_micro_window4"
    with pytest.raises(ValueError, match=r"run holds a student of another architecture \(position_bias shared -> "
                                         r"per_block\): use another --out, or the --student it was distilled with"):
        distill.main(parse(*argv, "--epochs", "2"))


def test_swinv2_keeps_its_offset_scale_when_its_window_grows():
    student = build_student("swinv2_micro_window8_shared", 32)  # stage windows 8 and 4 (clipped to the 4x4 map)
    arch = finetune.finetuning_arch(student.arch, 64, 0.0)  # at 64 px: windows 8 and 8
    model = build_from_arch(arch)
    assert arch["pretrained_windows"] == [8, 4] and model.layers[1].window == 8
    grown = model.layers[1].blocks[0].rel_pos_bias.relative_coords_table.view(15, 15, 2)
    trained = student.layers[1].rel_pos_bias.relative_coords_table.view(7, 7, 2)
    assert torch.equal(grown[4:11, 4:11], trained)  # offsets up to 3: the inputs the MLP was trained on
    assert grown.abs().max() > trained.abs().max()  # larger offsets extrapolate beyond them


def test_encoders_of_classifiers_and_checkpoints_serve_as_teachers(distilled, tmp_path):
    student = load_model_file(distilled / "student.pth").eval()
    classifier = Classifier(load_model_file(distilled / "student.pth"), 10)
    torch.save({"arch": classifier.arch, "model": classifier.state_dict()}, tmp_path / "classifier.pth")
    images = torch.rand(2, 3, 32, 32)
    from_checkpoint = load_teacher("mine", distilled / "checkpoint.pth", grid=4)
    torch.testing.assert_close(from_checkpoint(images), student(images))
    from_classifier = load_teacher("mine", tmp_path / "classifier.pth", grid=4)
    torch.testing.assert_close(from_classifier.encoder.forward_features(images), student.forward_features(images))
    assert checkpoints.infer_vit_arch(checkpoints.convert_timm(timm_layout(1280, 1, 14, 2, make=meta)))["num_heads"] == 16
    with pytest.raises(ValueError, match="width 100: its number of heads is unknown"):
        checkpoints.infer_vit_arch(checkpoints.convert_timm(timm_layout(100, 1, 14, 2, make=meta)))


def test_swin_student_finetunes_with_per_block_bias_and_layer_decay_per_block(tmp_path):
    torch.manual_seed(0)
    student = build_student("swinv2_micro_window4_shared", 32).eval()  # depths (2, 2), one bias MLP per stage
    torch.save({"arch": student.arch, "model": student.state_dict()}, tmp_path / "student.pth")
    model, _ = finetune.main(ft_parse(*FT_MICRO, "--init", str(tmp_path / "student.pth"), "--epochs", "1",
                                      "--out", str(tmp_path / "ft")))
    encoder = model.encoder.eval()
    shared = student.state_dict()
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # every block got a copy of its stage's MLP
        block_bias = encoder.layers[i].blocks[j].rel_pos_bias
        assert encoder.layers[i].rel_pos_bias is None and block_bias is not None
    fresh = finetune.encoder_for_finetuning(shared, student.arch, 32)
    for key, value in shared.items():
        if ".rel_pos_bias." in key:
            i, rest = key.split(".")[1], key.split(".rel_pos_bias.")[1]
            assert all(torch.equal(fresh[f"layers.{i}.blocks.{j}.rel_pos_bias.{rest}"], value) for j in (0, 1))
    # Layer ids: patch_embed 0, blocks 1..4 across the stages, stage 0's merging with its last block (2), rest 5.
    scale = finetune.layer_decay_scale(student.arch, 0.5)
    expected = {"encoder.patch_embed.proj.weight": 0.5 ** 5, "encoder.layers.0.blocks.0.attn.qkv.weight": 0.5 ** 4,
                "encoder.layers.0.blocks.1.mlp.fc1.weight": 0.5 ** 3, "encoder.layers.0.downsample.reduction.weight":
                0.5 ** 3, "encoder.layers.1.blocks.0.attn.logit_scale": 0.5 ** 2,
                "encoder.layers.1.blocks.1.rel_pos_bias.rpe_mlp.0.weight": 0.5, "head.weight": 1.0}
    assert {name: scale(name) for name in expected} == expected


@pytest.mark.parametrize("student_name", ["swinv2_micro_window4", "swinv2_micro_window4_shared"])
def test_swin_classifier_pools_after_the_distilled_norm(tmp_path, student_name):
    # The official SwinTransformerV2.forward_features: avgpool(norm(x)), `norm` loaded from the distilled
    # checkpoint; then the head. Computed here from the student's own tensors.
    student = randomise_(build_student(student_name, 32), seed=3).eval()
    torch.save({"arch": student.arch, "model": student.state_dict()}, tmp_path / "student.pth")
    args = finetune.apply_recipe(ft_parse(*FT_MICRO, "--init", str(tmp_path / "student.pth")))
    classifier = finetune.build_classifier(args, num_classes=10, verbose=False).eval()
    pooled = []
    classifier.head.register_forward_hook(lambda module, inputs, output: pooled.append(inputs[0]))
    images = torch.rand(3, 3, 32, 32)
    logits = classifier(images)
    tokens = student.forward_features(images)  # (3, 16, 64): the last stage, before the final norm
    weight, bias = student.state_dict()["norm.weight"], student.state_dict()["norm.bias"]
    mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    expected = ((tokens - mean) / torch.sqrt(var + 1e-5) * weight + bias).mean(dim=1)  # eps 1e-5: the official V2's
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected @ classifier.head.weight.T + classifier.head.bias)
    assert not any(k.startswith("fc_norm.") for k in classifier.state_dict())
    # A Swin classifier file of an earlier version (no 'pooling' in its arch) rebuilds as it was trained: fc_norm(mean).
    old_arch = {k: v for k, v in classifier.arch.items() if k != "pooling"}
    old = build_from_arch(old_arch)
    assert isinstance(old.fc_norm, torch.nn.LayerNorm) and isinstance(old.encoder.norm, torch.nn.Identity)


# ----------------------------------------------------------------------------- diagnose.py
def test_attention_distance_identity_is_zero_and_uniform_matches_brute_force():
    grid, batch, heads = (3, 4), 2, 2
    n = grid[0] * grid[1]
    identity = torch.eye(1 + n).expand(batch, heads, -1, -1)
    patches, cls_mass = diagnose.patch_block(identity)
    assert diagnose.attention_distance(patches, grid).abs().max() < 1e-6 and (cls_mass == 0).all()
    # Uniform attention over class token and patches: every query's mean distance to all patches.
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    brute = sum(math.dist(a, b) for a in cells for b in cells) / n ** 2
    uniform = torch.full((batch, heads, 1 + n, 1 + n), 1 / (1 + n))
    renormed, cls_mass = diagnose.patch_block(uniform, renorm=True)
    torch.testing.assert_close(diagnose.attention_distance(renormed, grid), torch.full((batch, heads), brute))
    torch.testing.assert_close(cls_mass, torch.full((batch, heads), 1 / (1 + n)))
    kept, _ = diagnose.patch_block(uniform, renorm=False)  # the class token's share is simply lost
    torch.testing.assert_close(diagnose.attention_distance(kept, grid), torch.full((batch, heads), brute * n / (1 + n)))


def test_swin_windows_are_measured_inside_the_window():
    # 64 px images; a Swin stage of 8x8 tokens in 2x2 windows of 4x4 tokens: tokens of 8 px.
    assert diagnose.token_layout(torch.rand(3 * 4, 2, 16, 16), 3, 0, 64) == ((4, 4), 8.0)
    assert diagnose.token_layout(torch.rand(3, 2, 16, 16), 3, 0, 64) == ((4, 4), 16.0)  # one window: 4x4 stage
    assert diagnose.token_layout(torch.rand(3, 2, 17, 17), 3, 1, 32) == ((4, 4), 8.0)  # ViT, 8 px patches
    with pytest.raises(ValueError, match="not over square grids"):
        diagnose.token_layout(torch.rand(3, 2, 13, 13), 3, 1, 32)


def test_swin_attention_is_measured_inside_windows_of_each_stage():
    swin = build_student("swinv2_micro_window4", 32).eval()  # stages of 8x8 and 4x4 tokens, 4x4 windows
    stats, layers, features = diagnose.run_attention(swin, torch.rand(3, 3, 32, 32), 2, True, True)
    assert [(s["grid"], s["pixels"]) for s in stats] == [((4, 4), 4.0)] * 2 + [((4, 4), 8.0)] * 2
    for s in stats:
        assert (s["distance"] > 0).all() and (s["distance"] <= math.sqrt(18)).all()  # inside a 4x4 window
    assert len(layers) == 4 and layers[0].shape == (3, 64 * 32) and features.shape == (3, 64)


def test_identical_heads_have_cosine_one_and_kl_zero():
    torch.manual_seed(0)
    head = torch.rand(2, 1, 6, 6).softmax(-1)
    same = head.expand(2, 3, 6, 6)
    torch.testing.assert_close(diagnose.head_cosine(same), torch.ones(2, 3, 3))
    torch.testing.assert_close(diagnose.head_kl(same), torch.zeros(2, 3, 3), atol=1e-6, rtol=0)
    different = torch.rand(2, 3, 6, 6).mul(5).softmax(-1)
    kl = diagnose.head_kl(different)
    # KL by hand for one pair: mean over queries of sum_j p log(p / q).
    p, q = different[1, 0], different[1, 2]
    torch.testing.assert_close(kl[1, 0, 2], (p * (p / q).log()).sum(-1).mean(), atol=1e-5, rtol=1e-4)
    assert diagnose.off_diagonal_mean(diagnose.head_cosine(different)).max() < 1
    assert diagnose.off_diagonal_mean(torch.tensor([[1.0, 0.2], [0.4, 1.0]])) == pytest.approx(0.3)


def test_diag_score_of_a_relative_position_map_is_one_and_col_score_of_columns_is_one():
    torch.manual_seed(0)
    grid = (3, 4)
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    value_of_offset = {}
    toeplitz = torch.tensor([[value_of_offset.setdefault((a[0] - b[0], a[1] - b[1]), torch.rand(()).item())
                              for b in cells] for a in cells])
    assert diagnose.diag_score(toeplitz, grid).item() == pytest.approx(1.0, abs=1e-6)
    columns = torch.rand(1, 12).expand(12, 12)
    assert diagnose.col_score(columns).item() == pytest.approx(1.0, abs=1e-6)
    noise = torch.rand(2, 12, 12)
    assert (diagnose.diag_score(noise, grid) < 0.9).all() and (diagnose.col_score(noise) < 0.9).all()
    assert diagnose.col_score(toeplitz).item() < 0.9


def test_filter_normalized_direction_keeps_filter_norms_and_skips_excluded():
    torch.manual_seed(0)
    model = Classifier(build_student("vit_micro_patch8", 32), 10)
    model.encoder.pos_embed = torch.nn.Parameter(torch.randn(1, 17, 32))  # as a plain ViT has
    direction = diagnose.filter_normalized_direction(model, seed=3)
    excluded = {n for n, p in model.named_parameters() if p.ndim <= 1} | {
        "encoder.cls_token", "encoder.pos_embed", "encoder.rel_pos_bias.relative_position_bias_table"}
    for name, param in model.named_parameters():
        if name in excluded:
            assert (direction[name] == 0).all(), name
        else:
            rows = lambda t: t.reshape(t.shape[0], -1).norm(dim=1)  # noqa: E731
            torch.testing.assert_close(rows(direction[name]), rows(param.detach()), msg=name)
            assert not torch.allclose(direction[name], param.detach())
    again = diagnose.filter_normalized_direction(model, seed=3)
    assert all(torch.equal(direction[k], again[k]) for k in direction)


def test_landscape_at_zero_equals_the_model_loss():
    torch.manual_seed(0)
    model = Classifier(build_student("vit_micro_patch8", 32), 4).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    images, labels = torch.rand(12, 3, 32, 32), torch.arange(12) % 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = diagnose.landscape(model, images, labels, [-0.5, 0.0, 0.5], seeds=[0, 1], batch_size=5)
    with torch.no_grad():
        logits = model(images)
    expected_loss = F.cross_entropy(logits, labels).item()
    expected_acc = (logits.argmax(-1) == labels).float().mean().item()
    for seed in range(2):
        assert curves["loss"][seed][1] == pytest.approx(expected_loss, rel=1e-5)
        assert curves["acc"][seed][1] == pytest.approx(expected_acc)
        assert curves["loss"][seed][0] != pytest.approx(expected_loss, rel=1e-3)  # the weights did move
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert diagnose.linear_cka(x, x) == pytest.approx(1.0)
    assert diagnose.linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)
    assert diagnose.linear_cka(x, torch.randn(40, 16)) < 0.8


def test_top_hessian_eigenvalue_of_a_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.1, 5.0, 12, dtype=torch.float64)) @ q.T
    quadratic = lambda ps: 0.5 * ps[0] @ a @ ps[0]  # noqa: E731
    value, trace = diagnose.top_hessian_eigenvalue(quadratic, [torch.randn(12, dtype=torch.float64)], iters=500,
                                                   tol=1e-10)
    assert value == pytest.approx(torch.linalg.eigvalsh(a).max().item(), rel=1e-4)
    assert len(trace) > 1 and trace[0] < value


def test_linear_head_fit_is_deterministic_and_folds_the_standardisation():
    torch.manual_seed(0)
    features, labels = torch.randn(30, 8) * 10 + 3, torch.arange(30) % 3
    head = diagnose.fit_linear_head(features, labels, 3)
    again = diagnose.fit_linear_head(features, labels, 3)
    assert torch.equal(head.weight, again.weight) and torch.equal(head.bias, again.bias)
    assert F.cross_entropy(head(features), labels) < math.log(3)


def test_diagnose_one_model_with_registers(tmp_path):
    torch.manual_seed(0)
    encoder = models.PretrainedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, rel_pos=None,
                                   abs_pos=True, qv_bias=False, layer_scale=None, num_registers=2)
    torch.save({"arch": encoder.arch, "model": encoder.state_dict()}, tmp_path / "reg.pth")
    diagnose.main(diagnose.get_args_parser().parse_args([
        "--model", str(tmp_path / "reg.pth"), "--images", "8", "--tools", "maps,distance", "--dpi", "30",
        "--out", str(tmp_path / "figures")]))
    assert (tmp_path / "figures" / "attn_maps_L1.png").exists()
    distance = json.loads((tmp_path / "figures" / "attn_distance.json").read_text())["models"]
    assert len(distance[str(tmp_path / "reg")]["distance_tokens"][0]) == 2  # a 4x4 grid after 1 + 2 prefix tokens


def test_diagnose_main_writes_every_json_and_png(tmp_path):
    torch.manual_seed(0)
    student = build_student("vit_micro_patch8", 32)
    torch.save({"arch": student.arch, "model": student.state_dict()}, tmp_path / "student.pth")
    classifier = Classifier(build_student("vit_micro_patch8", 32), 10)
    torch.save({"arch": classifier.arch, "model": classifier.state_dict()}, tmp_path / "finetuned.pth")
    out = tmp_path / "figures"
    argv = ["--model", "Original=vit_micro_patch8", "--model", f"Distilled={tmp_path / 'student.pth'}",
            "--model", str(tmp_path / "finetuned.pth"), "--images", "12", "--batch-size", "5", "--points", "5",
            "--seeds", "2", "--grid-2d", "3", "--hessian-iters", "3", "--dpi", "40", "--out", str(out)]
    diagnose.main(diagnose.get_args_parser().parse_args(argv))
    names = {p.name for p in out.iterdir()}
    for tool in ("attn_distance", "head_diversity", "attn_maps", "loss_landscape", "cka", "hessian"):
        assert f"{tool}.json" in names, tool
    assert {"attn_distance.png", "head_diversity.png", "attn_maps_L0.png", "attn_maps_L1.png", "attn_maps.pt",
            "loss_landscape_1d.png", "loss_landscape_2d.png", "cka.png", "hessian.png"} <= names
    distance = json.loads((out / "attn_distance.json").read_text())
    assert list(distance["models"]) == ["Original", "Distilled", str(tmp_path / "finetuned")]
    assert distance["img_size"] == 32 and distance["n_images"] == 12
    original = distance["models"]["Original"]
    assert len(original["distance_px"]) == 2 and len(original["distance_px"][0]) == 2
    torch.testing.assert_close(torch.tensor(original["distance_px"]), 8 * torch.tensor(original["distance_tokens"]))
    # The teacher's random attention is close to uniform, and never beyond the grid's largest distance.
    assert 0 < original["layer_mean"][0] < 8 * math.sqrt(18)
    # The teacher passed through is the fixed-seed teacher of distill.py.
    teacher = load_pretrained("vit_micro_patch8", None, 32).eval()
    images = diagnose.load_images(None, 12, 32)[0]
    with torch.no_grad():
        _, attns = attention_maps(teacher, images)
    patches, _ = diagnose.patch_block(attns[1])
    expected = diagnose.attention_distance(patches, (4, 4)).mean(0) * 8
    torch.testing.assert_close(torch.tensor(original["distance_px"][1]), expected, atol=1e-4, rtol=1e-4)
    landscape = json.loads((out / "loss_landscape.json").read_text())
    assert "fine-tuned" in landscape["models"][str(tmp_path / "finetuned")]["head"]
    assert "linear head" in landscape["models"]["Distilled"]["head"]
    assert not any("head" in key for key in landscape["models"]["Distilled"]["excluded_keys"])  # a buffer: fixed
    assert len(landscape["models"]["Distilled"]["loss"]) == 2 and len(landscape["models"]["Original"]["loss_2d"]) == 3
    cka = json.loads((out / "cka.json").read_text())
    assert len(cka["pairs"]) == 3 and len(cka["pairs"][0]["cka"]) == 2
    with pytest.raises(ValueError, match="same images"):
        diagnose.load_models(["vit_micro_patch8", str(tmp_path / "student.pth")], img_size=64)
    # NAME:WEIGHTS passes the weights to the teacher loader: here a model file of this project.
    (label, _, loaded), = diagnose.load_models([f"S={'vit_micro_patch8'}:{tmp_path / 'student.pth'}"])[0]
    assert label == "S" and torch.equal(loaded.state_dict()["blocks.0.attn.qkv.weight"],
                                        student.state_dict()["blocks.0.attn.qkv.weight"])


# ----------------------------------------------------------------------------- decoding on the device
def write_photos(folder):
    """Smooth waves with noise, as photos have: three JPEGs and a greyscale one, which the device
    decodes, and the files the workers must decode themselves: a PNG, an EXIF-rotated JPEG, CMYK."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def photo(height, width):
        y, x = np.mgrid[0:height, 0:width]
        waves = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
        return Image.fromarray(np.clip(waves + rng.normal(0, 20, waves.shape), 0, 255).astype(np.uint8))
    for i in range(3):
        photo(60 + 7 * i, 80 - 5 * i).save(folder / f"plain{i}.jpg", quality=90)
    photo(56, 72).convert("L").save(folder / "grey.jpg")
    photo(50, 70).save(folder / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    photo(48, 64).save(folder / "rotated.jpg", exif=exif)
    photo(56, 72).convert("CMYK").save(folder / "cmyk.jpg")


def test_device_path_draws_the_cpu_paths_crop_and_flip_and_gives_its_pixels(tmp_path):
    from torchvision import transforms
    from data import FDCropBox, decode_and_crop, read_undecoded, skip_unreadable
    folder = tmp_path / "photos"
    write_photos(folder)

    def draws(image):  # what fd_transform draws, in its order: the crop box, then the flip
        return [*transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)), int(torch.rand(1) < 0.5)]
    boxes = SeededTransform(image_dataset(folder), draws, seed=3)
    pil = SeededTransform(image_dataset(folder), fd_transform(32), seed=3)
    device = SeededTransform(image_dataset(folder, loader=read_undecoded), FDCropBox(32), seed=3)
    names = [path.name for path in device.dataset.files]
    flips = set()
    for epoch in (0, 1):
        boxes.epoch = pil.epoch = device.epoch = epoch
        samples = [device[i] for i in range(len(device))]
        undecoded = [name for name, ((data, _), _) in zip(names, samples) if data.ndim == 1]
        assert undecoded == ["grey.jpg", "plain0.jpg", "plain1.jpg", "plain2.jpg"]
        crops = [crop.tolist() for (_, crop), _ in samples]
        assert crops == [boxes[i][0] for i in range(len(boxes))]
        flips |= {crop[4] for crop in crops}
        images, _, _ = skip_unreadable(samples, stack=False)
        difference = (decode_and_crop(images, 32, "cpu") - torch.stack([pil[i][0] for i in range(len(pil))])).abs()
        # Measured: at most 0.0012 mean and 0.0039 (1/255) max per image, PIL rounding its resized
        # image to 8 bits. The worst image's mean with a wrong flip is 0.25, with a crop one row off
        # 0.05, without antialiasing 0.02, bicubic instead of fd_transform's bilinear 0.01.
        assert difference.mean(dim=(1, 2, 3)).max() < 0.003 and difference.max() < 0.01
    assert flips == {0, 1}


def corrupt_huffman_table(jpeg):
    """The JPEG with a Huffman table that no decoder accepts, in a header that PIL still opens."""
    counts = jpeg.index(b"\xff\xc4") + 5  # past the marker, its length and the table's class and id
    return jpeg[:counts] + b"\xff" * 16 + jpeg[counts + 16:]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])  # on a GPU: nvJPEG
def test_distill_decode_on_device_logs_the_losses_of_the_cpu_pipeline(tmp_path, device):
    # JPEGs without chroma subsampling, so that on a GPU nvJPEG decodes them exactly as PIL does:
    # it upsamples 4:2:0 chroma more plainly, which moves the colours of these noise images by 0.05.
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(16):
        pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", subsampling=0)
    jpeg = (folder / "img0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # caught by the workers
    (folder / "bad_table.jpg").write_bytes(corrupt_huffman_table(jpeg))  # caught by the decoder
    # 18 images in 3 batches of 6: every image drawn in each of the 2 epochs.
    argv = [*MICRO, "--data", str(folder), "--batch-size", "6", "--epochs", "2", "--max-bad-frac", "0.5",
            "--device", device]
    with pytest.warns(UserWarning, match="skipping an unreadable image"):
        distill.main(parse(*argv, "--out", str(tmp_path / "cpu")))
    # Two workers, so that the collated batches cross from the worker processes; their warning about
    # the truncated file stays there, the decoder's is in this process.
    with pytest.warns(UserWarning, match="skipping an image that cannot be decoded: .*Huffman"):
        distill.main(parse(*argv, "--decode-on-device", "--workers", "2", "--out", str(tmp_path / "device")))
    cpu, device = read_log(tmp_path / "cpu"), read_log(tmp_path / "device")
    assert [r["step"] for r in device] == [1, 2, 3, 4, 5, 6]
    assert [r["bad_images"] for r in device] == [r["bad_images"] for r in cpu]
    assert sum(r["bad_images"] for r in cpu) == 4
    assert [r["loss"] for r in device] == pytest.approx([r["loss"] for r in cpu], rel=2e-3)


# ----------------------------------------------------------------------------- files of earlier versions
def test_files_written_by_an_earlier_version_still_load_and_resume(tmp_path):
    # testdata/ holds tiny files written before the code was reorganised into checkpoints.py and
    # training.py: a distilled micro ViT (student.pth and its checkpoint.pth at step 2 of 2), a
    # classifier fine-tuned from it (best.pth), a micro SwinV2 student, and what each gave then on
    # fixed images. They must load to the same functions, and the checkpoint must resume.
    data = REPO / "testdata"
    expected = torch.load(data / "expected_outputs.pt", weights_only=True)
    images = expected["images"]
    with torch.no_grad():
        for name, file in [("student", "student.pth"), ("best", "best.pth"), ("swinv2_student", "swinv2_student.pth")]:
            model = load_model_file(data / file).eval()
            torch.testing.assert_close(model(images), expected[name], rtol=0, atol=0)
            # The same parameters in the same order: an optimizer state saved then loads by position.
            assert list(model.state_dict()) == list(torch.load(data / file, weights_only=True)["model"]), file
        teacher = load_teacher("mine", data / "checkpoint.pth", grid=4)  # the student of the checkpoint
        torch.testing.assert_close(teacher(images), expected["checkpoint_student"], rtol=0, atol=0)
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((data / "checkpoint.pth").read_bytes())
    distill.main(parse(*MICRO, "--synthetic-images", "16", "--epochs", "2", "--out", str(out)))
    assert [r["step"] for r in read_log(out)] == [3, 4]
    finetune.main(ft_parse(*FT_MICRO, "--init", str(data / "student.pth"), "--epochs", "1", "--out", str(tmp_path / "ft")))
    assert (tmp_path / "ft" / "best.pth").is_file()


def test_the_vit_section_of_models_runs_alone_in_a_notebook(tmp_path):
    # A course copies the top of models.py, up to the Swin banner, into a notebook: it must run
    # with torch and einops alone and give the same student as the project.
    source = (REPO / "models.py").read_text()
    section = source[:source.index("# ============================================================================= Swin")]
    imported = {line.split()[1].split(".")[0] for line in section.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"math", "re", "collections", "torch", "einops"}, imported
    (tmp_path / "notebook.py").write_text(section + (
        "\ntorch.manual_seed(0)\n"
        "student = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()\n"
        "torch.save({'state': student.state_dict(), 'out': student(torch.ones(1, 3, 32, 32))}, 'out.pt')\n"))
    result = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    student = build_student("vit_micro_patch8", 32).eval()
    student.load_state_dict(saved["state"])
    torch.testing.assert_close(student(torch.ones(1, 3, 32, 32)), saved["out"])


def test_imports_run_one_way():
    # Entry points on top, never importing each other; the helpers below never import an entry point.
    import ast
    entry_points, helpers = {"distill", "finetune", "diagnose", "bench"}, {"models", "checkpoints", "data", "training"}
    for name in entry_points | helpers:
        tree = ast.parse((REPO / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & entry_points, (name, imported & entry_points)
        if name == "models":
            assert not imported & helpers, imported & helpers


# ----------------------------------------------------------------------------- silent changes of the method
def test_drop_path_scales_the_kept_samples_by_one_over_keep():
    torch.manual_seed(0)
    drop, x = models.DropPath(0.25).train(), torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 1 / 0.75) and torch.all(y[~kept] == 0)  # exactly 1/keep, or nothing
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("name", ["clip", "clip_l14"])
def test_clip_teachers_normalise_with_clip_statistics(name):
    # OpenAI's clip/clip.py, _transform: Normalize((0.48145466, 0.4578275, 0.40821073),
    # (0.26862954, 0.26130258, 0.27577711)); a one-block tower of the teacher's arch keeps them.
    tower = build_from_arch(dict(checkpoints.TEACHERS[name]["arch"], depth=1, embed_dim=64, num_heads=1))
    assert tower.mean.flatten().tolist() == pytest.approx(CLIP_MEAN_REF, abs=1e-7)
    assert tower.std.flatten().tolist() == pytest.approx(CLIP_STD_REF, abs=1e-7)


def test_training_transforms_flip_both_ways():
    # A ramp dark on the left and bright on the right: unflipped crops keep it, flipped ones reverse it.
    ramp = Image.fromarray((torch.linspace(0, 255, 64).repeat(64, 1)).byte().numpy()).convert("RGB")
    finetuning = finetune.train_transform(finetune.apply_recipe(ft_parse(*FT_MICRO, "--randaug-ops", "0",
                                                                         "--reprob", "0")))
    for transform in (fd_transform(32), finetuning):
        orientations = set()
        for seed in range(40):
            torch.manual_seed(seed)
            image = transform(ramp)
            orientations.add(bool(image[0, :, 0].mean() < image[0, :, -1].mean()))
        assert orientations == {True, False}


def test_randaugment_has_the_strength_of_timms_rand_m9(monkeypatch):
    # The official fine-tuning recipe's 'rand-m9' is timm's RandAugment at magnitude 9 of _LEVEL_DENOM 10 (timm's
    # auto_augment.py): rotate by 30 * 9/10 = 27 degrees, shear by 0.3 * 9/10 = 0.27, either sign.
    from torchvision.transforms import autoaugment
    applied, real = collections.defaultdict(set), autoaugment._apply_op

    def record(image, op, magnitude, *args, **kwargs):
        applied[op].add(round(abs(magnitude), 4))
        return real(image, op, magnitude, *args, **kwargs)
    monkeypatch.setattr(autoaugment, "_apply_op", record)
    transform = finetune.train_transform(finetune.apply_recipe(ft_parse(*FT_MICRO, "--reprob", "0")))
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    torch.manual_seed(0)
    for _ in range(100):
        transform(image)
    assert applied["Rotate"] == {27.0} and applied["ShearX"] == {0.27}


def test_a_model_file_with_a_missing_and_an_extra_key_is_refused(tmp_path):
    state = torch.load(REPO / "testdata" / "student.pth", weights_only=True)
    del state["model"]["norm.bias"]
    state["model"]["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="norm.bias") as error:
        load_model_file(tmp_path / "bad.pth")
    assert "extra.weight" in str(error.value)


# ----------------------------------------------------------------------------- GPU only
# Comparisons with the CPU turn TF32 off: cuDNN's convolutions (the patch embedding) use it by default.
@pytest.fixture
def exact_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@needs_cuda
def test_gpu_run_trains_as_the_cpu_run_with_fused_adamw_and_pinned_workers(tmp_path, monkeypatch, exact_cuda):
    fused, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: fused.append(kw.get("fused")) or adamw(*a, **kw))
    argv = [*MICRO, "--epochs", "1", "--drop-path", "0"]  # no drop path: the GPU draws from another generator
    cpu = distill.main(parse(*argv, "--out", str(tmp_path / "cpu")))
    gpu = distill.main(parse(*argv, "--device", "cuda", "--workers", "2", "--out", str(tmp_path / "gpu")))
    assert fused == [False, True]  # AdamW's fused CUDA kernel on the GPU only
    assert [r["loss"] for r in read_log(tmp_path / "gpu")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "cpu")], rel=1e-4)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3, msg=name)


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_gpu_autocast_tracks_fp32_and_only_fp16_runs_the_grad_scaler(tmp_path, amp):
    argv = [*MICRO, "--device", "cuda", "--epochs", "1", "--drop-path", "0"]
    distill.main(parse(*argv, "--out", str(tmp_path / "fp32")))
    distill.main(parse(*argv, "--amp", amp, "--out", str(tmp_path / amp)))
    fp32, low = ([r["loss"] for r in read_log(tmp_path / name)] for name in ("fp32", amp))
    assert low[0] == pytest.approx(fp32[0], rel=2e-2)  # the same weights: 8 (bf16) or 11 (fp16) bits of mantissa
    assert low[-1] is not None and low[-1] == pytest.approx(fp32[-1], rel=0.1)  # and the run trains alike
    scaler = torch.load(tmp_path / amp / "checkpoint.pth", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (amp == "fp16")  # bf16 needs no loss scaling; fp16's scale is saved


@needs_cuda
def test_gpu_compiled_run_matches_eager(tmp_path, exact_cuda):
    argv = [*MICRO, "--device", "cuda", "--epochs", "1", "--drop-path", "0"]
    distill.main(parse(*argv, "--out", str(tmp_path / "eager")))
    distill.main(parse(*argv, "--compile", "--out", str(tmp_path / "compiled")))
    assert [r["loss"] for r in read_log(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in read_log(tmp_path / "eager")], rel=1e-3)


@needs_cuda
@pytest.mark.parametrize("backend", ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_gpu_fused_attention_takes_the_learned_bias_in_bf16(backend):
    # The student's bias requires grad, and the float mask rules out FlashAttention: the memory-efficient kernel
    # must take it (cuDNN's may refuse a bias that needs a gradient).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = build_student("vit_small_patch16", 64).cuda()  # 64-wide heads, as the real students have
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.rand(4, 3, 64, 64, device="cuda")
    explicit, _ = attention_maps(model, images)  # fp32, the probabilities' path
    explicit.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)), torch.autocast("cuda", dtype=torch.bfloat16):
            fused = model(images).float()
            fused.square().mean().backward()
    except RuntimeError as error:
        if backend == "EFFICIENT_ATTENTION":
            raise
        pytest.skip(f"{backend} takes no learned bias on this GPU: {str(error)[:80]}")
    torch.testing.assert_close(fused, explicit, rtol=5e-2, atol=5e-2)
    for n, p in model.named_parameters():  # bf16 gradients point where fp32's do
        assert F.cosine_similarity(p.grad.flatten(), expected[n].flatten(), dim=0) > 0.99, n


@needs_cuda
def test_gpu_files_load_on_a_machine_without_one(tmp_path):
    out = tmp_path / "gpu"
    distill.main(parse(*MICRO, "--device", "cuda", "--epochs", "1", "--out", str(out)))
    saved = torch.load(out / "student.pth", weights_only=True)  # no map_location: as a user on a laptop would
    assert all(value.device.type == "cpu" for value in saved["model"].values())
    # The run goes on, on the CPU, in a process that sees no GPU (in a copy: this process holds the folder's lock);
    # then fine-tunes on the GPU, evaluated on the CPU.
    moved = tmp_path / "cpu"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock"))
    cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "distill.py"), *MICRO, "--epochs", "2", "--out", str(moved)],
                          env=cpu_only, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr[-2000:]
    assert [r["step"] for r in read_log(moved)] == list(range(1, 17))
    _, metrics = finetune.main(ft_parse(*FT_MICRO, "--init", str(out / "student.pth"), "--device", "cuda",
                                        "--epochs", "1", "--out", str(tmp_path / "ft")))
    done = subprocess.run([sys.executable, str(REPO / "finetune.py"), *FT_MICRO, "--eval-only", "--init",
                           str(tmp_path / "ft" / "best.pth")], env=cpu_only, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"top-1 {metrics['top1']:.2f}" in done.stdout, (metrics, done.stdout[-500:])


@needs_cuda
def test_gpu_bench_finds_the_largest_batch_and_reports_mfu(capsys):
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8", "--img-size", "32", "--batch-size", "8",
            "--max-batch", "96", "--steps", "2", "--warmup", "1", "--amp", "bf16"]
    bench.main(bench.get_args_parser().parse_args(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "batch 96," in lines[-2]  # a micro step fits at the limit: doubled from 8 up to it
    last = dict(field.split("=") for field in lines[-1].split()[1:])
    assert float(last["img/s"]) > 0 and float(last["peak_mem_mb"]) > 0
    assert last["mfu"] == "n/a" or 0 < float(last["mfu"]) < 1
