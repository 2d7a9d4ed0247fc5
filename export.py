"""Export a model file of this project (a distilled student.pth: its encoder; a fine-tuned classifier's best.pth or
checkpoint.pth) for timm and transformers, without either library:

    python export.py out/fd/student.pth --out out/fd/export        # --to timm|hf|both, --per-block

OUT/timm/model.pth loads strictly into timm's Beit or SwinTransformerV2 with the printed call, `timm.create_model(
**json.load(open("OUT/timm/create_model.json"))["create_model"])`; OUT/hf/ (config.json, model.safetensors,
preprocessor_config.json) with transformers' BeitModel, Swinv2Model or ...ForImageClassification `.from_pretrained`.
Their outputs equal ours: the ViT's tokens after its final norm (timm forward_features, transformers
last_hidden_state), the SwinV2's last stage, a classifier's logits; a position bias shared by blocks is copied into
each, the same function (always for SwinV2, as theirs have one per block; with --per-block for the ViT).
Not carried over: ours take images in [0, 1], theirs normalised ones (the statistics are in create_model.json and
preprocessor_config.json); the resolution is the file's (at another, they resize position tables their own way, not
as finetune.py does); SwinV2's shifted windows are masked with -inf by ours, -100 by timm and -200 by transformers
(the same while every learned temperature stays well below 100); nothing of training.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from models import IMAGENET_MEAN, IMAGENET_STD
from teachers import DTYPE_NAMES, check_state, read_model_file, rename, shared_bias_to_per_block

# The values of the student (a BEiT) in a teachers.PretrainedViT arch; others are a published teacher's, no BEiT's.
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
    swin, pooling = "depths" in encoder, arch.get("pooling", "mean_then_fc_norm")  # older files' default
    odd = {k: encoder[k] for k in BEIT_VALUES if k in encoder and encoder[k] != BEIT_VALUES[k]}
    if arch.get("linear_probe"):
        return "a linear probe (a BatchNorm without affine parameters before the head) has no timm or transformers twin"
    if swin and encoder["version"] != 2:
        return "a Swin V1 (the EsViT teacher's architecture); only SwinV2 students are exported"
    if swin and encoder["norm_eps"] != 1e-5:
        return f"LayerNorm eps {encoder['norm_eps']}: timm's and transformers' SwinV2 use 1e-5"
    if swin and classifier and pooling != "norm_then_mean":  # a file of an earlier finetune.py
        return (f"this Swin classifier pools {pooling}: the mean of the tokens before the final norm, then "
                f"fc_norm; timm's and transformers' SwinV2 apply the final norm to every token, then the mean")
    if not swin and odd:
        return f"a ViT with {odd} (a published teacher's layout) is not a BEiT: export the student distilled from it"
    if not swin and classifier and pooling != "mean_then_fc_norm":
        return f"a ViT classifier pooling {pooling}: transformers' BEiT pools the mean of the tokens, then a layernorm"


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
                  num_heads=encoder["num_heads"], num_classes=num_classes, pretrained_cfg_overlay=overlay)
    if "depths" in encoder:
        return dict(model_name="swinv2_base_window8_256", **common, global_pool="avg", depths=encoder["depths"],
                    window_size=encoder["window_size"], pretrained_window_sizes=encoder["pretrained_windows"])
    # Students (num_classes 0, no pooling) keep their final norm on every token; classifiers pool, then fc_norm.
    # timm's Beit derives its fc_norm from the pooling (before timm 1.0.31 it takes no use_fc_norm).
    return dict(model_name="beit_base_patch16_224", **common, global_pool="avg" if num_classes else "",
                depth=encoder["depth"], mlp_ratio=encoder["mlp_ratio"], use_abs_pos_emb=False,
                use_rel_pos_bias=rel_pos == "per_block", use_shared_rel_pos_bias=rel_pos == "shared",
                init_values=encoder["layer_scale"] or 0.0)  # create_model drops None: beit_base's 0.1 would stay


def hf_config(encoder, num_classes, rel_pos):
    common = dict(image_size=encoder["img_size"], patch_size=encoder["patch_size"], num_channels=3, hidden_act="gelu",
                  drop_path_rate=0.0)
    if num_classes:  # labels LABEL_0, LABEL_1, ...; an encoder keeps transformers' default
        common.update(num_labels=num_classes)
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
        chunks.append(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = dict(dtype=DTYPE_NAMES[tensor.dtype][1], shape=list(tensor.shape),
                            data_offsets=[offset, offset + len(chunks[-1])])
        offset += len(chunks[-1])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as the reference writer does
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def export_model_file(path, out, to="both", per_block=False):
    """OUT/timm/ and/or OUT/hf/ of a model file (see above); ValueError 'FILE: cannot export: why' if it has no twin."""
    path, out = Path(path), Path(out)
    try:
        arch, state, _ = read_model_file(path, head=True)
        if reason := unsupported(arch):
            raise ValueError(reason)
        check_state(arch, state, str(path))  # every key and shape checked against the model it rebuilds
    except (FileNotFoundError, TypeError, ValueError) as error:  # messages that may start with FILE
        why = str(error).removeprefix(f"{path}: ").removeprefix(f"{path} ")
        raise ValueError(f"{path}: cannot export: {why}") from None

    encoder, num_classes = arch.get("encoder", arch), arch.get("num_classes", 0)
    swin, state = "depths" in encoder, {k.removeprefix("encoder."): v for k, v in state.items()}
    if swin:  # 0: offsets scaled by the stage's own window (timm, transformers), as ours without pretrained_windows
        windows = encoder.get("pretrained_windows") or [0] * len(encoder["depths"])
        encoder = dict(encoder, pretrained_windows=list(windows))
    rel_pos = "per_block" if per_block and encoder.get("rel_pos") else encoder.get("rel_pos")
    if swin or per_block:
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
        family, size = "swinv2" if swin else "beit", encoder["img_size"]
        # A classifier's encoder lives under the base model's prefix; its head is `classifier`.
        head = [(r"^(?!head\.)", f"{family}."), (r"^head\.", "classifier.")] if num_classes else []
        weights = {rename(k, (SWIN_HF if swin else VIT_HF) + head, regex=True): v for k, v in state.items()}
        write_safetensors(split_qkv(weights, HF_QKV[family]), out / "hf" / "model.safetensors")
        config = hf_config(encoder, num_classes, rel_pos)
        processor = dict(image_processor_type="BeitImageProcessor" if family == "beit" else "ViTImageProcessor",
                         do_resize=True, size=dict(height=size, width=size), resample=3,  # PIL's bicubic
                         do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                         image_mean=stats["mean"], image_std=stats["std"])
        for name, content in (("config.json", config), ("preprocessor_config.json", processor)):
            (out / "hf" / name).write_text(json.dumps(content, indent=1))
        print(f"transformers: {out / 'hf'} ({kind}) loads with {config['architectures'][0]}.from_pretrained")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser("export.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a model file of this project: student.pth, a classifier's best.pth, ...")
    parser.add_argument("--out", required=True, help="folder to write timm/ and hf/ into")
    parser.add_argument("--to", choices=("timm", "hf", "both"), default="both", help="hf: transformers")
    parser.add_argument("--per-block", action="store_true", help="copy a ViT's shared position table into every "
                        "block, as finetune.py does (the same outputs; each block's table then fine-tunes on its own)")
    args = parser.parse_args()
    try:
        export_model_file(args.file, args.out, args.to, args.per_block)
    except ValueError as error:  # a refusal: one line, as distill.py and finetune.py print theirs
        parser.exit(2, f"{parser.prog}: error: {error}\n")
