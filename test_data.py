"""data.py: the synthetic dataset, image folders as people have them, odd and unreadable images, the training
transforms (flips both ways, RandAugment's strength), and decoding on the device, which must draw the CPU path's crops
and flips and give its pixels."""
import collections
import contextlib
import io
import re

import pytest
import torch
from PIL import Image

import distill
import finetune
from conftest import (FT_MICRO, MICRO, distill_cli_in_process, ft_parse, needs_cuda, parse, read_log,
                      write_images)
from data import SeededTransform, SyntheticShapes, fd_transform, image_dataset


def write_odd_and_bad_images(folder):
    """Readable images in every awkward form, and three unreadable files."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((40, 48), 65535, np.uint16)).save(folder / "white16.png")  # 16-bit greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:8, :8]).save(folder / "tiny.png")  # smaller than the crop
    for i in range(10):
        Image.fromarray(np.roll(rgb, i, axis=0)).save(folder / f"plain{i}.jpg")
    data = (folder / "plain0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")


def write_photos(folder):
    """Smooth waves with noise, as photos have: three JPEGs and a greyscale one, which the device
    decodes, and the files the workers must decode themselves: a PNG, an EXIF-rotated JPEG, CMYK."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def photo(height, width):
        y, x = np.mgrid[0:height, 0:width]
        waves = np.stack([128 + 100 * np.sin(x / 7 + c) * np.cos(y / 9 - c) for c in range(3)], axis=-1)
        return Image.fromarray(np.clip(waves + rng.normal(0, 20, waves.shape), 0, 255).astype(np.uint8))
    for i in range(3):
        photo(60 + 7 * i, 80 - 5 * i).save(folder / f"plain{i}.jpg", quality=90)
    photo(56, 72).convert("L").save(folder / "grey.jpg")
    photo(50, 70).save(folder / "photo.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    photo(48, 64).save(folder / "rotated.jpg", exif=exif)
    photo(56, 72).convert("CMYK").save(folder / "cmyk.jpg")


def corrupt_huffman_table(jpeg):
    """The JPEG with a Huffman table that no decoder accepts, in a header that PIL still opens."""
    counts = jpeg.index(b"\xff\xc4") + 5  # past the marker, its length and the table's class and id
    return jpeg[:counts] + b"\xff" * 16 + jpeg[counts + 16:]


# ----------------------------------------------------------------------------- datasets
def test_synthetic_dataset_is_deterministic_labelled_and_split():
    train, val = SyntheticShapes(40, 64), SyntheticShapes(40, 64, split="val")
    a, label = train[7]
    assert a.size == (64, 64) and a.mode == "RGB" and label == 7
    assert a.tobytes() == train[7][0].tobytes() != val[7][0].tobytes()
    assert sorted(train[i][1] for i in range(40)) == sorted(list(range(10)) * 4)
    seeded = SeededTransform(train, fd_transform(32), seed=1)
    torch.manual_seed(123)
    first = seeded[3][0]
    state = torch.get_rng_state()
    assert torch.equal(first, seeded[3][0]) and torch.equal(state, torch.get_rng_state())
    seeded.epoch = 1
    assert first.shape == (3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert not torch.equal(first, seeded[3][0])  # a new epoch, a new crop


def test_image_folders_and_clear_errors(tmp_path):
    write_images(tmp_path / "imnet" / "train" / "cat", 5)
    write_images(tmp_path / "imnet" / "train" / "dog", 5)
    write_images(tmp_path / "flat", 6)
    labelled = image_dataset(tmp_path / "imnet")
    assert len(labelled) == 10 and labelled.classes == ["cat", "dog"] and labelled[9][1] == 1
    flat = image_dataset(tmp_path / "flat")
    assert len(flat) == 6 and flat[0][1] == -1 and flat[0][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="--data .*missing"):
        image_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data .*no images"):
        image_dataset(tmp_path / "empty")
    (tmp_path / "empty_classes" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="--data .*empty_classes: no images found"):
        image_dataset(tmp_path / "empty_classes")
    write_images(tmp_path / "imnet" / "train" / "bird", 1)
    (tmp_path / "imnet" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="--data .*train: no images in the class folders empty"):
        image_dataset(tmp_path / "imnet", labelled=True)


def test_folders_as_people_have_them(tmp_path):
    # photos/ with loose images and an edited/ subfolder, a symlinked folder, Jupyter's checkpoints and
    # macOS's ._ files: every image is used, hidden files and folders never.
    photos = tmp_path / "photos"
    write_images(photos, 3)
    write_images(photos / "edited", 2)
    write_images(tmp_path / "elsewhere", 4)
    (photos / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (photos / "edited" / "up").symlink_to(photos, target_is_directory=True)  # a loop: followed once, not forever
    (photos / ".ipynb_checkpoints").mkdir()
    (photos / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    write_images(photos / ".thumbnails", 2)
    dataset = image_dataset(photos)
    names = sorted(str(f.relative_to(photos)) for f in dataset.files)
    assert names == sorted(["img0.jpg", "img1.png", "img2.jpg", "edited/img0.jpg", "edited/img1.png",
                            "linked/img0.jpg", "linked/img1.png", "linked/img2.jpg", "linked/img3.png"])
    assert {label for _, label in [dataset[0], dataset[8]]} == {-1}  # loose images: unlabelled
    assert dataset.summary == f"9 images in {photos} (no class folders: unlabelled)"
    with pytest.raises(ValueError, match=r"photos: 3 images lie outside class subfolders"):
        image_dataset(photos, labelled=True)  # fine-tuning needs a class for every image
    write_images(tmp_path / "imnet" / "cat", 2)
    write_images(tmp_path / "imnet" / "dog", 1)
    (tmp_path / "imnet" / ".ipynb_checkpoints").mkdir()
    classes = image_dataset(tmp_path / "imnet", labelled=True)
    assert classes.classes == ["cat", "dog"]
    assert classes.summary.endswith(f"3 images in {tmp_path / 'imnet'}, 2 classes")
    out = tmp_path / "run"
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        distill.main(parse(*MICRO, "--data", str(photos), "--epochs", "1", "--batch-size", "3", "--out", str(out)))
    assert f"data: 9 images in {photos}" in captured.getvalue()
    assert len(read_log(out)) == 3 and torch.load(out / "student.pth", weights_only=True)["data"].startswith("9 images")


def test_odd_images_load_and_unreadable_ones_are_skipped_counted_and_bounded(tmp_path, capsys, monkeypatch):
    from data import UnreadableImage, load_rgb
    folder = tmp_path / "odd"
    write_odd_and_bad_images(folder)
    assert load_rgb(folder / "white16.png").getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert load_rgb(folder / "rotated.jpg").size == (40, 48)  # EXIF orientation applied
    assert all(load_rgb(folder / f).mode == "RGB" for f in ("grey.png", "cmyk.jpg", "rgba.png", "palette.png"))
    for name in ("truncated.jpg", "empty.jpg", "notes.png"):
        with pytest.raises(UnreadableImage, match=name):
            load_rgb(folder / name)
    # 20 files, 3 unreadable: skipped with a warning naming them, counted in the log.
    argv = [*MICRO, "--data", str(folder), "--batch-size", "4", "--epochs", "1", "--log-every", "100"]
    with pytest.warns(UserWarning, match="skipping an unreadable image: .*(truncated|empty|notes)"):
        distill.main(parse(*argv, "--max-bad-frac", "0.5", "--out", str(tmp_path / "run")))
    assert sum(r["bad_images"] for r in read_log(tmp_path / "run")) == 3  # 5 batches of 4: every file drawn
    # Past the bound (one image of 20 is more than 0.01): the run stops in that step, before its checkpoint, the
    # message on a line of its own after the progress bar. Each step is saved (--save-every: a tenth of 5 steps).
    strict = tmp_path / "strict"
    capsys.readouterr()
    with pytest.raises(SystemExit) as status, pytest.warns(UserWarning, match="skipping an unreadable image"):
        distill_cli_in_process(monkeypatch, *argv, "--max-bad-frac", "0.01", "--out", str(strict))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    assert stderr.rstrip().split("\n")[-1].startswith("distill.py: error: epoch 0: 1 of its 20 images were "
                                                       "unreadable, more than --max-bad-frac 0.01")
    assert torch.load(strict / "checkpoint.pth", weights_only=True)["step"] < 5  # not the epoch's end: stopped early
    # A folder of nothing but unreadable files, read by a worker process: one line naming one of them.
    (tmp_path / "bad").mkdir()
    for name in ("notes.png", "empty.jpg", "truncated.jpg"):
        for i in range(3):
            (tmp_path / "bad" / f"{i}{name}").write_bytes((folder / name).read_bytes())
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *argv, "--workers", "1", "--data", str(tmp_path / "bad"), "--out",
                        str(tmp_path / "bad_run"))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]  # the worker may still warn after it
    assert len(errors) == 1 and re.fullmatch(rf"distill.py: error: all 4 images of a batch are unreadable, as "
                                             rf"{tmp_path / 'bad'}/\S+: .*is --data the folder you meant\? Fix or "
                                             rf"remove the files the warnings name .*", errors[0])


# ----------------------------------------------------------------------------- transforms
def test_training_transforms_flip_both_ways():
    # A ramp dark on the left and bright on the right: unflipped crops keep it, flipped ones reverse it.
    ramp = Image.fromarray((torch.linspace(0, 255, 64).repeat(64, 1)).byte().numpy()).convert("RGB")
    finetuning = finetune.train_transform(finetune.apply_recipe(ft_parse(*FT_MICRO, "--randaug-ops", "0",
                                                                         "--reprob", "0")))
    for transform in (fd_transform(32), finetuning):
        orientations = set()
        for seed in range(40):
            torch.manual_seed(seed)
            image = transform(ramp)
            orientations.add(bool(image[0, :, 0].mean() < image[0, :, -1].mean()))
        assert orientations == {True, False}


def test_randaugment_has_the_strength_of_timms_rand_m9(monkeypatch):
    # The official fine-tuning recipe's 'rand-m9' is timm's RandAugment at magnitude 9 of _LEVEL_DENOM 10 (timm's
    # auto_augment.py): rotate by 30 * 9/10 = 27 degrees, shear by 0.3 * 9/10 = 0.27, either sign.
    from torchvision.transforms import autoaugment
    applied, real = collections.defaultdict(set), autoaugment._apply_op

    def record(image, op, magnitude, *args, **kwargs):
        applied[op].add(round(abs(magnitude), 4))
        return real(image, op, magnitude, *args, **kwargs)
    monkeypatch.setattr(autoaugment, "_apply_op", record)
    transform = finetune.train_transform(finetune.apply_recipe(ft_parse(*FT_MICRO, "--reprob", "0")))
    image = Image.new("RGB", (32, 32), (120, 60, 200))
    torch.manual_seed(0)
    for _ in range(100):
        transform(image)
    assert applied["Rotate"] == {27.0} and applied["ShearX"] == {0.27}


# ----------------------------------------------------------------------------- decoding on the device
def test_device_path_draws_the_cpu_paths_crop_and_flip_and_gives_its_pixels(tmp_path):
    from torchvision import transforms
    from data import FDCropBox, decode_and_crop, read_undecoded, skip_unreadable
    folder = tmp_path / "photos"
    write_photos(folder)

    def draws(image):  # what fd_transform draws, in its order: the crop box, then the flip
        return [*transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)), int(torch.rand(1) < 0.5)]
    boxes = SeededTransform(image_dataset(folder), draws, seed=3)
    pil = SeededTransform(image_dataset(folder), fd_transform(32), seed=3)
    device = SeededTransform(image_dataset(folder, loader=read_undecoded), FDCropBox(32), seed=3)
    names = [path.name for path in device.dataset.files]
    flips = set()
    for epoch in (0, 1):
        boxes.epoch = pil.epoch = device.epoch = epoch
        samples = [device[i] for i in range(len(device))]
        undecoded = [name for name, ((data, _), _) in zip(names, samples) if data.ndim == 1]
        assert undecoded == ["grey.jpg", "plain0.jpg", "plain1.jpg", "plain2.jpg"]
        crops = [crop.tolist() for (_, crop), _ in samples]
        assert crops == [boxes[i][0] for i in range(len(boxes))]
        flips |= {crop[4] for crop in crops}
        images, _, _ = skip_unreadable(samples, stack=False)
        difference = (decode_and_crop(images, 32, "cpu") - torch.stack([pil[i][0] for i in range(len(pil))])).abs()
        # Measured: at most 0.0012 mean and 0.0039 (1/255) max per image, PIL rounding its resized
        # image to 8 bits. The worst image's mean with a wrong flip is 0.25, with a crop one row off
        # 0.05, without antialiasing 0.02, bicubic instead of fd_transform's bilinear 0.01.
        assert difference.mean(dim=(1, 2, 3)).max() < 0.003 and difference.max() < 0.01
    assert flips == {0, 1}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])  # on a GPU: nvJPEG
