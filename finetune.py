"""Fine-tune and evaluate an encoder as in the FD paper (arXiv 2205.14141): the distilled student (after
FD), the teacher itself (before FD, the baseline), or a random ViT (from scratch).

    python distill.py && python finetune.py --init out/distill/student.pth --out out/ft_fd  # after FD
    python finetune.py --init vit_tiny_patch16 --out out/ft_teacher         # before FD: the default teacher
    python finetune.py --out out/ft_scratch                                 # from scratch
    torchrun --nproc_per_node 8 finetune.py --init out/fd_clip/student.pth --data /path/to/imagenet --out out/ft_clip
    python finetune.py --init clip --init-weights FILE --data /path/to/imagenet   # fine-tune a teacher directly
    python finetune.py --eval-only --init out/ft_fd/best.pth                # top-1/top-5 on the val split
    python finetune.py --linear-probe --init out/distill/student.pth --out out/lin_fd

Running the same command again in the same --out resumes from OUT/checkpoint.pth (the last state,
also a model file). OUT/best.pth holds the classifier of the best epoch; OUT/log.jsonl gets train
lines (step, epoch, loss, lr, img_per_s) and one eval line per epoch (top1, top5, loss, images).
"""
import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import v2
from tqdm import tqdm

import training
from data import (SeededTransform, SyntheticShapes, eval_transform, image_dataset, leave_the_process_group,
                  skip_unreadable, steps_of_batches, train_loader)
from models import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_student
from teachers import build_from_arch, encoder_for_finetuning, finetuning_arch, load_model_file, read_encoder

# ----------------------------------------------------------------------------- presets
# The official fine-tuning configs (configs/finetune/*.yaml); lr, min_lr and warmup_lr are
# per 512 images and scale linearly with the global batch. `model` is the architecture trained
# from scratch (no --init); with --init the architecture comes from the loaded encoder.
PAPER_RECIPE = dict(model="vit_base_patch16", img_size=224, epochs=100, warmup_epochs=20, batch_size=128,
                    lr=1.25e-3, min_lr=2.5e-7, warmup_lr=2.5e-7, weight_decay=0.05, layer_decay=0.65,
                    drop_path=0.1)  # layer decay and drop path of the CLIP-B 100-epoch config
RECIPES = {
    "clip": dict(PAPER_RECIPE, layer_decay=0.6, drop_path=0.3),
    "clip_l14": dict(PAPER_RECIPE, model="vit_large_patch14", epochs=50, warmup_epochs=5, lr=2.5e-4, min_lr=5e-7,
                     warmup_lr=5e-7, layer_decay=0.75, drop_path=0.4),
    "dino": dict(PAPER_RECIPE, lr=1.5e-3, layer_decay=0.6, drop_path=0.2),
    "deit": dict(PAPER_RECIPE, layer_decay=0.65, drop_path=0.3),
    "esvit": dict(PAPER_RECIPE, model="swinv2_base_window14", batch_size=64, layer_decay=0.8, drop_path=0.4),
    "paper": PAPER_RECIPE,
    # The built-in default, for the output of distill.py's default: a tiny ViT at 96 px on the synthetic
    # data, about two minutes on a 2-core CPU. A larger lr than the paper's: a few hundred steps, not 100 epochs.
    "vit_tiny_patch16": dict(model="vit_tiny_patch16", img_size=96, epochs=4, warmup_epochs=0.5, batch_size=32, lr=4e-3,
                             min_lr=1e-5, warmup_lr=1e-6, weight_decay=0.05, layer_decay=0.75, drop_path=0.1),
}
DEFAULT_RECIPE = "vit_tiny_patch16"
# --linear-probe (MAE's recipe, main_linprobe.py): frozen encoder, BatchNorm without affine before the
# head, no weight decay, no mixup, smoothing, RandAugment or erasing. MAE uses LARS at 0.1 per 256 images;
# we use SGD with momentum 0.9 at that lr: LARS's per-layer trust ratio matters little for one linear layer.
LINEAR_PROBE = dict(lr=0.2, min_lr=0.0, warmup_lr=0.0, weight_decay=0.0, layer_decay=1.0, drop_path=0.0,
                    mixup=0.0, cutmix=0.0, smoothing=0.0, randaug_ops=0, reprob=0.0)
