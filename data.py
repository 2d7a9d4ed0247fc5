"""Data for FD: image folders (`--data`: an ImageFolder, maybe under train/, or any folder of images: distillation
needs no labels), SyntheticShapes (no download), the FD transform seeded per (seed, epoch, image) so that workers and
resuming change nothing, a loader that starts mid-epoch, and (--decode-on-device) decoding on the training device."""
import functools
import io
import itertools
import os
import random
import warnings
from contextlib import suppress
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def random_colour(rng):
    return tuple(rng.randint(0, 255) for _ in range(3))


class SyntheticShapes(Dataset):
    """`size` RGB images of `image_size` px in 10 classes: 5 shapes, solid or striped, each preferring a band, with
    random colours and sizes, clutter and a distractor (no 100% fine-tuning); image i of a split is fixed."""

    SHAPES = ("circle", "square", "triangle", "cross", "ring")

    def __init__(self, size=2048, image_size=128, split="train"):
        self.size, self.image_size, self.split = size, image_size, split
        self.classes = [f"{shape}-{fill}" for fill in ("solid", "striped") for shape in self.SHAPES]
        self.summary = f"{size} synthetic images"  # what the data is, as image_dataset's datasets say

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = random.Random(f"{self.split}-{index}")  # string seeds are stable across processes
        label, s = index % len(self.classes), self.image_size
        shape, fill = self.classes[label].split("-")
        image = Image.new("RGB", (s, s), random_colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(3, 8)):  # clutter
            draw.line([(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(2)], fill=random_colour(rng),
                      width=rng.randint(1, 3))
        distractor = rng.choice([k for k in self.SHAPES if k != shape])
        self.paste_shape(image, rng, distractor, "solid", rng.uniform(0.12, 0.2) * s,
                         (rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s))
        band = (label % 3 + 0.5) / 3  # the class's preferred band: a weak positional cue, as in real photos
        centre = (rng.uniform(0.25, 0.75) * s, min(max(rng.gauss(band, 0.15), 0.2), 0.8) * s)
        self.paste_shape(image, rng, shape, fill, rng.uniform(0.2, 0.35) * s, centre)
        return image, label

    def paste_shape(self, image, rng, shape, fill, r, centre):
        s, (x, y) = self.image_size, centre
        mask = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask)
        if shape in ("circle", "ring"):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
            if shape == "ring":
                draw.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=0)
        elif shape in ("square", "triangle"):  # turned by a random part of its symmetry angle
            sides = 4 if shape == "square" else 3
            draw.regular_polygon((x, y, r), sides, rotation=rng.uniform(0, 360 / sides), fill=255)
        else:  # a cross: two bars a third as wide as long
            draw.rectangle([x - r, y - r / 3, x + r, y + r / 3], fill=255)
            draw.rectangle([x - r / 3, y - r, x + r / 3, y + r], fill=255)
        colour = Image.new("RGB", (s, s), random_colour(rng))
        if fill == "striped":  # a row of stripes repeated, turned, the middle cut out
            period = rng.randint(4, 9)
            row = bytes(255 if i % period <= period // 2 else 0 for i in range(2 * s))
            stripes = Image.frombytes("L", (2 * s, 2 * s), row * (2 * s)).rotate(rng.uniform(0, 180))
            stripes = stripes.crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
            colour = Image.composite(colour, Image.new("RGB", (s, s), random_colour(rng)), stripes)
        image.paste(colour, (0, 0), mask)


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, empty, not an image)."""


def load_rgb(path):
    """Any image file as 8-bit RGB, EXIF-rotated (16/32-bit greyscale scaled, not clipped); else UnreadableImage."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale
                image = image.convert("I").point(lambda v: v * (255 / 65535)).convert("L")
            elif image.mode == "P":  # a palette, possibly with a transparent colour
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{path}: {error}") from None


class ImageFiles(Dataset):
    """Image files and their labels (-1: unlabelled, distillation needs none), read by `loader`."""

    def __init__(self, files, labels, classes, loader, summary):
        self.files, self.labels, self.classes, self.loader, self.summary = files, labels, classes, loader, summary

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.loader(self.files[index]), self.labels[index]


