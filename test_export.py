"""The export for timm and transformers (`python export.py`): every exported model must give our outputs
on random images, with every weight randomised first so that a mis-mapped tensor cannot hide behind zeros or ones;
ours take images in [0, 1], theirs the images normalised with the statistics the export wrote, which this checks too.
timm and transformers are test-only dependencies (`pip install timm transformers`); the tests that need one skip
without it.
"""
import json
import math

import pytest
import torch
from PIL import Image

import distill
import export
import models
import teachers
from conftest import export_command, normalise, vit
from models import Classifier, SwinTransformer
from teachers import PretrainedViT


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


def swinv2(position_bias="shared", pretrained_windows=None):
    # 8x8 then 4x4 tokens, window 4: shifted windows in stage 0, one window covering stage 1
    return SwinTransformer(version=2, img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, position_bias=position_bias, pretrained_windows=pretrained_windows)


def export_model(model, tmp_path, **options):
    path = tmp_path / "model.pth"
    torch.save({"arch": model.arch, "model": model.state_dict()}, path)
    return export.export_model_file(path, tmp_path / "export", **options)


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
             "d": torch.tensor([True, False, True]), "e": torch.tensor(2.5, dtype=torch.float16),
             "f": torch.randn(0, 3)}  # an empty tensor too
    export.write_safetensors(state, tmp_path / "x.safetensors")
    read = teachers.read_safetensors(tmp_path / "x.safetensors")
    assert read.keys() == state.keys()
    for name, value in read.items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name
    safetensors_torch = pytest.importorskip("safetensors.torch")
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
    # Earlier versions saved the student as a PretrainedViT at the student's values (teachers.build_from_arch)
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
    student = teachers.load_model_file(run / "student.pth").eval()
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
    with pytest.raises(ValueError, match=r"state\.pth: cannot export: expected a model file of this project"):
        export.export_model_file(tmp_path / "state.pth", tmp_path / "x")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth: cannot export: "):
        export.export_model_file(tmp_path / "notes.pth", tmp_path / "x")
    student = vit()
    state = student.state_dict()
    state.pop("norm.weight")
    torch.save({"arch": student.arch, "model": state}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"cut\.pth: cannot export: .*missing: norm\.weight"):
        export.export_model_file(tmp_path / "cut.pth", tmp_path / "x")
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
    assert done.stderr.startswith(f"export.py: error: {tmp_path / 'teacher.pth'}: cannot export: ")
    assert "abs_pos" in done.stderr and not (tmp_path / "x").exists()