"""Feature Distillation (Wei et al., 2022, arXiv 2205.14141): train a fresh ViT student to predict
the whitened output feature map of a frozen pretrained teacher.

    python distill.py                                    # built-in default: tiny random teacher, synthetic data, CPU
    python distill.py --teacher clip --data /path/to/imagenet
    torchrun --nproc_per_node 8 distill.py --teacher clip --data /path/to/imagenet --out out/fd_clip
    python distill.py --teacher clip,dinov2_vitb14 --teacher-loss-weights 1,0.5 --data /path/to/imagenet

Running the same command again in the same --out resumes from OUT/checkpoint.pth. The distilled
encoder alone is written to OUT/student.pth, the input of finetune.py.

Reading order: the recipes and flags; the FD objective (the projector, whitening, the target, the
smooth-L1 loss); main, with the training step written out. The student and the teacher wrapper
are in models.py, the published teachers in teachers.py, the run's state (resume, save, the log,
DDP or FSDP2) shared with finetune.py in training.py.
"""
import argparse
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import training
from data import (FDCropBox, SeededTransform, SyntheticShapes, decode_and_crop, fd_transform, image_dataset,
                  load_rgb, read_undecoded, steps_of_batches, train_loader)
from models import build_student, parse_vit_name, set_grad_checkpointing
from teachers import add_teacher_flags, load_teachers

# ----------------------------------------------------------------------------- presets
# The official distillation recipes (the official configs/pretrain/*.yaml); every value can be overridden by its flag.
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
    p = argparse.ArgumentParser("distill.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_teacher_flags(p, DEFAULT_TEACHER)
    p.add_argument("--student", default=None, help="student architecture, e.g. vit_base_patch16" + FROM_PRESET)
    p.add_argument("--data", default=None, help="ImageFolder root (train/ used if present) or a flat folder of "
                                                "images; the built-in synthetic dataset if not given")
    p.add_argument("--synthetic-images", type=training.POSITIVE, default=2048, help="size of the built-in dataset")
    p.add_argument("--out", default="out/distill", help="output folder; rerunning in it resumes")
    training.add_schedule_flags(p, FROM_PRESET)
    p.add_argument("--weight-decay", type=training.NON_NEGATIVE, default=0.05, help="AdamW weight decay (not on "
                   "biases, norms, LayerScale, class token, position tables)")
    p.add_argument("--clip-grad", type=training.number(float, 0.0, open_low=True), default=3.0,
                   help="max gradient norm")
    p.add_argument("--drop-path", type=training.number(float, 0.0, 1.0, open_high=True), default=None,
                   help="student drop path rate" + FROM_PRESET)
    p.add_argument("--min-crop-scale", type=training.number(float, 0.0, 1.0, open_low=True), default=None,
                   help="RandomResizedCrop min scale" + FROM_PRESET)
    p.add_argument("--img-size", type=training.POSITIVE, default=None, help="crop size seen by teacher and student" +
                   FROM_PRESET)
    training.add_run_flags(p)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the student's blocks: "
                   "less memory (large students, large batches) for about a third more compute")
    p.add_argument("--decode-on-device", action="store_true", help="decode (nvJPEG on a GPU), crop and resize on "
                   "the training device, the workers only read files: for runs whose workers cannot keep up "
                   "(--workers x the img/s of `python bench.py --data-pipeline` < the run's img/s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the student's init, the data order and augmentation")
    return p


def apply_preset(args):
    """Fill every flag left unset from the (first) teacher's preset. A teacher without one gets the paper's
    recipe, with a student of the teacher's own size when the teacher is a plain ViT."""
    first = args.teacher.split(",")[0]
    preset = PRESETS.get(first) or dict(
        PAPER_RECIPE, drop_path=0.1, student=first if first.startswith("vit_") else "vit_base_patch16")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    patch = parse_vit_name(args.student)[1] if args.student.startswith("vit_") else 1  # Swin checks its own stages
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the student's patch size {patch}")
    return args


