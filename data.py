"""Data for Feature Distillation: image folders, the built-in synthetic dataset, the FD transform
and a distributed loader that can start mid-epoch.

Distillation needs no labels, so `--data` may be an ImageFolder (class subfolders, optionally under
`train/`) or a flat folder of images. Without `--data` the built-in `SyntheticShapes` dataset is
used: no download, deterministic, labelled, and hard enough to be worth fine-tuning on.

Random augmentation is seeded per (seed, epoch, image), so what an image looks like in an epoch
does not depend on the number of workers or on whether the run was resumed.
"""
import itertools
import random
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import datasets, transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class SyntheticShapes(Dataset):
    """A labelled dataset drawn on the fly: `size` RGB images of `image_size` px, 10 classes.

    A class is a shape (circle, square, triangle, cross, ring) with a fill (solid or striped), and
    prefers one band of the image. Colours, sizes, stripe angles, background clutter and a
    distractor shape of another kind vary at random, so the task needs real features, and random
    crops can cut the object out (fine-tuning should not reach 100%). Image i of a split is always
    the same image; the "train" and "val" splits never share one.
    """

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
        # The class's preferred band: a weak positional cue, as objects have in real photos.
        band = (label % 3 + 0.5) / 3
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
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
        elif shape == "square":
            draw.regular_polygon((x, y, r), 4, rotation=rng.uniform(0, 90), fill=255)
        elif shape == "triangle":
            draw.regular_polygon((x, y, r), 3, rotation=rng.uniform(0, 120), fill=255)
        elif shape == "cross":
            w = r / 3
            draw.rectangle([x - r, y - w, x + r, y + w], fill=255)
            draw.rectangle([x - w, y - r, x + w, y + r], fill=255)
        else:  # ring
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
            draw.ellipse([x - r / 2, y - r / 2, x + r / 2, y + r / 2], fill=0)
        colour = Image.new("RGB", (s, s), self._colour(rng))
        if fill == "striped":
            stripes = Image.new("L", (2 * s, 2 * s), 0)
            period = rng.randint(4, 9)
            stripe_draw = ImageDraw.Draw(stripes)
            for i in range(0, 2 * s, period):
                stripe_draw.rectangle([i, 0, i + period // 2, 2 * s], fill=255)
            stripes = stripes.rotate(rng.uniform(0, 180)).crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
            colour = Image.composite(colour, Image.new("RGB", (s, s), self._colour(rng)), stripes)
        image.paste(colour, (0, 0), mask)


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, empty, not an image)."""


def load_rgb(path):
    """An image file as 8-bit RGB, whatever it holds: the EXIF orientation applied, 16-bit and
    32-bit greyscale scaled down (not clipped), palette and alpha images flattened, CMYK converted.
    A file that cannot be decoded raises UnreadableImage naming it."""
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


class FlatImageFolder(Dataset):
    """Every image directly inside a folder, unlabelled (label -1): distillation needs no labels."""

    def __init__(self, root):
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return load_rgb(self.files[index]), -1


def image_dataset(root, split="train"):
    """The untransformed images under `root`: `root/<split>/` if it exists, then class subfolders
    (an ImageFolder) if there are any, otherwise the images directly in the folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (give an ImageFolder root, a folder "
                                f"with train/ and val/, or a flat folder of images)")
    if (root / split).is_dir():
        root = root / split
    if any(p.is_dir() for p in root.iterdir()):
        try:  # PIL images, labels from the folder names
            return datasets.ImageFolder(root, loader=load_rgb)
        except FileNotFoundError as error:
            raise ValueError(f"--data {root}: {error}") from None
    dataset = FlatImageFolder(root)
    if len(dataset) == 0:
        raise ValueError(f"--data {root}: no images found (expected class subfolders or image files "
                         f"ending in {', '.join(IMAGE_EXTENSIONS)})")
    return dataset


def fd_transform(img_size, min_scale=0.08):
    """The distillation augmentation (PAPER.md §1): a random resized crop and a horizontal flip,
    nothing else; the teacher and the student both see the result. Output in [0, 1]."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])


def eval_transform(img_size):
    """The evaluation view (fine-tuning's validation, the diagnosis images): resize to
    img_size / 0.875 (256 for 224), bicubic, then the centre crop. Output in [0, 1]."""
    return transforms.Compose([
        transforms.Resize(int(img_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size), transforms.ToTensor()])


class SeededTransform(Dataset):
    """Applies a random transform with the torch RNG seeded by (seed, epoch, index), so every
    image's augmentation is reproducible whatever the workers, ranks or resume point.
    Set `.epoch` before each epoch's iterator is created. An unreadable image gives None and a
    warning naming it; `skip_unreadable` (the loaders' collate) leaves it out of the batch."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image, label = self.dataset[index]
        except UnreadableImage as error:
            warnings.warn(f"skipping an unreadable image: {error}")
            return None
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), label


def skip_unreadable(samples):
    """Collate (image, label) samples into (images, labels, number of unreadable images left out)."""
    readable = [sample for sample in samples if sample is not None]
    if not readable:
        raise RuntimeError(f"all {len(samples)} images of a batch were unreadable (see the warnings above)")
    images, labels = default_collate(readable)
    return images, labels, torch.tensor(len(samples) - len(readable))


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can skip the first `start` samples of its epoch, so a resumed run
    continues with exactly the batches it had not yet seen. With one process it is a seeded
    shuffle."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def train_loader(dataset, batch_size, workers, seed, rank=0, world_size=1, pin_memory=False):
    """A shuffling loader over this rank's share of the dataset, dropping the last partial batch."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images: too few for {world_size} process(es) "
                         f"with --batch-size {batch_size}; lower --batch-size or add images")
    # Workers are started afresh each epoch (not persistent) so they see the new epoch number. The
    # loader's own generator keeps it from drawing on the global RNG (the student's drop path).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=skip_unreadable, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def steps_of_batches(loader, sampler, dataset, step, steps_per_epoch, total_steps, accum):
    """For every optimizer step from `step` to `total_steps`: (epoch, its `accum` micro-batches).
    A run resumed at `step` starts mid-epoch with exactly the batches it had not yet seen."""
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = skip * accum * loader.batch_size
        dataset.epoch = epoch
        batches = iter(loader)
        for _ in range(skip, steps_per_epoch):
            yield epoch, [next(batches) for _ in range(accum)]
            step += 1
