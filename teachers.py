"""The published teachers (TEACHERS) and their ViT (PretrainedViT); the files encoders come from, read without
running code from them and converted to the names of models.py: published layouts (timm, open_clip, torchvision,
Hugging Face, EsViT) and this project's model files; the encoder as fine-tuned.
"""
import argparse
import collections
import hashlib
import io
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import (IMAGENET_MEAN, IMAGENET_STD, VIT_SIZES, Classifier, SwinTransformer, Teacher, VisionTransformer,
                    parse_vit_name, swin_arch, swin_stage_windows, window_position_index)
from training import number

# ============================================================================= the published ViTs
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with (not nn.GELU)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class PretrainedViT(VisionTransformer):
    """The ViT of published models (CLIP, SigLIP, DINO, DeiT, DINOv2, torchvision): the student with their options:
    absolute positions, a full qkv bias, CLIP's QuickGELU or SigLIP's tanh GELU, a LayerNorm before the blocks, a
    bias-free patch embedding, no class token (SigLIP), DINOv2's registers (not in the output), their norms' eps."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 rel_pos=None, abs_pos=True, qv_bias=False, layer_scale=None, drop_path=0.0, norm_eps=1e-6,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, act="gelu", norm_pre=False, patch_bias=True, num_registers=0,
                 class_token=True):
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, rel_pos, layer_scale, drop_path,
                         mean, std)
        if act not in ("gelu", "quick_gelu", "gelu_tanh"):
            raise ValueError(f"unknown activation {act!r}: expected gelu, quick_gelu (CLIP) or gelu_tanh (SigLIP)")
        self.arch.update(abs_pos=abs_pos, qv_bias=qv_bias, norm_eps=norm_eps, mean=list(mean), std=list(std),
                         act=act, norm_pre=norm_pre, patch_bias=patch_bias, num_registers=num_registers,
                         class_token=class_token)
        self.num_registers = num_registers  # in the blocks (and their attention maps), not in the output
        if not class_token:  # SigLIP: an empty class token (1, 0, C), so the student's embed() puts none in front
            del self.cls_token
            self.register_buffer("cls_token", torch.zeros(1, 0, embed_dim), persistent=False)
            self.num_prefix_tokens = 0
        for block in self.blocks:
            if not qv_bias:  # its weight drawn below, after VisionTransformer's; its bias zero
                block.attn.qkv = nn.Linear(embed_dim, 3 * embed_dim)
                block.attn.q_bias = block.attn.v_bias = None
                nn.init.zeros_(block.attn.qkv.bias)
            if act != "gelu":
                block.mlp.act = QuickGELU() if act == "quick_gelu" else nn.GELU(approximate="tanh")
        if not patch_bias:
            self.patch_embed.bias = None
        num_positions = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim)) if abs_pos else None
        self.reg_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.norm_pre = nn.LayerNorm(embed_dim) if norm_pre else None
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = norm_eps
        # Random weights (tests, benchmarks) for what is new here; VisionTransformer drew the rest.
        qkv_weights = [block.attn.qkv.weight for block in self.blocks if not qv_bias]
        for param in [self.pos_embed, self.reg_tokens] + qkv_weights:
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02, a=-0.02, b=0.02)

    def embed(self, images):
        x = super().embed(images)  # (B, [1 +] N, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.reg_tokens is not None:  # registers have no position (DINOv2)
            x = torch.cat([x[:, :1], self.reg_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x if self.norm_pre is None else self.norm_pre(x)

    def forward_features(self, images):
        x = super().forward_features(images)  # (B, 1 + registers + N, C)
        return x if self.reg_tokens is None else torch.cat([x[:, :1], x[:, 1 + self.num_registers:]], dim=1)


# ============================================================================= the published teachers
# Each entry: its image tower's architecture (PretrainedViT's options), layout, URL, SHA-256 (prefix).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PLAIN_VIT = dict(rel_pos=None, abs_pos=True, qv_bias=False, layer_scale=None, norm_eps=1e-6)


def teacher_arch(size, patch_size, img_size=224, **options):
    """The arch of a plain teacher ViT: absolute positions, a full qkv bias, no LayerScale."""
    dims = dict(zip(("embed_dim", "depth", "num_heads", "mlp_ratio"), (*VIT_SIZES[size], 4.0)))  # or its own ratio
    return dict(PLAIN_VIT, img_size=img_size, patch_size=patch_size, **dims, **options)


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
    "hf": dict(layout="hf"),  # a transformers CLIP, SigLIP or DINOv2 folder, its arch from config.json
}


# ============================================================================= building teachers
def sizes(arch):
    """What the name of an architecture fixes, in words."""
    if "depths" in arch:
        return f"a Swin of width {arch['embed_dim']}, depths {list(arch['depths'])}, window {arch['window_size']}"
    return f"a ViT of width {arch['embed_dim']}, depth {arch['depth']}, patch {arch['patch_size']}"


TEACHER_FLAGS = dict(name="--teacher", weights="with --teacher-weights FILE")  # distill.py's, for messages


def load_pretrained(name, weights=None, img_size=None, grid=None, mean=None, std=None, flags=TEACHER_FLAGS):
    """A pretrained encoder (trainable, in train mode) mapping images in [0, 1] to its tokens (finetune.py,
    diagnose.py): a teacher of TEACHERS from `weights` (its published layout; 'hf': a transformers folder),
    its published file (downloaded into the torch hub cache) or random weights (`weights == "random"`);
    another name from `weights`, a model file this project wrote, or a plain ViT such as 'vit_tiny_patch16'
    (random weights from a fixed seed, the same in every process). `img_size` or `grid` (tokens per side):
    the input resolution, absolute positions resized bicubically. `mean`, `std`: to replace its statistics."""
    source, state, final_norm, named = name, None, True, f"{flags['name']} {name}"
    if name in TEACHERS:
        spec, arch = TEACHERS[name], TEACHERS[name].get("arch")
        if weights != "random":
            path = Path(weights) if weights else teacher_weights_file(name, flags)
            if spec["layout"] == "hf":  # the architecture is in config.json beside the weights
                path, state, arch = read_hf_model(path)
            else:
                prefer = (spec["state_key"], *WRAPPER_KEYS) if "state_key" in spec else WRAPPER_KEYS
                state = CONVERTERS[spec["layout"]](unwrap_state_dict(read_checkpoint(path), path, prefer))
            source = str(path)
        if arch is None and state is None:
            raise ValueError(f"{named} has no fixed architecture: give its weights file {flags['weights']}")
        try:
            arch = dict(arch or infer_vit_arch(state, spec["act"]))
        except KeyError as error:  # a tensor infer_vit_arch needs
            raise ValueError(f"{source} does not fit the {spec['layout']} layout of {named} (missing: "
                             f"{error.args[0]}; the file has {', '.join(list(state)[:8])}, ...)") from None
    elif weights not in (None, "random"):
        (arch, state, _), source = read_model_file(weights), str(weights)
        try:  # the name of an architecture (vit_base_patch16) must be the file's; other names are labels
            named = sizes(swin_arch(name) if name.startswith("swin") else teacher_arch(*parse_vit_name(name)))
        except ValueError:
            named = sizes(arch)
        if named != sizes(arch):
            raise ValueError(f"{weights} holds {sizes(arch)}, but the name it is given with, {name}, is {named}: give "
                             f"the file's architecture as the name, or another file")
        final_norm = any(k.startswith("norm.") for k in state)  # a fine-tuned classifier pools before any
    else:  # a plain ViT of a named size, random weights
        try:
            arch = teacher_arch(*parse_vit_name(name))
        except ValueError:
            raise ValueError(f"unknown teacher {name!r}: expected one of {', '.join(TEACHERS)}, a plain ViT such as "
                             f"vit_base_patch16 (random weights), or a model file of this project as weights") from None

    if state is not None:  # the file must fit the architecture at its own size: checked before a weight is made
        check_state(arch, state, source, final_norm)
    # Absolute positions follow a new grid, relative ones (students, Swin) don't: distill.py resizes tokens.
    if arch.get("abs_pos") and not arch.get("rel_pos"):
        patch = arch["patch_size"]
        img_size = grid * patch if grid is not None else img_size
        if img_size and img_size != arch["img_size"]:
            if state is not None:
                old_grid, new_grid = (arch["img_size"] // patch,) * 2, (img_size // patch,) * 2
                state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid)
            arch["img_size"] = img_size
    arch.update({key: list(values) for key, values in dict(mean=mean, std=std).items() if values is not None})
    with torch.random.fork_rng(devices=[]):  # the same random weights on every process
        torch.manual_seed(0)
        model = build_from_arch(arch)
    model.norm = model.norm if final_norm else nn.Identity()  # a classifier's encoder: tokens as they come
    if state is not None:
        model.load_state_dict(state)  # casts fp16 weights (OpenAI CLIP) to the model's dtype
    model.source = source
    return model


def load_teacher(name, weights=None, grid=None, mean=None, std=None):
    """The frozen FD teacher (see load_pretrained) giving `grid` x `grid` tokens, as the student."""
    encoder = load_pretrained(name, weights, grid=grid, mean=mean, std=std)
    return Teacher(encoder, encoder.source)


def add_teacher_flags(p, default):
    """distill.py's flags naming its teachers, their files, their loss weights and input statistics."""
    positive = number(float, 0.0, open_low=True)
    p.add_argument("--teacher", default=default,
                   help=f"a published teacher ({', '.join(TEACHERS)}; the paper's bring their recipe for the flags "
                        f"left unset), a plain ViT such as vit_small_patch16 (random weights), or any name with "
                        f"--teacher-weights FILE of this project; several, comma-separated, are distilled together "
                        f"(the first one's recipe)")
    p.add_argument("--teacher-weights", default=None, help="the teacher's file in its published layout (if not "
                   "given, downloaded), a model file of this project, or 'random' (random weights); several "
                   "teachers: one per teacher, comma-separated, empty as if not given (e.g. ',dinov2.pth')")
    p.add_argument("--teacher-loss-weights", type=lambda text: [positive(w) for w in text.split(",")],
                   default=None, help="several teachers: the weight of each one's loss, comma-separated [equal]")
    p.add_argument("--teacher-mean", type=float, nargs=3, metavar=("R", "G", "B"), default=None,
                   help="one teacher's input mean (unset: its own, printed at start; e.g. 0.5 0.5 0.5 for timm's "
                        "augreg and SigLIP files)")
    p.add_argument("--teacher-std", type=float, nargs=3, metavar=("R", "G", "B"), default=None,
                   help="one teacher's input standard deviation (unset: its own)")