AUGMENTATION = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, randaug_ops=2, reprob=0.25)  # all recipes
FROM_RECIPE = " (unset: from the recipe)"


def get_args_parser():
    p = argparse.ArgumentParser("finetune.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--init", help="what to fine-tune: a distilled student.pth or distill checkpoint.pth, a model "
                   "file this project wrote, or a teacher name (clip, dino, vit_tiny_patch16, ...); from scratch if "
                   "not given")
    p.add_argument("--init-weights", help="weights file for a teacher named by --init")
    p.add_argument("--recipe", choices=list(RECIPES), help="fine-tuning recipe [unset: the --init teacher's, or the "
                   f"teacher the --init file was distilled from, else {DEFAULT_RECIPE}]")
    p.add_argument("--model", help="architecture trained from scratch" + FROM_RECIPE)
    p.add_argument("--data", help="ImageFolder root with train/ and val/; the built-in synthetic dataset if not given")
    p.add_argument("--synthetic-images", type=training.POSITIVE, default=2048,
                   help="training images of the built-in dataset")
    p.add_argument("--synthetic-val-images", type=training.POSITIVE, default=500,
                   help="validation images of the built-in dataset")
    p.add_argument("--out", default="out/finetune", help="output folder; rerunning in it resumes")
    training.add_schedule_flags(p, FROM_RECIPE)
    p.add_argument("--weight-decay", type=training.NON_NEGATIVE, help="AdamW weight decay (not on biases, norms, "
                   "LayerScale, class token, position tables)" + FROM_RECIPE)
    p.add_argument("--layer-decay", type=training.number(float, 0.0, 1.0, open_low=True), help="layer-wise lr decay: "
                   "block i of L gets decay^(L-i), the patch embedding decay^(L+1)" + FROM_RECIPE)
    p.add_argument("--drop-path", type=training.number(float, 0.0, 1.0, open_high=True),
                   help="drop path rate" + FROM_RECIPE)
    p.add_argument("--clip-grad", type=training.number(float, 0.0, open_low=True), default=5.0,
                   help="max gradient norm (the official config.py default)")
    p.add_argument("--img-size", type=training.POSITIVE, help="training and evaluation crop; position tables are "
                   "resized to it" + FROM_RECIPE)
    for flag, kind, text in (
            ("--smoothing", training.number(float, 0.0, 1.0, open_high=True), "label smoothing"),
            ("--mixup", training.NON_NEGATIVE, "mixup alpha, 0 = off"),
            ("--cutmix", training.NON_NEGATIVE, "cutmix alpha, 0 = off; with mixup, one of the two per batch "
                                                "(p = 0.5)"),
            ("--randaug-ops", training.number(int, 0), "RandAugment ops per image (magnitude 9), 0 = off"),
            ("--reprob", training.number(float, 0.0, 1.0), "random erasing probability")):
        default = AUGMENTATION[flag[2:].replace("-", "_")]  # as the recipes set it
        p.add_argument(flag, type=kind, help=f"{text} [{default}; 0 with --linear-probe]")
    p.add_argument("--linear-probe", action="store_true", help="train only a BatchNorm + linear head on the frozen "
                   "encoder (SGD, see LINEAR_PROBE)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the classifier file given by --init and exit")
    training.add_run_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the head's init, the data order and augmentation")
    return p


