"""Export a model file of this project for timm or transformers: a distilled student.pth (its encoder) or a
fine-tuned classifier (best.pth, checkpoint.pth). Neither library is needed to export.

    python export.py out/fd/student.pth --out out/fd/export                 # both formats
    python export.py out/ft_fd/best.pth --to timm --out out/ft_fd/export    # a classifier, timm only
    python export.py out/fd/student.pth --to hf --per-block --out out/fd/export

timm: OUT/timm/model.pth, a state dict that loads strictly into the model of OUT/timm/create_model.json,
`timm.create_model(**json.load(open(...))["create_model"])`; the call is printed too. The ViT student is timm's
Beit (beit.py), a SwinV2 timm's SwinTransformerV2 (swin_transformer_v2.py).
transformers: OUT/hf/ (config.json, model.safetensors, preprocessor_config.json) for BeitModel or
BeitForImageClassification (modeling_beit.py), Swinv2Model or Swinv2ForImageClassification (modeling_swinv2.py),
`.from_pretrained("OUT/hf")`.

The outputs equal ours (test_export.py): the ViT's tokens after its final norm (timm forward_features, transformers
last_hidden_state), the SwinV2's last stage, the logits of a classifier. A SwinV2's position-bias MLP shared by a
stage is copied into every block (theirs have one per block): the same function; `--per-block` does the same for
the ViT's shared table. What does not carry over: our models take images in [0, 1] and normalise them themselves,
theirs take normalised images (the statistics are in create_model.json's pretrained_cfg_overlay and in
preprocessor_config.json); the resolution is the file's (at another, timm and transformers resize the position
tables their own way, not as finetune.py does); SwinV2's shifted windows are masked with -inf by ours, -100 by timm
and -200 by transformers (the same while every learned temperature stays well below 100); nothing of training.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

from checkpoints import DTYPE_NAMES, load_strict, read_checkpoint, shared_bias_to_per_block
from models import IMAGENET_MEAN, IMAGENET_STD, build_from_arch

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
# timm's SwinV2 merges patches at the start of stages 1-3; ours (the official layout), like transformers', at the
# end of stages 0-2.
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
# transformers splits the qkv matrix into three
HF_QKV = {"beit": ("q_proj", "k_proj", "v_proj"), "swinv2": ("query", "key", "value")}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a model file of this project: student.pth, a classifier's best.pth or checkpoint.pth")
    p.add_argument("--out", required=True, help="folder to write timm/ and hf/ into")
    p.add_argument("--to", choices=("timm", "hf", "both"), default="both", help="hf: transformers")
    p.add_argument("--per-block", action="store_true", help="copy a ViT's shared position table into every block, "
                   "as finetune.py does (the same outputs; each block's table then fine-tunes on its own)")
    return p


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


def rename(state, rules):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def split_qkv(state, names):
    """One (3C, C) qkv matrix -> three (C, C) ones: rows are q, k, v in that order (models.qkv_heads)."""
    out = {}
    for key, value in state.items():
        if key.endswith("qkv.weight"):
            out.update({key.replace("qkv", name): part.clone() for name, part in zip(names, value.chunk(3))})
        else:
            out[key] = value
    return out


def timm_create_model(encoder, num_classes, rel_pos, stats):
    """The keyword arguments of timm.create_model for the model the state dict fits; a registered name whose
    architecture every argument here overrides."""
    size = encoder["img_size"]
    overlay = dict(stats, input_size=[3, size, size], crop_pct=0.875, interpolation="bicubic")  # data.eval_transform
    common = dict(pretrained=False, img_size=size, patch_size=encoder["patch_size"], embed_dim=encoder["embed_dim"],
                  num_heads=encoder["num_heads"], num_classes=num_classes, global_pool="avg")
    if "depths" in encoder:
        return dict(model_name="swinv2_base_window8_256", **common, depths=encoder["depths"],
                    window_size=encoder["window_size"], pretrained_window_sizes=pretrained_windows(encoder),
                    pretrained_cfg_overlay=overlay)
    # Students (num_classes 0) keep their final norm on every token; classifiers pool first, then fc_norm.
    return dict(model_name="beit_base_patch16_224", **common, depth=encoder["depth"], mlp_ratio=encoder["mlp_ratio"],
                use_abs_pos_emb=False, use_rel_pos_bias=rel_pos == "per_block",
                use_shared_rel_pos_bias=rel_pos == "shared", use_fc_norm=num_classes > 0,
                init_values=encoder["layer_scale"] or 0.0,  # create_model drops None: beit_base's 0.1 would stay
                pretrained_cfg_overlay=overlay)


def pretrained_windows(encoder):
    # 0: the offsets are scaled by the stage's own window (timm, transformers), as ours without pretrained_windows
    return list(encoder.get("pretrained_windows") or [0] * len(encoder["depths"]))


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
                    pretrained_window_sizes=pretrained_windows(encoder), qkv_bias=True,
                    use_absolute_embeddings=False, layer_norm_eps=encoder["norm_eps"])
    # use_mean_pooling=False keeps the final layernorm on every token (a student); True replaces it by the
    # pooler's layernorm after the mean (a classifier's fc_norm).
    return dict(model_type="beit", architectures=["BeitForImageClassification" if num_classes else "BeitModel"],
                **common, hidden_size=encoder["embed_dim"], num_hidden_layers=encoder["depth"],
                num_attention_heads=encoder["num_heads"], layer_norm_eps=1e-6,
                intermediate_size=int(encoder["embed_dim"] * encoder["mlp_ratio"]),
                use_absolute_position_embeddings=False, use_mask_token=False,
                use_relative_position_bias=rel_pos == "per_block",
                use_shared_relative_position_bias=rel_pos == "shared",
                layer_scale_init_value=encoder["layer_scale"] or 0.0, use_mean_pooling=num_classes > 0)


def write_safetensors(state, path):
    """The safetensors format: an 8-byte little-endian header length, a JSON header (dtype, shape, byte range of each
    tensor), the raw little-endian bytes (what checkpoints.read_safetensors reads)."""
    if sys.byteorder != "little":
        raise SystemExit("safetensors stores little-endian bytes: export on a little-endian machine")
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


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    path = Path(args.file)
    try:
        checkpoint = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{path}: cannot export: {str(error).removeprefix(f'{path}: ')}") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("arch"), dict)
            and isinstance(checkpoint.get("model", checkpoint.get("student")), dict)):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise SystemExit(f"{path}: cannot export: not a model file of this project (expected the keys 'arch' and "
                         f"'model' of a student.pth or a classifier's best.pth; found {found})")
    arch = checkpoint["arch"]
    source = checkpoint.get("model", checkpoint.get("student"))  # a model file, or a distillation checkpoint
    state = {k.removeprefix("encoder."): v for k, v in source.items()}
    if reason := unsupported(arch):
        raise SystemExit(f"{path}: cannot export: {reason}")
    try:  # every key and shape checked by rebuilding the model
        load_strict(build_from_arch(arch), source, str(path))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"{path}: cannot export: {str(error).removeprefix(f'{path} ')}") from None

    encoder, num_classes = arch.get("encoder", arch), arch.get("num_classes", 0)
    swin = "depths" in encoder
    rel_pos = "per_block" if args.per_block and encoder.get("rel_pos") else encoder.get("rel_pos")
    if swin or rel_pos != encoder.get("rel_pos"):
        state = shared_bias_to_per_block(state)
    stats = dict(mean=list(encoder.get("mean", IMAGENET_MEAN)), std=list(encoder.get("std", IMAGENET_STD)))
    out = Path(args.out)
    kind = f"{'SwinV2' if swin else 'ViT'} {'classifier' if num_classes else 'encoder'}"
    if args.to in ("timm", "both"):
        (out / "timm").mkdir(parents=True, exist_ok=True)
        torch.save(rename(state, SWIN_TIMM if swin else VIT_TIMM), out / "timm" / "model.pth")
        kwargs = timm_create_model(encoder, num_classes, rel_pos, stats)
        call = f"timm.create_model({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        (out / "timm" / "create_model.json").write_text(json.dumps(dict(create_model=kwargs, call=call), indent=1))
        print(f"timm: {out / 'timm' / 'model.pth'} ({kind}) loads strictly into\n  {call}")
    if args.to in ("hf", "both"):
        (out / "hf").mkdir(parents=True, exist_ok=True)
        family = "swinv2" if swin else "beit"
        # A classifier's encoder lives under the base model's prefix; its head is `classifier`.
        head = [(r"^(?!head\.)", f"{family}."), (r"^head\.", "classifier.")] if num_classes else []
        hf_state = split_qkv(rename(state, (SWIN_HF if swin else VIT_HF) + head), HF_QKV[family])
        write_safetensors(hf_state, out / "hf" / "model.safetensors")
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
    main()
