"""Benchmark the FD training step and the fine-tuning step: images/s, step time, peak memory and,
on a GPU, model FLOPs utilisation. The steps use the modules, loss and optimizer of distill.py and finetune.py.

    python bench.py --compare                 # ViT-S/16 student + CLIP-style ViT-S teacher, 224 px, batch 16:
                                              # tuned against plain fp32 eager, in one process
    python bench.py --student vit_base_patch16 --teacher clip --batch-size 128 --amp bf16 --compile
    python bench.py --step finetune --student vit_base_patch16 --batch-size 64
    python bench.py --student vit_base_patch16 --teacher clip,dinov2_vitb14 --batch-size 128 --amp bf16
    python bench.py --data-pipeline           # decoding + the FD transform alone, per worker
    python bench.py --student vit_large_patch14 --teacher clip_l14 --amp bf16 --max-batch 1024 [--grad-ckpt]

Teachers get random weights (no download). The last line printed is machine-readable:
    distill img/s=... step_ms=... peak_mem_mb=... mfu=... ratio=...
"""
import argparse
import copy
import gc
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data import (FDCropBox, SeededTransform, decode_and_crop, fd_transform, image_dataset, read_undecoded,
                  skip_unreadable)
from models import Classifier, Teacher, build_student, parse_vit_name, set_grad_checkpointing
from teachers import OPENAI_CLIP, build_from_arch, load_teacher, teacher_arch
from training import POSITIVE, autocast_dtype, number, param_groups, run_cli

# Dense bf16 peak of the cards we quote MFU for, in TFLOP/s (without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
BACKENDS = {"auto": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def get_args_parser():
    p = argparse.ArgumentParser("bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", choices=["distill", "finetune"], default="distill",
                   help="the step timed: distill.py's (teacher + student) or finetune.py's (classifier)")
    p.add_argument("--student", default="vit_small_patch16", help="the student (or classifier encoder) architecture")
    p.add_argument("--teacher", default="clip_vit_small_patch16",
                   help="a published teacher (random weights), a plain ViT name, or clip_vit_<size>_patch<P>: "
                        "a ViT with OpenAI CLIP's options (QuickGELU, ln_pre); several, comma-separated, together")
    p.add_argument("--img-size", type=POSITIVE, default=224, help="input resolution")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="images per step")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype, as distill.py's --amp")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's models")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in the student's blocks")
    p.add_argument("--attn", choices=list(BACKENDS), default="auto", help="SDPA kernel (auto: PyTorch's choice)")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps")
    p.add_argument("--warmup", type=number(int, 0), default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compare", action="store_true", help="also run plain fp32 eager in the same process")
    p.add_argument("--max-batch", type=POSITIVE, default=None, metavar="LIMIT",
                   help="on a GPU: find the largest batch up to LIMIT that fits in memory (doubling from "
                        "--batch-size, then bisection to a multiple of 8) and time that")
    p.add_argument("--data-pipeline", action="store_true", help="time decoding and the FD transform instead")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch threads on the CPU [all cores]")
    return p


def bench_teacher(name, grid):
    if name.startswith("clip_vit_"):
        return Teacher(build_from_arch(teacher_arch(*parse_vit_name(name[5:]), img_size=grid * int(name.split("patch")[1]),
                                                    **OPENAI_CLIP)))
    return load_teacher(name, "random", grid=grid)


def make_step(cfg, device):
    """step(images): one optimizer step as distill.py (or finetune.py) takes it, on models built
    here: the same modules, loss and optimizer, one micro-batch (test_bench.py checks that its loss is
    distill.py's)."""
    torch.manual_seed(0)
    student = build_student(cfg.student, cfg.img_size, drop_path=0.1)
    set_grad_checkpointing(student, cfg.grad_ckpt)
    dtype = autocast_dtype(cfg.amp, device)
    if cfg.step == "distill":
        teachers = [bench_teacher(name, student.grid[0]).to(device).compute_in(dtype)
                    for name in cfg.teacher.split(",")]
        if any(student.num_prefix_tokens != teacher.num_prefix_tokens for teacher in teachers):
            raise ValueError("bench.py times ViT students with ViT teachers: every token is in the loss")
        widths = [teacher.embed_dim for teacher in teachers]
        model = nn.Sequential(student, nn.Linear(student.embed_dim, sum(widths))).to(device)  # + the projectors
        run_model, run_teachers = (torch.compile(model), list(map(torch.compile, teachers))) if cfg.compile else (
            model, teachers)

        def compute_loss(images):  # distill.py: smooth-L1 (beta 2) to each teacher's whitened tokens, equal weights
            losses = []
            for teacher, prediction in zip(run_teachers, run_model(images).float().split(widths, dim=-1)):
                with torch.no_grad():
                    target = F.layer_norm(teacher(images).float(), prediction.shape[-1:], eps=1e-5)
                losses.append(F.smooth_l1_loss(prediction, target, beta=2.0))
            return sum(losses) / len(losses)
    else:
        model = Classifier(student, num_classes=1000).to(device)
        run_model = torch.compile(model) if cfg.compile else model

        def compute_loss(images):  # finetune.py's soft cross-entropy, targets as after mixup
            targets = F.one_hot(torch.arange(len(images), device=device) % 1000, 1000).float()
            return torch.sum(-targets * F.log_softmax(run_model(images).float(), dim=-1), dim=-1).mean()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    backend = BACKENDS[cfg.attn]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def step(images):
        with sdpa_kernel(backend) if backend else nullcontext():
            with autocast:
                loss = compute_loss(images)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), 3.0)):  # synchronises, as distill.py
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def random_images(batch_size, cfg, device):
    return torch.rand(batch_size, 3, cfg.img_size, cfg.img_size, device=device)