def recipe_of(init):
    """The recipe for an --init: a teacher's own, or that of the teacher a file was distilled from."""
    if init is None or init in RECIPES:
        return init or DEFAULT_RECIPE
    try:  # mmap: reads the few plain-data keys, not the weights
        state = torch.load(init, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a teacher name without a recipe, or a file read_encoder reports on
        return "paper"
    teacher = state.get("teacher") or state.get("args", {}).get("teacher")  # distill's files: a dict per teacher
    teacher = teacher[0] if isinstance(teacher, list) else teacher  # (a dict before): the first one's, as distill's
    name = state.get("recipe") or (teacher.get("name") if isinstance(teacher, dict) else teacher)
    return name if name in RECIPES else "paper"


def apply_recipe(args):
    """Fill every flag left unset from the recipe (and, with --linear-probe, from LINEAR_PROBE)."""
    args.recipe = args.recipe or recipe_of(args.init)
    values = {**RECIPES[args.recipe], **AUGMENTATION, **(LINEAR_PROBE if args.linear_probe else {})}
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------- the classifier
def build_classifier(args, num_classes, verbose=True):
    """The classifier to fine-tune, with the --init encoder loaded into it. Loading is strict except
    for what the recipe replaces, and says what it loaded and replaced."""
    if args.init is None:  # the FD student's architecture and initialisation, per-block tables as after distillation
        arch = build_student(args.model, args.img_size, args.drop_path).arch
    else:
        arch, source, description = read_encoder(args.init, args.init_weights)
        state = encoder_for_finetuning(source, arch, args.img_size)
    model = Classifier(build_from_arch(finetuning_arch(arch, args.img_size, args.drop_path)), num_classes,
                       args.linear_probe)
    if args.init is None:
        if verbose:
            print(f"init: none, a random {args.model} (from scratch)")
        return model
    result = model.load_state_dict({"encoder." + k: v for k, v in state.items()}, strict=False)
    new = [k for k in result.missing_keys if k.startswith(("fc_norm.", "head."))]
    missing = [k for k in result.missing_keys if k not in new]
    if missing or result.unexpected_keys:
        raise ValueError(f"--init {args.init}: {description} does not fit the classifier built from its arch; "
                         f"missing keys: {missing or 'none'}; unexpected keys: {result.unexpected_keys or 'none'}")
    if verbose:
        tables = sum(k.endswith("relative_position_bias_table") for k in state)
        resized = [f"{tables} relative position tables"] * bool(tables) + ["pos_embed"] * ("pos_embed" in state)
        resized = (f"resized from {arch['img_size']} to {args.img_size} px: {', '.join(resized) or 'nothing'}"
                   if arch["img_size"] != args.img_size else f"no resizing (at {args.img_size} px already)")
        print(f"init: {description}: loaded {len(state)} encoder tensors, all the classifier needs but its head")
        print(f"  replaced by the recipe: removed {sorted(set(source) - set(state)) or 'nothing'}; "
              f"added {len(set(state) - set(source))} per-block relative position tables; {resized}; "
              f"new: {', '.join(new)}")
    return model


# ----------------------------------------------------------------------------- data and objective
def train_transform(args):
    """RandomResizedCrop + flip + RandAugment, then random erasing, all bicubic (timm's
    create_transform as the official code uses it). Output in [0, 1] (models normalise themselves)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    steps = [transforms.RandomResizedCrop(args.img_size, scale=(0.08, 1.0), interpolation=bicubic),
             transforms.RandomHorizontalFlip()]
    if args.randaug_ops:
        # timm's 'rand-m9' (the official config) is 9 of 10 levels; torchvision's default 31 bins would
        # make magnitude 9 a third as strong. (timm also fires each op with probability 0.5.)
        steps.append(transforms.RandAugment(args.randaug_ops, magnitude=9, num_magnitude_bins=11,
                                            interpolation=bicubic))
    steps.append(transforms.ToTensor())
    if args.reprob:
        # timm erases with per-pixel normal noise in normalised space: erase between a normalise and its inverse.
        inverse = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], [1 / s for s in IMAGENET_STD]
        steps += [transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
                  transforms.RandomErasing(args.reprob, value="random"), transforms.Normalize(*inverse)]
    return transforms.Compose(steps)


def labelled_splits(args):
    """The untransformed train and val datasets, refusing splits with different classes."""
    if args.data is None:
        return SyntheticShapes(args.synthetic_images), SyntheticShapes(args.synthetic_val_images, split="val")
    if not (Path(args.data) / "val").is_dir():
        raise FileNotFoundError(f"--data {args.data}: no val/ folder (fine-tuning needs train/ and val/)")
    train, val = image_dataset(args.data, "train", labelled=True), image_dataset(args.data, "val", labelled=True)
    if train.classes != val.classes:
        only = [sorted(set(a.classes) - set(b.classes)) or "none" for a, b in ((train, val), (val, train))]
        raise ValueError(f"--data {args.data}: train/ and val/ have different classes (only in train/: {only[0]}; "
                         f"only in val/: {only[1]})")
    return train, val


def mixup_cutmix(args, num_classes):
    """Mixup or CutMix, one of the two per batch with probability 0.5 (timm's Mixup as the official code sets it);
    None when both are off."""
    mixers = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup else []) + (
        [v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix else [])
    return v2.RandomChoice(mixers) if mixers else None


def soft_targets(images, labels, num_classes, mixer, smoothing):
    """Images (B, 3, H, W) and labels (B,) -> mixed images and target distributions (B, classes),
    each summing to 1: one-hot or mixed, then label-smoothed (smoothing commutes with mixing)."""
    images, targets = mixer(images, labels) if mixer is not None else (images, F.one_hot(labels, num_classes).float())
    return images, targets * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits, targets):
    """Cross-entropy with target distributions, averaged over the batch, in fp32."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def layer_decay_scale(arch, decay):
    """lr_scale(name) for a Classifier of an encoder `arch` (the official optimizer.py): decay^(depth+1-id)
    with layer id 0 before the blocks (embeddings, CLIP's ln_pre, DINOv2's registers), i+1 for block
    i, depth+1 after (fc_norm, head). Swin counts blocks across stages; patch merging joins the last."""
    depths = arch.get("depths") or [arch["depth"]]
    depth = sum(depths)

    def layer_id(name):
        parts = name.removeprefix("encoder.").split(".")
        if parts[0] in ("cls_token", "pos_embed", "patch_embed", "norm_pre", "reg_tokens"):
            return 0
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        if parts[0] == "layers":  # layers.STAGE.blocks.BLOCK or layers.STAGE.downsample
            stage, before = int(parts[1]), sum(depths[:int(parts[1])])
            return before + int(parts[3]) + 1 if parts[2] == "blocks" else before + depths[stage]
        return depth + 1
    return lambda name: decay ** (depth + 1 - layer_id(name))


# ----------------------------------------------------------------------------- evaluation
def topk_correct(logits, labels, ks=(1, 5)):
    """How many of the labels are among the top-k logits, for each k: a float64 tensor (len(ks),)."""
    hits = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices == labels[:, None]  # (B, kmax)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).double()


def val_loader(dataset, batch_size, workers, rank, world_size):
    """Every validation image exactly once over all ranks: rank r takes images r, r + world, ...
    (DistributedSampler would pad the last shard with repeats)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), world_size),
                      num_workers=workers, collate_fn=skip_unreadable, worker_init_fn=leave_the_process_group,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate(model, loader, device, autocast, world_size):
    """Top-1, top-5 (%) and cross-entropy over the whole validation set, summed over the ranks, with the ranks'
    BatchNorm statistics averaged (the linear probe's); every module left in the mode it was in."""
    modes = {module: module.training for module in model.modules()}  # a linear probe's frozen encoder stays in eval
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d) and world_size > 1):
        for buffer in (norm.running_mean, norm.running_var):
            dist.all_reduce(buffer)
            buffer /= world_size
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, summed loss, images
    batches = torch.tensor(len(loader), device=device)
    if world_size > 1:  # under FSDP every forward is a collective: a rank with a batch less runs an empty one
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    for images, labels, _ in loader:  # unreadable images are left out, with a warning
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="sum").double()
        totals += torch.cat([topk_correct(logits, labels), torch.stack([loss, loss.new_tensor(len(labels))])])
    for _ in range(int(batches) - len(loader)):
        with autocast:
            model(torch.zeros(1, 3, *(model.arch["encoder"]["img_size"],) * 2, device=device))
    for module, mode in modes.items():
        module.train(mode)
    if world_size > 1:  # float64 counts are exact: every image counted once, on one rank
        dist.all_reduce(totals)
    top1, top5, loss, count = totals.tolist()
    return dict(top1=100 * top1 / count, top5=100 * top5 / count, loss=loss / count, images=int(count))


