"""Data for Feature Distillation: image folders, the built-in synthetic dataset, the FD transform
and a distributed loader that can start mid-epoch.

Distillation needs no labels, so `--data` may be an ImageFolder (class subfolders, optionally under
`train/`) or a flat folder of images. Without `--data` the built-in `SyntheticShapes` dataset is
used: no download, deterministic, labelled, and hard enough to be worth fine-tuning on.

Random augmentation is seeded per (seed, epoch, image), so what an image looks like in an epoch
does not depend on the number of workers or on whether the run was resumed.

With `--decode-on-device` the workers only read the files and draw each image's crop and flip
(`read_undecoded`, `FDCropBox`); `decode_and_crop` then decodes the JPEGs on the training device
(nvJPEG on a GPU) and crops and resizes them there, for when the workers cannot keep up.
"""
import functools
import io
import itertools
import math
import random
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg

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

    def __init__(self, root, loader=load_rgb):
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.loader = loader

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.loader(self.files[index]), -1


def image_dataset(root, split="train", loader=load_rgb):
    """The untransformed images under `root`: `root/<split>/` if it exists, then class subfolders
    (an ImageFolder) if there are any, otherwise the images directly in the folder. Each file is
    read by `loader`: load_rgb, or read_undecoded to decode on the training device."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder (give an ImageFolder root, a folder "
                                f"with train/ and val/, or a flat folder of images)")
    if (root / split).is_dir():
        root = root / split
    if any(p.is_dir() for p in root.iterdir()):
        try:  # labels from the folder names
            return datasets.ImageFolder(root, loader=loader)
        except FileNotFoundError as error:
            raise ValueError(f"--data {root}: {error}") from None
    dataset = FlatImageFolder(root, loader)
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


def skip_unreadable(samples, stack=True):
    """Collate (image, label) samples into (images, labels, number of unreadable images left out).
    stack=False is for FDCropBox's (data, crop) samples, whose data differ in size: images is then
    (data, shapes, crops), all the data flattened into one tensor, their shapes, the crops stacked.
    One tensor rather than a list of them: each tensor a worker sends holds a file descriptor
    until the batch is received, and a list per batch runs out of them."""
    readable = [sample for sample in samples if sample is not None]
    if not readable:
        raise RuntimeError(f"all {len(samples)} images of a batch were unreadable (see the warnings above)")
    if stack:
        images, labels = default_collate(readable)
    else:
        data = [data for (data, _), _ in readable]
        images = (torch.cat([d.flatten() for d in data]), [tuple(d.shape) for d in data],
                  torch.stack([crop for (_, crop), _ in readable]))
        labels = torch.tensor([label for _, label in readable])
    return images, labels, torch.tensor(len(samples) - len(readable))


# ----------------------------------------------------------------------------- decoding on the device
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def read_undecoded(path):
    """An image file for FDCropBox, the loader of `--decode-on-device`. A JPEG the device decoder
    takes is left undecoded: (its bytes as a 1-D uint8 tensor, the image opened by PIL, which has
    read the header alone: the size, no pixels). Any other file is decoded here by load_rgb into a
    PIL image: not a JPEG, CMYK (nvJPEG has no CMYK), an EXIF orientation to apply (nvJPEG ignores
    it), or bytes that do not end the way a JPEG ends (a truncated file, which load_rgb reports)."""
    try:
        data = Path(path).read_bytes()
        if data.startswith(JPEG_START) and data.endswith(JPEG_END):
            header = Image.open(io.BytesIO(data))  # lazy: the pixels are never decoded here
            if header.mode in ("RGB", "L") and header.getexif().get(0x0112, 1) == 1:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), header
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # load_rgb raises UnreadableImage, naming the file and the error
    return load_rgb(path)


class FDCropBox:
    """fd_transform's random draws without its pixel work, for `--decode-on-device`: an image as
    read_undecoded gives it becomes (data, [top, left, height, width, flip]), the crop box and
    flip that fd_transform(img_size, min_scale) draws from the same RNG state: the same calls, in
    the same order. data is the JPEG's bytes, or a decoded image's uint8 (3, H, W) pixels (also a
    PIL image from SyntheticShapes). decode_and_crop does the rest on the training device."""

    def __init__(self, img_size, min_scale=0.08):
        self.crop, self.flip, _ = fd_transform(img_size, min_scale).transforms

    def __call__(self, image):
        if isinstance(image, Image.Image):
            data = transforms.functional.pil_to_tensor(image)
        else:
            data, image = image  # the JPEG's bytes, its header
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        flip = torch.rand(1) < self.flip.p
        return data, torch.tensor([top, left, height, width, int(flip)])


def decode_jpegs(encoded, device):
    """JPEG bytes decoded to uint8 RGB (3, H, W) tensors on `device`, all in one call (nvJPEG decodes
    a list as a batch on a GPU). One file the decoder rejects fails the whole call, so then each is
    decoded alone on the CPU; one that fails there too is None, with a warning."""
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as error:
                warnings.warn(f"skipping an image that cannot be decoded: {error}")
                decoded.append(None)
        return decoded


def decode_and_crop(images, img_size, device):
    """The rest of fd_transform on `device`, for the images of a micro-batch of FDCropBox's samples
    as skip_unreadable(stack=False) collates them: the JPEGs decoded, then each image cropped,
    resized to img_size x img_size (bilinear and antialiased, as PIL resizes in fd_transform) and
    flipped. Returns float (B, 3, S, S) in [0, 1], what fd_transform gives up to rounding; an image
    that cannot be decoded is left out of B. On the CPU, decode_jpeg decodes exactly as PIL does;
    nvJPEG upsamples 4:2:0 chroma (most JPEGs) more plainly, so colours at sharp edges differ a little."""
    data, shapes, crops = images
    images = [part.view(shape) for part, shape in zip(data.split([math.prod(s) for s in shapes]), shapes)]
    encoded = [i for i, image in enumerate(images) if image.ndim == 1]  # bytes; the others are pixels
    if encoded:
        for i, image in zip(encoded, decode_jpegs([images[i] for i in encoded], device)):
            images[i] = image
    out = []
    for image, crop in zip(images, crops):
        if image is None:
            continue
        top, left, height, width, flip = crop.tolist()
        image = image.to(device, non_blocking=True)[:, top:top + height, left:left + width].float() / 255
        image = transforms.functional.resize(image, [img_size, img_size], antialias=True,
                                             interpolation=transforms.InterpolationMode.BILINEAR)
        out.append(image.flip(-1) if flip else image)
    if not out:
        raise RuntimeError(f"all {len(images)} images of a batch were unreadable (see the warnings above)")
    return torch.stack(out)


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can skip the first `start` samples of its epoch, so a resumed run
    continues with exactly the batches it had not yet seen. With one process it is a seeded
    shuffle."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def train_loader(dataset, batch_size, workers, seed, rank=0, world_size=1, pin_memory=False, stack=True):
    """A shuffling loader over this rank's share of the dataset, dropping the last partial batch.
    stack=False for FDCropBox's samples: see skip_unreadable."""
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                               drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images: too few for {world_size} process(es) "
                         f"with --batch-size {batch_size}; lower --batch-size or add images")
    # Workers are started afresh each epoch (not persistent) so they see the new epoch number. The
    # loader's own generator keeps it from drawing on the global RNG (the student's drop path).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        collate_fn=functools.partial(skip_unreadable, stack=stack), pin_memory=pin_memory,
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
