"""Data for FD: image folders (`--data`: an ImageFolder, maybe under train/, or any folder of images: distillation
needs no labels), SyntheticShapes (no download), the FD transform seeded per (seed, epoch, image) so that workers and
resuming change nothing, a loader that starts mid-epoch, and (--decode-on-device) decoding on the training device."""
import functools
import io
import itertools
import math
import os
import random
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SyntheticShapes(Dataset):
    """`size` RGB images of `image_size` px in 10 classes: a shape (circle, square, triangle, cross, ring), solid or
    striped, preferring a band of the image; colours, sizes, stripe angles, clutter and a distractor vary at random,
    and crops can cut the object out (fine-tuning should not reach 100%). Image i of a split is fixed; splits differ."""

    SHAPES = ("circle", "square", "triangle", "cross", "ring")
    FILLS = ("solid", "striped")
    num_classes = len(SHAPES) * len(FILLS)

    def __init__(self, size=2048, image_size=128, split="train"):
        self.size, self.image_size, self.split = size, image_size, split
        self.classes = [f"{s}-{f}" for f in self.FILLS for s in self.SHAPES]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = random.Random(f"{self.split}-{index}")  # string seeds are stable across processes
        label = index % self.num_classes
        shape, fill = self.SHAPES[label % len(self.SHAPES)], self.FILLS[label // len(self.SHAPES)]
        s = self.image_size
        image = Image.new("RGB", (s, s), self._colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(3, 8)):  # clutter
            draw.line([(rng.uniform(0, s), rng.uniform(0, s)) for _ in range(2)],
                      fill=self._colour(rng), width=rng.randint(1, 3))
        distractor = rng.choice([k for k in self.SHAPES if k != shape])
        self._paste_shape(image, rng, distractor, "solid", rng.uniform(0.12, 0.2) * s,
                          (rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s))
        band = (label % 3 + 0.5) / 3  # the class's preferred band: a weak positional cue, as in real photos
        centre = (rng.uniform(0.25, 0.75) * s, min(max(rng.gauss(band, 0.15), 0.2), 0.8) * s)
        self._paste_shape(image, rng, shape, fill, rng.uniform(0.2, 0.35) * s, centre)
        return image, label

    @staticmethod
    def _colour(rng):
        return tuple(rng.randint(0, 255) for _ in range(3))

    def _paste_shape(self, image, rng, shape, fill, radius, centre):
        s, (x, y), r = self.image_size, centre, radius
        mask = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(mask)
        if shape in ("circle", "ring"):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
            if shape == "ring":
                draw.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=0)
        elif shape in ("square", "triangle"):  # turned by a random part of its symmetry angle
            sides = 4 if shape == "square" else 3
            draw.regular_polygon((x, y, r), sides, rotation=rng.uniform(0, 360 / sides), fill=255)
        else:  # cross
            w = r / 3
            draw.rectangle([x - r, y - w, x + r, y + w], fill=255)
            draw.rectangle([x - w, y - r, x + w, y + r], fill=255)
        colour = Image.new("RGB", (s, s), self._colour(rng))
        if fill == "striped":
            stripes, period = Image.new("L", (2 * s, 2 * s), 0), rng.randint(4, 9)
            stripe_draw = ImageDraw.Draw(stripes)
            for i in range(0, 2 * s, period):
                stripe_draw.rectangle([i, 0, i + period // 2, 2 * s], fill=255)
            stripes = stripes.rotate(rng.uniform(0, 180)).crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
            colour = Image.composite(colour, Image.new("RGB", (s, s), self._colour(rng)), stripes)
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

    def __init__(self, files, labels, classes, loader=load_rgb):
        self.files, self.labels, self.classes, self.loader = files, labels, classes, loader

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.loader(self.files[index]), self.labels[index]


def image_dataset(root, split="train", loader=load_rgb, labelled=False):
    """The untransformed images under `root`, or `root/<split>/` if it exists: an ImageFolder (labels: the sorted class
    folders' indices) if every image is in a class folder, else all of them unlabelled, which `labelled=True`
    (fine-tuning) refuses. `loader` (load_rgb, or read_undecoded) reads each file; `.summary` says what was found."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (give an ImageFolder root, a folder "
                                f"with train/ and val/, or a folder of images)")
    root = root / split if (root / split).is_dir() else root
    files = []  # every image file, sorted, in subfolders and links; hidden ones (.ipynb_checkpoints, ._*) are not data
    visited = set()  # folders seen, by device and inode: a symbolic link back up the tree is followed once
    for parent, folders, names in os.walk(root, followlinks=True):
        folder = os.stat(parent)
        if (folder.st_dev, folder.st_ino) in visited:
            folders[:] = []
            continue
        visited.add((folder.st_dev, folder.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        files += [Path(parent, name) for name in sorted(names)
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"--data {root}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)}, "
                         f"directly in it or in subfolders)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [f for f in files if f.parent == root]
    if labelled and (loose or not classes):
        raise ValueError(f"--data {root}: {len(loose)} images lie outside class subfolders; fine-tuning needs "
                         f"every image in a folder named after its class")
    if loose or not classes:
        dataset = ImageFiles(files, [-1] * len(files), [], loader)
    else:
        folder_of = [f.relative_to(root).parts[0] for f in files]
        empty = sorted(set(classes) - set(folder_of))
        if empty and labelled:
            raise ValueError(f"--data {root}: no images in the class folders {', '.join(empty)}; remove them or "
                             f"add images")
        classes = [c for c in classes if c not in empty]
        if labelled and len(classes) == 1:  # one class: trivially 100% correct, a loss of 0, and nothing learnt
            raise ValueError(f"--data {root}: one class folder ({classes[0]}); fine-tuning a classifier needs two "
                             f"classes or more, each in a folder of its own")
        dataset = ImageFiles(files, [classes.index(folder) for folder in folder_of], classes, loader)
    dataset.summary = f"{len(files)} images in {root}" + (f", {len(classes)} class{'es' * (len(classes) != 1)}"
                                                          if dataset.classes else " (no class folders: unlabelled)")
    return dataset


def fd_transform(img_size, min_scale=0.08):
    """FD's augmentation (arXiv 2205.14141; FDTransform in the official data/data_fd.py), for teacher and student
    alike: a random resized crop and a horizontal flip only. In [0, 1]: the models normalise."""
    return transforms.Compose([transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def eval_transform(img_size):
    """The evaluation view: resized to img_size / 0.875 (256 for 224), bicubic, centre-cropped; in [0, 1]."""
    return transforms.Compose([transforms.Resize(int(img_size / 0.875), interpolation=InterpolationMode.BICUBIC),
                               transforms.CenterCrop(img_size), transforms.ToTensor()])


class SeededTransform(Dataset):
    """A random transform with the torch RNG seeded by (seed, epoch, index), whatever the workers, ranks, resume point
    (set `.epoch` before each epoch's iterator). An unreadable image: its UnreadableImage, a warning; the collate
    drops it."""

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
        images = (torch.cat([d.flatten() for d in data]), [tuple(d.shape) for d in data], torch.stack(crops))
        labels = torch.tensor(labels)
    return images, labels, torch.tensor(len(samples) - len(readable))


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (with one process, a seeded shuffle) that skips the first `start` samples of its epoch."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def leave_the_process_group(worker_id):
    """A worker's init: Ctrl-C in a terminal and torchrun's SIGTERM go to the process group; out of it, the workers
    leave them to the training process, which finishes its step and saves (training.stop_requested), then ends them."""
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
                      worker_init_fn=leave_the_process_group, generator=torch.Generator().manual_seed(seed)), sampler


def steps_of_batches(loader, sampler, dataset, step, steps_per_epoch, total_steps, accum):
    """(epoch, its `accum` micro-batches) per optimizer step from `step` (mid-epoch if resumed) to `total_steps`."""
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = skip * accum * loader.batch_size
        dataset.epoch = epoch
        batches = iter(loader)
        for _ in range(skip, min(steps_per_epoch, skip + total_steps - step)):  # the last epoch may be cut short
            yield epoch, [next(batches) for _ in range(accum)]
            step += 1


# ===== GPU extra: --decode-on-device, for when the workers cannot keep up: they only read the files and draw each
# image's crop and flip (read_undecoded, FDCropBox); decode_and_crop decodes (nvJPEG), crops and resizes on the device.
def read_undecoded(path):
    """For FDCropBox: a JPEG the device decoder takes as (its bytes, a 1-D uint8 tensor; PIL's lazy header, for the
    size); others by load_rgb: not JPEG, CMYK (nvJPEG has none), EXIF-rotated (nvJPEG ignores it), or truncated."""
    try:
        data = Path(path).read_bytes()
        if data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9"):  # a JPEG's start and end markers
            header = Image.open(io.BytesIO(data))  # lazy: the pixels are never decoded here
            if header.mode in ("RGB", "L") and header.getexif().get(0x0112, 1) == 1:  # 0x0112: EXIF orientation
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), header
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # load_rgb raises UnreadableImage, naming the file and the error
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
    images = [part.view(shape) for part, shape in zip(data.split([math.prod(s) for s in shapes]), shapes)]
    encoded = [i for i, image in enumerate(images) if image.ndim == 1]  # bytes; the others are pixels
    try:  # in one call: nvJPEG decodes a list as a batch
        decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB, device=device) if encoded else []
    except RuntimeError:  # then each alone on the CPU: one that fails there too is left out, with a warning
        decoded = [None] * len(encoded)
        for j, i in enumerate(encoded):
            try:
                decoded[j] = decode_jpeg(images[i], mode=ImageReadMode.RGB).to(device)
            except RuntimeError as error:
                warnings.warn(f"skipping an image that cannot be decoded: {error}")
    for i, image in zip(encoded, decoded):
        images[i] = image
    out = []
    for image, crop in zip(images, crops):
        if image is not None:
            top, left, height, width, flip = crop.tolist()
            image = image.to(device, non_blocking=True)[:, top:top + height, left:left + width].float() / 255
            image = transforms.functional.resize(image, [img_size] * 2, InterpolationMode.BILINEAR, antialias=True)
            out.append(image.flip(-1) if flip else image)
    if not out:
        raise RuntimeError(f"all {len(images)} images of a batch were unreadable (see the warnings above)")
    return torch.stack(out)
