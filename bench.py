"""Benchmark the FD training step and the fine-tuning step: images/s, step time, peak memory and,
on a GPU, model FLOPs utilisation. The steps are the very code distill.py and finetune.py run.

    python bench.py --compare                 # ViT-S/16 student + CLIP-style ViT-S teacher, 224 px, batch 16:
                                              # tuned against plain fp32 eager, in one process
    python bench.py --student vit_base_patch16 --teacher clip --batch-size 128 --amp bf16 --compile
    python bench.py --step finetune --student vit_base_patch16 --batch-size 64
    python bench.py --data-pipeline           # decoding + the FD transform alone, per worker

Teachers get random weights (no download). The last line printed is machine-readable:
    distill img/s=... step_ms=... peak_mem_mb=... mfu=... ratio=...
"""
import argparse
import copy
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import distill
from data import SeededTransform, fd_transform, image_dataset
from models import (OPENAI_CLIP, Classifier, Teacher, build_from_arch, build_student, load_teacher,
                    parse_vit_name, set_grad_checkpointing, teacher_arch)

# Dense bf16 peak of the cards we quote MFU for, in TFLOP/s (without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
BACKENDS = {"auto": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def get_args_parser():
    p = argparse.ArgumentParser("FD benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--step", choices=["distill", "finetune"], default="distill")
    p.add_argument("--student", default="vit_small_patch16")
    p.add_argument("--teacher", default="clip_vit_small_patch16",
                   help="a published teacher (random weights), a plain ViT name, or clip_vit_<size>_patch<P>: "
                        "a ViT with OpenAI CLIP's options (QuickGELU, ln_pre)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--attn", choices=list(BACKENDS), default="auto", help="SDPA kernel (auto: PyTorch's choice)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compare", action="store_true", help="also run plain fp32 eager in the same process")
    p.add_argument("--data-pipeline", action="store_true", help="time decoding and the FD transform instead")
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU [all cores]")
    return p


def bench_teacher(name, grid):
    if name.startswith("clip_vit_"):
        return Teacher(build_from_arch(teacher_arch(*parse_vit_name(name[5:]), img_size=grid * int(name.split("patch")[1]),
                                                    **OPENAI_CLIP)))
    return load_teacher(name, "random", grid=grid)


def make_step(cfg, device):
    """One optimizer step of distill.py (or finetune.py) on a fixed batch, and its model."""
    torch.manual_seed(0)
    student = build_student(cfg.student, cfg.img_size, drop_path=0.1)
    set_grad_checkpointing(student, cfg.grad_ckpt)
    dtype = distill.autocast_dtype(cfg.amp, device)
    images = torch.rand(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    if cfg.step == "distill":
        teacher = distill.prepare_teacher(bench_teacher(cfg.teacher, student.grid[0]).to(device), dtype)
        model = distill.FDStudent(student, teacher.embed_dim).to(device)
        run_model, run_teacher = (torch.compile(model), torch.compile(teacher)) if cfg.compile else (model, teacher)
        compute_loss = distill.fd_objective(run_teacher, student)
    else:
        model = Classifier(student, num_classes=1000).to(device)
        run_model = torch.compile(model) if cfg.compile else model
        targets = F.one_hot(torch.arange(cfg.batch_size, device=device) % 1000, 1000).float()  # as after mixup

        def compute_loss(model, images):
            return torch.sum(-targets * F.log_softmax(model(images).float(), dim=-1), dim=-1).mean()
    optimizer = torch.optim.AdamW(distill.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    backend = BACKENDS[cfg.attn]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()

    def step():
        with sdpa_kernel(backend) if backend else nullcontext():
            distill.optimizer_step(run_model, [images], compute_loss, optimizer, scaler, 3.0, autocast)
    return step


def measure(cfg, device):
    step = make_step(cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # the process's peak resident memory (kilobytes on Linux)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with FlopCounterMode(display=False) as counter:
        step()
    tflops = counter.get_total_flops() / step_s / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    return dict(img_s=cfg.batch_size / step_s, step_ms=1000 * step_s, peak_mem_mb=peak_mb, tflops=tflops,
                mfu=tflops / peak if peak else None, warmup_s=warmup_s)


def describe(cfg):
    teacher = f" + {cfg.teacher} teacher" if cfg.step == "distill" else ""
    return (f"{cfg.step}: {cfg.student}{teacher}, {cfg.img_size} px, batch {cfg.batch_size}, amp {cfg.amp}, "
            f"attn {cfg.attn}{', compile' if cfg.compile else ''}{', grad-ckpt' if cfg.grad_ckpt else ''}")


def bench_data_pipeline(cfg, count=64):
    """Decode and transform JPEGs of ImageNet's typical size (500x375) in one process: images/s per
    data-loading worker. A run is data-bound when workers x this < the training step's images/s."""
    from PIL import Image
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            pixels = torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
            Image.fromarray(pixels.numpy()).save(Path(folder) / f"{i:03d}.jpg", quality=90)
        dataset = SeededTransform(image_dataset(folder), fd_transform(cfg.img_size, 0.08), seed=0)
        dataset[0]
        start = time.perf_counter()
        for i in range(count):
            dataset[i]
        rate = count / (time.perf_counter() - start)
    print(f"data pipeline: JPEG 500x375 decode + FD transform to {cfg.img_size} px: {rate:.0f} img/s per worker")
    print(f"data img/s_per_worker={rate:.1f}")


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data_pipeline:
        return bench_data_pipeline(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        plain = measure(plain_cfg, device)
        ratio = tuned["img_s"] / plain["img_s"]
        print(f"{describe(plain_cfg)}: {plain['img_s']:.1f} img/s, {plain['step_ms']:.0f} ms/step; ratio {ratio:.2f}")
    mfu = f"{tuned['mfu']:.3f}" if tuned["mfu"] else "n/a"
    print(f"{cfg.step} img/s={tuned['img_s']:.2f} step_ms={tuned['step_ms']:.1f} peak_mem_mb={tuned['peak_mem_mb']:.0f} "
          f"mfu={mfu} ratio={f'{ratio:.2f}' if ratio else 'n/a'}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