def load_teachers(args, grid, device, is_main):
    """distill.py's frozen teachers of --teacher A[,B...] giving `grid` x `grid` tokens, as the student, each
    printed on rank 0; what the student's files record of each (name, weights, SHA-256, input statistics);
    their loss weights, summing to 1."""
    names = args.teacher.split(",")
    files = args.teacher_weights.split(",") if args.teacher_weights is not None else [""] * len(names)
    loss_weights = args.teacher_loss_weights or [1.0] * len(names)
    if not len(names) == len(files) == len(loss_weights):
        raise ValueError(f"--teacher names {len(names)} teacher(s), --teacher-weights {len(files)}, "
                         f"--teacher-loss-weights {len(loss_weights)}: give one of each per teacher, comma-separated")
    if len(names) > 1 and (args.teacher_mean or args.teacher_std):
        raise ValueError("--teacher-mean and --teacher-std are for one teacher: several each keep their own statistics")
    teachers, infos, loss_weights = [], [], [weight / sum(loss_weights) for weight in loss_weights]
    for name, weights, loss_weight in zip(names, files, loss_weights):
        teacher = load_teacher(name, weights or None, grid, args.teacher_mean, args.teacher_std).to(device)
        stats = dict(mean=teacher.encoder.mean.flatten().tolist(), std=teacher.encoder.std.flatten().tolist())
        sha256 = sha256sum(teacher.source) if is_main and Path(teacher.source).is_file() else None
        infos.append(dict(name=name, weights=teacher.source, sha256=sha256, **stats))
        teachers.append(teacher)
        if is_main:
            stats = " std ".join(" ".join(f"{v:.4g}" for v in stats[k]) for k in ("mean", "std"))
            print(f"teacher {name}: {f'{teacher.source} (sha256 {sha256})' if sha256 else 'random weights'}, "
                  f"{teacher.encoder.grid[0]}x{teacher.encoder.grid[1]} tokens at {teacher.input_size} px, input mean "
                  f"{stats} (--teacher-mean, --teacher-std), loss weight {loss_weight:.3g}")
    return teachers, infos, loss_weights