def flops_per_image(cfg, device, batch_size=2):
    """The model FLOPs of one step, per image: counted on an eager step (compiled code is invisible
    to the counter) and without activation checkpointing, whose recomputation MFU does not count."""
    counted = copy.copy(cfg)
    counted.compile, counted.attn, counted.grad_ckpt = False, "auto", False
    step = make_step(counted, device)
    with FlopCounterMode(display=False) as counter:
        step(random_images(batch_size, cfg, device))
    return counter.get_total_flops() / batch_size


def fits_in_memory(step, batch_size, cfg, device):
    try:
        for _ in range(2):  # the second step also holds the optimizer's state
            step(random_images(batch_size, cfg, device))
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(step, cfg, device):
    """The largest batch up to cfg.max_batch (to a multiple of 8, from cfg.batch_size up) whose
    step fits in GPU memory."""
    if not fits_in_memory(step, cfg.batch_size, cfg, device):
        raise SystemExit(f"--batch-size {cfg.batch_size} does not fit: start --max-batch from a smaller one")
    fits, fails = cfg.batch_size, None
    while fails is None and fits < cfg.max_batch:
        if fits_in_memory(step, min(2 * fits, cfg.max_batch), cfg, device):
            fits = min(2 * fits, cfg.max_batch)
        else:
            fails = min(2 * fits, cfg.max_batch)
    if fails is None:
        return fits
    while fails - fits > 8:
        middle = (fits + fails) // 16 * 8
        fits, fails = (middle, fails) if fits_in_memory(step, middle, cfg, device) else (fits, middle)
    return fits


