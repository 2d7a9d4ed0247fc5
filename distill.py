"""Feature Distillation (Wei et al., 2022, arXiv 2205.14141): train a fresh ViT student to predict
the whitened output feature map of a frozen pretrained teacher.

    python distill.py                                    # built-in default: tiny random teacher, synthetic data, CPU
    python distill.py --teacher clip --data /path/to/imagenet
    torchrun --nproc_per_node 8 distill.py --teacher clip --data /path/to/imagenet --out out/fd_clip

Running the same command again in the same --out resumes from OUT/checkpoint.pth. The distilled
encoder alone is written to OUT/student.pth, the input of finetune.py.

This file also holds the training helpers that finetune.py reuses: distributed setup, autocast,
parameter groups, the learning-rate schedule, the accumulating optimizer step, atomic checkpoints.
"""
import argparse
import json
import math
import os
import random
import subprocess
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (FDCropBox, SeededTransform, SyntheticShapes, decode_and_crop, fd_transform, image_dataset,
                  load_rgb, read_undecoded, steps_of_batches, train_loader)
from models import TEACHERS, build_student, load_teacher, set_grad_checkpointing, sha256sum

# ----------------------------------------------------------------------------- presets
# The official distillation recipes (PAPER.md §6); every value can be overridden by its flag.
# lr, min_lr and warmup_lr are per 512 images and scale linearly with the global batch.
PAPER_RECIPE = dict(img_size=224, epochs=300, warmup_epochs=10, batch_size=128, lr=3e-4, min_lr=5e-6,
                    warmup_lr=5e-7, min_crop_scale=0.08)
PRESETS = {
    "clip": dict(PAPER_RECIPE, student="vit_base_patch16", drop_path=0.2),
    "clip_l14": dict(PAPER_RECIPE, student="vit_large_patch14", drop_path=0.3),
    "dino": dict(PAPER_RECIPE, student="vit_base_patch16", drop_path=0.3),
    "deit": dict(PAPER_RECIPE, student="vit_base_patch16", drop_path=0.3),
    "esvit": dict(PAPER_RECIPE, student="swinv2_base_window14", drop_path=0.3, lr=2e-4, min_lr=1e-5,
                  warmup_lr=1e-6),
    # The built-in default: a tiny random teacher on the synthetic data, about a minute on a laptop
    # CPU. A larger lr than the paper's because the run is a few hundred steps, not 300 epochs.
    "vit_tiny_patch16": dict(student="vit_tiny_patch16", img_size=96, epochs=2, warmup_epochs=0.2,
                             batch_size=32, lr=4e-3, min_lr=1e-4, warmup_lr=1e-6, drop_path=0.1,
                             min_crop_scale=0.08),
}
DEFAULT_TEACHER = "vit_tiny_patch16"


FROM_PRESET = " (unset: from the --teacher preset)"


def get_args_parser():
    p = argparse.ArgumentParser("Feature Distillation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=DEFAULT_TEACHER,
                   help=f"teacher: a published one ({', '.join(TEACHERS)}), a plain ViT such as vit_small_patch16 "
                        f"(random weights), or any name with --teacher-weights FILE of this project; the paper's "
                        f"teachers ({', '.join(p for p in PRESETS if p in TEACHERS)}) bring their "
                        f"recipe, which fills the flags left unset")
    p.add_argument("--teacher-weights", default=None,
                   help="the teacher's weights file, in its published layout (downloaded to the torch hub cache if "
                        "not given), a model file this project wrote, or 'random' for a published architecture "
                        "with random weights")
    p.add_argument("--student", default=None, help="student architecture, e.g. vit_base_patch16" + FROM_PRESET)
    p.add_argument("--data", default=None, help="ImageFolder root (train/ used if present) or a flat folder of "
                                                "images; the built-in synthetic dataset if not given")
    p.add_argument("--synthetic-images", type=int, default=2048, help="size of the built-in dataset")
    p.add_argument("--out", default="out/distill", help="output folder; rerunning in it resumes")
    add_schedule_flags(p, FROM_PRESET)
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on biases, norms, "
                   "LayerScale, class token, position tables)")
    p.add_argument("--clip-grad", type=float, default=3.0, help="max gradient norm")
    p.add_argument("--drop-path", type=float, default=None, help="student drop path rate" + FROM_PRESET)
    p.add_argument("--min-crop-scale", type=float, default=None, help="RandomResizedCrop min scale" + FROM_PRESET)
    p.add_argument("--img-size", type=int, default=None, help="crop size seen by teacher and student" + FROM_PRESET)
    add_run_flags(p)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the student's blocks: "
                   "less memory (large students, large batches) for about a third more compute")
    p.add_argument("--decode-on-device", action="store_true",
                   help="decode the JPEGs (nvJPEG on a GPU) and crop and resize them on the training device; "
                        "the workers only read the files. Use it when the run is data-bound: when --workers x "
                        "the per-worker img/s of `python bench.py --data-pipeline` is below the img/s the run "
                        "logs (or bench.py measures) for the training step")
    p.add_argument("--seed", type=int, default=0, help="seeds the student's init, the data order and augmentation")
    return p


