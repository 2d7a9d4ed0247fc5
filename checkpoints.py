"""Model files: the published teachers' checkpoints read and converted, this project's files read and exported.

No code from a file runs when it is read (read_checkpoint). Pure state_dict -> state_dict functions convert the
timm, open_clip, OpenAI CLIP, torchvision, DINOv2, EsViT and Hugging Face transformers layouts to the names of
models.py, and a strict load lists every key that does not fit. `load_teacher` is what distill.py calls. At the end,
the export of a student or classifier for timm and transformers (neither library is needed):

    python checkpoints.py export out/fd/student.pth --out out/fd/export    # --to timm|hf|both, --per-block
"""
import argparse
import collections
import hashlib
import io
import json
import math
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from models import (IMAGENET_MEAN, IMAGENET_STD, VIT_SIZES, Teacher, build_from_arch, parse_vit_name, swin_arch,
                    window_position_index)


# ============================================================================= reading files
DATA_ONLY_GLOBALS = {"argparse.Namespace": argparse.Namespace}  # pickled training arguments (EsViT, DINO)
WRAPPER_KEYS = ("model", "state_dict", "teacher", "student", "module")  # where checkpoints nest a state dict


def read_checkpoint(path):
    """Whatever a checkpoint file holds, read without running code from it: a zip or legacy pickle through
    torch.load(weights_only=True), a TorchScript archive by unpickling only its tensors, a safetensors file."""
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
    except pickle.UnpicklingError as error:
        try:
            globals_ = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except ValueError:  # not a pickle at all: text, an HTML page saved under the file's name
            raise not_a_checkpoint(path, error) from None
        refused = sorted(g for g in globals_ if g not in DATA_ONLY_GLOBALS)
        if refused:
            raise ValueError(f"{path}: refused: unpickling it would call {', '.join(refused)}, which can run code. "
                             f"Nothing from it was executed. If you trust the file, re-save its tensors as a plain "
                             f"state dict") from None
        with torch.serialization.safe_globals([DATA_ONLY_GLOBALS[g] for g in globals_]):
            return torch.load(path, map_location="cpu", weights_only=True)
    # OSError: the zip reader's 'Invalid argument' on a cut file; KeyError, IndexError: other bytes read as a pickle
    except (RuntimeError, EOFError, OSError, KeyError, IndexError) as error:
        raise not_a_checkpoint(path, error) from None


def not_a_checkpoint(path, error):
    return ValueError(f"{path}: not a readable checkpoint, probably truncated or not written by torch.save "
                      f"({type(error).__name__}: {str(error).split('.')[0]}): download or copy it again")


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
    storages = {}

    class ScriptModule:
        """Stands in for a TorchScript module while unpickling: only holds its attributes."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("__torch__"):
                return ScriptModule
            if (module, name) not in TORCHSCRIPT_GLOBALS:
                raise pickle.UnpicklingError(f"refused to load {module}.{name} from a TorchScript archive")
            return TORCHSCRIPT_GLOBALS[module, name]

        def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
            _, dtype, key, _, numel = pid
            if key not in storages:
                raw = bytearray(archive.read(f"{root}/data/{key}"))
                storages[key] = torch.frombuffer(raw, dtype=dtype)[:numel] if numel else torch.empty(0, dtype=dtype)
            return storages[key]

    def tensors(module, prefix=""):  # (name, tensor) of a module and, recursively, of its submodules
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield prefix + name, value
            elif isinstance(value, ScriptModule):
                yield from tensors(value, f"{prefix}{name}.")

    return dict(tensors(Unpickler(io.BytesIO(archive.read(f"{root}/data.pkl"))).load()))


def read_safetensors(path):
    """A safetensors file: an 8-byte little-endian header length, a JSON header (dtype, shape, byte range), the data.
    Anything else (text, a renamed .pth, a truncated download) is refused as not a readable checkpoint."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    try:
        header, data = json.loads(raw[8:8 + header_len]), memoryview(raw)[8 + header_len:]
        header.pop("__metadata__", None)  # strings, not a tensor
        tensors = {}
        for name, info in header.items():
            dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if end > len(data) or end - start != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"{name}: bytes {start}-{end} of {len(data)}")
            tensors[name] = (torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else
                             torch.empty(0, dtype=dtype)).reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError, UnicodeDecodeError too
        raise ValueError(f"{path}: not a readable checkpoint (not a safetensors file, or truncated: "
                         f"{type(error).__name__}: {str(error)[:80]}); download it again") from None


