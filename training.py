"""The run's state, shared by distill.py and finetune.py: their common flags, the distributed setup from
torchrun's environment, autocast, AdamW parameter groups, the schedule (the learning rate a pure function of the
step), DDP or FSDP2, and the doors to what a run keeps: `resume` and `restore` (refusals, weights, optimizer, RNG
states), `save` (atomic, plain or sharded) and `save_model_file`; stopping on a signal, the log, the lock on OUT."""
import argparse
import atexit
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

# ----------------------------------------------------------------------------- flags
def number(kind, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a `kind` (int or float) in [low, high], ends open if asked; bad values stop the run at once."""
    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        # NaN is in no range: every comparison with it is false.
        if not ((low < value if open_low else low <= value) and (value < high if open_high else value <= high)):
            bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high or high == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected a value in {bounds}")
        return value
    return parse


def whole_or_fraction(text):
    """'2' -> 2 (printed as given), '0.15' -> 0.15: part of an epoch, for a folder too small for one."""
    value = float(text)
    return int(value) if value == int(value) else value  # int() refuses inf and NaN


POSITIVE, NON_NEGATIVE = number(int, 1), number(float, 0.0)


def device_name(text):
    """An argparse type: a torch device name (cpu, cuda, cuda:1)."""
    try:
        return str(torch.device(text))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None


def count(n, noun):
    """'1 epoch', '2 epochs', '0.5 epochs', '3 classes'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def run_cli(main, args):
    """Run an entry point. A user's error (ValueError, OSError, FloatingPointError): one line on rank 0,
    status 2 (FD_TRACEBACK=1 shows where). SIGTERM or Ctrl-C: the step saved (a second: at once), 128 + it."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, receive_stop_signal)
    line = None
    try:
        result, status = main(args), 0
    except (Stopped, KeyboardInterrupt) as stop:
        line = stop if isinstance(stop, Stopped) else "interrupted: left at once, the last checkpoint as it was"
        status = 128 + (STOP_SIGNALS[-1] if STOP_SIGNALS else signal.SIGINT)
    except (ValueError, OSError, FloatingPointError) as error:
        if os.environ.get("FD_TRACEBACK"):
            raise
        # An error raised in a DataLoader worker comes wrapped, its traceback in the message, the error last.
        message = str(error).strip().splitlines()[-1].removeprefix(f"{type(error).__name__}: ")
        line, status = f"{Path(sys.argv[0]).name}: error: {message} (FD_TRACEBACK=1 shows where)", 2
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open ends its line first
        bar.close()
    if line and int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr)
    if dist.is_initialized():
        # gloo's worker threads may still hold the last collective's tensors for a moment; freed once Python has
        # begun to shut down, they abort the process ("terminate called without an active exception"). So a rank
        # leaves without the interpreter's teardown: everything is written and flushed, the OS frees the rest.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)
    return result


# ----------------------------------------------------------------------------- stopping on a signal
# Clusters preempt a job with SIGTERM (torchrun forwards it to every rank), then SIGKILL after a grace period;
# a person presses Ctrl-C. Either way the step under way is finished and saved: nothing is lost.
STOP_SIGNALS = []  # those this process received


class Stopped(Exception):
    """The run saved its step and stops on a signal."""

    def __init__(self, signum, step):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}: "
                         "rerun the same command to resume")


def receive_stop_signal(signum, frame):
    STOP_SIGNALS.append(signum)
    if len(STOP_SIGNALS) > 1:
        raise KeyboardInterrupt  # the second: leave at once (an atomic save under way leaves the old file)


def stop_requested(world_size, device):
    """The stop signal's number once one was received, else 0; the same on every rank (a collective): a rank that
    saved and left alone would leave the others waiting in the next all-reduce."""
    signum = STOP_SIGNALS[0] if STOP_SIGNALS else 0
    if world_size > 1:
        flag = torch.tensor(signum, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag)
    return signum


def add_schedule_flags(p, unset):
    """The length, batch and learning-rate flags; `unset` says where an unset flag takes its value from."""
    p.add_argument("--epochs", type=number(whole_or_fraction, 0, open_low=True), help="training length, whole or a "
                   "fraction (finetune.py evaluates at each epoch's end and the run's)" + unset)
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, help="linear warmup length, shorter than the run" + unset)
    p.add_argument("--batch-size", type=POSITIVE, help="images per process per micro-step" + unset)
    p.add_argument("--accum", type=POSITIVE, default=1, help="micro-steps per optimizer step")
    for flag, which in (("--lr", "peak"), ("--min-lr", "final"), ("--warmup-lr", "initial")):
        p.add_argument(flag, type=NON_NEGATIVE, help=f"{which} learning rate per 512 images" + unset)


def add_run_flags(p):
    """Data loading, checkpoints, logging, precision, compilation, and when to give up."""
    # At most 12: a worker decodes and crops 230-330 img/s (NOTES.md), an H100's compiled ViT-B/16 step takes 1,900.
    workers = min(12, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    p.add_argument("--workers", type=number(int, 0), default=workers, help="data-loading processes per training "
                   "process (this machine's CPU cores shared among its training processes, at most 12)")
    p.add_argument("--save-every", type=POSITIVE, default=None, help="checkpoint every N optimizer steps (fine-"
                   "tuning: also after every epoch) [1000, or a tenth of the run if that is fewer]")
    p.add_argument("--keep", type=number(int, 0), default=0, help="also keep the last N checkpoints as "
                   "OUT/checkpoint-STEP.pth")
    p.add_argument("--log-every", type=POSITIVE, default=10, help="log every N optimizer steps")
    p.add_argument("--device", type=device_name, default=None, help="where to train: cpu, cuda, cuda:N [this "
                   "process's GPU (cuda:LOCAL_RANK under torchrun) if there is one, else cpu]")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained model (and the teacher)")
    p.add_argument("--fsdp", action="store_true", help="shard the trained model, its gradients and optimizer state "
                   "over the processes (FSDP2) instead of replicating them (DDP): for models too large for DDP; "
                   "checkpoints become sharded folders (OUT/checkpoint.dcp) that resume on any number of processes")
    p.add_argument("--max-nonfinite", type=POSITIVE, default=20, help="stop after this many optimizer steps in a row "
                   "skipped for a non-finite loss or gradient")
    p.add_argument("--max-bad-frac", type=number(float, 0.0, 1.0), default=0.01, help="stop when more than this "
                   "fraction of an epoch's images are unreadable (they are skipped with a warning naming the file)")


# ----------------------------------------------------------------------------- setup
def setup_distributed(device=None):
    """(rank, world_size, device) from torchrun's environment and --device (unset: this process's GPU if any,
    else the CPU). The backend follows the device: nccl, or gloo on CPUs (--device cpu on a GPU machine)."""
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # cuda without an index: under torchrun each process its own GPU
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use --device cpu, or a GPU it has")
        torch.cuda.set_device(device)  # fused kernels, the GPU's RNG and NCCL use the current device
    if world_size == 1:
        return 0, 1, device
    # torchrun's store outlives a restart (--max-restarts) and still holds the dead attempt's addresses,
    # which gloo would try to connect to: every attempt gets keys of its own.
    rank, attempt = int(os.environ["RANK"]), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=timedelta(minutes=30))
    # A dead rank should end the job with an error, not hang it forever.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            store=dist.PrefixStore(f"attempt{attempt}", store), timeout=timedelta(minutes=30))
    atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world_size, device


def autocast_dtype(amp, device):
    """The autocast dtype for --amp, or None for fp32. auto: bf16 on CUDA and on CPUs with bf16 instructions
    (AMX, AVX512-BF16), where it makes an FD step 1.6-1.8x faster than fp32 (NOTES.md); elsewhere it is emulated."""
    if amp == "auto" and device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    elif amp == "auto":
        cpuinfo = Path("/proc/cpuinfo")
        flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
        amp = "bf16" if "amx_bf16" in flags or "avx512_bf16" in flags else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


# Position tables and temperatures, as the official code: decaying them towards 0 has no meaning.
NO_WEIGHT_DECAY = ("cls_token", "pos_embed", "reg_tokens", "relative_position_bias_table", "rpe_mlp", "logit_scale")


def param_groups(model, weight_decay, lr_scale=None):
    """AdamW parameter groups: no weight decay for 1-D tensors (biases, norms, LayerScale) and NO_WEIGHT_DECAY;
    `lr_scale(name)`, a per-parameter lr multiplier (layer-wise decay), becomes the group's 'lr_scale'."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim <= 1 or any(key in name for key in NO_WEIGHT_DECAY)
            scale = lr_scale(name) if lr_scale else 1.0
            group = dict(params=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale)
            groups.setdefault((no_decay, scale), group)["params"].append(param)
    return list(groups.values())