# ----------------------------------------------------------------------------- the FD objective
class FDStudent(nn.Module):
    """What FD trains: the student and, per teacher, a projector mapping its tokens to that teacher's width
    (the paper's 1x1 convolution, i.e. a Linear over channels). The projectors are the row blocks of one
    Linear, in teacher order: the functions and gradients of one Linear each, in one matrix product, and for
    one teacher the projector as ever. Only this is wrapped in DDP and saved; the frozen teachers never are."""

    def __init__(self, student, teacher_dims):
        super().__init__()
        self.student, self.teacher_dims = student, list(teacher_dims)
        self.projector = nn.Linear(student.embed_dim, sum(teacher_dims))

    def forward(self, images):
        return self.projector(self.student(images)).split(self.teacher_dims, dim=-1)  # per teacher (B, [1 +] N, C)


def whiten(tokens):
    """The paper's whitening: a LayerNorm without scale or bias, i.e. every token standardised over
    its channels (not a decorrelation), so that teachers of any feature scale give targets of one
    scale (models/feature_distillation.py: nn.LayerNorm(dim, elementwise_affine=False))."""
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5)


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
    norm, whitened. The class token is kept when `with_cls`."""
    tokens = teacher(images).float()  # fp32 before the norm: a teacher may run in fp16
    prefix = teacher.num_prefix_tokens
    return whiten(torch.cat([tokens[:, :prefix if with_cls else 0], resize_tokens(tokens[:, prefix:], grid)], dim=1))


def fd_loss(prediction, target, beta=2.0):
    """Smooth L1 with beta 2 between the projected student tokens and the target, both (B, T, C),
    averaged over batch, tokens and channels (models/feature_distillation.py)."""
    return F.smooth_l1_loss(prediction.float(), target, beta=beta)


# ----------------------------------------------------------------------------- main
# The teacher's file is compared by its SHA-256, not its path: a file moved or copied may resume.
# The global batch is compared as such: the number of processes may change (training.resume).
RESUME_FLAGS = ("teacher", "teacher_mean", "teacher_std", "student", "img_size", "seed")


def main(args):
    args = apply_preset(args)
    rank, world_size, device = training.setup_distributed(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed)  # the same student initialisation on every rank

    # The models: the student with a projector per teacher (trained), the teachers (frozen, never saved).
    student = build_student(args.student, args.img_size, args.drop_path)
    set_grad_checkpointing(student, args.grad_ckpt)
    teachers, teacher_info, loss_weights = load_teachers(args, student.grid[0], device, is_main)
    model = FDStudent(student, [teacher.embed_dim for teacher in teachers]).to(device)
    with_cls = [student.num_prefix_tokens > 0 and teacher.num_prefix_tokens > 0 for teacher in teachers]  # not Swin
    out = Path(args.out)  # created only now: a teacher that cannot be loaded leaves nothing behind
    training.lock_out(out, is_main)

    # The data: random resized crops and flips, the same view for teacher and student.
    if args.decode_on_device:  # the workers read the files and draw the crops, decode_and_crop does the rest
        read, transform = read_undecoded, FDCropBox(args.img_size, args.min_crop_scale)
    else:
        read, transform = load_rgb, fd_transform(args.img_size, args.min_crop_scale)
    images = image_dataset(args.data, loader=read) if args.data else SyntheticShapes(args.synthetic_images)
    dataset = SeededTransform(images, transform, args.seed)
    loader = train_loader(dataset, args.batch_size, args.workers, args.seed, rank, world_size,
                          pin_memory=device.type == "cuda", stack=not args.decode_on_device)
    plan = training.schedule(args, len(loader), world_size)

    dtype = training.autocast_dtype(args.amp, device)
    train_model = training.wrap_model(model, device, world_size, args.fsdp, dtype)  # DDP, FSDP2, or the model itself
    optimizer = torch.optim.AdamW(training.param_groups(model, args.weight_decay), lr=plan.lrs["lr"],
                                  betas=(0.9, 0.999), fused=device.type == "cuda")  # after sharding: FSDP2's shards
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only; bf16 needs none
    for teacher in teachers:
        teacher.compute_in(dtype)
    state = training.resume(out, args, RESUME_FLAGS, world_size, is_main, student.arch, teacher_info)
    parts = {"student": student, "projector": model.projector}  # the keys of OUT/checkpoint.pth
    step = training.restore(state, model, optimizer, scaler, parts, rank, world_size, args.seed)
    run_teachers = teachers
    if args.compile:
        train_model, run_teachers = torch.compile(train_model), [torch.compile(teacher) for teacher in teachers]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    record = dict(arch=student.arch, git=training.git_hash(), teacher=teacher_info, data=images.summary)

    if is_main:
        print(training.describe(args, plan, world_size, dtype, device))
        print(f"data: {images.summary}")
        print(f"student {args.student} at {args.img_size} px, drop path {args.drop_path}, "
              f"{training.count(args.epochs, 'epoch')} ({args.warmup_epochs} warmup), crop scale "
              f"{args.min_crop_scale}-1, lr/512 {args.lr:g} (min {args.min_lr:g}, warmup {args.warmup_lr:g})")
        if step >= plan.total_steps:
            print(f"{out} holds step {step} of {plan.total_steps} already: nothing to train "
                  f"(raise --epochs or use a new --out)")

    progress = tqdm(total=plan.total_steps, initial=step, disable=not is_main, dynamic_ncols=True)
    log = training.TrainingLog(out, args, plan, device, world_size, is_main, start_step=step)
    train_model.train()
    # Each step: `accum` micro-batches of (images, labels, unreadable images left out), resuming mid-epoch.
    for epoch, batch in steps_of_batches(loader, step, plan.steps_per_epoch, plan.total_steps, args.accum):
        micro_batches = [decode_and_crop(images, args.img_size, device) if args.decode_on_device
                         else images.to(device, non_blocking=True) for images, _, _ in batch]
        lr = plan.lr(step)  # a pure function of the step
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = 0.0  # the loss, then its term for each teacher
        for i, images in enumerate(micro_batches):
            # Gradients are all-reduced (DDP) or reduce-scattered (FSDP) in the last micro-batch's backward only.
            with training.gradient_sync(train_model, enabled=i == len(micro_batches) - 1):
                with autocast:
                    terms = []
                    for teacher, prediction, cls in zip(run_teachers, train_model(images), with_cls):
                        target = distillation_target(teacher, images, student.grid, cls)  # (B, T, C)
                        terms.append(fd_loss(prediction[:, prediction.shape[1] - target.shape[1]:], target))
                    micro_loss = sum(weight * term for weight, term in zip(loss_weights, terms))
                scaler.scale(micro_loss / len(micro_batches)).backward()
            losses += torch.stack([micro_loss, *terms]).detach() / len(micro_batches)
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
        grad_norm = nn.utils.clip_grad_norm_(train_model.parameters(), args.clip_grad)
        # A NaN or inf loss or gradient skips the step, on every rank alike: the gradients were all-reduced.
        finite = bool(torch.isfinite(grad_norm))  # one synchronisation per step, as GradScaler's own check
        if finite:
            scaler.step(optimizer)
        scaler.update()  # in fp16, a skipped step also lowers the loss scale
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # The images left out: unreadable files (by the loader), and those decode_and_crop cannot decode.
        bad_images = sum(int(bad) + len(labels) - len(inputs) for (_, labels, bad), inputs in zip(batch, micro_batches))
        log.add(losses, finite, step, epoch, bad_images)
        progress.update()
        if step % args.log_every == 0 or step == plan.total_steps:
            logged = log.write(step=step, epoch=epoch, lr=lr)
            terms = {info["name"]: f"{term:.3g}" for info, term in zip(teacher_info, logged.get("loss_terms", []))
                     if len(teacher_info) > 1}  # one teacher's term is the loss
            progress.set_postfix(loss=logged["loss"], **terms, lr=f"{lr:.2e}", img_s=f"{logged['img_per_s']:.1f}")
        stop = training.stop_requested(world_size, device)  # SIGTERM or Ctrl-C: save this step, then leave
        if step % plan.save_every == 0 or step == plan.total_steps or stop:
            meta = dict(record, step=step, epoch=step // plan.steps_per_epoch)
            training.save(out, args, model, optimizer, scaler, parts, meta, world_size, is_main)
        if stop:
            raise training.Stopped(stop, step)
    progress.close()

    training.save_model_file(out / "student.pth", model, is_main, prefix="student.", **record, step=step)
    if is_main:
        print(f"wrote {out / 'student.pth'} (the distilled student, for finetune.py) and its checkpoint")
    return student


if __name__ == "__main__":
    training.run_cli(main, get_args_parser().parse_args())