def unwrap_state_dict(checkpoint, path, prefer=WRAPPER_KEYS):
    """The state dict inside a checkpoint: the first of `prefer` that a nested dict is found under, with the
    prefixes of wrappers removed (DDP's module., torch.compile's _orig_mod., DINO's backbone., its head dropped)."""
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


def load_strict(model, state, source, check_only=False):
    """load_state_dict, naming every missing, unexpected or misshapen key: a silently half-loaded teacher ruins runs.
    `check_only`: the checks alone (a model on the meta device, which holds no values to load into)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label}: {', '.join(keys[:12])}" + (f" and {len(keys) - 12} more" if len(keys) > 12 else "")
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("different shapes", shapes))
                    if keys]
        raise ValueError(f"{source} does not fit this model ({'; '.join(problems)}). Is it the file of another "
                         f"model? Check --teacher / --init and the weights file")
    if not check_only:
        model.load_state_dict(state)  # casts fp16 weights (OpenAI CLIP) to the model's dtype


def sha256sum(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def teacher_weights_file(name):
    """The cached published file of a teacher, downloaded and checked on first use."""
    url = TEACHERS[name].get("url")
    if url is None:
        raise ValueError(f"--teacher {name} reads any file of its layout: give it with --teacher-weights FILE")
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {name} teacher from {url} to {path}")
        try:  # writes to a temporary file, checks the hash prefix, then renames
            torch.hub.download_url_to_file(url, str(path), hash_prefix=TEACHERS[name].get("sha256"))
        except Exception as error:  # offline, a proxy, a changed file: the machine's error, in one line
            raise OSError(f"could not download the {name} teacher ({error}): fetch {url} yourself and put it at "
                          f"{path}, or pass it with --teacher-weights FILE") from None
    return path


# ============================================================================= the published teachers
# Each entry: its image tower's architecture (models.PretrainedViT's options), its file's layout (as OpenAI's
# clip/model.py, timm's and torchvision's vision_transformer.py, DINOv2, EsViT write it), URL, SHA-256 (or a prefix).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PLAIN_VIT = dict(rel_pos=None, abs_pos=True, qv_bias=False, layer_scale=None, norm_eps=1e-6)


def teacher_arch(size, patch_size, img_size=224, **options):
    """The arch of a plain teacher ViT: absolute positions, a full qkv bias, no LayerScale."""
    embed_dim, depth, num_heads, mlp_ratio = (*VIT_SIZES[size], 4.0)[:4]
    return dict(PLAIN_VIT, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, mlp_ratio=mlp_ratio, **options)


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
    "hf": dict(layout="hf"),  # a transformers CLIP, SigLIP or DINOv2 folder, its architecture from config.json
}


# Key conversions: pure functions from a published state dict to our names. Towers and heads the
# FD target does not use are dropped by name; anything else unknown is left for the strict load.
CLIP_TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.", "positional_embedding", "text_projection",
                   "logit_scale", "visual.proj")  # visual.proj maps to the text space, after the FD target


def rename(key, renames, regex=False):
    for old, new in renames:
        key = re.sub(old, new, key) if regex else key.replace(old, new)
    return key


def convert_openai_clip(state):
    renames = [("visual.", ""), ("class_embedding", "cls_token"), ("positional_embedding", "pos_embed"),
               ("conv1.", "patch_embed."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."), (".ln_1.", ".norm1."),
               ("transformer.resblocks.", "blocks."), (".ln_2.", ".norm2."), (".attn.in_proj_", ".attn.qkv."),
               (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]
    out = {rename(k, renames): v for k, v in state.items() if not k.startswith(CLIP_TEXT_TOWER)}
    for key in out.keys() & {"cls_token", "pos_embed"}:  # (C,) and (1+N, C) in the file: add our batch axis
        out[key] = out[key].reshape(1, -1, out[key].shape[-1])
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


def esvit_to_swin(state_dict):
    """EsViT's checkpoint['student'] -> our V1 keys, without DDP's prefix 'module.', the DINO heads ('head.*' for the
    image, 'head_dense.*' for the regions) and the index tables (derived from the window size; EsViT's checked)."""
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn.relative_position_index"):  # (window², window²)
            if not torch.equal(value.cpu().long(), window_position_index(math.isqrt(value.shape[0]))):
                raise ValueError(f"{key}: not the Swin relative position layout this model assumes")
        elif not key.startswith(("head.", "head_dense.")):
            converted[key] = value
    return converted


CONVERTERS = {"openai_clip": convert_openai_clip, "timm": convert_timm, "torchvision": convert_torchvision,
              "esvit": esvit_to_swin}
# No tensor shape gives the heads: 64 channels per head in published ViTs, 16 heads in ViT-H/14, ViT-g/14, ViT-bigG/14.
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


def shared_bias_to_per_block(state):
    """Copy a shared position bias into every block that shared it, as the official utils.py does for the ViT's
    table: `rel_pos_bias.*` into `blocks.j.rel_pos_bias.*`, a SwinV2 stage's `layers.i.rel_pos_bias.*` into
    `layers.i.blocks.j.rel_pos_bias.*`. The same function, each block's bias then free to fine-tune on its own."""
    num_blocks = {}  # what precedes "blocks." -> how many blocks follow it
    for key in state:
        if match := re.match(r"(.*?)blocks\.(\d+)\.", key):
            num_blocks[match[1]] = max(num_blocks.get(match[1], 0), int(match[2]) + 1)
    converted = {}
    for key, value in state.items():
        prefix, shared, rest = key.partition("rel_pos_bias.")
        if shared and "blocks." not in prefix:  # a bias shared by the blocks after `prefix`
            for j in range(num_blocks[prefix]):
                converted[f"{prefix}blocks.{j}.rel_pos_bias.{rest}"] = value.clone()
        else:
            converted[key] = value
    return converted


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


# ============================================================================= Hugging Face layouts
# transformers' CLIPVisionModel, SiglipVisionModel, Dinov2Model and Dinov2WithRegistersModel (a full CLIPModel or
# SiglipModel file holds its image tower under `vision_model.`), read without transformers: the architecture from
# config.json, the input statistics from preprocessor_config.json. The target is every token after the final norm,
# as for the other teachers: CLIP's post_layernorm too (transformers applies it to the pooled class token only).
HF_FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip",
               "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}
HF_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# What a config.json leaves out has transformers' default (configuration_clip.py, _siglip.py, _dinov2.py, ...).
HF_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
HF_DEFAULTS = {"clip": dict(HF_BASE, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, image_mean=CLIP_MEAN,
                            image_std=CLIP_STD),
               "siglip": dict(HF_BASE, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                              image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
               "dinov2": dict(HF_BASE, mlp_ratio=4, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)}
HF_DEFAULTS["dinov2_with_registers"] = dict(HF_DEFAULTS["dinov2"], patch_size=16, num_register_tokens=4)
HF_UNUSED = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias",  # text tower
             "head.", "embeddings.mask_token", "embeddings.position_ids")  # SigLIP's pooling, DINOv2's MIM token
# Both DINOv2 names: published files' (attention.attention.query, ...) and those of transformers 5 (q_proj, ...).
HF_RENAMES = [("embeddings.patch_embeddings.projection.", "patch_embed."),
              ("embeddings.patch_embedding.", "patch_embed."), ("embeddings.class_embedding", "cls_token"),
              ("embeddings.cls_token", "cls_token"), ("embeddings.position_embedding.weight", "pos_embed"),
              ("embeddings.position_embeddings", "pos_embed"), ("embeddings.register_tokens", "reg_tokens"),
              ("pre_layrnorm.", "norm_pre."), ("post_layernorm.", "norm."), ("layernorm.", "norm."),
              ("encoder.layers.", "blocks."), ("encoder.layer.", "blocks."), ("layer_norm1.", "norm1."),
              ("layer_norm2.", "norm2."), ("self_attn.", "attn."),
              ("attention.attention.query.", "attn.q_proj."), ("attention.attention.key.", "attn.k_proj."),
              ("attention.attention.value.", "attn.v_proj."), ("attention.output.dense.", "attn.proj."),
              ("attention.", "attn."), ("out_proj.", "proj."), ("o_proj.", "proj."),
              (".layer_scale1.lambda1", ".gamma_1"), (".layer_scale2.lambda1", ".gamma_2")]


def convert_hf(state):
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    out = {rename(k, HF_RENAMES): v for k, v in state.items() if not k.startswith(HF_UNUSED)}
    for key in out.keys() & {"cls_token", "pos_embed"}:  # CLIP's (C,), (1+N, C), SigLIP's (N, C): add our batch axis
        out[key] = out[key].reshape(1, -1, out[key].shape[-1])
    for key in [k for k in out if ".attn.q_proj." in k]:  # separate q, k, v projections -> our one qkv
        out[key.replace("q_proj", "qkv")] = torch.cat([out.pop(key.replace("q_proj", f"{p}_proj")) for p in "qkv"])
    return out


def read_hf_model(path):
    """(weights file, state dict in our names, arch) of a transformers model: a folder with config.json,
    model.safetensors (or pytorch_model.bin) and maybe preprocessor_config.json, or a weights file beside them."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()),
                    path / "model.safetensors")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file. --teacher hf reads the architecture from the model's "
                                f"config.json: put it beside {path.name} (a Hugging Face model folder holds "
                                f"config.json, model.safetensors and preprocessor_config.json)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if str(model_type).startswith("siglip2"):
        raise ValueError(f"{config_file}: a SigLIP 2 NaFlex model ({model_type}) has no fixed patch grid; use a "
                         f"fixed-resolution SigLIP 2 model (e.g. google/siglip2-base-patch16-224, model_type siglip)")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a layout --teacher hf reads "
                         f"({', '.join(HF_FAMILIES)})")
    family = HF_FAMILIES[model_type]
    c = {**HF_DEFAULTS.get(model_type, HF_DEFAULTS[family]), **config.get("vision_config", config)}
    if (folder / "preprocessor_config.json").is_file():
        preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
        c.update({k: preprocessor[k] for k in ("image_mean", "image_std") if k in preprocessor})
    act = "swiglu" if c.get("use_swiglu_ffn") else c["hidden_act"]  # DINOv2-g's SwiGLU MLP has other weights
    if act not in HF_ACTS:
        raise ValueError(f"{config_file}: activation {act!r} is not supported ({', '.join(HF_ACTS)})")
    state = convert_hf(unwrap_state_dict(read_checkpoint(path), path))
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


# ============================================================================= building teachers
def sizes(arch):
    """What the name of an architecture fixes, in words."""
    if "depths" in arch:
        return f"a Swin of width {arch['embed_dim']}, depths {list(arch['depths'])}, window {arch['window_size']}"
    return f"a ViT of width {arch['embed_dim']}, depth {arch['depth']}, patch {arch['patch_size']}"


def load_pretrained(name, weights=None, img_size=None, grid=None):
    """A pretrained encoder (trainable, in train mode) that maps images in [0, 1] to its tokens:
    - a teacher of TEACHERS, from `weights` (a file in its published layout; for 'hf' a transformers model folder),
      else from its published file (downloaded into the torch hub cache), or random weights if `weights == "random"`;
    - with any other name, from `weights`, a model file this project wrote, or without it a plain ViT such as
      'vit_tiny_patch16' (random weights from a fixed seed: the same in every process).
    `img_size` or `grid` (tokens per side): the input resolution, absolute position embeddings resized bicubically."""
    source, final_norm = name, True
    if name in TEACHERS:
        spec, state = TEACHERS[name], None
        if weights != "random":
            path = Path(weights) if weights else teacher_weights_file(name)
            if spec["layout"] == "hf":  # the architecture is in config.json beside the weights
                path, state, arch = read_hf_model(path)
                spec = dict(spec, arch=arch)
            else:
                prefer = (spec["state_key"], *WRAPPER_KEYS) if "state_key" in spec else WRAPPER_KEYS
                state = CONVERTERS[spec["layout"]](unwrap_state_dict(read_checkpoint(path), path, prefer))
            source = str(path)
        if "arch" not in spec and state is None:
            raise ValueError(f"--teacher {name} has no fixed architecture: give a weights file")
        try:
            arch = dict(spec["arch"]) if "arch" in spec else infer_vit_arch(state, spec["act"])
        except KeyError as error:  # a tensor infer_vit_arch needs
            raise ValueError(f"{source} does not fit the {spec['layout']} layout of --teacher {name} (missing: "
                             f"{error.args[0]}; the file has {', '.join(list(state)[:8])}, ...)") from None
    elif weights not in (None, "random"):
        (arch, state, _), source = read_encoder_file(weights), str(weights)
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
            arch, state = teacher_arch(*parse_vit_name(name)), None
        except ValueError:
            raise ValueError(f"unknown teacher {name!r}: expected one of {', '.join(TEACHERS)}, a plain ViT such as "
                             f"vit_base_patch16 (random weights), or a model file of this project as weights") from None

    # Only absolute positions follow a new grid; relative ones (students, Swin) don't: distill.py resizes their tokens.
    if arch.get("abs_pos") and not arch.get("rel_pos"):
        patch = arch["patch_size"]
        img_size = grid * patch if grid is not None else img_size
        if img_size and img_size != arch["img_size"]:
            if state is not None:
                with torch.device("meta"):  # the file must fit the architecture at its own size before any resizing
                    native = build_from_arch(arch)
                    native.norm = native.norm if final_norm else nn.Identity()
                load_strict(native, state, source, check_only=True)
                old_grid, new_grid = (arch["img_size"] // patch,) * 2, (img_size // patch,) * 2
                state["pos_embed"] = resize_pos_embed(state["pos_embed"], old_grid, new_grid)
            arch["img_size"] = img_size
    with torch.random.fork_rng(devices=[]):  # the same random weights on every process
        torch.manual_seed(0)
        model = build_from_arch(arch)
    model.norm = model.norm if final_norm else nn.Identity()  # a fine-tuned classifier's encoder: tokens as they come
    if state is not None:
        load_strict(model, state, source)
    model.source = source
    return model


def load_teacher(name, weights=None, grid=None):
    """The frozen FD teacher (`name`, `weights`: see load_pretrained) giving `grid` x `grid` tokens, as the student."""
    encoder = load_pretrained(name, weights, grid=grid)
    return Teacher(encoder, encoder.source)


# ============================================================================= this project's files
def load_model_file(path):
    """Rebuild a model, strictly, from a file this project wrote ({'arch': ..., 'model': state_dict}: student.pth)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise ValueError(f"{path}: not a model file written by this project (expected the keys 'arch' and 'model', "
                         f"found {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    model = build_from_arch(state["arch"])
    model.load_state_dict(state["model"])
    return model


def read_encoder_file(path):
    """(arch, state dict, description) of the encoder in a file this project wrote: a model file (a distilled
    student.pth; a fine-tuned Classifier, without its head) or a distillation checkpoint.pth (its student)."""
    state = read_checkpoint(path)
    if isinstance(state, dict) and "arch" in state and "student" in state:
        return state["arch"], state["student"], f"the student of distillation checkpoint {path} (step {state['step']})"
    if isinstance(state, dict) and "arch" in state and "model" in state:
        if "encoder" in state["arch"]:
            encoder = {k.removeprefix("encoder."): v for k, v in state["model"].items() if k.startswith("encoder.")}
            return state["arch"]["encoder"], encoder, f"the encoder of classifier {path}"
        return state["arch"], state["model"], f"model file {path}"
    raise ValueError(f"{path}: expected a model file of this project ('arch', 'model') or a distillation checkpoint "
                     f"('arch', 'student'), found {sorted(state) if isinstance(state, dict) else type(state).__name__}"
                     f"; for a published checkpoint name its layout with --teacher ({', '.join(TEACHERS)})")


# ============================================================================= exporting to timm and transformers
EXPORTING = """Export a model file of this project (a distilled student.pth: its encoder; a fine-tuned classifier's
best.pth or checkpoint.pth) for timm and transformers; neither is needed to export. timm: OUT/timm/model.pth loads
strictly into `timm.create_model(**json.load(open("OUT/timm/create_model.json"))["create_model"])`, a call printed
too: timm's Beit (beit.py) or SwinTransformerV2 (swin_transformer_v2.py). transformers: OUT/hf/ (config.json,
model.safetensors, preprocessor_config.json) loads with BeitModel, Swinv2Model or their ...ForImageClassification
(modeling_beit.py, modeling_swinv2.py) `.from_pretrained("OUT/hf")`.

Their outputs equal ours (test_checkpoints.py): the ViT's tokens after its final norm (timm forward_features,
transformers last_hidden_state), the SwinV2's last stage, a classifier's logits. A position bias shared by blocks is
copied into each (theirs have one per block; the same function): always for SwinV2, with --per-block for the ViT.
Not carried over: ours take images in [0, 1], theirs normalised ones (the statistics are in create_model.json's
pretrained_cfg_overlay and preprocessor_config.json); the resolution is the file's (at another, they resize position
tables their own way, not as finetune.py does); SwinV2's shifted windows are masked with -inf by ours, -100 by timm
and -200 by transformers (the same while every learned temperature stays well below 100); nothing of training."""
# A ViT arch saved by models.PretrainedViT is the student (a BEiT) only with these values: anything else is a
# published teacher's layout (absolute positions, a full qkv bias, QuickGELU, ...), which neither Beit has.
BEIT_VALUES = dict(abs_pos=False, qv_bias=True, act="gelu", norm_pre=False, patch_bias=True, num_registers=0,
                   norm_eps=1e-6, class_token=True)
# Our names -> theirs, applied in order with re.sub.
VIT_TIMM = [(r"^patch_embed\.", "patch_embed.proj."), (r"^blocks\.(\d+)\.rel_pos_bias\.", r"blocks.\1.attn.")]
VIT_HF = [(r"^patch_embed\.", "embeddings.patch_embeddings.projection."), (r"^cls_token$", "embeddings.cls_token"),
          (r"^rel_pos_bias\.", "shared_position_bias."),
          (r"^blocks\.(\d+)\.rel_pos_bias\.", r"layers.\1.relative_position_bias."), (r"^blocks\.", "layers."),
          (r"\.norm1\.", ".layernorm_before."), (r"\.norm2\.", ".layernorm_after."), (r"\.gamma_(\d)$", r".lambda_\1"),
          (r"\.attn\.proj\.", ".attention.o_proj."), (r"\.attn\.([qv])_bias$", r".attention.\1_proj.bias"),
          (r"\.attn\.qkv\.", ".attention.qkv."), (r"^norm\.", "layernorm."), (r"^fc_norm\.", "pooler.layernorm.")]
# timm's SwinV2 merges patches at the start of stages 1-3; ours (the official layout), like transformers', at the end.
SWIN_TIMM = [(r"\.rel_pos_bias\.rpe_mlp\.", ".attn.cpb_mlp."), (r"^head\.", "head.fc."),
             (r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.")]
SWIN_HF = [(r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
           (r"^patch_embed\.norm\.", "embeddings.norm."), (r"^layers\.", "encoder.layers."),
           (r"\.rel_pos_bias\.rpe_mlp\.", ".attention.self.continuous_position_bias_mlp."),
           (r"\.attn\.proj\.", ".attention.output.dense."), (r"\.attn\.q_bias$", ".attention.self.query.bias"),
           (r"\.attn\.v_bias$", ".attention.self.value.bias"),
           (r"\.attn\.(logit_scale|qkv\.weight)$", r".attention.self.\1"), (r"\.norm1\.", ".layernorm_before."),
           (r"\.norm2\.", ".layernorm_after."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
           (r"\.mlp\.fc2\.", ".output.dense."), (r"^norm\.", "layernorm.")]
HF_QKV = {"beit": ("q_proj", "k_proj", "v_proj"), "swinv2": ("query", "key", "value")}  # transformers splits qkv


def unsupported(arch):
    """Why the model of an arch has no timm / transformers twin, or None."""
    encoder, classifier = arch.get("encoder", arch), "encoder" in arch
    pooling = arch.get("pooling", "mean_then_fc_norm")  # what models.build_from_arch assumes for older files
    if arch.get("linear_probe"):
        return "a linear probe (a BatchNorm without affine parameters before the head) has no timm or transformers twin"
    if "depths" in encoder:
        if encoder["version"] != 2:
            return "a Swin V1 (the EsViT teacher's architecture); only SwinV2 students are exported"
        if encoder["norm_eps"] != 1e-5:
            return f"LayerNorm eps {encoder['norm_eps']}: timm's and transformers' SwinV2 use 1e-5"
        if classifier and pooling != "norm_then_mean":  # a file of an earlier finetune.py
            return (f"this Swin classifier pools {pooling}: the mean of the tokens before the final norm, then "
                    f"fc_norm; timm's and transformers' SwinV2 apply the final norm to every token, then the mean")
        return None
    odd = {k: encoder[k] for k in BEIT_VALUES if k in encoder and encoder[k] != BEIT_VALUES[k]}
    if odd:
        return f"a ViT with {odd} (a published teacher's layout) is not a BEiT: export the student distilled from it"
    if classifier and pooling != "mean_then_fc_norm":
        return f"a ViT classifier pooling {pooling}: transformers' BEiT pools the mean of the tokens, then a layernorm"
    return None


def split_qkv(state, names):
    """One (3C, C) qkv matrix -> three (C, C) ones: rows are q, k, v in that order (models.qkv_heads)."""
    out = {}
    for key, value in state.items():
        parts = zip(names, value.chunk(3)) if key.endswith("qkv.weight") else ()
        out.update({key.replace("qkv", name): part.clone() for name, part in parts} or {key: value})
    return out


def timm_create_model(encoder, num_classes, rel_pos, stats):
    """timm.create_model's keyword arguments: a registered name, its architecture all overridden here."""
    size = encoder["img_size"]
    overlay = dict(stats, input_size=[3, size, size], crop_pct=0.875, interpolation="bicubic")  # data.eval_transform
    common = dict(pretrained=False, img_size=size, patch_size=encoder["patch_size"], embed_dim=encoder["embed_dim"],
                  num_heads=encoder["num_heads"], num_classes=num_classes)
    if "depths" in encoder:
        return dict(model_name="swinv2_base_window8_256", **common, global_pool="avg", depths=encoder["depths"],
                    window_size=encoder["window_size"], pretrained_window_sizes=encoder["pretrained_windows"],
                    pretrained_cfg_overlay=overlay)
    # Students (num_classes 0, no pooling) keep their final norm on every token; classifiers pool, then fc_norm.
    # timm's Beit derives its fc_norm from the pooling (before timm 1.0.31 it takes no use_fc_norm).
    return dict(model_name="beit_base_patch16_224", **common, global_pool="avg" if num_classes else "",
                depth=encoder["depth"], mlp_ratio=encoder["mlp_ratio"], use_abs_pos_emb=False,
                use_rel_pos_bias=rel_pos == "per_block", use_shared_rel_pos_bias=rel_pos == "shared",
                init_values=encoder["layer_scale"] or 0.0,  # create_model drops None: beit_base's 0.1 would stay
                pretrained_cfg_overlay=overlay)


def hf_config(encoder, num_classes, rel_pos):
    common = dict(image_size=encoder["img_size"], patch_size=encoder["patch_size"], num_channels=3, hidden_act="gelu",
                  drop_path_rate=0.0)
    if num_classes:  # an encoder keeps transformers' default labels
        common.update(id2label={str(i): f"LABEL_{i}" for i in range(num_classes)},
                      label2id={f"LABEL_{i}": i for i in range(num_classes)})
    if "depths" in encoder:
        return dict(model_type="swinv2", **common, embed_dim=encoder["embed_dim"], depths=encoder["depths"],
                    architectures=["Swinv2ForImageClassification" if num_classes else "Swinv2Model"],
                    num_heads=encoder["num_heads"], window_size=encoder["window_size"], mlp_ratio=4.0,
                    pretrained_window_sizes=encoder["pretrained_windows"], qkv_bias=True,
                    use_absolute_embeddings=False, layer_norm_eps=encoder["norm_eps"])
    # use_mean_pooling: False keeps the final layernorm on every token (a student); True: the mean, then fc_norm.
    return dict(model_type="beit", architectures=["BeitForImageClassification" if num_classes else "BeitModel"],
                **common, hidden_size=encoder["embed_dim"], num_hidden_layers=encoder["depth"],
                num_attention_heads=encoder["num_heads"], layer_norm_eps=1e-6,
                intermediate_size=int(encoder["embed_dim"] * encoder["mlp_ratio"]), use_mask_token=False,
                use_absolute_position_embeddings=False, use_relative_position_bias=rel_pos == "per_block",
                use_shared_relative_position_bias=rel_pos == "shared",
                layer_scale_init_value=encoder["layer_scale"] or 0.0, use_mean_pooling=num_classes > 0)


def write_safetensors(state, path):
    """The file read_safetensors reads: header length, JSON header, the raw little-endian bytes of each tensor."""
    if sys.byteorder != "little":
        raise ValueError("safetensors stores little-endian bytes: export on a little-endian machine")
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0  # transformers checks the format
    for name, tensor in state.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=DTYPE_NAMES[tensor.dtype][1], shape=list(tensor.shape),
                            data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.writelines(chunks)


def export_model_file(path, out, to="both", per_block=False):
    """OUT/timm/ and/or OUT/hf/ of a model file (EXPORTING); ValueError 'FILE: cannot export: why' if it has no twin."""
    path, out = Path(path), Path(out)
    try:
        checkpoint = read_checkpoint(path)
        # a model file ('model'), or a distillation checkpoint ('student')
        source = checkpoint.get("model", checkpoint.get("student")) if isinstance(checkpoint, dict) else None
        if not (isinstance(source, dict) and isinstance(checkpoint.get("arch"), dict)):
            found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            raise ValueError(f"not a model file of this project (expected the keys 'arch' and 'model' of a student.pth "
                             f"or a classifier's best.pth; found {found})")
        arch = checkpoint["arch"]
        if reason := unsupported(arch):
            raise ValueError(reason)
        load_strict(build_from_arch(arch), source, str(path))  # every key and shape checked by rebuilding the model
    except (FileNotFoundError, TypeError, ValueError) as error:  # messages that may start with FILE
        why = str(error).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        raise ValueError(f"{path}: cannot export: {why}") from None

    encoder, num_classes = arch.get("encoder", arch), arch.get("num_classes", 0)
    swin, state = "depths" in encoder, {k.removeprefix("encoder."): v for k, v in source.items()}
    if swin:  # 0: offsets scaled by the stage's own window (timm, transformers), as ours without pretrained_windows
        windows = encoder.get("pretrained_windows") or [0] * len(encoder["depths"])
        encoder = dict(encoder, pretrained_windows=list(windows))
    rel_pos = "per_block" if per_block and encoder.get("rel_pos") else encoder.get("rel_pos")
    if swin or rel_pos != encoder.get("rel_pos"):
        state = shared_bias_to_per_block(state)
    stats = dict(mean=list(encoder.get("mean", IMAGENET_MEAN)), std=list(encoder.get("std", IMAGENET_STD)))
    kind = f"{'SwinV2' if swin else 'ViT'} {'classifier' if num_classes else 'encoder'}"
    if to in ("timm", "both"):
        (out / "timm").mkdir(parents=True, exist_ok=True)
        torch.save({rename(k, SWIN_TIMM if swin else VIT_TIMM, regex=True): v for k, v in state.items()},
                   out / "timm" / "model.pth")
        kwargs = timm_create_model(encoder, num_classes, rel_pos, stats)
        call = f"timm.create_model({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        (out / "timm" / "create_model.json").write_text(json.dumps(dict(create_model=kwargs, call=call), indent=1))
        print(f"timm: {out / 'timm' / 'model.pth'} ({kind}) loads strictly into\n  {call}")
    if to in ("hf", "both"):
        (out / "hf").mkdir(parents=True, exist_ok=True)
        family = "swinv2" if swin else "beit"
        # A classifier's encoder lives under the base model's prefix; its head is `classifier`.
        head = [(r"^(?!head\.)", f"{family}."), (r"^head\.", "classifier.")] if num_classes else []
        rules = (SWIN_HF if swin else VIT_HF) + head
        write_safetensors(split_qkv({rename(k, rules, regex=True): v for k, v in state.items()}, HF_QKV[family]),
                          out / "hf" / "model.safetensors")
        config = hf_config(encoder, num_classes, rel_pos)
        (out / "hf" / "config.json").write_text(json.dumps(config, indent=1))
        size = encoder["img_size"]
        processor = dict(image_processor_type="BeitImageProcessor" if family == "beit" else "ViTImageProcessor",
                         do_resize=True, size=dict(height=size, width=size), resample=3,  # PIL's bicubic
                         do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                         image_mean=stats["mean"], image_std=stats["std"])
        (out / "hf" / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
        print(f"transformers: {out / 'hf'} ({kind}) loads with {config['architectures'][0]}.from_pretrained")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    command = parser.add_subparsers(dest="command", required=True).add_parser(
        "export", description=EXPORTING, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a student.pth or a classifier's best.pth for timm and transformers")
    command.add_argument("file", help="a model file of this project: student.pth, a classifier's best.pth, ...")
    command.add_argument("--out", required=True, help="folder to write timm/ and hf/ into")
    command.add_argument("--to", choices=("timm", "hf", "both"), default="both", help="hf: transformers")
    command.add_argument("--per-block", action="store_true", help="copy a ViT's shared position table into every "
                         "block, as finetune.py does (the same outputs; each block's table then fine-tunes on its own)")
    args = parser.parse_args()
    try:
        export_model_file(args.file, args.out, args.to, args.per_block)
    except ValueError as error:  # a refusal: one line, as distill.py and finetune.py print theirs
        parser.exit(2, f"{parser.prog}: error: {error}\n")