def sha256sum(path):
    """The file's SHA-256, read in chunks (hashlib.file_digest needs Python 3.11; torch runs on older ones)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ============================================================================= this project's files
def build_from_arch(arch):
    """The model an `arch` dict saved with its weights describes: a Classifier, a Swin, the ViT student,
    or a PretrainedViT (which earlier versions' student files describe, at the student's values)."""
    if "encoder" in arch:
        return Classifier(build_from_arch(arch["encoder"]), arch["num_classes"], arch["linear_probe"],
                          arch.get("pooling", "mean_then_fc_norm"))
    if "depths" in arch:
        return SwinTransformer(**arch)
    return (PretrainedViT if "abs_pos" in arch else VisionTransformer)(**arch)  # a published ViT's options, or none


def load_model_file(path):
    """Rebuild a model, strictly, from a model file this project wrote (student.pth: 'arch', 'model')."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise ValueError(f"{path}: not a model file written by this project (expected the keys 'arch' and 'model', "
                         f"found {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    model = build_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model


def read_model_file(path, head=False):
    """(arch, state dict, description) of a file this project wrote: a model file (a distilled student.pth; a
    fine-tuned Classifier, its encoder alone unless `head`) or a distillation checkpoint.pth (its student)."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and "arch" in state and "student" in state:
        return state["arch"], state["student"], f"the student of distillation checkpoint {path} (step {state['step']})"
    if isinstance(state, dict) and "arch" in state and "model" in state:
        if "encoder" in state["arch"] and not head:
            encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
            return state["arch"]["encoder"], encoder, f"the encoder of classifier {path}"
        return state["arch"], state["model"], f"model file {path}"
    raise ValueError(f"{path}: expected a model file of this project ('arch', 'model') or a distillation checkpoint "
                     f"('arch', 'student'), found {sorted(state) if isinstance(state, dict) else type(state).__name__}"
                     f"; a published checkpoint is read by the name of its layout ({', '.join(TEACHERS)})")


# ============================================================================= reading files
DATA_ONLY_GLOBALS = [argparse.Namespace]  # pickled training arguments (EsViT, DINO)
WRAPPER_KEYS = ("model", "state_dict", "teacher", "student", "module")  # where checkpoints nest a state dict


def read_checkpoint(path):
    """Whatever a checkpoint file holds, read without running code from it: a zip or legacy pickle through
    torch.load(weights_only=True), a TorchScript archive by unpickling only its tensors, a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/constants.pkl") for name in archive.namelist()):
                return read_torchscript(archive)
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        with torch.serialization.safe_globals(DATA_ONLY_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:  # a global not allowed (ValueError: no zip of torch.save)
                if not (refused := sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))):
                    raise ValueError(str(error)) from None  # no global to blame: unreadable bytes
    # Cut short (the zip reader's OSError 'Invalid argument'), no pickle or no safetensors header at all
    except (RuntimeError, EOFError, OSError, LookupError, ValueError, TypeError, AttributeError) as error:
        why = f"{type(error).__name__}: {str(error).split('. ')[0]}"
        raise ValueError(f"{path}: not a readable checkpoint, probably truncated or of another format "
                         f"({why}): download or copy it again") from None
    raise ValueError(f"{path}: refused: unpickling it would call {', '.join(refused)}, which can run code. "
                     f"Nothing from it was executed. If you trust the file, re-save its tensors as a plain "
                     f"state dict")


