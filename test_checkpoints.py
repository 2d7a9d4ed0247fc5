"""checkpoints.py's file formats, against independent references and the real libraries:

    python -m pytest -q test_checkpoints.py

Hugging Face transformers model folders as FD teachers (--teacher hf): CLIP, SigLIP and DINOv2 towers written in the
key layouts of the published files, checked against a forward written here from the raw tensors and against
transformers' own models loaded from the same folder. The export for timm and transformers (`python checkpoints.py
export`): every exported model must give our outputs on random images, with every weight randomised first so that a
mis-mapped tensor cannot hide behind zeros or ones; ours take images in [0, 1], theirs the images normalised with the
statistics the export wrote, which this checks too. timm and transformers are test-only dependencies (`pip install
timm transformers`); the tests that need one skip without it.
"""
import ast
import hashlib
import json
import math
import struct
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import diagnose
import distill
import finetune
import models
from checkpoints import load_pretrained, load_teacher
from conftest import distill_cli_in_process, script_in_process
from models import Classifier, PretrainedViT, SwinTransformer, VisionTransformer, build_from_arch

REPO = Path(__file__).resolve().parent


def normalise(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# Input statistics, typed in from their sources.
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # openai/CLIP clip/clip.py
SIGLIP_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # google/siglip-base-patch16-224 preprocessor_config.json
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # facebook/dinov2-base preprocessor_config.json
ODD_STATS = ((0.4, 0.45, 0.5), (0.2, 0.25, 0.3))  # a preprocessor_config.json of our own: it must be read

WIDTH, DEPTH, HEADS, MLP = 64, 2, 2, 128
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=8)


# ----------------------------------------------------------------------------- tiny files in the published layouts
def save_safetensors(tensors, path):
    """The safetensors format: an 8-byte little-endian header length, a JSON header, the raw data. Written here, not
    with checkpoints.write_safetensors: the fixtures must not share a mistake with the reader they test."""
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


# ----------------------------------------------------------------------------- the reference forward
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


TRANSFORMERS_MODELS = {"clip_vision": "CLIPVisionModel", "clip_full": "CLIPModel", "siglip_vision": "SiglipVisionModel",
                       "siglip_full": "SiglipModel", "dinov2": "Dinov2Model", "dinov2_reg4": "Dinov2WithRegistersModel"}


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
    with pytest.raises(ValueError, match=r"config.json: model_type 'beit' is not a layout --teacher hf reads"):
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


# ============================================================================= exporting to timm and transformers
def randomise(model, seed=0):
    """Every parameter drawn anew: weights, biases, LayerNorm gains, LayerScale, position tables and MLPs. SwinV2's
    temperatures stay near their start (10): with theirs up to 100, the -100 of timm's and transformers' shifted-window
    masks would no longer zero a probability that our -inf does."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                param.copy_(math.log(10.0) + 0.3 * torch.randn_like(param))
            elif param.ndim == 1 and (name.endswith("weight") or "gamma" in name):  # LayerNorm gains, LayerScale
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "relative_position_bias_table" in name or name.endswith("cls_token"):
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def vit(rel_pos="shared", layer_scale=0.1):
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, rel_pos=rel_pos,
                             layer_scale=layer_scale)


def swinv2(position_bias="shared", pretrained_windows=None):
    # 8x8 then 4x4 tokens, window 4: shifted windows in stage 0, one window covering stage 1
    return SwinTransformer(version=2, img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, position_bias=position_bias, pretrained_windows=pretrained_windows)


def export_model(model, tmp_path, **options):
    path = tmp_path / "model.pth"
    torch.save({"arch": model.arch, "model": model.state_dict()}, path)
    return checkpoints.export_model_file(path, tmp_path / "export", **options)


def export_command(*args):
    """`python checkpoints.py export ARGS`, as a user runs it: its __main__ block, in this process (conftest.py)."""
    return script_in_process("checkpoints.py", "export", *args)


def assert_same(case, library, theirs, ours):
    """Equal to fp32 rounding, relative to the outputs' scale."""
    assert theirs.shape == ours.shape, (theirs.shape, ours.shape)
    diff = (theirs - ours).abs().max().item()
    print(f"{case} -> {library}: max |diff| {diff:.2e} (outputs up to {ours.abs().max().item():.2f})")
    assert diff <= 1e-5 * max(1.0, ours.abs().max().item()), diff


