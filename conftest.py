"""Helpers, constants and fixtures shared by several test files: the micro runs' flags, readers of their logs,
files written in published layouts, reference computations, and launches that more than one file's tests check.

Each test checks behaviour against an independent computation written in the tests, not against the code under test;
subprocess tests run the real torchrun."""
import contextlib
import io
import json
import math
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import distill
import finetune
import training
from models import VisionTransformer, build_student
from teachers import load_teacher

REPO = Path(__file__).resolve().parent
# The micro runs train on the CPU, also on a GPU machine: they are compared with CPU computations here.
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32",
         "--synthetic-images", "64", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--amp", "fp32",
         "--warmup-epochs", "0.5", "--device", "cpu"]

FT_MICRO = ["--recipe", "vit_tiny_patch16", "--model", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
            "64", "--synthetic-val-images", "25", "--batch-size", "8", "--workers", "0", "--log-every", "1",
            "--amp", "fp32", "--device", "cpu"]

# Fine-tuning on 2 torchrun CPU ranks: 32 training images, a global batch of 8 (4 steps an epoch, 8 in all), and 17
# validation images: 9 on rank 0 (3 batches of 4 or fewer), 8 on rank 1 (2), an uneven split that must still count
# every image once.
FT_TWO_RANKS = ["--recipe", "vit_tiny_patch16", "--model", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
                "32", "--synthetic-val-images", "17", "--batch-size", "4", "--workers", "0", "--log-every", "1",
                "--amp", "fp32", "--epochs", "2", "--lr", "0.05", "--device", "cpu"]

CPU_ONLY = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # subprocesses on the CPU, on any machine

# The tiny EsViT-layout Swin of test_teachers.py's checkpoint test: Swin-B/W14 at 224 in miniature (stage maps
# 16, 8, 4, 2: shifted windows in stages 0-1, window == map in stage 2, window clipped in stage 3).
ESVIT_TINY = dict(img_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16],
                  window_size=4)

# The GPU tier: tests of the paths only a GPU takes (at the end of each test file), skipped elsewhere.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier: needs a CUDA GPU")


# ----------------------------------------------------------------------------- flags, logs and runs
def parse(*argv):
    return distill.get_args_parser().parse_args(list(argv))


def ft_parse(*argv):
    return finetune.get_args_parser().parse_args(list(argv))


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def ft_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def micro_pair(drop_path=0.0, seed=0):
    torch.manual_seed(seed)
    teacher = load_teacher("vit_micro_patch8", grid=4)
    model = distill.FDStudent(build_student("vit_micro_patch8", 32, drop_path), [teacher.embed_dim])
    return teacher, model


def fd_closure(teacher):
    """The loss distill.main computes for the micro ViT pair (every token, class token included)."""
    return lambda model, images: distill.fd_loss(model(images)[0], distill.distillation_target(teacher, images, (4, 4)))


@contextlib.contextmanager
def crash_at_call(monkeypatch, module, name, n, signum=None):
    """Within the block, the n-th call of module.name raises KeyboardInterrupt, as a crash would, or with `signum`
    sends this process that signal (a cluster's SIGTERM) and goes on; with one loss per optimizer step, at step n."""
    real, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and signum is None:
            raise KeyboardInterrupt("simulated crash")
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, crashing)
    try:
        yield
    finally:
        monkeypatch.setattr(module, name, real)