# Each dtype's names: a TorchScript archive's storage class (torch.FloatStorage, ...), a safetensors header's.
DTYPE_NAMES = {torch.float32: ("Float", "F32"), torch.float16: ("Half", "F16"), torch.bfloat16: ("BFloat16", "BF16"),
               torch.float64: ("Double", "F64"), torch.int64: ("Long", "I64"), torch.int32: ("Int", "I32"),
               torch.int16: ("Short", "I16"), torch.int8: ("Char", "I8"), torch.uint8: ("Byte", "U8"),
               torch.bool: ("Bool", "BOOL")}
SAFETENSORS_DTYPES = {name: dtype for dtype, (_, name) in DTYPE_NAMES.items()}
# All that a TorchScript archive's data.pkl may name besides its module classes (__torch__.*): no code.
TORCHSCRIPT_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"):  # a view of the storage, without torch's hooks
                       lambda storage, offset, size, stride, *_: storage.as_strided(size, stride, offset),
                       ("collections", "OrderedDict"): collections.OrderedDict,
                       **{("torch", f"{name}Storage"): dtype for dtype, (name, _) in DTYPE_NAMES.items()}}


def read_torchscript(archive):
    """The tensors of a TorchScript archive (OpenAI CLIP's .pt files), by name as in its state_dict(), without
    torch.jit: data.pkl is unpickled refusing all globals but module placeholders and TORCHSCRIPT_GLOBALS."""
    root = archive.namelist()[0].split("/")[0]
    ScriptModule = type("ScriptModule", (), {})  # stands in for a TorchScript module, holding its attributes

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = ScriptModule if module.startswith("__torch__") else TORCHSCRIPT_GLOBALS.get((module, name))
            if obj is None:
                raise pickle.UnpicklingError(f"refused to load {module}.{name} from a TorchScript archive")
            return obj

        def persistent_load(self, pid):  # once per storage: the archive's pickler memoizes them
            _, dtype, key, _, numel = pid  # ('storage', dtype, key, location, numel)
            raw = bytearray(archive.read(f"{root}/data/{key}"))
            return torch.frombuffer(raw, dtype=dtype)[:numel] if numel else torch.empty(0, dtype=dtype)

    def tensors(module, prefix=""):  # (name, tensor) of a module and, recursively, of its submodules
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield prefix + name, value
            elif isinstance(value, ScriptModule):
                yield from tensors(value, f"{prefix}{name}.")

    return dict(tensors(Unpickler(io.BytesIO(archive.read(f"{root}/data.pkl"))).load()))