# ----------------------------------------------------------------------------- main
RESUME_FLAGS = ("init", "init_weights", "recipe", "model", "img_size", "linear_probe", "seed")  # and the global batch


def evaluate_file(args, val_images, num_classes, device, autocast, rank, world_size):
    """--eval-only: the classifier file --init (OUT/best.pth, OUT/checkpoint.pth) at its own resolution; returns
    (classifier, evaluation)."""
    if args.init is None or not Path(args.init).is_file():
        raise ValueError("--eval-only needs --init FILE, a fine-tuned classifier such as OUT/best.pth")
    model = load_model_file(args.init).to(device)
    if not isinstance(model, Classifier):
        raise ValueError(f"--eval-only: {args.init} holds an encoder without a head: fine-tune it first")
    if model.arch["num_classes"] != num_classes:
        raise ValueError(f"--eval-only: {args.init} has {model.arch['num_classes']} classes, the data {num_classes}")
    img_size = model.arch["encoder"]["img_size"]
    val = val_loader(SeededTransform(val_images, eval_transform(img_size)), args.batch_size, args.workers, rank,
                     world_size)
    metrics = evaluate(model, val, device, autocast, world_size)
    if rank == 0:
        print(f"{args.init} at {img_size} px: top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% "
              f"loss {metrics['loss']:.4f} on {metrics['images']} images")
    return model, metrics