def measure(cfg, device):
    step = make_step(cfg, device)
    if cfg.max_batch:
        cfg.batch_size = largest_batch(step, cfg, device)
    images = random_images(cfg.batch_size, cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(cfg.warmup):
        step(images)
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        step(images)
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's peak resident memory (kilobytes on Linux)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del step, images
    tflops = flops_per_image(cfg, device) * cfg.batch_size / step_s / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    return dict(img_s=cfg.batch_size / step_s, step_ms=1000 * step_s, peak_mem_mb=peak_mb, tflops=tflops,
                mfu=tflops / peak if peak else None, warmup_s=warmup_s)


def describe(cfg):
    teacher = f" + {cfg.teacher} teacher{'s' * (',' in cfg.teacher)}" if cfg.step == "distill" else ""
    return (f"{cfg.step}: {cfg.student}{teacher}, {cfg.img_size} px, batch {cfg.batch_size}, amp {cfg.amp}, "
            f"attn {cfg.attn}{', compile' if cfg.compile else ''}{', grad-ckpt' if cfg.grad_ckpt else ''}")


def write_photos(folder, count):
    """JPEGs of ImageNet's typical size (500x375) and file size (about 110 kB): smooth colour fields
    with grain. Pure noise decodes more slowly than photos and would understate the rate."""
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        fields = F.interpolate(torch.rand(1, 3, 12, 16, generator=generator), size=(375, 500), mode="bicubic")
        pixels = (fields[0] + 0.08 * torch.randn(3, 375, 500, generator=generator)).clamp(0, 1)
        Image.fromarray((255 * pixels).byte().permute(1, 2, 0).numpy()).save(Path(folder) / f"{i:03d}.jpg", quality=90)


def per_second(count, run, repeats=3):
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return count / statistics.median(times)


def bench_data_pipeline(cfg, count=64):
    """Images/s of the data pipeline on JPEGs: per data-loading worker for the CPU path (decode + FD
    transform) and for --decode-on-device's share (read the file, draw the crop), and on the
    training device for decode_and_crop. A run is data-bound when workers x the per-worker rate is
    below the training step's images/s."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as folder:
        write_photos(folder, count)
        size_kb = sum(p.stat().st_size for p in Path(folder).iterdir()) / count / 1000
        cpu_path = SeededTransform(image_dataset(folder), fd_transform(cfg.img_size, 0.08), seed=0)
        device_path = SeededTransform(image_dataset(folder, loader=read_undecoded), FDCropBox(cfg.img_size), seed=0)
        cpu_rate = per_second(count, lambda: [cpu_path[i] for i in range(count)])
        read_rate = per_second(count, lambda: [device_path[i] for i in range(count)])
        samples, _, _ = skip_unreadable([device_path[i] for i in range(count)], stack=False)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        decode_rate = per_second(count, lambda: (decode_and_crop(samples, cfg.img_size, device), sync()))
    print(f"data pipeline, {count} JPEGs of 500x375 ({size_kb:.0f} kB) to {cfg.img_size} px:\n"
          f"  decode + FD transform in a worker: {cpu_rate:.0f} img/s per worker\n"
          f"  --decode-on-device: the worker's share {read_rate:.0f} img/s per worker, "
          f"decode_and_crop on {device.type} {decode_rate:.0f} img/s (batches of {count})")
    print(f"data img/s_per_worker={cpu_rate:.1f} device_decode_worker_img/s={read_rate:.1f} "
          f"device_decode_img/s={decode_rate:.1f}")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data_pipeline:
        return bench_data_pipeline(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.max_batch and device.type != "cuda":
        raise SystemExit("--max-batch searches GPU memory: it needs a GPU")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}")
    tuned = measure(cfg, device)
    print(f"{describe(cfg)}: {tuned['img_s']:.1f} img/s, {tuned['step_ms']:.0f} ms/step, peak {tuned['peak_mem_mb']:.0f} MB, "
          f"{tuned['tflops']:.2f} TFLOP/s" + (f", MFU {tuned['mfu']:.1%}" if tuned["mfu"] else "")
          + f" (warm-up {tuned['warmup_s']:.0f} s)")
    ratio = None
    if cfg.compare:
        plain_cfg = copy.copy(cfg)
        plain_cfg.amp, plain_cfg.compile, plain_cfg.attn, plain_cfg.grad_ckpt = "fp32", False, "auto", False
        plain_cfg.max_batch = None  # the tuned run's batch
        plain = measure(plain_cfg, device)
        ratio = tuned["img_s"] / plain["img_s"]
        print(f"{describe(plain_cfg)}: {plain['img_s']:.1f} img/s, {plain['step_ms']:.0f} ms/step; ratio {ratio:.2f}")
    mfu = f"{tuned['mfu']:.3f}" if tuned["mfu"] else "n/a"
    print(f"{cfg.step} img/s={tuned['img_s']:.2f} step_ms={tuned['step_ms']:.1f} peak_mem_mb={tuned['peak_mem_mb']:.0f} "
          f"mfu={mfu} ratio={f'{ratio:.2f}' if ratio else 'n/a'}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
