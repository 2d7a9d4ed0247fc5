"""diagnose.py's handling of what users give it: model specs, image folders, flags, and the figures it draws.

    python -m pytest -q test_diagnose.py
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import diagnose
import distill
from conftest import script_in_process

HERE = Path(__file__).parent
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
         "8", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--workers", "0", "--amp", "fp32",
         "--device", "cpu"]


def parse(*argv):
    return diagnose.get_args_parser().parse_args(list(argv))


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
    with pytest.raises(ValueError, match=r"could not download the dino teacher .* or pass it as --model dino:FILE$"):
        diagnose.load_models(["D=dino"])
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pth")  # a state dict of unknown layout
    with pytest.raises(ValueError, match=r"found \['w'\]; for a published checkpoint name its layout as --model "
                                         r"NAME:FILE, NAME one of \(clip, "):
        diagnose.load_models([str(tmp_path / "bare.pth")])


def test_a_user_error_is_one_line_and_status_2(monkeypatch):
    monkeypatch.delenv("FD_TRACEBACK", raising=False)
    monkeypatch.chdir(HERE)
    run = script_in_process("diagnose.py", "--model", "nowhere.pth")  # its __main__ block, in this process
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["diagnose.py: error: nowhere.pth: no such file (FD_TRACEBACK=1 shows where)"]


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