class Schedule(NamedTuple):
    """A run's length in steps, global batch, learning rates (scaled to the global batch), save interval."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    global_batch: int
    lrs: dict
    save_every: int

    def lr(self, step):
        return lr_at(step, self.total_steps, self.warmup_steps, **self.lrs)


def schedule(args, batches_per_epoch, world_size):
    """The Schedule of a run of `batches_per_epoch` batches per process and epoch."""
    steps_per_epoch = batches_per_epoch // args.accum
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch has {batches_per_epoch} batches per process, fewer than --accum {args.accum}: "
                         f"lower --accum or --batch-size")
    global_batch = args.batch_size * world_size * args.accum
    lrs = {k: getattr(args, k) * global_batch / 512 for k in ("lr", "min_lr", "warmup_lr")}
    total_steps, warmup_steps = round(args.epochs * steps_per_epoch), round(args.warmup_epochs * steps_per_epoch)
    if total_steps == 0:
        raise ValueError(f"--epochs {args.epochs} is less than one step ({global_batch} images of an epoch of "
                         f"{steps_per_epoch * global_batch}): lengthen the run or lower --batch-size")
    # Unset: a resumable state within minutes on a small run, every 1000 steps on a long one.
    save_every = args.save_every or max(1, min(1000, total_steps // 10))
    return Schedule(steps_per_epoch, total_steps, warmup_steps, global_batch, lrs, save_every)


def describe(args, plan, world_size, dtype, device):
    """The line every run starts with: the batch, the lr it implies, the length, the precision."""
    return (f"{world_size} process(es) x {args.batch_size} images x {count(args.accum, 'micro-step')} = "
            f"{plan.global_batch} images per step; lr {plan.lrs['lr']:.3g} (= {args.lr:g} x {plan.global_batch}/512); "
            f"{count(plan.total_steps, 'step')} ({count(args.epochs, 'epoch')} of {plan.steps_per_epoch}); autocast "
            f"{dtype or 'off (fp32)'} on {device}")


def lr_at(step, total_steps, warmup_steps, lr, min_lr, warmup_lr):
    """Linear warmup from warmup_lr to lr, then cosine decay to min_lr: a pure function of the step."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- DDP or FSDP2