def add_schedule_flags(p, unset):
    """The length, batch and learning-rate flags of distill.py and finetune.py; `unset` says where
    a flag left unset takes its value from."""
    p.add_argument("--epochs", type=int, default=None, help="training length" + unset)
    p.add_argument("--warmup-epochs", type=float, default=None, help="linear warmup length" + unset)
    p.add_argument("--batch-size", type=int, default=None, help="images per process per micro-step" + unset)
    p.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate per 512 images" + unset)
    p.add_argument("--min-lr", type=float, default=None, help="final learning rate per 512 images" + unset)
    p.add_argument("--warmup-lr", type=float, default=None, help="initial learning rate per 512 images" + unset)


def add_run_flags(p):
    """How a run of distill.py or finetune.py is carried out: data loading, checkpoints, logging,
    precision, compilation, and when to give up."""
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per training process [up to 8, the CPU cores shared among "
                        "the processes of this machine]")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (fine-tuning: "
                   "also after every epoch)")
    p.add_argument("--keep", type=int, default=0, help="also keep the last N checkpoints as OUT/checkpoint-STEP.pth")
    p.add_argument("--log-every", type=int, default=10, help="log every N optimizer steps")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model (and the teacher)")
    p.add_argument("--max-nonfinite", type=int, default=20, help="stop after this many optimizer steps in a row "
                   "skipped for a non-finite loss or gradient")
    p.add_argument("--max-bad-frac", type=float, default=0.01, help="stop when more than this fraction of an "
                   "epoch's images are unreadable (they are skipped with a warning naming the file)")


def apply_preset(args):
    """Fill every flag left unset from the teacher's preset. A teacher without one gets the paper's
    recipe, with a student of the teacher's own size when the teacher is a plain ViT."""
    preset = PRESETS.get(args.teacher) or dict(
        PAPER_RECIPE, drop_path=0.1,
        student=args.teacher if args.teacher.startswith("vit_") else "vit_base_patch16")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- the FD objective
class FDStudent(nn.Module):
    """What FD trains: the student and the projector g mapping its tokens to the teacher's width
    (the paper's 1x1 convolution, i.e. a Linear over channels). Only this is wrapped in DDP and
    saved; the frozen teacher never is."""

    def __init__(self, student, teacher_dim):
        super().__init__()
        self.student = student
        self.projector = nn.Linear(student.embed_dim, teacher_dim)

    def forward(self, images):
        return self.projector(self.student(images))  # (B, 1+N, teacher_dim)


def resize_tokens(patches, grid):
    """Bilinearly resize the square grid of patch tokens (B, N, C) to grid[0] x grid[1] tokens: lets
    a teacher and a student with different grids be paired (a Swin teacher's 7x7 map for a ViT's
    14x14). ViT teachers are run at the resolution that gives the student's grid instead."""
    if patches.shape[1] == grid[0] * grid[1]:
        return patches
    side = math.isqrt(patches.shape[1])
    maps = rearrange(patches, "b (h w) c -> b c h w", h=side)
    maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
    return rearrange(maps, "b c h w -> b (h w) c")


