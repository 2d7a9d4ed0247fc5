"""distill.py: the FD objective (whitened teacher tokens, smooth L1 through the projector, the loss of main recomputed
here), several teachers, the presets and teacher statistics, and end-to-end distillation runs, on a GPU too."""
import hashlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import distill
import finetune
import models
import teachers
from conftest import (CPU_ONLY, MICRO, REPO, crash_at_call, distill_cli_in_process, fd_closure, micro_pair,
                      needs_cuda, parse, read_log, timm_layout, write_images)
from models import SwinTransformer, build_student
from teachers import build_from_arch, load_model_file, load_teacher


# Comparisons with the CPU turn TF32 off: cuDNN's convolutions (the patch embedding) use it by default.
@pytest.fixture
def exact_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# ----------------------------------------------------------------------------- the FD objective
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
        monkeypatch.setattr(teachers, "load_teacher", lambda *args, **kwargs: models.Teacher(swin))
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


def test_bf16_autocast_tracks_fp32_and_the_bf16_teacher_is_exact():
    teacher, model = micro_pair()
    images = torch.rand(8, 3, 32, 32)
    compute_loss = fd_closure(teacher)
    fp32 = compute_loss(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compute_loss(model, images)
        target = distill.distillation_target(teacher, images, (4, 4))
        teacher.compute_in(torch.bfloat16)
        assert teacher.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        assert torch.equal(distill.distillation_target(teacher, images, (4, 4)), target)
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()  # bf16 keeps 8 bits of mantissa


# ----------------------------------------------------------------------------- several teachers
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
    real_teacher, real_target, seen = teachers.load_teacher, distill.distillation_target, {"teachers": []}
    monkeypatch.setattr(teachers, "load_teacher", lambda name, weights, grid, *_: models.Teacher(swin) if name == "swin"
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
    distill.main(parse(*argv, "--out", str(crashed)))
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


# ----------------------------------------------------------------------------- presets and teacher statistics
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


def test_teacher_statistics_are_shown_and_can_be_set(tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(parse(*MICRO, "--epochs", "1", "--teacher-mean", "0.5", "0.5", "0.5", "--teacher-std", "0.5", "0.25",
                       "0.5", "--out", str(out)))
    assert "input mean 0.5 0.5 0.5 std 0.5 0.25 0.5" in capsys.readouterr().out
    recorded = torch.load(out / "student.pth", weights_only=True)["teacher"][0]
    assert (recorded["mean"], recorded["std"]) == ([0.5] * 3, [0.5, 0.25, 0.5])
    distill.main(parse(*MICRO, "--epochs", "1", "--out", str(tmp_path / "own")))
    assert "input mean 0.485 0.456 0.406 std 0.229 0.224 0.225" in capsys.readouterr().out  # timm's ImageNet values


# ----------------------------------------------------------------------------- end to end
def test_overfitting_one_batch_drives_the_loss_down(tmp_path):
    # distill.main on the same 8 images for 40 steps, no drop path and whole-image crops: the step learns.
    argv = [*MICRO, "--synthetic-images", "8", "--epochs", "40", "--warmup-epochs", "0", "--lr", "0.1",
            "--min-lr", "0.1", "--drop-path", "0", "--min-crop-scale", "1", "--out", str(tmp_path)]
    distill.main(parse(*argv))
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 40 and losses[-1] < 0.3 * losses[0], losses


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
    student = distill.main(parse(*MICRO, "--teacher", "esvit_micro", "--teacher-weights",
                                 str(tmp_path / "swin_teacher.pth"), "--student", student_name, "--epochs", "2",
                                 "--lr", "0.3", "--warmup-epochs", "0", "--out", str(out))).cpu()
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


def test_compiled_run_matches_eager_and_saves_plain_keys(tmp_path):
    # A cold torch.compile takes about a minute on a 2-core CPU: the one compile in the suite.
    argv = [*MICRO, "--epochs", "1"]
    eager = distill.main(parse(*argv, "--out", str(tmp_path / "eager")))
    distill.main(parse(*argv, "--compile", "--out", str(tmp_path / "compiled")))
    state = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)
    assert set(state["student"]) == set(eager.state_dict())  # no _orig_mod. prefixes
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


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


# ----------------------------------------------------------------------------- GPU only
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