def image_dataset(root, split="train", loader=load_rgb, labelled=False):
    """The untransformed images under `root` (or `root/<split>/`), read by `loader`: an ImageFolder (labels: the sorted
    class folders' indices) if every image is in one, else unlabelled (`labelled` refuses it); `.summary` tells what."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (give an ImageFolder root, a folder "
                                f"with train/ and val/, or a folder of images)")
    root = root / split if (root / split).is_dir() else root
    files = []  # every image file, sorted, in subfolders and links; hidden ones (.ipynb_checkpoints, ._*) are not data
    visited = set()  # folders seen: a symbolic link back up the tree is followed once
    for parent, folders, names in os.walk(root, followlinks=True):
        if os.path.realpath(parent) in visited:
            folders[:] = []
            continue
        visited.add(os.path.realpath(parent))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        files += [Path(parent, name) for name in sorted(names)
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"--data {root}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)}, "
                         f"directly in it or in subfolders)")
    loose = [f for f in files if f.parent == root]  # then every image is unlabelled
    if labelled and loose:
        raise ValueError(f"--data {root}: {len(loose)} images lie outside class subfolders; fine-tuning needs "
                         f"every image in a folder named after its class")
    folder_of = [f.relative_to(root).parts[0] for f in files]
    classes = [] if loose else sorted(set(folder_of))
    empty = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in classes)
    if labelled and empty:
        raise ValueError(f"--data {root}: no images in the class folders {', '.join(empty)}; remove them or "
                         f"add images")
    if labelled and len(classes) == 1:  # one class: trivially 100% correct, a loss of 0, and nothing learnt
        raise ValueError(f"--data {root}: one class folder ({classes[0]}); fine-tuning a classifier needs two "
                         f"classes or more, each in a folder of its own")
    summary = f"{len(files)} images in {root}" + (f", {len(classes)} class{'es' * (len(classes) != 1)}" if classes
                                                  else " (no class folders: unlabelled)")
    return ImageFiles(files, [classes.index(f) if classes else -1 for f in folder_of], classes, loader, summary)


def fd_transform(img_size, min_scale=0.08):
    """FD's augmentation (the official data/data_fd.py, FDTransform), for teacher and student alike: a random
    resized crop and a flip, in [0, 1] (the models normalise)."""
    return transforms.Compose([transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def eval_transform(img_size):
    """The evaluation view: resized to img_size / 0.875 (256 for 224), bicubic, centre-cropped; in [0, 1]."""
    return transforms.Compose([transforms.Resize(int(img_size / 0.875), interpolation=InterpolationMode.BICUBIC),
                               transforms.CenterCrop(img_size), transforms.ToTensor()])


class SeededTransform(Dataset):
    """A random transform with the torch RNG seeded by (seed, epoch, index), whatever the workers, ranks, resume point
    (set `.epoch` before each epoch). An unreadable image: its UnreadableImage, with a warning; the collate drops it."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image, label = self.dataset[index]
        except UnreadableImage as error:
            warnings.warn(f"skipping an unreadable image: {error}")
            return error
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), label


def skip_unreadable(samples, stack=True):
    """(images, labels, number of unreadable images left out); stack=False (FDCropBox's samples, of differing sizes):
    images = (all the data in one flat tensor, as each tensor a worker sends holds a file descriptor; shapes; crops)."""
    readable = [sample for sample in samples if not isinstance(sample, UnreadableImage)]
    if not readable:  # nothing to train on: most likely all of --data is
        raise ValueError(f"all {len(samples)} images of a batch are unreadable, as {samples[0]}: is --data the "
                         f"folder you meant? Fix or remove the files the warnings name")
    if stack:
        images, labels = default_collate(readable)
    else:
        data, crops, labels = zip(*((data, crop, label) for (data, crop), label in readable))
        images = (torch.cat([d.flatten() for d in data]), [d.shape for d in data], torch.stack(crops))
        labels = torch.tensor(labels)
    return images, labels, torch.tensor(len(samples) - len(readable))


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (with one process, a seeded shuffle) that skips the first `start` samples of its epoch;
    its len stays the whole epoch's, which the schedule counts."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


def leave_the_process_group(worker_id):
    """A worker's init: out of the process group, Ctrl-C and torchrun's SIGTERM reach the training process alone."""
    os.setpgrp()