def wrap_model(model, device, world_size, fsdp, dtype):
    """The module to train: `model` itself in one process; under torchrun DDP or, with `fsdp`, FSDP2: each
    transformer block (of a ModuleList named `blocks`), then the rest, sharded over the ranks, gathered in the
    autocast dtype for forward and backward (fp32 master weights), gradients reduce-scattered in fp32."""
    if fsdp and dtype == torch.float16:
        raise ValueError("--fsdp runs with --amp bf16 or fp32 (fp16's GradScaler does not take sharded gradients)")
    if fsdp and world_size > 1:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for name, module in model.named_modules():
            if name.split(".")[-1] == "blocks" and isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if world_size > 1:  # the buffers (position index, input statistics) are constants: no need to sync
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    return model


@contextmanager
def gradient_sync(train_model, enabled):
    """Gradient accumulation: no all-reduce (DDP) or reduce-scatter (FSDP2) but on the last micro-batch."""
    train_model = getattr(train_model, "_orig_mod", train_model)  # under torch.compile, the module it wraps
    if isinstance(train_model, FSDPModule):
        train_model.set_requires_gradient_sync(enabled)
    with train_model.no_sync() if isinstance(train_model, DistributedDataParallel) and not enabled else nullcontext():
        yield


# ----------------------------------------------------------------------------- checkpoints and log
def save_atomic(obj, path):
    """torch.save to a flushed temporary file renamed over `path`: a crash or a full disk leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # A failed write (a full disk: torch's writer then reports 'unexpected pos'): the cause, in one line.
        cause = error.__context__ if isinstance(error.__context__, OSError) else error
        if isinstance(cause, (OSError, RuntimeError)):
            raise OSError(f"cannot write {path} ({cause}); nothing was replaced: free some space on its disk (or "
                          f"use another --out), then run the same command again") from error
        raise
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    os.fsync(directory)
    os.close(directory)


def save(out, args, model, optimizer, scaler, parts, meta, world_size, is_main):
    """The state to resume from (a collective): `meta` (step, epoch, arch, origin), the flags, the loss scaler,
    every rank's RNG states (drop path, mixup), the model, the optimizer. --fsdp: OUT/checkpoint.dcp, the
    ranks' shards and meta.pth, written as checkpoint.dcp.tmp and swapped in whole (mid-swap: .dcp.old);
    else OUT/checkpoint.pth, `parts` by key. --keep N: also the newest N as checkpoint-STEP.pth (or .dcp)."""
    kind = ".dcp" if args.fsdp else ".pth"
    final, tmp, old = (out / f"checkpoint{kind}{suffix}" for suffix in ("", ".tmp", ".old"))
    if args.fsdp and is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    gpu = torch.cuda.is_initialized()  # a run on the CPU of a GPU machine leaves the GPU alone
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if gpu else None}
    rngs = [rng] * world_size
    if world_size > 1:  # also a barrier: no rank writes into the folder before it is emptied
        dist.all_gather_object(rngs, rng)
    state = dict(meta, scaler=scaler.state_dict(), args=vars(args), rng=rngs, world_size=world_size)
    if args.fsdp:
        dcp.save(dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))), checkpoint_id=tmp)
    else:
        state.update({key: part.state_dict() for key, part in parts.items()}, optimizer=optimizer.state_dict())
    if is_main:
        if args.fsdp:
            save_atomic(state, tmp / "meta.pth")
            shutil.rmtree(old, ignore_errors=True)  # left by a run killed while it swapped the folders
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            save_atomic(state, final)
        if args.keep > 0:
            snapshot = out / f"checkpoint-{meta['step']:07d}{kind}"
            if args.fsdp:
                shutil.copytree(final, snapshot, dirs_exist_ok=True)
            else:
                save_atomic(state, snapshot)
            for stale in sorted(out.glob(f"checkpoint-*{kind}"))[:-args.keep]:
                (shutil.rmtree if args.fsdp else Path.unlink)(stale)
    if world_size > 1:
        dist.barrier()  # no rank reads or rewrites the checkpoint before it is complete


def save_model_file(path, model, is_main, prefix="", **record):
    """A model file (a collective under FSDP): the weights of `model` under `prefix`, as plain CPU tensors without
    it, and `record` (arch: what rebuilds the model; where it came from): student.pth, best.pth."""
    if any(isinstance(module, FSDPModule) for module in model.modules()):  # gathered, whole on rank 0 only
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.barrier()  # no rank leaves while another still gathers (gloo aborts a process torn down mid-use)
    else:
        weights = {key: value.cpu() for key, value in model.state_dict().items()}  # a GPU's file loads on a laptop too
    if is_main:
        weights = {k.removeprefix(prefix): value for k, value in weights.items() if k.startswith(prefix)}
        save_atomic(dict(record, model=weights), path)


class TrainingLog:
    """OUT/log.jsonl (rank 0): every --log-every steps the loss (averaged over the interval and ranks; a
    vector gives its terms too, as loss_terms), lr, images/s, non-finite steps skipped and unreadable images.
    Lines after `start_step` move to log.discarded.jsonl. It stops runs at --max-nonfinite, --max-bad-frac."""

    def __init__(self, out, args, plan, device, world_size, is_main, start_step=0):
        self.path, self.args, self.device = out / "log.jsonl", args, device
        self.world_size, self.is_main, self.in_a_row, self.epoch, self.epoch_bad = world_size, is_main, 0, None, 0
        self.images_per_step, self.images_per_epoch = plan.global_batch, plan.steps_per_epoch * plan.global_batch
        self.checkpoint = out / ("checkpoint.dcp" if args.fsdp else "checkpoint.pth")  # the state a run leaves
        self.reset()
        if is_main and self.path.exists():
            kept, later = [], []
            for line in self.path.read_text().splitlines():
                try:
                    (kept if json.loads(line)["step"] <= start_step else later).append(line)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    later.append(line)
            if later:
                with open(out / "log.discarded.jsonl", "a") as f:
                    f.write("".join(line + "\n" for line in later))
                self.path.write_text("".join(line + "\n" for line in kept))
                print(f"{self.path}: {len(later)} lines after step {start_step} moved to {out / 'log.discarded.jsonl'}")

    def reset(self):
        self.loss, self.steps, self.skipped, self.bad, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def add(self, loss, finite, step, epoch, bad_images=0):
        self.epoch_bad = bad_images + (self.epoch_bad if epoch == self.epoch else 0)
        self.epoch, self.bad = epoch, self.bad + bad_images
        self.stop_on_bad_images(alone=True)  # before any checkpoint
        if finite:
            self.loss, self.steps, self.in_a_row = self.loss + loss, self.steps + 1, 0
            return
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if self.is_main:
            print(f"step {step}: non-finite loss or gradient, step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.args.max_nonfinite:
            kept = (f"{self.checkpoint} holds the last good state" if self.checkpoint.exists() else
                    "no checkpoint was written")
            raise FloatingPointError(f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                                     f"(--max-nonfinite {self.args.max_nonfinite}); {kept}. Try --amp bf16 or fp32, "
                                     f"or a lower --lr")

    def stop_on_bad_images(self, alone=False):
        """`alone`: on this rank's count, a lower bound of all ranks' that the others may not reach."""
        if self.epoch_bad > self.args.max_bad_frac * self.images_per_epoch:
            error = ValueError(f"epoch {self.epoch}: {self.epoch_bad} of its {self.images_per_epoch} images were "
                               f"unreadable, more than --max-bad-frac {self.args.max_bad_frac}: the warnings name "
                               f"them; fix or remove them")
            if alone and not self.is_main:  # run_cli prints rank 0's errors only
                print(f"rank {dist.get_rank()}: {error}", file=sys.stderr)
            raise error

    def write(self, epoch, **fields):
        """Log the interval that ends now; returns the record (on every rank)."""
        totals = torch.cat([torch.as_tensor(value, dtype=torch.float64, device=self.device).flatten()
                            for value in (self.loss / max(self.steps, 1), float(self.bad))])
        if self.world_size > 1:  # the decision to skip is the same on every rank: so is self.steps
            dist.all_reduce(totals)
        (loss, *terms), bad = (totals[:-1] / self.world_size).tolist(), int(totals[-1].item())
        self.epoch_bad += bad - self.bad  # the other ranks' of the interval
        self.stop_on_bad_images()
        record = dict(fields, epoch=epoch, loss=loss if self.steps else None, skipped=self.skipped, bad_images=bad,
                      img_per_s=(self.steps + self.skipped) * self.images_per_step / (time.perf_counter() - self.start))
        if terms:  # distill.py's term per teacher
            record["loss_terms"] = terms
        self.write_line(**record)
        self.reset()
        return record

    def write_line(self, **record):
        """One line of OUT/log.jsonl, on rank 0 (finetune.py's evaluations too)."""
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_HELD_LOCKS = {}  # OUT folder -> its open lock file, held for this process's lifetime


def lock_out(out, is_main=True):
    """Create OUT; rank 0 holds an exclusive lock on it, as a second run writing there would interleave its log and
    race for the checkpoint. The OS drops the lock when the process ends, however it ends: a crash leaves none."""
    out.mkdir(parents=True, exist_ok=True)
    if not is_main or out.resolve() in _HELD_LOCKS:  # or held already, by a run started earlier in this process
        return
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise ValueError(f"--out {out}: another run is writing to it ({lock.read().strip() or 'a running process'}); "
                         f"wait for it to end, or use another --out") from None
    except OSError as error:  # a file system without locks (some NFS, Lustre): run unguarded
        print(f"warning: cannot lock {out} ({error}): a second run in it would not be noticed")
        return
    lock.truncate(0)
    print(f"pid {os.getpid()} on {os.uname().nodename}", file=lock, flush=True)
    _HELD_LOCKS[out.resolve()] = lock


def resume(out, args, resume_flags, world_size, is_main=True, arch=None, teachers=None):
    """The state to resume from, or None for a new run (whose warmup must be shorter than the run): from
    OUT/checkpoint.pth (--fsdp: checkpoint.dcp's meta.pth), else the newest snapshot; "source" names it.
    Refused: other `resume_flags` or global batch (the step would be elsewhere in the data and schedule),
    another `arch`, `teachers` of other SHA-256s. Other changes (processes too) are reported."""
    kind, other = (".dcp", ".pth") if args.fsdp else (".pth", ".dcp")
    if (out / f"checkpoint{other}").exists():
        raise ValueError(f"{out} holds checkpoint{other}, written {'without' if args.fsdp else 'with'} "
                         f"--fsdp: resume it as it was written, or use another --out")
    path, snapshots = out / f"checkpoint{kind}", sorted(out.glob(f"checkpoint-*{kind}"))
    # checkpoint.dcp.old: a save died while swapping the folders
    found = [p for p in (path, out / f"checkpoint{kind}.old", *snapshots[-1:]) if p.exists()]
    if not found:  # a new run (a run under way keeps the schedule it started with)
        if args.warmup_epochs >= args.epochs:
            raise ValueError(f"--warmup-epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the "
                             f"lr would never reach its peak; shorten the warmup or lengthen the run")
        return None
    if found[0] in snapshots and is_main:
        print(f"{path} is missing: resuming from the newest snapshot, {found[0]}")
    path = found[0]
    try:
        state = torch.load(path / "meta.pth" if path.is_dir() else path, map_location="cpu", weights_only=True)
    except Exception as error:
        offer = (f"the newest snapshot is {snapshots[-1]}: copy it to {path} to resume from it" if snapshots
                 and snapshots[-1] != path else "move it away to start afresh")
        raise ValueError(f"{path} cannot be read ({str(error).split('.')[0]}); {offer}") from None
    saved, processes = state["args"], state["world_size"]
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}"
               for k in resume_flags if saved.get(k) != getattr(args, k)]
    old_batch, new_batch = saved["batch_size"] * saved["accum"] * processes, args.batch_size * args.accum * world_size
    if old_batch != new_batch:
        changed.append(f"global batch {old_batch} -> {new_batch} (--batch-size {saved['batch_size']} -> "
                       f"{args.batch_size}, --accum {saved['accum']} -> {args.accum}, processes {processes} -> "
                       f"{world_size})")
    if changed:
        raise ValueError(f"{path} was written by a run with other settings ({'; '.join(changed)}): "
                         f"use another --out, or the same flags to resume")
    allowed = [f"--{k.replace('_', '-')} {v} -> {getattr(args, k)}" for k, v in saved.items()  # None: not yet set
               if k not in resume_flags and getattr(args, k, None) not in (None, v)]
    allowed += [f"processes {processes} -> {world_size}"] * (processes != world_size)
    if allowed and is_main:
        print(f"resuming with changed settings: {'; '.join(allowed)}")
    old_arch = state["arch"]  # older files hold more keys, of the same values
    changed = [f"{k} {old_arch[k]} -> {arch[k]}" for k in sorted(set(old_arch) & set(arch or {}))
               if k != "drop_path" and old_arch[k] != arch[k]]  # e.g. a SwinV2 of a version that shared its bias
    if changed:
        raise ValueError(f"{out} holds a student of another architecture ({'; '.join(changed)}): use another --out, "
                         f"or the --student it was distilled with")
    old_teachers = state.get("teacher") or teachers or []
    for old, new in zip([old_teachers] if isinstance(old_teachers, dict) else old_teachers, teachers or []):
        if is_main and old["sha256"] != new["sha256"]:  # one teacher was recorded as a dict
            raise ValueError(f"{out} was distilled from teacher weights {old['weights']} (sha256 {old['sha256']}), "
                             f"not {new['weights']}: use another --out, or that file")
    return dict(state, source=path)


def restore(state, model, optimizer, scaler, parts, rank, world_size, seed):
    """The step a run starts from: 0 for a new one (`state` None), its ranks drawing drop path and mixup each
    from its own seed; else `state` loaded: `parts` by key (from checkpoint.dcp: the shards of `model`), the
    optimizer, the loss scaler and the RNG states (a fresh seed per rank if the processes are more or fewer)."""
    if state is None:
        torch.manual_seed(seed + rank)
        return 0
    if state["source"].is_dir():
        shards = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
        dcp.load(shards, checkpoint_id=state["source"])
        set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])
    else:
        for key, module in parts.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) == world_size:
        torch.set_rng_state(rngs[rank]["torch"])
        if rngs[rank]["cuda"] is not None and torch.cuda.is_initialized():
            torch.cuda.set_rng_state(rngs[rank]["cuda"])
    else:
        print(f"rank {rank}: the checkpoint holds RNG states of {len(rngs)} processes, this run has "
              f"{world_size}: drop path continues from seed {seed + rank + state['step']}")
        torch.manual_seed(seed + rank + state["step"])
    if rank == 0:
        print(f"resuming from {state['source']} at step {state['step']}")
    return state["step"]