def read_safetensors(path):
    """A safetensors file: the header's length (8 bytes, little-endian), a JSON header, the tensors' bytes."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:start]), torch.frombuffer(raw, dtype=torch.uint8)[start:]
    header.pop("__metadata__", None)  # strings, not a tensor
    tensors = {}
    for name, info in header.items():  # bytes that do not fit the dtype and shape fail to view or reshape
        begin, end = info["data_offsets"]
        tensors[name] = data[begin:end].clone().view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def unwrap_state_dict(state, path, prefer=WRAPPER_KEYS):
    """The state dict inside a checkpoint: the first of `prefer` that a nested dict is found under, without
    DDP's module. and torch.compile's _orig_mod.; only the image tower where its names have a prefix (DINO's
    backbone., without its head; transformers' vision_model., without the text tower)."""
    while isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in prefer if isinstance(state.get(k), dict)), None)
        if key is None:
            raise ValueError(f"{path}: no state dict found: expected tensors, or one of the entries "
                             f"{', '.join(prefer)}; found {', '.join(map(str, state))}")
        state = state[key]
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    for tower in ("backbone.", "vision_model."):
        if any(k.startswith(tower) for k in state):
            state = {k.removeprefix(tower): v for k, v in state.items() if k.startswith(tower)}
    return state


def check_state(arch, state, source, final_norm=True):
    """`state` checked against the model of `arch` (on the meta device: no weight is made; without its final norm
    unless `final_norm`), naming every missing, unexpected or misshapen key: a half-loaded teacher ruins runs."""
    with torch.device("meta"):
        expected = build_from_arch(arch).state_dict()
    expected = {k: v for k, v in expected.items() if final_norm or not k.startswith("norm.")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(keys[:12])}" + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("different shapes", shapes))
                    if keys]
        raise ValueError(f"{source} does not fit this model ({'; '.join(problems)}). Is it the file of another "
                         f"model? Check the model's name and its weights file")


def teacher_weights_file(name, flags):
    """The cached published file of a teacher, downloaded and checked on first use."""
    url = TEACHERS[name].get("url")
    if url is None:
        raise ValueError(f"{flags['name']} {name} reads any file of its layout: give it {flags['weights']}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {name} teacher from {url} to {path}")
        try:  # writes to a temporary file, checks the hash prefix, then renames
            torch.hub.download_url_to_file(url, str(path), hash_prefix=TEACHERS[name].get("sha256"))
        except Exception as error:  # offline, a proxy, a changed file: the machine's error, in one line
            raise OSError(f"could not download the {name} teacher ({error}): fetch {url} yourself and put it at "
                          f"{path}, or pass it {flags['weights']}") from None
    return path


# Key conversions from a published state dict to our names. Towers and heads the FD target does not use are
# dropped by name; anything else unknown is left for the strict load.
CLIP_TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "positional_embedding", "text_projection",
                   "logit_scale", "visual.proj")  # visual.proj maps to the text space, after the FD target