def train_loader(dataset, batch_size, workers, seed, rank=0, world_size=1, pin_memory=False, stack=True):
    """This rank's shuffled share of the dataset in full batches; `stack` as in skip_unreadable."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images: too few for {world_size} process(es) "
                         f"with --batch-size {batch_size}; lower --batch-size or add images")
    # Non-persistent workers see each new epoch's number; the loader's own generator spares the global RNG (drop path).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      collate_fn=functools.partial(skip_unreadable, stack=stack), pin_memory=pin_memory,
                      worker_init_fn=leave_the_process_group, generator=torch.Generator().manual_seed(seed))


def steps_of_batches(loader, step, steps_per_epoch, total_steps, accum):
    """(epoch, `accum` micro-batches) per step of a train_loader, from `step` (maybe mid-epoch) to `total_steps`."""
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = skip * accum * loader.batch_size
        loader.dataset.epoch = epoch
        batches = iter(loader)
        for _ in range(skip, min(steps_per_epoch, skip + total_steps - step)):  # the last epoch may be cut short
            yield epoch, [next(batches) for _ in range(accum)]
            step += 1


# ===== GPU extra: --decode-on-device, for workers that cannot keep up: they only read files and draw crops.
def read_undecoded(path):
    """For FDCropBox: a JPEG the device decoder takes as (its bytes, a 1-D uint8 tensor; PIL's lazy header, for the
    size); others by load_rgb: not JPEG, CMYK (nvJPEG has none), EXIF-rotated (nvJPEG ignores it), or truncated."""
    with suppress(OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # then load_rgb names the error
        data = Path(path).read_bytes()
        if data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9"):  # a JPEG's start and end markers
            header = Image.open(io.BytesIO(data))  # lazy: the pixels are never decoded here
            if header.mode in ("RGB", "L") and header.getexif().get(0x0112, 1) == 1:  # 0x0112: EXIF orientation
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), header
    return load_rgb(path)


class FDCropBox:
    """fd_transform's random draws, by the same calls in the same order, without its pixel work: an image from
    read_undecoded becomes (data: the JPEG's bytes or uint8 (3, H, W) pixels, [top, left, height, width, flip])."""

    def __init__(self, img_size, min_scale=0.08):
        self.crop, self.flip, _ = fd_transform(img_size, min_scale).transforms

    def __call__(self, image):  # a PIL image, or (the JPEG's bytes, its header) from read_undecoded
        data, image = (transforms.functional.pil_to_tensor(image), image) if isinstance(image, Image.Image) else image
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        return data, torch.tensor([top, left, height, width, int(torch.rand(1) < self.flip.p)])


def decode_and_crop(images, img_size, device):
    """The rest of fd_transform on `device` for skip_unreadable(stack=False)'s batch: float (B, 3, S, S) in [0, 1] less
    undecodable images, as fd_transform up to rounding (nvJPEG upsamples 4:2:0 chroma more plainly than PIL)."""
    data, shapes, crops = images
    images = [part.view(shape) for part, shape in zip(data.split([shape.numel() for shape in shapes]), shapes)]
    jpegs = [image for image in images if image.ndim == 1]  # bytes; the others are pixels
    try:  # in one call: nvJPEG decodes a list as a batch
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:  # then each alone on the CPU: one that fails there too is left out, with a warning
        decoded = [None] * len(jpegs)
        for i, jpeg in enumerate(jpegs):
            try:
                decoded[i] = decode_jpeg(jpeg, mode=ImageReadMode.RGB)
            except RuntimeError as error:
                warnings.warn(f"skipping an image that cannot be decoded: {error}")
    decoded, out = iter(decoded), []
    for image, (top, left, height, width, flip) in zip(images, crops.tolist()):
        image = next(decoded) if image.ndim == 1 else image
        if image is not None:
            image = image.to(device, non_blocking=True)[:, top:top + height, left:left + width].float() / 255
            image = transforms.functional.resize(image, [img_size] * 2, InterpolationMode.BILINEAR, antialias=True)
            out.append(image.flip(-1) if flip else image)
    if not out:
        raise RuntimeError(f"all {len(images)} images of a batch were unreadable (see the warnings above)")
    return torch.stack(out)