@torch.no_grad()
def distillation_target(teacher, images, grid, with_cls=True):
    """The FD target (B, [1 +] grid tokens, C): the teacher's output tokens after its own final
    norm, whitened by a LayerNorm without scale or bias, i.e. each token standardised over its
    channels (PAPER.md §1.2). The class token is kept when `with_cls`."""
    tokens = teacher(images).float()  # fp32 before the norm: a teacher may run in fp16
    prefix = teacher.num_prefix_tokens
    target = torch.cat([tokens[:, :prefix if with_cls else 0], resize_tokens(tokens[:, prefix:], grid)], dim=1)
    return F.layer_norm(target, target.shape[-1:], eps=1e-5)


def fd_loss(prediction, target, beta=2.0):
    """Smooth L1 with beta 2, averaged over batch, tokens and channels (PAPER.md §1.4)."""
    return F.smooth_l1_loss(prediction.float(), target, beta=beta)


def fd_objective(teacher, student):
    """The loss of one batch, compute_loss(model, images), for the FD model wrapping `student`:
    on every patch token, and on the class token when student and teacher both have one (Swin
    has none)."""
    with_cls = student.num_prefix_tokens > 0 and teacher.num_prefix_tokens > 0

    def compute_loss(model, images):
        prediction = model(images)  # (B, prefix + N, C)
        target = distillation_target(teacher, images, student.grid, with_cls)
        return fd_loss(prediction[:, prediction.shape[1] - target.shape[1]:], target)
    return compute_loss


def prepare_teacher(teacher, dtype):
    """Store the frozen teacher's linear and convolution weights in the autocast dtype. Autocast
    caches its casts only for weights that require grad, so it would cast a frozen teacher's
    weights again at every step; the result is the same bit for bit, norms stay in fp32."""
    if dtype is not None:
        for module in teacher.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
    return teacher


# ----------------------------------------------------------------------------- training helpers
def setup_distributed():
    """(rank, world_size, device) from torchrun's environment variables; without torchrun, one
    process on the GPU if there is one, else on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # A dead rank should end the job with an error, not hang it forever.
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return dist.get_rank(), world_size, device


def default_workers():
    """Data-loading processes per training process: this machine's CPU cores shared among its
    training processes, at most 12. A worker decodes and crops 230-330 img/s (README, Performance)
    and a compiled ViT-B/16 step on one H100 takes about 1,900 img/s: 8 workers would starve it."""
    return min(12, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def cpu_has_native_bf16():
    """True on CPUs with bf16 instructions (AMX or AVX512-BF16), where bf16 autocast makes an FD step
    1.6-1.8x faster than fp32 (README, Measured); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(amp, device):
    """The autocast dtype for --amp, or None for fp32."""
    if amp == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        amp = "bf16" if fast else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


# Position tables and temperatures, as the official code: decaying them towards 0 has no meaning.
NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "reg_tokens", "relative_position_bias_table", "rpe_mlp", "logit_scale")


def param_groups(model, weight_decay, lr_scale=None):
    """AdamW parameter groups: no weight decay for 1-D tensors (biases, norms, LayerScale) and
    NO_WEIGHT_DECAY. `lr_scale(name)` gives a
    per-parameter lr multiplier (layer-wise decay when fine-tuning), stored as the group's
    'lr_scale'."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or any(key in name for key in NO_WEIGHT_DECAY)
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault((no_decay, scale), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": scale})
        group["params"].append(param)
    return list(groups.values())


def schedule(args, batches_per_epoch, world_size):
    """(steps per epoch, total steps, warmup steps, global batch, lrs): the learning rates per 512
    images of args scaled linearly to the global batch."""
    steps_per_epoch = batches_per_epoch // args.accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {batches_per_epoch} batches per process, fewer than --accum {args.accum}: "
                         f"lower --accum or --batch-size")
    global_batch = args.batch_size * world_size * args.accum
    lrs = {k: getattr(args, k) * global_batch / 512 for k in ("lr", "min_lr", "warmup_lr")}
    return (steps_per_epoch, args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch),
            global_batch, lrs)


def lr_at(step, total_steps, warmup_steps, lr, min_lr, warmup_lr):
    """Linear warmup from warmup_lr to lr, then cosine decay to min_lr: a pure function of the step."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(model, micro_batches, compute_loss, optimizer, scaler, clip_grad, autocast):
    """One optimizer step over the micro-batches of one batch; returns the mean loss (a tensor)
    and whether the step was taken. Under DDP the gradients are all-reduced only on the last
    micro-step: no_sync covers the forward and backward of the others. A step whose gradient is
    not finite (a NaN or inf loss, an fp16 overflow) is skipped: the same on every rank, since
    the gradients were all-reduced."""
    total_loss = 0.0
    for i, batch in enumerate(micro_batches):
        is_last = i == len(micro_batches) - 1
        no_sync = getattr(model, "no_sync", None)
        with nullcontext() if is_last or no_sync is None else no_sync():
            with autocast():
                loss = compute_loss(model, batch) / len(micro_batches)
            scaler.scale(loss).backward()
        total_loss += loss.detach()
    scaler.unscale_(optimizer)  # clip the true gradients; a no-op unless fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    finite = bool(torch.isfinite(grad_norm))  # one synchronisation per step, as GradScaler's own check
    if finite:
        scaler.step(optimizer)
    scaler.update()  # in fp16, a skipped step also lowers the loss scale
    optimizer.zero_grad(set_to_none=True)
    return total_loss, finite