def timm_model(out):
    timm = pytest.importorskip("timm")
    spec = json.loads((out / "timm" / "create_model.json").read_text())
    model = timm.create_model(**spec["create_model"]).eval()
    model.load_state_dict(torch.load(out / "timm" / "model.pth", weights_only=True), strict=True)
    # The printed call builds the same model
    assert eval(spec["call"], {"timm": timm}).state_dict().keys() == model.state_dict().keys()
    return model, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]


def hf_model(out, class_name):
    transformers = pytest.importorskip("transformers")
    model, info = getattr(transformers, class_name).from_pretrained(out / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or misshapen key
    processor = json.loads((out / "hf" / "preprocessor_config.json").read_text())
    return model.eval(), processor["image_mean"], processor["image_std"]


IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- layouts and the safetensors writer
def test_relative_position_index_is_the_layout_of_timm_and_transformers():
    timm_beit = pytest.importorskip("timm.models.beit")
    hf_beit = pytest.importorskip("transformers.models.beit.modeling_beit")
    for grid in [(4, 4), (3, 5), (7, 2)]:
        ours = models.relative_position_index(*grid)
        assert torch.equal(ours, timm_beit.gen_relative_position_index(grid))
        assert torch.equal(ours, hf_beit.BeitRelativePositionBias.generate_relative_position_index(grid))


def test_swinv2_offsets_and_index_are_those_of_timm_and_transformers():
    timm_swin = pytest.importorskip("timm.models.swin_transformer_v2")
    transformers = pytest.importorskip("transformers")
    hf_swin = pytest.importorskip("transformers.models.swinv2.modeling_swinv2")
    for window, scale_window in [(4, None), (4, 6), (7, 12)]:
        theirs = timm_swin.WindowAttention(8, (window, window), 2, pretrained_window_size=scale_window or 0)
        hf = hf_swin.Swinv2SelfAttention(transformers.Swinv2Config(), 8, 2, window, [scale_window or 0] * 2)
        for attention in (theirs, hf):
            assert torch.equal(attention.relative_position_index, models.window_position_index(window))
            torch.testing.assert_close(attention.relative_coords_table.reshape(-1, 2),
                                       models.log_spaced_offsets(window, scale_window), atol=1e-6, rtol=0)


def test_safetensors_writer_reads_back_with_ours_and_the_library(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).bfloat16(),
             "d": torch.tensor([True, False, True]), "e": torch.tensor(2.5, dtype=torch.float16)}
    checkpoints.write_safetensors(state, tmp_path / "x.safetensors")
    for name, value in checkpoints.read_safetensors(tmp_path / "x.safetensors").items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state["f"] = torch.randn(0, 3)  # an empty tensor too (checkpoints.read_safetensors cannot read one back)
    checkpoints.write_safetensors(state, tmp_path / "x.safetensors")
    loaded = safetensors_torch.load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- ViT (BEiT)
@pytest.mark.parametrize("rel_pos, layer_scale, options", [("shared", 0.1, {}), ("shared", 0.1, {"per_block": True}),
                                                           (None, None, {})])
def test_vit_student_equals_timm_beit_and_transformers_beit_model(tmp_path, rel_pos, layer_scale, options):
    student = randomise(vit(rel_pos, layer_scale))
    out = export_model(student, tmp_path, **options)
    case = f"ViT student rel_pos={rel_pos}{' --per-block' if options else ''}"
    with torch.no_grad():
        ours = student(IMAGES)  # (B, 1+N, C), class token first, after the final norm
        model, mean, std = timm_model(out)
        assert_same(case, "timm Beit", model.forward_features(normalise(IMAGES, mean, std)), ours)
        model, mean, std = hf_model(out, "BeitModel")
        assert_same(case, "transformers BeitModel", model(normalise(IMAGES, mean, std)).last_hidden_state, ours)


def test_student_file_of_an_earlier_version_is_a_beit_too(tmp_path):
    # Earlier versions saved the student as a PretrainedViT at the student's values (models.build_from_arch)
    student = randomise(PretrainedViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, rel_pos="shared",
                                      abs_pos=False, qv_bias=True, layer_scale=0.1, mean=(0.5,) * 3, std=(0.25,) * 3))
    out = export_model(student, tmp_path, to="timm")
    with torch.no_grad():
        model, mean, std = timm_model(out)
        assert mean == [0.5] * 3 and std == [0.25] * 3  # its own statistics
        assert_same("ViT student, earlier file", "timm Beit", model.forward_features(normalise(IMAGES, mean, std)),
                    student(IMAGES))