def test_distill_decode_on_device_logs_the_losses_of_the_cpu_pipeline(tmp_path, device):
    # JPEGs without chroma subsampling, so that on a GPU nvJPEG decodes them exactly as PIL does:
    # it upsamples 4:2:0 chroma more plainly, which moves the colours of these noise images by 0.05.
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(16):
        pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", subsampling=0)
    jpeg = (folder / "img0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # caught by the workers
    (folder / "bad_table.jpg").write_bytes(corrupt_huffman_table(jpeg))  # caught by the decoder
    # 18 images in 3 batches of 6: every image drawn in each of the 2 epochs.
    argv = [*MICRO, "--data", str(folder), "--batch-size", "6", "--epochs", "2", "--max-bad-frac", "0.5",
            "--device", device]
    with pytest.warns(UserWarning, match="skipping an unreadable image"):
        distill.main(parse(*argv, "--out", str(tmp_path / "cpu")))
    # Two workers, so that the collated batches cross from the worker processes; their warning about
    # the truncated file stays there, the decoder's is in this process.
    with pytest.warns(UserWarning, match="skipping an image that cannot be decoded: .*Huffman"):
        distill.main(parse(*argv, "--decode-on-device", "--workers", "2", "--out", str(tmp_path / "device")))
    cpu, device = read_log(tmp_path / "cpu"), read_log(tmp_path / "device")
    assert [r["step"] for r in device] == [1, 2, 3, 4, 5, 6]
    assert [r["bad_images"] for r in device] == [r["bad_images"] for r in cpu]
    assert sum(r["bad_images"] for r in cpu) == 4
    assert [r["loss"] for r in device] == pytest.approx([r["loss"] for r in cpu], rel=2e-3)