CLIP_RENAMES = [("visual.", ""), ("class_embedding", "cls_token"), ("positional_embedding", "pos_embed"),
                ("conv1.", "patch_embed."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
                ("transformer.resblocks.", "blocks."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
                (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."),
                (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]
TV_RENAMES = [("class_token", "cls_token"), ("conv_proj.", "patch_embed."), ("encoder.ln.", "norm."),
              ("encoder.pos_embedding", "pos_embed"), ("encoder.layers.encoder_layer_", "blocks."),
              (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".self_attention.out_proj.", ".attn.proj."),
              (".self_attention.in_proj_", ".attn.qkv."), (".mlp.0.", ".mlp.fc1."), (".mlp.3.", ".mlp.fc2.")]
TIMM_RENAMES = [("patch_embed.proj.", "patch_embed."), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"),
                ("register_tokens", "reg_token"), ("reg_token", "reg_tokens")]  # DINOv2's name, then timm's


def rename(key, renames, regex=False):
    for old, new in renames:
        key = re.sub(old, new, key) if regex else key.replace(old, new)
    return key


def convert(state, renames, drop, regex=False):
    """`state` in our names, without the tensors whose names start with `drop`; class token and positions
    shaped as ours, (1, [1 +] N, C), where CLIP stores (C,) and (1 + N, C), SigLIP (N, C)."""
    out = {rename(k, renames, regex): v for k, v in state.items() if not k.startswith(drop)}
    for key in out.keys() & {"cls_token", "pos_embed"}:
        out[key] = out[key].reshape(1, -1, out[key].shape[-1])
    return out


def convert_timm(state):
    """timm's layout (DINO, DeiT, timm checkpoints) and the official DINOv2 one."""
    out = convert(state, TIMM_RENAMES, ("head.", "mask_token"))  # classifier, projection; DINOv2's MIM token
    pos = out.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # timm's DINOv2-with-registers layout keeps no class position (it is folded into cls_token)
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return out


def esvit_to_swin(state_dict):
    """EsViT's checkpoint['student'] in our V1 names, without module., DINO heads, index tables (checked)."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for key in [k for k in state if k.endswith("attn.relative_position_index")]:
        index = state.pop(key)  # (window², window²)
        if not torch.equal(index.cpu().long(), window_position_index(math.isqrt(index.shape[0]))):
            raise ValueError(f"{key}: not the Swin relative position layout this model assumes")
    return {k: v for k, v in state.items() if not k.startswith(("head.", "head_dense."))}


CONVERTERS = {"openai_clip": lambda sd: convert(sd, CLIP_RENAMES, CLIP_TEXT_TOWER), "timm": convert_timm,
              "torchvision": lambda sd: convert(sd, TV_RENAMES, "heads."), "esvit": esvit_to_swin}
# No shape gives the heads: 64 channels each in published ViTs, 16 heads in ViT-H/14, ViT-g/14, ViT-bigG/14.
HEADS_BY_WIDTH = {1280: 16, 1408: 16, 1664: 16}


def infer_vit_arch(state, act="gelu"):
    """The architecture of a converted ViT state dict, from its tensor shapes."""
    embed_dim = state["cls_token"].shape[-1]
    if embed_dim not in HEADS_BY_WIDTH and embed_dim % 64:
        raise ValueError(f"a ViT of width {embed_dim}: its number of heads is unknown (not 64 channels per head)")
    patch_size = state["patch_embed.weight"].shape[-1]
    clip_like = "norm_pre.weight" in state  # CLIP towers: LayerNorm eps 1e-5 and CLIP statistics
    clip_options = dict(norm_eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD) if clip_like else {}
    return dict(PLAIN_VIT, img_size=math.isqrt(state["pos_embed"].shape[1] - 1) * patch_size, patch_size=patch_size,
                embed_dim=embed_dim, depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                num_heads=HEADS_BY_WIDTH.get(embed_dim) or embed_dim // 64,
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim, act=act, norm_pre=clip_like,
                layer_scale=1.0 if "blocks.0.gamma_1" in state else None, patch_bias="patch_embed.bias" in state,
                num_registers=state["reg_tokens"].shape[1] if "reg_tokens" in state else 0, **clip_options)


# ============================================================================= the encoder as fine-tuned
def shared_bias_to_per_block(state):
    """A position bias shared by blocks, `[layers.i.]rel_pos_bias.*`, copied into each `[layers.i.]blocks.j.`,
    as the official utils.py does: the same function, each block's bias then free to fine-tune on its own."""
    blocks = dict.fromkeys(m[0] for key in state if (m := re.match(r".*?blocks\.\d+\.", key)))  # in order
    out = {}
    for key, value in state.items():
        prefix, shared, rest = key.partition("rel_pos_bias.")
        if shared and "blocks." not in prefix:  # a bias shared by the blocks after `prefix`
            out.update({f"{b}rel_pos_bias.{rest}": value.clone() for b in blocks if b.startswith(prefix)})
        else:
            out[key] = value
    return out


def resize_grid(values, old_grid, new_grid):
    """Bicubically resample values laid out on a grid, (h*w, C) -> (h'*w', C), in raster order: how
    absolute position embeddings and relative position tables follow a change of resolution."""
    if tuple(old_grid) == tuple(new_grid):
        return values
    grid = rearrange(values, "(h w) c -> 1 c h w", h=old_grid[0], w=old_grid[1])
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> (h w) c").to(values.dtype)


def resize_pos_embed(pos_embed, old_grid, new_grid):
    """Absolute position embeddings (1, [1 +] N, C) resampled to another grid, the class token's (if any) kept."""
    prefix = pos_embed.shape[1] - old_grid[0] * old_grid[1]  # 0 for SigLIP, which has no class token
    patches = resize_grid(pos_embed[0, prefix:], old_grid, new_grid)
    return torch.cat([pos_embed[:, :prefix], patches[None]], dim=1)


def resize_rel_pos_table(table, old_grid, new_grid):
    """A BEiT table ((2h-1)(2w-1) + 3, heads) for h x w patches resampled to another grid: its offsets form a
    (2h-1) x (2w-1) grid, the 3 class-token rows are kept (the official code: scipy's interp2d)."""
    offsets = [(2 * h - 1, 2 * w - 1) for h, w in (old_grid, new_grid)]
    return torch.cat([resize_grid(table[:-3], *offsets), table[-3:]])


def finetuning_arch(arch, img_size, drop_path):
    """The encoder's arch as fine-tuned: at img_size, with the recipe's drop path, a position bias in every block."""
    if "depths" in arch:  # Swin; V2 keeps the offset scale of the windows it was trained with
        windows = arch.get("pretrained_windows") or swin_stage_windows(arch)
        return dict(arch, img_size=img_size, drop_path=drop_path, position_bias="per_block",
                    pretrained_windows=windows if arch["version"] == 2 else None)
    return dict(arch, img_size=img_size, drop_path=drop_path, rel_pos="per_block" if arch.get("rel_pos") else None)


def encoder_for_finetuning(state, arch, img_size):
    """Encoder weights of an `arch` model for Classifier(finetuning_arch(...)) at img_size: a relative
    position table (SwinV2's per-stage MLP too) in every block, resized to the new grid or a Swin V1 stage's
    new window. A ViT loses its final norm (its classifier pools before it), a Swin keeps it (pools after)."""
    swin = "depths" in arch
    if not swin:
        state = {k: v for k, v in state.items() if k not in ("norm.weight", "norm.bias")}
    state = shared_bias_to_per_block(state)
    old_grid, new_grid = (arch["img_size"] // arch["patch_size"],) * 2, (img_size // arch["patch_size"],) * 2
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        if swin:  # layers.STAGE.blocks...: the window of that stage, before and after
            old, new = (swin_stage_windows(arch, size)[int(key.split(".")[1])] for size in (None, img_size))
            state[key] = resize_grid(state[key], (2 * old - 1,) * 2, (2 * new - 1,) * 2)
        else:
            state[key] = resize_rel_pos_table(state[key], old_grid, new_grid)
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid)
    return state


def read_encoder(init, init_weights):
    """(arch, encoder state_dict, description) of what finetune.py's --init names, at its own resolution."""
    path = Path(init)
    if path.is_file():
        return read_model_file(path)
    if path.suffix in (".pth", ".pt") or os.sep in init:
        raise FileNotFoundError(f"--init {init}: no such file")
    encoder = load_pretrained(init, init_weights, flags=dict(name="--init", weights="with --init-weights FILE"))
    return encoder.arch, encoder.state_dict(), f"{init} " + (f"weights {init_weights}" if init_weights else
                                                             "(random weights from a fixed seed)")


# ============================================================================= Hugging Face layouts
# The image towers of transformers' CLIP, SigLIP and DINOv2 (with registers) files, read without transformers:
# the architecture from config.json, input statistics from preprocessor_config.json. The target is every token
# after the final norm, CLIP's post_layernorm too (transformers applies it to the pooled class token only).
HF_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2", "dinov2_with_registers")
HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# What a config.json leaves out has transformers' default (configuration_clip.py, _siglip.py, _dinov2.py).
HF_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
               hidden_act="gelu", layer_norm_eps=1e-6, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
HF_DEFAULTS = {"clip": dict(HF_BASE, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            image_mean=CLIP_MEAN, image_std=CLIP_STD),
               "siglip": dict(HF_BASE, patch_size=16, hidden_act="gelu_pytorch_tanh", image_mean=(0.5,) * 3,
                              image_std=(0.5,) * 3),
               "dinov2": dict(HF_BASE, patch_size=14, mlp_ratio=4),
               "dinov2_with_registers": dict(HF_BASE, patch_size=16, mlp_ratio=4, num_register_tokens=4)}
HF_UNUSED = ("head.", "embeddings.mask_token", "embeddings.position_ids")  # SigLIP's head, DINOv2's MIM token
# Regular expressions, in order; DINOv2's attention.attention.query, ... (in transformers 5: q_proj, ...).
HF_RENAMES = [(r"embeddings\.patch_embeddings?\.(projection\.)?", "patch_embed."),
              (r"embeddings\.(class_embedding|cls_token)", "cls_token"), (r"(post_)?layernorm\.", "norm."),
              (r"embeddings\.position_embeddings?(\.weight)?", "pos_embed"), (r"pre_layrnorm\.", "norm_pre."),
              (r"embeddings\.register_tokens", "reg_tokens"), (r"encoder\.layers?\.", "blocks."),
              (r"layer_norm(\d)\.", r"norm\1."), (r"attention\.attention\.([qkv])[a-z]*\.", r"attn.\1_proj."),
              (r"attention\.output\.dense\.", "attn.proj."), (r"(self_attn|attention)\.", "attn."),
              (r"\.(out|o)_proj\.", ".proj."), (r"\.layer_scale(\d)\.lambda1", r".gamma_\1")]


def read_hf_model(path):
    """(weights file, state dict in our names, arch) of a transformers model: a folder with config.json,
    model.safetensors (or pytorch_model.bin) and maybe preprocessor_config.json, or a weights file beside them."""
    if path.is_dir():
        path = next((path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()),
                    path / "model.safetensors")
    config_file, preprocessor_file = path.with_name("config.json"), path.with_name("preprocessor_config.json")
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file. The hf teacher takes its architecture from "
                                f"config.json: put it beside {path.name}, as in a Hugging Face model folder")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if str(model_type).startswith("siglip2"):
        raise ValueError(f"{config_file}: a SigLIP 2 NaFlex model ({model_type}) has no fixed patch grid; use a "
                         f"fixed-resolution SigLIP 2 model (e.g. google/siglip2-base-patch16-224, model_type siglip)")
    if model_type not in HF_TYPES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a layout the hf teacher reads "
                         f"({', '.join(HF_TYPES)})")
    family = model_type.split("_")[0]
    c = {**HF_DEFAULTS.get(model_type, HF_DEFAULTS[family]), **config.get("vision_config", config)}
    if preprocessor_file.is_file():
        preprocessor = json.loads(preprocessor_file.read_text())
        c.update({k: preprocessor[k] for k in ("image_mean", "image_std") if k in preprocessor})
    act = "swiglu" if c.get("use_swiglu_ffn") else c["hidden_act"]  # DINOv2-g's SwiGLU MLP has other weights
    if act not in HF_ACTS:
        raise ValueError(f"{config_file}: activation {act!r} is not supported ({', '.join(HF_ACTS)})")
    state = convert(unwrap_state_dict(read_checkpoint(path), path), HF_RENAMES, HF_UNUSED, regex=True)
    for q in [k for k in state if ".attn.q_proj." in k]:  # separate q, k, v projections -> our one qkv
        state[q.replace("q_proj", "qkv")] = torch.cat([state.pop(q.replace("q_", f"{p}_")) for p in "qkv"])
    # The grid of the file's position embeddings (transformers' DINOv2 resizes them to any input on the fly).
    prefix = int(family != "siglip")
    grid = (math.isqrt(state["pos_embed"].shape[1] - prefix) if "pos_embed" in state
            else c.get("image_size", 224) // c["patch_size"])
    mlp_ratio = c["mlp_ratio"] if family == "dinov2" else c["intermediate_size"] / c["hidden_size"]
    return path, state, dict(PLAIN_VIT, img_size=grid * c["patch_size"], patch_size=c["patch_size"],
                             embed_dim=c["hidden_size"], depth=c["num_hidden_layers"],
                             num_heads=c["num_attention_heads"], mlp_ratio=mlp_ratio, norm_eps=c["layer_norm_eps"],
                             act=HF_ACTS[act], norm_pre=family == "clip", patch_bias=family != "clip",
                             class_token=bool(prefix), layer_scale=1.0 if family == "dinov2" else None,
                             num_registers=c.get("num_register_tokens", 0), mean=tuple(c["image_mean"]),
                             std=tuple(c["image_std"]))
