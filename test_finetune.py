"""finetune.py: layer decay, mixup and cutmix, top-k, the recipes, initialisation from each kind of
file, the linear probe, Swin classifiers' pooling, and end-to-end fine-tuning runs, on 2 torchrun ranks too."""
import colorsys
import signal

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import finetune
import teachers
import training
from conftest import (FT_MICRO, crash_at_call, ft_log, ft_parse, randomise_, scaled, stop_signals_restored,
                      timm_layout, write_images)
from data import SeededTransform, SyntheticShapes
from models import Classifier, build_student
from teachers import build_from_arch, load_model_file, load_pretrained

TABLE = "rel_pos_bias.relative_position_bias_table"


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


def write_class_folders(root, classes):
    for name in classes:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")


# ----------------------------------------------------------------------------- layer decay
def test_layer_decay_scales_every_parameter_group():
    encoder = teachers.PretrainedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
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


# ----------------------------------------------------------------------------- recipes and initialisation
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


def test_finetuning_on_one_class_is_refused(tmp_path):
    for split in ("train", "val"):  # every image right: top-1 100% and a loss of 0, for nothing learnt
        write_images(tmp_path / "data" / split / "cats", 4)
    with pytest.raises(ValueError, match=r"one class folder \(cats\); fine-tuning a classifier needs two classes"):
        finetune.main(ft_parse(*FT_MICRO, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")))


def test_val_classes_must_equal_train_classes(tmp_path):
    write_class_folders(tmp_path / "data" / "train", ["cat", "dog"])
    write_class_folders(tmp_path / "data" / "val", ["bird", "cat"])
    with pytest.raises(ValueError, match=r"different classes \(only in train/: \['dog'\]; only in val/: \['bird'\]"):
        finetune.main(ft_parse(*FT_MICRO, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")))


# ----------------------------------------------------------------------------- end to end
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
    with crash_at_call(monkeypatch, finetune, "soft_cross_entropy", 5, signal.SIGTERM), stop_signals_restored(), \
            pytest.raises(SystemExit) as leaving:
        training.run_cli(finetune.main, ft_parse(*argv, "--out", str(tmp_path / "stopped")))
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