def save_atomic(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash or a full
    disk during the save leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint_files(state, out, step, keep):
    """OUT/checkpoint.pth, the state to resume from, and with `keep` > 0 also a snapshot
    OUT/checkpoint-STEP.pth of which the newest `keep` are kept."""
    save_atomic(state, out / "checkpoint.pth")
    if keep > 0:
        save_atomic(state, out / f"checkpoint-{step:07d}.pth")
        for old in sorted(out.glob("checkpoint-*.pth"))[:-keep]:
            old.unlink()


def rng_states(world_size):
    """This process's RNG states, gathered from every rank (a collective when distributed)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()  # as plain data: loads with weights_only
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
             "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(states, rank, world_size, fresh_seed):
    if len(states) != world_size:
        print(f"rank {rank}: the checkpoint holds RNG states of {len(states)} processes, this run has "
              f"{world_size}: drop path continues from seed {fresh_seed}")
        torch.manual_seed(fresh_seed)
        return
    random.setstate(states[rank]["python"])
    kind, keys, position, has_gauss, gauss = states[rank]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states[rank]["torch"])
    if states[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states[rank]["cuda"])


class TrainingLog:
    """OUT/log.jsonl, written by rank 0: every --log-every steps the loss averaged over the interval
    and the ranks, the lr, images/s, the steps skipped for a non-finite gradient and the unreadable
    images left out. Skipped steps change no weight; `max_nonfinite` of them in a row stop the run,
    the last checkpoint intact. More than `max_bad_frac` unreadable images in an epoch stop it too."""

    def __init__(self, path, device, world_size, is_main, max_nonfinite, max_bad_frac, images_per_epoch, checkpoint):
        self.path, self.device, self.world_size, self.is_main = path, device, world_size, is_main
        self.max_nonfinite, self.max_bad_frac, self.checkpoint = max_nonfinite, max_bad_frac, checkpoint
        self.images_per_epoch = images_per_epoch
        self.in_a_row, self.epoch, self.epoch_bad = 0, None, 0
        self.reset()

    def reset(self):
        self.loss, self.steps, self.skipped, self.bad, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def add(self, loss, finite, step, bad_images=0):
        self.bad += bad_images
        if finite:
            self.loss, self.steps, self.in_a_row = self.loss + loss, self.steps + 1, 0
            return
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if self.is_main:
            print(f"step {step}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_nonfinite:
            kept = f"{self.checkpoint} holds the last good state" if self.checkpoint.exists() else "no checkpoint was written"
            raise FloatingPointError(f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                                     f"(--max-nonfinite {self.max_nonfinite}); {kept}. Try --amp bf16 or fp32, or a "
                                     f"lower --lr")

    def write(self, images_per_step, epoch, **fields):
        """Log the interval that ends now; returns the record (on every rank)."""
        loss = torch.as_tensor(self.loss / max(self.steps, 1), dtype=torch.float64, device=self.device)
        totals = torch.stack([loss, torch.tensor(float(self.bad), dtype=torch.float64, device=self.device)])
        if self.world_size > 1:  # the decision to skip is the same on every rank: so is self.steps
            dist.all_reduce(totals)
        loss, bad = totals[0].item() / self.world_size, int(totals[1].item())
        seen = (self.steps + self.skipped) * images_per_step
        if epoch != self.epoch:
            self.epoch, self.epoch_bad = epoch, 0
        self.epoch_bad += bad
        if self.epoch_bad > self.max_bad_frac * self.images_per_epoch:
            raise RuntimeError(f"epoch {epoch}: {self.epoch_bad} of its {self.images_per_epoch} images were unreadable, "
                               f"more than --max-bad-frac {self.max_bad_frac}: the warnings name them; fix or remove "
                               f"them")
        record = dict(fields, epoch=epoch, loss=loss if self.steps else None, skipped=self.skipped, bad_images=bad,
                      img_per_s=seen / (time.perf_counter() - self.start))
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.reset()
        return record


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_resume(path, args, resume_flags, world_size, is_main=True):
    """The checkpoint to resume from, refusing one written by a run with another model or another
    batch (the step count would then mean another place in the data and the schedule). Flags that
    may change (the length, workers, logging) are allowed and reported."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        snapshots = sorted(path.parent.glob("checkpoint-*.pth"))
        offer = (f"the newest snapshot is {snapshots[-1]}: copy it to {path} to resume from it" if snapshots
                 else "no snapshot to fall back on (see --keep); move it away to start afresh")
        raise RuntimeError(f"{path} cannot be read ({str(error).split('.')[0]}); {offer}") from None
    changed = [f"--{k.replace('_', '-')} {state['args'].get(k)} -> {getattr(args, k)}"
               for k in resume_flags if state["args"].get(k) != getattr(args, k)]
    if state["world_size"] != world_size:
        changed.append(f"processes {state['world_size']} -> {world_size}")
    if changed:
        raise ValueError(f"{path} was written by a run with other settings ({'; '.join(changed)}): "
                         f"use another --out, or the same flags to resume")
    allowed = [f"--{k.replace('_', '-')} {v} -> {getattr(args, k)}" for k, v in state["args"].items()
               if k not in resume_flags and hasattr(args, k) and getattr(args, k) != v]
    if allowed and is_main:
        print(f"resuming with changed settings: {'; '.join(allowed)}")
    return state


# ----------------------------------------------------------------------------- main
RESUME_FLAGS = ("teacher", "teacher_weights", "student", "img_size", "batch_size", "accum")


def main(args):
    args = apply_preset(args)
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    if args.workers is None:
        args.workers = default_workers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # the same student initialisation on every rank

    student = build_student(args.student, args.img_size, args.drop_path)
    set_grad_checkpointing(student, args.grad_ckpt)
    teacher = load_teacher(args.teacher, args.teacher_weights, grid=student.grid[0]).to(device)
    is_file = is_main and Path(teacher.source).is_file()  # recorded with the student, for reproducibility
    teacher_info = dict(name=args.teacher, weights=teacher.source, sha256=sha256sum(teacher.source) if is_file else None)
    model = FDStudent(student, teacher.embed_dim).to(device)

    if args.decode_on_device:  # the workers read the files and draw the crops, decode_and_crop does the rest
        read, transform = read_undecoded, FDCropBox(args.img_size, args.min_crop_scale)
    else:
        read, transform = load_rgb, fd_transform(args.img_size, args.min_crop_scale)
    images = image_dataset(args.data, loader=read) if args.data else SyntheticShapes(args.synthetic_images)
    dataset = SeededTransform(images, transform, args.seed)
    loader, sampler = train_loader(dataset, args.batch_size, args.workers, args.seed, rank, world_size,
                                   pin_memory=device.type == "cuda", stack=not args.decode_on_device)
    steps_per_epoch, total_steps, warmup_steps, global_batch, lrs = schedule(args, len(loader), world_size)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lrs["lr"], betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    dtype = autocast_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    prepare_teacher(teacher, dtype)

    step = 0
    checkpoint = out / "checkpoint.pth"
    if checkpoint.exists():
        state = load_resume(checkpoint, args, RESUME_FLAGS, world_size, is_main)
        student.load_state_dict(state["student"])
        model.projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        restore_rng(state["rng"], rank, world_size, fresh_seed=args.seed + rank + step)
        if is_main:
            print(f"resuming from {checkpoint} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)  # each rank its own drop-path draws

    train_model = model
    if world_size > 1:  # the buffers (position index, input statistics) are constants: no need to sync
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    run_teacher = teacher
    if args.compile:
        train_model, run_teacher = torch.compile(train_model), torch.compile(teacher)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    compute_loss = fd_objective(run_teacher, student)
    commit = git_hash()  # recorded in every checkpoint, for reproducibility

    def save_checkpoint():
        rng = rng_states(world_size)  # every rank takes part
        if is_main:
            save_checkpoint_files({"student": student.state_dict(), "projector": model.projector.state_dict(),
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "step": step, "epoch": step // steps_per_epoch, "world_size": world_size,
                         "rng": rng, "args": vars(args), "arch": student.arch, "git": commit,
                         "teacher": teacher_info}, out, step, args.keep)

    if is_main:
        print(f"{world_size} process(es) x {args.batch_size} images x {args.accum} micro-steps = {global_batch} "
              f"images per step; lr {lrs['lr']:.3g} (= {args.lr:g} x {global_batch}/512); "
              f"{total_steps} steps of {steps_per_epoch} per epoch; autocast {dtype or 'off (fp32)'} on {device}")
        weights = f"{teacher.source} (sha256 {teacher_info['sha256']})" if teacher_info["sha256"] else "random weights"
        print(f"teacher {args.teacher}: {weights}, {teacher.encoder.grid[0]}x{teacher.encoder.grid[1]} tokens at "
              f"{teacher.input_size} px")
        print(f"student {args.student} at {args.img_size} px, "
              f"drop path {args.drop_path}, {args.epochs} epochs ({args.warmup_epochs} warmup), crop scale "
              f"{args.min_crop_scale}-1, lr/512 {args.lr:g} (min {args.min_lr:g}, warmup {args.warmup_lr:g})")
    if step >= total_steps and is_main:
        print(f"{checkpoint} is already at step {step} of {total_steps}: nothing to train "
              f"(raise --epochs or use a new --out)")

    progress = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True)
    log = TrainingLog(out / "log.jsonl", device, world_size, is_main, args.max_nonfinite, args.max_bad_frac,
                      steps_per_epoch * global_batch, checkpoint)
    train_model.train()
    # Each step's batch: `accum` micro-batches of (images, labels, unreadable images left out).
    for epoch, batch in steps_of_batches(loader, sampler, dataset, step, steps_per_epoch, total_steps, args.accum):
        micro_batches = [decode_and_crop(images, args.img_size, device) if args.decode_on_device
                         else images.to(device, non_blocking=True) for images, _, _ in batch]
        # The images left out: unreadable files (by the loader), and those decode_and_crop cannot decode.
        bad_images = sum(int(bad) + len(labels) - len(inputs) for (_, labels, bad), inputs in zip(batch, micro_batches))
        lr = lr_at(step, total_steps, warmup_steps, **lrs)
        set_lr(optimizer, lr)
        loss, finite = optimizer_step(train_model, micro_batches, compute_loss, optimizer, scaler, args.clip_grad,
                                      autocast)
        step += 1
        log.add(loss, finite, step, bad_images=bad_images)
        progress.update()
        if step % args.log_every == 0 or step == total_steps:
            record = log.write(global_batch, step=step, epoch=epoch, lr=lr)
            progress.set_postfix(loss=record["loss"], lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.1f}")
        if step % args.save_every == 0 or step == total_steps:
            save_checkpoint()
    progress.close()

    if is_main:
        save_atomic({"arch": student.arch, "model": student.state_dict(), "teacher": teacher_info,
                     "step": step}, out / "student.pth")
        print(f"wrote {out / 'student.pth'} (the distilled student, for finetune.py) and {checkpoint}")
    if world_size > 1:
        dist.destroy_process_group()
    return student


if __name__ == "__main__":
    main(get_args_parser().parse_args())