@pytest.mark.parametrize("kind", ["vit", "swinv2"])
def test_classifier_logits_equal_timm_and_transformers(tmp_path, kind):
    if kind == "vit":  # per-block tables, mean of the patch tokens, fc_norm
        classifier, names = Classifier(vit("per_block"), num_classes=10), ("Beit", "BeitForImageClassification")
    else:  # pretrained_windows as after finetune.py: the offsets keep the scale of other windows
        classifier = Classifier(swinv2("per_block", pretrained_windows=[6, 3]), num_classes=10)
        names = ("SwinTransformerV2", "Swinv2ForImageClassification")
        assert classifier.arch["pooling"] == "norm_then_mean"  # the final norm on every token, then the mean
    classifier = randomise(classifier)
    out = export_model(classifier, tmp_path)
    with torch.no_grad():
        ours = classifier(IMAGES)
        model, mean, std = timm_model(out)
        assert_same(f"{kind} classifier", f"timm {names[0]}", model(normalise(IMAGES, mean, std)), ours)
        model, mean, std = hf_model(out, names[1])
        assert_same(f"{kind} classifier", f"transformers {names[1]}", model(normalise(IMAGES, mean, std)).logits, ours)


# ----------------------------------------------------------------------------- SwinV2
@pytest.mark.parametrize("position_bias", ["shared", "per_block"])
def test_swinv2_student_equals_timm_and_transformers_swinv2(tmp_path, position_bias):
    student = randomise(swinv2(position_bias))
    out = export_model(student, tmp_path)
    case = f"SwinV2 student {position_bias}"
    with torch.no_grad():
        ours = student(IMAGES)  # (B, N, C), the last stage after the final norm
        model, mean, std = timm_model(out)
        assert_same(case, "timm SwinTransformerV2", model.forward_features(normalise(IMAGES, mean, std)).flatten(1, 2),
                    ours)
        model, mean, std = hf_model(out, "Swinv2Model")
        assert_same(case, "transformers Swinv2Model", model(normalise(IMAGES, mean, std)).last_hidden_state, ours)


