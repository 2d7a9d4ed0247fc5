"""diagnose.py: its measures (attention distance, head diversity, position scores, the loss landscape, CKA, the top
Hessian eigenvalue, the linear head) against independent computations, its runs on one model and on several, and its
handling of what users give it: model specs, image folders, flags, and the figures it draws."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

import diagnose
import distill
import teachers
from conftest import script_in_process
from diagnose import attention_maps
from models import Classifier, build_student
from teachers import load_pretrained

HERE = Path(__file__).parent
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
         "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--amp", "fp32",
         "--device", "cpu"]


def parse(*argv):
    return diagnose.get_args_parser().parse_args(list(argv))


# ----------------------------------------------------------------------------- measures
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


# ----------------------------------------------------------------------------- runs
def test_diagnose_one_model_with_registers(tmp_path):
    torch.manual_seed(0)
    encoder = teachers.PretrainedViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, rel_pos=None,
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


# ----------------------------------------------------------------------------- what users give it
@pytest.mark.parametrize("specs", [["A=x.pth", "A=y.pth"], ["run/student.pth", "run/student.pt"]])
def test_two_models_with_one_label_are_refused_before_loading(specs):
    # Results are keyed by label: the second model would silently replace the first. The files need not exist.
    with pytest.raises(ValueError, match=rf"--model {specs[0]} and --model {specs[1]} are both labelled "
                                         rf"'(A|run/student)': give each its own LABEL=, e.g. --model \S+-2="):
        diagnose.load_models(specs)


def test_unreadable_images_are_skipped_counted_and_replaced(tmp_path):
    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"not an image")  # 6 files spread over 5 images: 0 1 2 4 5; 1 is unreadable
    with pytest.warns(UserWarning, match=r"skipping an unreadable image: .*1\.png"):
        images, labels, source = diagnose.load_images(tmp_path, 5, 32)
    assert images.shape == (5, 3, 32, 32) and (labels == -1).all()
    assert source["unreadable"] == 1 and source["indices"] == [0, 2, 3, 4, 5]  # 1's place: the next readable, 3
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"5 readable images \(1 unreadable, named in the "
                                                                   r"warnings\), fewer than --images 6"):
        diagnose.load_images(tmp_path, 6, 32)


@pytest.mark.parametrize("flag, value", [
    ("--images", "0"), ("--batch-size", "0"), ("--points", "0"), ("--points", "4"), ("--seeds", "0"),
    ("--grid-2d", "-1"), ("--grid-2d", "1"), ("--hessian-images", "0"), ("--hessian-iters", "-3"), ("--dpi", "0"),
    ("--img-size", "0"), ("--probe-wd", "-1")])
def test_out_of_range_flags_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(flag, value)
    assert exit_.value.code == 2
    assert f"argument {flag}: {value} is out of range: expected" in capsys.readouterr().err


def test_tools_take_spaces_and_say_what_is_wrong(capsys):
    assert parse("--tools", " distance , cka").tools == {"distance", "cka"}
    assert parse().tools == set(diagnose.TOOLS) and parse().out == "out/diagnose"  # never the tracked figures/
    for tools, message in [("distance, kca,maps", "unknown tool kca: the tools are distance, diversity, maps, "
                                                  "landscape, cka, hessian"),
                           (" , ", "no tool named: give one or more of distance, diversity, maps, landscape, cka, "
                                   "hessian, comma-separated")]:
        with pytest.raises(SystemExit):
            parse("--tools", tools)
        assert f"argument --tools: {message}\n" in capsys.readouterr().err


def test_teacher_without_weights_is_told_the_spec_form(tmp_path, monkeypatch):
    # A layout without a published file, and a published file that cannot be downloaded: diagnose has no
    # --teacher-weights, the weights go in the spec.
    with pytest.raises(ValueError, match=r"^--model timm reads any file of its layout: give it as --model timm:FILE$"):
        diagnose.load_models(["timm"])

    def offline(url, path, hash_prefix=None):
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match=r"could not download the dino teacher .* or pass it as --model dino:FILE$"):
        diagnose.load_models(["D=dino"])
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pth")  # a state dict of unknown layout
    with pytest.raises(ValueError, match=r"found \['w'\]; a published checkpoint is read by the name of its layout "
                                         r"\(clip, "):
        diagnose.load_models([str(tmp_path / "bare.pth")])


def test_a_user_error_is_one_line_and_status_2(monkeypatch):
    monkeypatch.delenv("FD_TRACEBACK", raising=False)
    monkeypatch.chdir(HERE)
    run = script_in_process("diagnose.py", "--model", "nowhere.pth")  # its __main__ block, in this process
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["diagnose.py: error: nowhere.pth: no such file (FD_TRACEBACK=1 shows where)"]


# ----------------------------------------------------------------------------- the figures
@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """A micro distillation run's checkpoint.pth and student.pth diagnosed side by side, the figures kept."""
    run, out, figures = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("diagnose"), {}
    distill.main(distill.get_args_parser().parse_args([*MICRO, "--out", str(run)]))
    save = Figure.savefig

    def keep(fig, path, **kwargs):
        figures[Path(path).name] = fig
        return save(fig, path, **kwargs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(Figure, "savefig", keep)
        diagnose.main(parse("--model", str(run / "checkpoint.pth"), "--model", f"Student={run / 'student.pth'}",
                            "--tools", "distance,maps,cka", "--images", "4", "--dpi", "20", "--out", str(out)))
    return run, out, figures


def test_a_distillation_checkpoint_is_read_as_its_student(diagnosed):
    run, out, _ = diagnosed
    models = json.loads((out / "attn_distance.json").read_text())["models"]
    assert list(models) == [(run / "checkpoint").as_posix(), "Student"]
    assert models[(run / "checkpoint").as_posix()]["distance_px"] == models["Student"]["distance_px"]


def test_figures_are_legible(diagnosed):
    _, out, figures = diagnosed
    assert {"attn_distance.png", "attn_maps_L0.png", "attn_maps_L1.png", "cka.png"} <= {p.name for p in out.iterdir()}
    # Attention distance: a legend says what the dots and lines are.
    legend = figures["attn_distance.png"].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a head (colour: its index)", "uniform attention"]
    # Attention maps: every panel says which axis is the query, which the key, and has a colour bar.
    maps = figures["attn_maps_L1.png"]
    panels = [ax for ax in maps.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and all((ax.get_xlabel(), ax.get_ylabel()) == ("key", "query") for ax in panels)
    assert sum(ax.get_label() == "<colorbar>" for ax in maps.axes) == 4
    assert type(maps.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"  # titles never overlap a row above
    # CKA: colours span the values (all near 1 here), layers are integer ticks.
    cka = json.loads((out / "cka.json").read_text())["pairs"][0]["cka"]
    ax = figures["cka.png"].axes[0]
    assert ax.images[0].get_clim() == pytest.approx((min(map(min, cka)), max(map(max, cka))))
    assert all(float(t).is_integer() for t in [*ax.get_xticks(), *ax.get_yticks()])