@contextlib.contextmanager
def stop_signals_restored():
    """Around training.run_cli called in this process: after it, SIGTERM and Ctrl-C end pytest again (the handlers
    run_cli installs are put back) and no stop signal it received stays recorded for the next run."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        training.STOP_SIGNALS.clear()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def distill_cli_in_process(monkeypatch, *argv):
    """distill.py's command line run in this process: training.run_cli, as distill.py's __main__ runs it, sys.argv[0]
    naming the script. For runs that end on a user's error, where a new process would add only its seconds of
    imports."""
    monkeypatch.setattr(sys, "argv", ["distill.py", *argv])
    with stop_signals_restored():
        return training.run_cli(distill.main, distill.get_args_parser().parse_args(list(argv)))


def script_in_process(script, *argv):
    """`python SCRIPT ARGV` in this process: runpy runs the script's __main__ block, as a user's command does, with
    sys.argv set and stdout and stderr captured. A subprocess.CompletedProcess, as subprocess.run(..., text=True)
    gives, for commands that end within a second, where a new process would add seconds of imports."""
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    try:
        with stop_signals_restored(), mock.patch.object(sys, "argv", [script, *map(str, argv)]), \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    return subprocess.CompletedProcess([script, *argv], status, stdout.getvalue(), stderr.getvalue())


def export_command(*args):
    """`python export.py ARGS`, as a user runs it: its __main__ block, in this process."""
    return script_in_process("export.py", *args)


def finetune_on_two_ranks(out, *extra):
    """finetune.py FT_TWO_RANKS under torchrun, 2 ranks; its result (stdout, stderr), having checked it succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "finetune.py"), *FT_TWO_RANKS, *extra, "--out", str(out)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ----------------------------------------------------------------------------- files and models
def write_images(folder, count, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


# The timm / DINO / DeiT layout (and DINOv2's), written here from their own naming, not from teachers.py.
def timm_layout(width, depth, patch, grid, classes=0, dinov2=False, registers=0, bias=True, make=torch.randn):
    """DINO / DeiT / timm ViT state dict (with dinov2=True: the official DINOv2 layout)."""
    sd = {"cls_token": make(1, 1, width), "pos_embed": make(1, 1 + grid * grid, width),
          "patch_embed.proj.weight": make(width, 3, patch, patch)}
    if bias:
        sd["patch_embed.proj.bias"] = make(width)
    if dinov2:
        sd["mask_token"] = make(1, width)
        if registers:
            sd["register_tokens"] = make(1, registers, width)
    for i in range(depth):
        for name, shape in [("norm1.weight", (width,)), ("norm1.bias", (width,)),
                            ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                            ("attn.proj.weight", (width, width)),
                            ("attn.proj.bias", (width,)), ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                            ("mlp.fc1.weight", (4 * width, width)), ("mlp.fc1.bias", (4 * width,)),
                            ("mlp.fc2.weight", (width, 4 * width)), ("mlp.fc2.bias", (width,))]:
            sd[f"blocks.{i}.{name}"] = make(*shape)
        if dinov2:
            sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = make(width), make(width)
    sd["norm.weight"], sd["norm.bias"] = make(width), make(width)
    if classes:
        sd["head.weight"], sd["head.bias"] = make(classes, width), make(classes)
    return sd


def scaled(sd, noise=0.05):
    """Random weights of a sensible scale: norms near 1, the rest small."""
    torch.manual_seed(0)
    return {k: (1 + noise * torch.randn_like(v)) if "norm" in k and k.endswith("weight")
            else noise * torch.randn_like(v) for k, v in sd.items()}


def vit(rel_pos="shared", layer_scale=0.1):
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, rel_pos=rel_pos,
                             layer_scale=layer_scale)