# ----------------------------------------------------------------------------- the command, as a user runs it
def test_export_command_on_a_distilled_student(tmp_path):
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "fd"
    distill.main(distill.get_args_parser().parse_args(
        ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
         "16", "--batch-size", "8", "--workers", "0", "--amp", "fp32", "--epochs", "1", "--warmup-epochs", "0",
         "--device", "cpu", "--out", str(run)]))
    done = export_command(run / "student.pth", "--out", tmp_path / "x")
    assert done.returncode == 0, done.stderr
    assert "timm.create_model(model_name='beit_base_patch16_224'" in done.stdout and "BeitModel" in done.stdout
    student = checkpoints.load_model_file(run / "student.pth").eval()
    spec = json.loads((tmp_path / "x" / "timm" / "create_model.json").read_text())
    model = timm.create_model(**spec["create_model"]).eval()
    model.load_state_dict(torch.load(tmp_path / "x" / "timm" / "model.pth", weights_only=True), strict=True)
    config = timm.data.resolve_data_config({}, model=model)
    assert tuple(config["mean"]) == models.IMAGENET_MEAN and tuple(config["std"]) == models.IMAGENET_STD
    hf, info = transformers.BeitModel.from_pretrained(tmp_path / "x" / "hf", output_loading_info=True)
    assert not any(info.values()), info
    # A distillation checkpoint.pth holds the same student; --to timm writes timm's files alone
    done = export_command(run / "checkpoint.pth", "--to", "timm", "--out", tmp_path / "y")
    assert done.returncode == 0 and not (tmp_path / "y" / "hf").exists(), done.stderr
    from_checkpoint = torch.load(tmp_path / "y" / "timm" / "model.pth", weights_only=True)
    from_student = torch.load(tmp_path / "x" / "timm" / "model.pth", weights_only=True)
    assert from_checkpoint.keys() == from_student.keys()
    assert all(torch.equal(from_checkpoint[k], v) for k, v in from_student.items())
    # transformers' own image processor gives the normalised images that the exported model expects
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "x" / "hf")
    pixels = (IMAGES * 255).round().to(torch.uint8)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
    processed = processor(images=pil_images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processed, normalise(pixels / 255, models.IMAGENET_MEAN, models.IMAGENET_STD),
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        ours = student(pixels / 255)
        assert_same("distilled student.pth", "timm Beit", model.forward_features(processed), ours)
        assert_same("distilled student.pth", "transformers BeitModel", hf.eval()(processed).last_hidden_state, ours)


# ----------------------------------------------------------------------------- refusals
def test_export_refuses_what_is_not_a_model_file_of_this_project(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "state.pth")
    with pytest.raises(ValueError, match=r"state\.pth: cannot export: not a model file of this project"):
        checkpoints.export_model_file(tmp_path / "state.pth", tmp_path / "x")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: cannot export: "):
        checkpoints.export_model_file(tmp_path / "notes.pth", tmp_path / "x")
    student = vit()
    state = student.state_dict()
    state.pop("norm.weight")
    torch.save({"arch": student.arch, "model": state}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"cut\.pth: cannot export: .*missing: norm\.weight"):
        checkpoints.export_model_file(tmp_path / "cut.pth", tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written


@pytest.mark.parametrize("model, reason", [
    (PretrainedViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2), "not a BEiT"),
    (SwinTransformer(version=1, img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                     window_size=4, position_bias="per_block"), "Swin V1"),
    (Classifier(vit(), num_classes=10, linear_probe=True), "linear probe"),
    (Classifier(swinv2(), num_classes=10, pooling="mean_then_fc_norm"), "Swin classifier pools mean_then_fc_norm"),
    (Classifier(vit(), num_classes=10, pooling="norm_then_mean"), "ViT classifier pooling norm_then_mean")])
def test_export_refuses_architectures_neither_library_has(tmp_path, model, reason):
    with pytest.raises(ValueError, match=f"model.pth: cannot export: .*{reason}"):
        export_model(model, tmp_path)


def test_export_command_exits_non_zero_naming_the_file_and_the_reason(tmp_path):
    teacher = PretrainedViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    torch.save({"arch": teacher.arch, "model": teacher.state_dict()}, tmp_path / "teacher.pth")
    done = export_command(tmp_path / "teacher.pth", "--out", tmp_path / "x")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr  # one line, no traceback
    assert done.stderr.startswith(f"checkpoints.py: error: {tmp_path / 'teacher.pth'}: cannot export: ")
    assert "abs_pos" in done.stderr and not (tmp_path / "x").exists()


def test_checkpoints_imports_models_alone_and_neither_library():
    tree = ast.parse((REPO / "checkpoints.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    project = {path.stem for path in REPO.glob("*.py")}
    assert imported & project <= {"models"}, imported & project
    assert not imported & {"timm", "transformers", "safetensors"}


# ----------------------------------------------------------------------------- a user's errors, in one line
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
    assert done.stderr.startswith(f"checkpoints.py: error: {notes}: ") and "not a readable checkpoint" in done.stderr


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
    assert checkpoints.TEACHERS["clip"]["url"] in error and "or pass it with --teacher-weights FILE" in error


def test_a_model_file_of_another_architecture_than_its_name_is_refused(tmp_path):
    torch.save({"arch": vit().arch, "model": vit().state_dict()}, tmp_path / "student.pth")
    with pytest.raises(ValueError, match=r"student.pth holds a ViT of width 32, depth 2, patch 16, but the name it is "
                                         r"given with, vit_base_patch16, is a ViT of width 768, depth 12, patch 16"):
        load_teacher("vit_base_patch16", tmp_path / "student.pth")
    with pytest.raises(ValueError, match=r"is a Swin of width 32, depths \[2, 2\], window 4"):
        load_teacher("swinv2_micro_window4", tmp_path / "student.pth")
    assert load_teacher("vit_micro_patch16", tmp_path / "student.pth").embed_dim == 32  # its own name, or a label:
    assert load_teacher("my_teacher", tmp_path / "student.pth").embed_dim == 32  # accepted


def test_loading_a_timm_layout_teacher_at_another_size_warns_nothing(tmp_path):
    # timm's layout (vision_transformer.py): ours but for patch_embed.proj; a 64 px file for a 32 px student.
    native = build_from_arch(dict(checkpoints.teacher_arch("micro", 16, img_size=64), embed_dim=64, num_heads=1))
    torch.save({k.replace("patch_embed.", "patch_embed.proj."): v for k, v in native.state_dict().items()},
               tmp_path / "timm.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. load_state_dict's 'copying ... to a meta parameter ..., which is a no-op'
        teacher = load_teacher("timm", tmp_path / "timm.pth", grid=2)
    assert teacher.encoder.pos_embed.shape == (1, 5, 64)
    torch.testing.assert_close(teacher.encoder.cls_token, native.cls_token)