def main(args):
    """Fine-tune (or with --eval-only, evaluate); returns (classifier, the last evaluation)."""
    start = time.perf_counter()  # for "done in": loading and evaluation too
    args = apply_recipe(args)
    rank, world_size, device = training.setup_distributed(args.device)
    is_main = rank == 0
    dtype = training.autocast_dtype(args.amp, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    train_images, val_images = labelled_splits(args)
    num_classes = len(train_images.classes)
    if is_main:
        print("data: " + "; ".join(split.summary for split in (train_images, val_images)))
    if args.eval_only:
        return evaluate_file(args, val_images, num_classes, device, autocast, rank, world_size)

    out = Path(args.out)
    training.lock_out(out, is_main)
    if args.fsdp and args.linear_probe:
        raise ValueError("--fsdp fine-tunes the whole classifier: it does not take --linear-probe")
    torch.manual_seed(args.seed)  # the same head initialisation on every rank
    state = training.resume(out, args, RESUME_FLAGS, world_size, is_main)
    model = build_from_arch(state["arch"]) if state else build_classifier(args, num_classes, verbose=is_main)
    if args.linear_probe:  # the rest of a model just built is in train mode
        model.encoder.requires_grad_(False).eval()  # frozen: no drop path either
    model.to(device)

    dataset = SeededTransform(train_images, train_transform(args), args.seed)
    loader = train_loader(dataset, args.batch_size, args.workers, args.seed, rank, world_size,
                          pin_memory=device.type == "cuda")
    val = val_loader(SeededTransform(val_images, eval_transform(args.img_size)), args.batch_size, args.workers, rank,
                     world_size)
    plan = training.schedule(args, len(loader), world_size)

    train_model = training.wrap_model(model, device, world_size, args.fsdp, dtype)  # DDP, FSDP2, or the model itself
    lr_scale = layer_decay_scale(model.encoder.arch, args.layer_decay)  # a decay of 1 scales every lr by 1
    groups = training.param_groups(model, args.weight_decay, lr_scale)
    optimizer = (torch.optim.SGD(groups, lr=plan.lrs["lr"], momentum=0.9) if args.linear_probe else
                 torch.optim.AdamW(groups, lr=plan.lrs["lr"], betas=(0.9, 0.999), fused=device.type == "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = training.restore(state, model, optimizer, scaler, {"model": model}, rank, world_size, args.seed)
    best = state["best"] if state else dict(top1=-1.0, epoch=-1)
    if args.compile:
        train_model = torch.compile(train_model)
    mixer = mixup_cutmix(args, num_classes)
    record = dict(arch=model.arch, recipe=args.recipe, init=args.init, git=training.git_hash())
    if is_main:
        print(training.describe(args, plan, world_size, dtype, device))
        scales = ", ".join(f"{s:.3g}" for s in sorted({g["lr_scale"] for g in groups}))
        print(f"recipe {args.recipe}{' (linear probe)' if args.linear_probe else ''}: "
              f"{training.count(num_classes, 'class')} at {args.img_size} px, {training.count(args.epochs, 'epoch')} "
              f"({args.warmup_epochs} warmup), layer decay {args.layer_decay} (lr scales {scales}), drop path "
              f"{args.drop_path}, mixup {args.mixup}, cutmix {args.cutmix}, smoothing {args.smoothing}, "
              f"RandAugment {args.randaug_ops} ops, erasing {args.reprob}")
        if step >= plan.total_steps:
            print(f"{state['source']} is already at step {step} of {plan.total_steps}: nothing to train")

    progress = tqdm(total=plan.total_steps, initial=step, disable=not is_main, dynamic_ncols=True)
    log = training.TrainingLog(out, args, plan, device, world_size, is_main, start_step=step)
    metrics = None
    # Each step's batch: `accum` micro-batches of (images, labels, unreadable images left out).
    for epoch, batch in steps_of_batches(loader, step, plan.steps_per_epoch, plan.total_steps, args.accum):
        lr = plan.lr(step)
        for group in optimizer.param_groups:  # layer-wise decay: each group its own scale of the lr
            group["lr"] = lr * group["lr_scale"]
        loss = 0.0
        for i, (images, labels, _) in enumerate(batch):
            images, targets = soft_targets(images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                           num_classes, mixer, args.smoothing)
            # As in distill.py: gradients all-reduced on the last micro-batch only, non-finite steps skipped.
            with training.gradient_sync(train_model, enabled=i == len(batch) - 1):
                with autocast:
                    micro_loss = soft_cross_entropy(train_model(images), targets)
                scaler.scale(micro_loss / len(batch)).backward()
            loss += micro_loss.detach() / len(batch)
        scaler.unscale_(optimizer)
        finite = bool(torch.isfinite(nn.utils.clip_grad_norm_(train_model.parameters(), args.clip_grad)))
        if finite:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.add(loss, finite, step, epoch, bad_images=sum(int(b[2]) for b in batch))
        progress.update()
        is_epoch_end = step % plan.steps_per_epoch == 0 or step == plan.total_steps  # the run's end: within an epoch
        if step % args.log_every == 0 or is_epoch_end:
            logged = log.write(step=step, epoch=epoch, lr=lr)
            progress.set_postfix(loss=logged["loss"], lr=f"{lr:.2e}", img_s=f"{logged['img_per_s']:.1f}")
        if is_epoch_end:
            metrics = evaluate(model, val, device, autocast, world_size)
            log.write_line(step=step, epoch=epoch, **metrics)
            if metrics["top1"] > best["top1"]:  # the same on every rank: the metrics are all-reduced
                best = dict(metrics, epoch=epoch)
                training.save_model_file(out / "best.pth", model, is_main, **record, step=step, **best)
            if is_main:
                progress.write(f"epoch {epoch + 1}/{args.epochs}: top-1 {metrics['top1']:.2f}% top-5 "
                               f"{metrics['top5']:.2f}% val loss {metrics['loss']:.4f} on {metrics['images']} images; "
                               f"best top-1 {best['top1']:.2f}% (epoch {best['epoch'] + 1})")
        stop = training.stop_requested(world_size, device)  # SIGTERM or Ctrl-C: save this step, then leave
        if is_epoch_end or step % plan.save_every == 0 or stop:  # the resume state; unsharded, also a model file
            meta = dict(record, step=step, epoch=step // plan.steps_per_epoch, best=best)
            training.save(out, args, model, optimizer, scaler, {"model": model}, meta, world_size, is_main)
        if stop:
            raise training.Stopped(stop, step)
    progress.close()
    if is_main:
        print(f"done in {time.perf_counter() - start:.0f} s: best top-1 {best['top1']:.2f}% "
              f"({out / 'best.pth'}), last state {log.checkpoint}")
    return model, metrics


if __name__ == "__main__":
    training.run_cli(main, get_args_parser().parse_args())