def normalise(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- reference computations
def randomise_(model, seed=0):
    """Parameters far from their initial values, so that a wrong wiring cannot hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):  # temperatures from 3 to 300: the cap at 100 matters
                p.copy_(torch.linspace(math.log(3.0), math.log(300.0), p.numel()).view_as(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)


def reference_window_attention(y, window, shift, heads, qkv_w, qkv_b, proj_w, proj_b, offset_bias,
                               temperature=None):
    """Shifted-window attention written as a loop over windows. y (B, H, W, C); offset_bias
    (2w-1, 2w-1, heads) indexed by (row offset, column offset) + w - 1; temperature (heads,) for
    cosine attention, None for scaled dot products. After rolling the map up-left by `shift`, two
    tokens of a window may attend to each other only if both or neither wrapped round, per axis."""
    B, H, W, C = y.shape
    d = C // heads
    rolled = torch.roll(y, (-shift, -shift), (1, 2))
    out = torch.empty_like(rolled)
    cells = [(r, c) for r in range(window) for c in range(window)]
    bias = torch.stack([torch.stack([offset_bias[r1 - r2 + window - 1, c1 - c2 + window - 1]
                                     for r2, c2 in cells]) for r1, c1 in cells]).permute(2, 0, 1)
    for top in range(0, H, window):
        for left in range(0, W, window):
            tokens = rolled[:, top:top + window, left:left + window].reshape(B, -1, C)
            q, k, v = (tokens @ qkv_w.T + qkv_b).split(C, dim=-1)
            q, k, v = (t.reshape(B, -1, heads, d).transpose(1, 2) for t in (q, k, v))
            if temperature is None:
                logits = q @ k.transpose(-1, -2) / math.sqrt(d)
            else:
                logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
                logits = logits * temperature.view(-1, 1, 1)
            logits = logits + bias
            if shift:
                wrapped = [(top + r >= H - shift, left + c >= W - shift) for r, c in cells]
                allowed = torch.tensor([[a == b for b in wrapped] for a in wrapped])
                logits = logits.masked_fill(~allowed, float("-inf"))
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, window, window, C)
            out[:, top:top + window, left:left + window] = o @ proj_w.T + proj_b
    return torch.roll(out, (shift, shift), (1, 2))


# ----------------------------------------------------------------------------- launches that several files check
@pytest.fixture(scope="session")
def distilled(tmp_path_factory):
    """A micro FD run (one epoch): its folder holds student.pth and checkpoint.pth. For test_finetune.py and
    test_teachers.py."""
    out = tmp_path_factory.mktemp("fd")
    distill.main(distill.get_args_parser().parse_args([*MICRO, "--epochs", "1", "--out", str(out)]))
    return out


@pytest.fixture(scope="session")
def two_teachers_two_ranks(tmp_path_factory):
    """One distillation from two teachers, run twice: on 2 torchrun CPU ranks, each with 2 micro-batches of 2 (the
    driver counts DDP's gradient all-reduces and saves each rank's student), and in one process with batches of 8:
    the same global batch. One launch serves the tests of torchrun's ranks with gradient accumulation (test_training.py)
    and of several teachers on several ranks (test_distill.py); the one-process run goes alongside (two cores)."""
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    out = tmp_path / "two"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import distill\n"
        "from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook\n"
        "reductions = []\n"
        "import training\n"
        "class CountingDDP(training.DistributedDataParallel):  # counts the gradient all-reduces\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        self.register_comm_hook(None, lambda state, bucket: reductions.append(1) or "
        "allreduce_hook(state, bucket))\n"
        "training.DistributedDataParallel = CountingDDP\n"
        "student = distill.main(distill.get_args_parser().parse_args(sys.argv[1:]))\n"
        f"torch.save(dict(student.state_dict(), reductions=torch.tensor(len(reductions))), "
        f"os.path.join({str(out)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    argv = [*MICRO, "--teacher", "vit_micro_patch8,vit_micro_patch4", "--teacher-loss-weights", "2,1", "--drop-path",
            "0", "--epochs", "1"]
    one = subprocess.Popen([sys.executable, str(REPO / "distill.py"), *argv, "--out", str(tmp_path / "one")],
                           env=CPU_ONLY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(driver), *argv, "--accum", "2", "--batch-size", "2", "--out", str(out)]
    result = subprocess.run(cmd, env=CPU_ONLY, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = one.communicate(timeout=240)[1]
    assert one.returncode == 0, stderr[-3000:]
    return tmp_path / "one", out, result


@pytest.fixture(scope="session")
def finetuned_with_ddp_on_two_ranks(tmp_path_factory):
    """finetune.py with DDP on 2 ranks (FT_TWO_RANKS): its folder and the launch's result. The reference of the FSDP
    fine-tuning (test_training.py) and the run whose uneven evaluation test_finetune.py counts again."""
    out = tmp_path_factory.mktemp("finetune") / "ddp"
    return out, finetune_on_two_ranks(out)
