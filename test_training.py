"""training.py, what distill.py and finetune.py share: flags checked when parsed, the run's length, the lr schedule
and weight-decay groups, gradient accumulation, non-finite steps, the state of a run (resuming after a crash, SIGKILL
or SIGTERM, failed checkpoint writes, the out folder's lock, files of earlier versions), and torchrun's ranks: DDP,
and FSDP2 with sharded checkpoints on 2 CPU ranks over gloo, under real torchrun.

What must hold of FSDP2: FSDP, DDP and one process compute the same training for the same global batch; a sharded
checkpoint written by 2 ranks resumes on 1 and on 2 (resharding) and continues the run it came from; a
rank killed under `torchrun --max-restarts 1` is recovered by the restarted ranks themselves; a run stopped by
SIGTERM saves its step, and the same command ends it as if uninterrupted."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import distill
import finetune
import training
from conftest import (FT_MICRO, FT_TWO_RANKS, MICRO, REPO, crash_at_call, distill_cli_in_process,
                      finetune_on_two_ranks, ft_log, ft_parse, micro_pair, needs_cuda, parse, read_log,
                      stop_signals_restored)
from models import build_student
from teachers import load_model_file, load_teacher

# The runs of the FSDP2 tests: 64 synthetic images, a global batch of 8: 8 steps per epoch, 16 in all. No drop path,
# so that runs on different numbers of processes (whose drop-path draws differ) compute the same function; gloo ranks
# on the CPU, also on a GPU machine.
FSDP_MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32",
              "--synthetic-images", "64", "--workers", "0", "--log-every", "1", "--amp", "fp32", "--warmup-epochs",
              "0.5", "--drop-path", "0", "--epochs", "2", "--lr", "0.05", "--device", "cpu"]

# distill.main under torchrun, with a fault at the Nth loss of the first attempt: every rank raises
# KeyboardInterrupt ('raise', a crash), rank 1 alone is SIGKILLed ('kill', a lost machine), or the job gets SIGTERM
# ('term', preempted).
DRIVER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import distill, training
fault, at = os.environ.get("FD_FAULT"), int(os.environ.get("FD_FAULT_AT", 0))
if fault and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    real_loss, calls = distill.fd_loss, []
    def fd_loss(prediction, target):
        calls.append(1)
        if len(calls) == at and fault == "raise":
            raise KeyboardInterrupt
        if len(calls) == at and fault == "kill" and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        if len(calls) == at and fault == "term" and os.environ.get("RANK", "0") == "0":  # a cluster's preemption:
            torchrun = "TORCHELASTIC_RESTART_COUNT" in os.environ  # to torchrun, which forwards it to every rank
            os.kill(os.getppid() if torchrun else os.getpid(), signal.SIGTERM)
        return real_loss(prediction, target)
    distill.fd_loss = fd_loss
training.run_cli(distill.main, distill.get_args_parser().parse_args(sys.argv[1:]))
"""

EXACT_GPU = dict(NVIDIA_TF32_OVERRIDE="0")  # no TF32 in cuDNN and cuBLAS: the GPU computes the CPU's function


def run(tmp_path, out, *argv, processes=2, fault=None, at=0, restarts=0, check=True, torchrun=None, env=()):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "--max-restarts", str(restarts)] if torchrun or processes > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", FD_FAULT=fault or "", FD_FAULT_AT=str(at), **dict(env))
    result = subprocess.run([*launcher, str(driver), *FSDP_MICRO, *argv, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "log.jsonl").read_text().splitlines())}


def student(out):
    return torch.load(Path(out) / "student.pth", weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted FSDP run on 2 ranks, 4 images each."""
    tmp_path = tmp_path_factory.mktemp("straight")
    run(tmp_path, tmp_path / "fsdp", "--fsdp", "--batch-size", "4", "--save-every", "4")
    return tmp_path / "fsdp"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The uninterrupted run in one process, this one (it needs no launcher), the same global batch of 8."""
    out = tmp_path_factory.mktemp("one_process") / "one"
    distill.main(distill.get_args_parser().parse_args([*FSDP_MICRO, "--batch-size", "8", "--out", str(out)]))
    return out


def assert_same_training(out, reference, rtol):
    ours, theirs = losses(out), losses(reference)
    assert [record["step"] for record in read_log(out)] == list(range(1, 17))  # each step logged once, in order
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=rtol), step
    a, b = student(out), student(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rtol, msg=key)


# ----------------------------------------------------------------------------- flags and the run's length
@pytest.mark.parametrize("script, flag, value, expected", [
    ("distill", "--epochs", "0", "expected a value in (0, inf)"),
    ("finetune", "--epochs", "-1", "expected a value in (0, inf)"),
    ("distill", "--epochs", "inf", "'inf' is not a number"),
    ("distill", "--save-every", "0", "[1, inf)"), ("distill", "--log-every", "0", "[1, inf)"),
    ("distill", "--drop-path", "1.5", "[0.0, 1.0)"), ("distill", "--min-crop-scale", "2", "(0.0, 1.0]"),
    ("distill", "--img-size", "0", "[1, inf)"), ("distill", "--lr", "-1", "-1 is out of range"),
    ("finetune", "--synthetic-val-images", "0", "[1, inf)"), ("finetune", "--mixup", "-1", "[0.0, inf)"),
    ("distill", "--batch-size", "two", "'two' is not an integer"), ("bench", "--steps", "0", "[1, inf)"),
    ("distill", "--clip-grad", "nan", "nan is out of range")])
def test_flag_values_are_checked_when_parsed(script, flag, value, expected, capsys):
    parser = {"distill": distill, "finetune": finetune, "bench": bench}[script].get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args([flag, value])
    error = capsys.readouterr().err
    assert f"{script}.py: error: argument {flag}: " in error and expected in error  # the README's words


def test_run_length_and_sizes_are_checked_before_training(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"--img-size 30 is not a multiple of the student's patch size 8"):
        distill.main(parse(*MICRO, "--img-size", "30", "--out", str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"--warmup-epochs 2 is not shorter than --epochs 2: the lr would never"):
        distill.main(parse(*MICRO, "--epochs", "2", "--warmup-epochs", "2", "--out", str(tmp_path / "b")))
    assert not (tmp_path / "b" / "student.pth").exists()
    # A user's error from the command line: one line on stderr, exit status 2, no traceback.
    capsys.readouterr()
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *MICRO, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c"))
    stderr = capsys.readouterr().err
    assert status.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"distill.py: error: --data {tmp_path / 'nowhere'}: no such folder "
                                                  f"(give an ImageFolder root, a folder with train/ and val/, or a "
                                                  f"folder of images) (FD_TRACEBACK=1 shows where)"]


def test_the_default_run_saves_a_checkpoint_every_tenth_of_the_way():
    args = distill.apply_preset(parse())  # the built-in default: 2 epochs of 64 steps
    assert training.schedule(args, batches_per_epoch=64, world_size=1).save_every == 12  # 128 steps // 10: a minute
    assert args.save_every is None  # the flags as given: recorded with the run
    long = distill.apply_preset(parse("--teacher", "clip"))
    assert training.schedule(long, batches_per_epoch=1251, world_size=8).save_every == 1000
    assert training.schedule(distill.apply_preset(parse("--save-every", "50")), 64, 1).save_every == 50


def test_a_fraction_of_an_epoch_distils_and_finetunes(tmp_path, capsys):
    # 64 images in batches of 8: half an epoch is 4 steps; fine-tuning evaluates at the run's end.
    distill.main(parse(*MICRO, "--epochs", "0.5", "--warmup-epochs", "0.25", "--out", str(tmp_path / "fd")))
    assert [r["step"] for r in read_log(tmp_path / "fd")] == [1, 2, 3, 4]
    assert "4 steps (0.5 epochs of 8)" in capsys.readouterr().out
    finetune.main(ft_parse(*FT_MICRO, "--epochs", "0.5", "--warmup-epochs", "0.25", "--out", str(tmp_path / "ft")))
    assert [r["step"] for r in ft_log(tmp_path / "ft") if "top1" in r] == [4]
    assert torch.load(tmp_path / "ft" / "best.pth", weights_only=True)["step"] == 4


# ----------------------------------------------------------------------------- the optimizer step
def test_weight_decay_groups_and_lr_schedule():
    _, model = micro_pair()
    groups = training.param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {f"student.blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} | {
        "student.patch_embed.weight", "projector.weight"}
    # Warmup from warmup_lr to lr, then cosine to min_lr, by hand.
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, warmup_lr=0.0)
    assert training.lr_at(0, **kw) == 0.0 and training.lr_at(5, **kw) == 0.5
    assert training.lr_at(10, **kw) == 1.0 and training.lr_at(110, **kw) == pytest.approx(0.1)
    assert training.lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)


def test_gradient_accumulation_equals_one_step_on_the_double_batch(tmp_path):
    # 2 micro-batches of 4 and one batch of 8: the same images, losses and weights, step by step.
    argv = [*MICRO, "--epochs", "1", "--drop-path", "0"]
    whole = distill.main(parse(*argv, "--out", str(tmp_path / "whole")))
    accumulated = distill.main(parse(*argv, "--batch-size", "4", "--accum", "2", "--out", str(tmp_path / "accum")))
    for a, b in zip(read_log(tmp_path / "whole"), read_log(tmp_path / "accum"), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    torch.manual_seed(0)
    start = build_student("vit_micro_patch8", 32)  # the runs' initialisation: training moved the weights
    assert not torch.equal(whole.blocks[0].attn.qkv.weight, start.blocks[0].attn.qkv.weight)


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, monkeypatch):
    real_loss, calls = distill.fd_loss, []

    def nan_at(steps):
        def loss(prediction, target):
            calls.append(1)
            value = real_loss(prediction, target)
            return value * float("nan") if len(calls) in steps else value
        return loss

    # One NaN (optimizer step 3): skipped, weights unchanged by it, counted in the log; the run goes on.
    monkeypatch.setattr(distill, "fd_loss", nan_at({3}))
    out = tmp_path / "one_nan"
    student = distill.main(parse(*MICRO, "--epochs", "1", "--log-every", "4", "--out", str(out)))
    log = read_log(out)
    assert [r["skipped"] for r in log] == [1, 0] and all(math.isfinite(r["loss"]) for r in log)
    assert all(torch.isfinite(p).all() for p in student.parameters())

    # NaN from step 3 on, --max-nonfinite 3: steps 3, 4, 5 skipped, then the run stops. The checkpoint
    # saved at step 4 holds the weights of step 2 (skipped steps change nothing), all finite.
    calls.clear()
    monkeypatch.setattr(distill, "fd_loss", nan_at(set(range(3, 100))))
    out = tmp_path / "nan"
    argv = [*MICRO, "--epochs", "1", "--save-every", "2", "--max-nonfinite", "3", "--out", str(out)]
    with pytest.raises(FloatingPointError, match="step 5: 3 steps in a row .*checkpoint.pth holds the last good"):
        distill.main(parse(*argv))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["student"].values())


# ----------------------------------------------------------------------------- the state of a run
def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    argv = [*MICRO, "--epochs", "2", "--save-every", "5"]  # 8 steps per epoch, 16 in all
    full = distill.main(parse(*argv, "--out", str(tmp_path / "full")))

    with crash_at_call(monkeypatch, distill, "fd_loss", 7), pytest.raises(KeyboardInterrupt):
        distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pth", weights_only=True)["step"] == 5
    resumed = distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))

    steps = [r["step"] for r in read_log(tmp_path / "crashed")]
    assert steps == list(range(1, 17))  # step 6 was logged, then redone: logged once
    discarded = (tmp_path / "crashed" / "log.discarded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in discarded] == [6]  # the first run's step 6, kept aside
    full_log = {r["step"]: r for r in read_log(tmp_path / "full")}
    for record in read_log(tmp_path / "crashed")[5:]:
        assert record["lr"] == full_log[record["step"]]["lr"]
        assert record["loss"] == full_log[record["step"]]["loss"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--student vit_micro_patch8 -> vit_tiny_patch8"):
        distill.main(parse(*argv, "--student", "vit_tiny_patch8", "--out", str(tmp_path / "crashed")))
    with pytest.raises(ValueError, match="--batch-size 8 -> 4"):
        distill.main(parse(*argv, "--batch-size", "4", "--out", str(tmp_path / "crashed")))


def test_sigkill_mid_epoch_then_the_same_command_gives_the_uninterrupted_weights(tmp_path):
    import signal
    import time
    command = [sys.executable, str(REPO / "distill.py"), *MICRO, "--epochs", "2", "--save-every", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The uninterrupted reference runs alongside the run to be killed (two cores).
    reference = subprocess.Popen([*command, "--out", str(tmp_path / "straight")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env=env)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    while not (killed / "checkpoint.pth").exists() and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: as a preempted job
    assert process.wait() == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0
    step = torch.load(killed / "checkpoint.pth", weights_only=True)["step"]
    assert 3 <= step < 16 and step % 3 == 0  # killed mid-run; the checkpoint on disk is whole
    subprocess.run([*command, "--out", str(killed)], check=True, capture_output=True, env=env)
    straight = torch.load(tmp_path / "straight" / "student.pth", weights_only=True)["model"]
    resumed = torch.load(killed / "student.pth", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_corrupt_files_are_reported(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "run"
    argv = [*MICRO, "--epochs", "1", "--save-every", "2", "--keep", "2", "--out", str(out)]
    real_save, saves = torch.save, []

    class FullDisk:  # a file whose writes fail past its first 1000 bytes, as on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 1000:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

    def disk_full_on_the_third_save(obj, f):  # torch's writer then fails too, with 'unexpected pos'
        saves.append(1)
        real_save(obj, FullDisk(f) if len(saves) == 3 else f)

    monkeypatch.setattr(torch, "save", disk_full_on_the_third_save)
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *argv)
    printed = capsys.readouterr()
    assert status.value.code == 2 and "Traceback" not in printed.err and "8 steps (1 epoch of 8)" in printed.out
    assert printed.err.rstrip().split("\n")[-1] == (
        f"distill.py: error: cannot write {out / 'checkpoint.pth'} ([Errno 28] No space left on device); "
        f"nothing was replaced: free some space on its disk (or use another --out), then run the same command again "
        f"(FD_TRACEBACK=1 shows where)")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2  # the previous one, whole
    assert not list(out.glob("*.tmp"))
    distill.main(parse(*argv[:-4], "--epochs", "2", "--save-every", "2", "--keep", "2", "--out", str(out)))
    assert "resuming with changed settings: --epochs 1 -> 2" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0000014.pth", "checkpoint-0000016.pth"]
    (out / "checkpoint.pth").write_bytes((out / "checkpoint.pth").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"checkpoint.pth cannot be read .*the newest snapshot is "
                                           r".*checkpoint-0000016.pth: copy it to"):
        distill.main(parse(*argv[:-4], "--epochs", "3", "--out", str(out)))
    # checkpoint.pth deleted, snapshots kept: the run resumes from the newest one and says so.
    (out / "checkpoint.pth").unlink()
    capsys.readouterr()
    distill.main(parse(*argv[:-4], "--epochs", "3", "--save-every", "2", "--keep", "2", "--out", str(out)))
    assert f"{out / 'checkpoint.pth'} is missing: resuming from the newest snapshot, {out / 'checkpoint-0000016.pth'}" \
        in capsys.readouterr().out
    steps = [r["step"] for r in read_log(out)]
    assert steps == list(range(1, 25))  # each step once: nothing restarted from 0, nothing logged twice


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pathlib, training; "
                               "training.lock_out(pathlib.Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(60)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"--out {out}: another run is writing to it \(pid {holder.pid} on "):
            distill.main(parse(*MICRO, "--epochs", "1", "--out", str(out)))
    finally:
        holder.kill()
        holder.wait()
    distill.main(parse(*MICRO, "--epochs", "1", "--out", str(out)))  # the lock went with its process
    assert (out / "student.pth").is_file()


def test_a_file_system_without_locks_runs_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    training.lock_out(tmp_path)
    assert f"warning: cannot lock {tmp_path} ([Errno 37] No locks available)" in capsys.readouterr().out


def test_files_written_by_an_earlier_version_still_load_and_resume(tmp_path):
    # testdata/ holds tiny files written by an earlier version of the code, before its rooms were reorganised:
    # a distilled micro ViT (student.pth and its checkpoint.pth at step 2 of 2), a
    # classifier fine-tuned from it (best.pth), a micro SwinV2 student, and what each gave then on
    # fixed images. They must load to the same functions, and the checkpoint must resume.
    data = REPO / "testdata"
    expected = torch.load(data / "expected_outputs.pt", weights_only=True)
    images = expected["images"]
    with torch.no_grad():
        for name, file in [("student", "student.pth"), ("best", "best.pth"), ("swinv2_student", "swinv2_student.pth")]:
            model = load_model_file(data / file).eval()
            torch.testing.assert_close(model(images), expected[name], rtol=0, atol=0)
            # The same parameters in the same order: an optimizer state saved then loads by position.
            assert list(model.state_dict()) == list(torch.load(data / file, weights_only=True)["model"]), file
        teacher = load_teacher("mine", data / "checkpoint.pth", grid=4)  # the student of the checkpoint
        torch.testing.assert_close(teacher(images), expected["checkpoint_student"], rtol=0, atol=0)
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes((data / "checkpoint.pth").read_bytes())
    distill.main(parse(*MICRO, "--synthetic-images", "16", "--epochs", "2", "--out", str(out)))
    assert [r["step"] for r in read_log(out)] == [3, 4]
    finetune.main(ft_parse(*FT_MICRO, "--init", str(data / "student.pth"), "--epochs", "1", "--out",
                           str(tmp_path / "ft")))
    assert (tmp_path / "ft" / "best.pth").is_file()


# ----------------------------------------------------------------------------- torchrun's ranks: DDP
def test_torchrun_two_cpu_ranks_with_accumulation_hold_identical_weights(two_teachers_two_ranks):
    _, out, result = two_teachers_two_ranks  # 2 ranks x 2 images x 2 micro-steps, as the fixture says
    assert "2 process(es) x 2 images x 2 micro-steps = 8 images per step" in result.stdout
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert [r["step"] for r in read_log(out)] == list(range(1, 9))  # 64 images / 8 per step
    assert rank0["reductions"] == 8  # one all-reduce per optimizer step (one bucket), not one per micro-batch
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == 8
    torch.manual_seed(0)
    start = build_student("vit_micro_patch8", 32)  # the initialisation of the run: training moved it
    assert not torch.equal(rank0["blocks.0.attn.qkv.weight"], start.state_dict()["blocks.0.attn.qkv.weight"])


def test_a_rank_that_dies_takes_the_job_down_instead_of_hanging(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import distill\n"
        "real_loss, calls = distill.fd_loss, []\n"
        "def failing_loss(*args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 2:\n"
        "        raise RuntimeError('simulated failure on rank 1')\n"
        "    return real_loss(*args, **kwargs)\n"
        "distill.fd_loss = failing_loss\n"
        "distill.main(distill.get_args_parser().parse_args(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(driver), *MICRO, "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=180)  # rank 0 waits in an all-reduce: torchrun must end it
    assert result.returncode != 0 and "simulated failure on rank 1" in result.stderr


# ----------------------------------------------------------------------------- FSDP2 and sharded checkpoints
def test_fsdp_ddp_and_one_process_train_alike(tmp_path, straight, one_process):
    # DDP on 2 ranks with 2 micro-batches of 2; one process with 8: the same global batch of 8.
    run(tmp_path, tmp_path / "ddp", "--batch-size", "2", "--accum", "2")
    assert_same_training(tmp_path / "ddp", straight, rtol=1e-4)
    assert_same_training(one_process, straight, rtol=1e-4)
    assert losses(straight)[16] < 0.8 * losses(straight)[1]  # it trained
    meta = torch.load(straight / "checkpoint.dcp" / "meta.pth", weights_only=True)
    assert meta["step"] == 16 and meta["world_size"] == 2 and len(meta["rng"]) == 2 and "student" not in meta
    assert sorted(p.name for p in (straight / "checkpoint.dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_process(tmp_path, straight, capsys):
    # Every rank crashes in step 7; one process resumes the checkpoint of step 4 with the same global batch of 8:
    # the shards are redistributed. It needs no launcher: it resumes in this one. (Two ranks resume sharded
    # checkpoints in the tests of a killed rank and of SIGTERM.)
    out, argv = tmp_path / "crashed", ["--fsdp", "--save-every", "4"]
    result = run(tmp_path, out, *argv, "--batch-size", "4", fault="raise", at=7, check=False)
    assert result.returncode != 0 and not (out / "student.pth").exists()
    assert torch.load(out / "checkpoint.dcp" / "meta.pth", weights_only=True)["step"] == 4
    assert not (out / "checkpoint.dcp.tmp").exists()
    distill.main(distill.get_args_parser().parse_args([*FSDP_MICRO, *argv, "--batch-size", "8", "--out", str(out)]))
    assert f"resuming from {out / 'checkpoint.dcp'} at step 4" in capsys.readouterr().out
    assert_same_training(out, straight, rtol=1e-4)


def test_a_killed_rank_is_recovered_by_torchrun_restarts(tmp_path, straight):
    out = tmp_path / "killed"
    result = run(tmp_path, out, "--fsdp", "--batch-size", "4", "--save-every", "4", fault="kill", at=10, restarts=1)
    assert "resuming from" in result.stdout  # the restarted ranks found the checkpoint of step 8 by themselves
    assert_same_training(out, straight, rtol=1e-6)


def test_sigterm_saves_the_step_and_the_same_command_resumes_bitwise(tmp_path, straight, one_process, monkeypatch,
                                                                     capsys):
    # One process (this one, as distill.py's __main__ runs) gets SIGTERM in step 6: the step is saved, the run
    # leaves with 128 + 15.
    out = tmp_path / "stopped1"
    argv = [*FSDP_MICRO, "--batch-size", "8", "--save-every", "4", "--out", str(out)]
    with crash_at_call(monkeypatch, distill, "fd_loss", 6, signal.SIGTERM), pytest.raises(SystemExit) as leaving:
        distill_cli_in_process(monkeypatch, *argv)
    assert leaving.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 6: rerun the same command to resume" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 6
    distill_cli_in_process(monkeypatch, *argv)  # the same command
    assert_same_training(out, one_process, rtol=0)  # every step logged once; the same weights, bit for bit
    # torchrun gets it in rank 0's step 3 and forwards it to both ranks, which save the sharded step 3.
    out, argv = tmp_path / "stopped2", ["--fsdp", "--batch-size", "4", "--save-every", "4"]
    result = run(tmp_path, out, *argv, fault="term", at=3, check=False)
    assert result.returncode != 0, result.stderr[-3000:]
    assert "stopped by SIGTERM at step 3: rerun the same command to resume" in result.stderr, result.stderr[-3000:]
    assert torch.load(out / "checkpoint.dcp" / "meta.pth", weights_only=True)["step"] == 3
    run(tmp_path, out, *argv)  # the same command
    assert_same_training(out, straight, rtol=0)


def test_a_second_stop_signal_leaves_at_once_with_one_line(capsys):
    sys.path.insert(0, str(REPO))
    import training

    def interrupted_twice(args):
        training.receive_stop_signal(signal.SIGINT, None)  # the first: the step goes on, to be saved
        assert training.stop_requested(1, "cpu") == signal.SIGINT
        training.receive_stop_signal(signal.SIGINT, None)  # the second: out, now
        raise AssertionError("still running")
    with stop_signals_restored(), pytest.raises(SystemExit) as leaving:
        training.run_cli(interrupted_twice, None)
    assert leaving.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == "interrupted: left at once, the last checkpoint as it was\n"


def test_checkpoints_of_the_other_kind_are_refused(tmp_path, straight, monkeypatch, capsys):
    out = tmp_path / "mixed"
    shutil.copytree(straight, out)
    (out / ".lock").unlink()
    with pytest.raises(SystemExit) as status:
        distill_cli_in_process(monkeypatch, *FSDP_MICRO, "--batch-size", "8", "--out", str(out))  # no --fsdp
    assert status.value.code == 2
    assert f"{out} holds checkpoint.dcp, written with --fsdp: resume it as it was written" in capsys.readouterr().err


def test_finetune_with_fsdp_matches_ddp_and_resumes(tmp_path, capsys, finetuned_with_ddp_on_two_ranks):
    # 17 validation images: 3 batches on rank 0, 2 on rank 1, whose FSDP forwards must still pair up.
    ddp_out, _ = finetuned_with_ddp_on_two_ranks  # the same run with DDP (conftest.py)
    finetune_on_two_ranks(tmp_path / "fsdp", "--fsdp")
    ddp, fsdp = losses(ddp_out), losses(tmp_path / "fsdp")  # train lines, and the eval lines' losses
    assert ddp.keys() == fsdp.keys() and all(fsdp[k] == pytest.approx(ddp[k], rel=1e-4) for k in ddp)
    best = {name: torch.load(out / "best.pth", weights_only=True) for name, out in (("ddp", ddp_out),
                                                                                     ("fsdp", tmp_path / "fsdp"))}
    assert best["fsdp"]["top1"] == best["ddp"]["top1"] and best["fsdp"]["model"].keys() == best["ddp"]["model"].keys()
    for key, value in best["ddp"]["model"].items():
        torch.testing.assert_close(best["fsdp"]["model"][key], value, rtol=1e-4, atol=1e-4, msg=key)
    assert (tmp_path / "fsdp" / "checkpoint.dcp" / "meta.pth").is_file()
    # The sharded state resumes on one process with the same global batch (and finds nothing left to do): in this
    # process, as a one-process run needs no launcher.
    sys.path.insert(0, str(REPO))
    import finetune
    finetune.main(finetune.get_args_parser().parse_args([*FT_TWO_RANKS, "--batch-size", "8", "--fsdp", "--out",
                                                         str(tmp_path / "fsdp")]))
    assert f"resuming from {tmp_path / 'fsdp' / 'checkpoint.dcp'} at step 8" in capsys.readouterr().out


def test_bf16_fsdp_gathers_bf16_and_keeps_fp32_weights(tmp_path):
    # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): compute as DDP's bf16 autocast does, within
    # bf16's rounding; the weights written out stay fp32. The bf16 autocast reference runs in this process with the
    # global batch of 8: DDP's ranks compute one process's training (test_fsdp_ddp_and_one_process_train_alike), and
    # a second torchrun launch would only add its seconds. 4 steps: each one compared.
    sys.path.insert(0, str(REPO))
    import distill
    short = ["--amp", "bf16", "--epochs", "1", "--synthetic-images", "32"]
    run(tmp_path, tmp_path / "fsdp", *short, "--batch-size", "4", "--fsdp")
    distill.main(distill.get_args_parser().parse_args([*FSDP_MICRO, *short, "--batch-size", "8", "--out",
                                                       str(tmp_path / "autocast")]))
    autocast, fsdp = losses(tmp_path / "autocast"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == sorted(autocast) == [1, 2, 3, 4]
    assert all(fsdp[k] == pytest.approx(autocast[k], rel=2e-2) for k in autocast)
    assert {value.dtype for value in student(tmp_path / "fsdp").values()} == {torch.float32}


def test_a_folder_left_by_a_save_killed_mid_swap_does_not_block_the_next(tmp_path):
    sys.path.insert(0, str(REPO))
    import distill
    argv = [*FSDP_MICRO, "--fsdp", "--batch-size", "8", "--save-every", "4", "--out", str(tmp_path / "run")]
    distill.main(distill.get_args_parser().parse_args([*argv, "--epochs", "1"]))  # one process: DCP without sharding
    (tmp_path / "run" / "checkpoint.dcp.old").mkdir()
    (tmp_path / "run" / "checkpoint.dcp.old" / "__0_0.distcp").write_bytes(b"left over")
    distill.main(distill.get_args_parser().parse_args(argv))
    assert torch.load(tmp_path / "run" / "checkpoint.dcp" / "meta.pth", weights_only=True)["step"] == 16
    assert not (tmp_path / "run" / "checkpoint.dcp.old").exists()


def test_gradient_sync_reaches_ddp_through_torch_compile(tmp_path):
    import torch.distributed as dist
    sys.path.insert(0, str(REPO))
    import training
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        for train_model in (ddp, torch.compile(ddp)):
            with training.gradient_sync(train_model, enabled=False):
                assert not ddp.require_backward_grad_sync  # no all-reduce on this micro-batch
            assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


def test_fsdp_refuses_fp16_wherever_it_is_asked_for():
    sys.path.insert(0, str(REPO))
    import training
    with pytest.raises(ValueError, match=r"--fsdp runs with --amp bf16 or fp32"):
        training.wrap_model(torch.nn.Linear(2, 2), torch.device("cpu"), 1, fsdp=True, dtype=torch.float16)


def test_fsdp_reduces_gradients_in_fp32_as_the_official_ddp_does():
    # The official FD trains under DDP with fp32 master weights: gradients are all-reduced in fp32 whatever the
    # autocast. Sharded, every FSDP2 unit (each block, then the rest) must compute in the autocast dtype and
    # reduce-scatter in fp32; a bf16 reduce loses 16 bits of every summed gradient, which no loss comparison shows.
    import torch.distributed as dist
    sys.path.insert(0, str(REPO))
    import distill
    import models
    import training
    from torch.distributed.fsdp import FSDPModule
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = distill.FDStudent(models.build_student("vit_micro_patch8", 32), [64])
        training.wrap_model(model, torch.device("cpu"), 2, fsdp=True, dtype=torch.bfloat16)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 1 + len(model.student.blocks)
        policies = {(m._get_fsdp_state()._mp_policy.param_dtype, m._get_fsdp_state()._mp_policy.reduce_dtype)
                    for m in units}
        assert policies == {(torch.bfloat16, torch.float32)}
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the modules' imports
def test_imports_run_one_way():
    # Entry points on top, never imported by a module of the project; the rooms below them import each other in one
    # direction only (no circle), models.py imports none of them, and nothing imports timm or transformers.
    import ast
    entry_points = {"distill", "finetune", "diagnose", "bench", "export"}
    rooms = {path.stem for path in REPO.glob("*.py") if not path.stem.startswith(("test_", "conftest"))}
    assert entry_points <= rooms and {"models", "teachers", "data", "training"} <= rooms, rooms
    imports = {}
    for name in rooms:
        tree = ast.parse((REPO / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"timm", "transformers", "safetensors"}, name
        imports[name] = imported & rooms - {name}
        assert not imports[name] & entry_points, (name, imports[name] & entry_points)
    assert imports["models"] == set()
    below = {}  # every module a module reaches through its imports: itself among them would be a circle

    def reach(name, seen=()):
        assert name not in seen, f"an import circle: {' -> '.join([*seen, name])}"
        return below.setdefault(name, set().union(*[{m} | reach(m, (*seen, name)) for m in imports[name]]))
    for name in rooms:
        reach(name)


# ----------------------------------------------------------------------------- GPU only
@needs_cuda
def test_gpu_files_load_on_a_machine_without_one(tmp_path):
    out = tmp_path / "gpu"
    distill.main(parse(*MICRO, "--device", "cuda", "--epochs", "1", "--out", str(out)))
    saved = torch.load(out / "student.pth", weights_only=True)  # no map_location: as a user on a laptop would
    assert all(value.device.type == "cpu" for value in saved["model"].values())
    # The run goes on, on the CPU, in a process that sees no GPU (in a copy: this process holds the folder's lock);
    # then fine-tunes on the GPU, evaluated on the CPU.
    moved = tmp_path / "cpu"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock"))
    cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "distill.py"), *MICRO, "--epochs", "2", "--out", str(moved)],
                          env=cpu_only, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr[-2000:]
    assert [r["step"] for r in read_log(moved)] == list(range(1, 17))
    _, metrics = finetune.main(ft_parse(*FT_MICRO, "--init", str(out / "student.pth"), "--device", "cuda",
                                        "--epochs", "1", "--out", str(tmp_path / "ft")))
    done = subprocess.run([sys.executable, str(REPO / "finetune.py"), *FT_MICRO, "--eval-only", "--init",
                           str(tmp_path / "ft" / "best.pth")], env=cpu_only, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"top-1 {metrics['top1']:.2f}" in done.stdout, (metrics, done.stdout[-500:])


@needs_cuda
def test_gpu_sharded_checkpoint_resumes_on_the_cpu_and_back(tmp_path, straight):
    # torchrun's one process on the GPU writes checkpoint.dcp (step 4); a process that sees no GPU resumes it and
    # writes step 8; the GPU resumes that and ends the run that 2 CPU ranks ran straight.
    out = tmp_path / "moved"
    for device, fault, env in (("cuda", "raise", EXACT_GPU), ("cpu", "raise", dict(CUDA_VISIBLE_DEVICES="")),
                               ("cuda", None, EXACT_GPU)):
        result = run(tmp_path, out, "--fsdp", "--batch-size", "8", "--save-every", "4", "--device", device,
                     processes=1, torchrun=device == "cuda", fault=fault, at=6, check=fault is None, env=env)
        assert fault is None or torch.load(out / "checkpoint.dcp" / "meta.pth", weights_only=True)["step"] in (4, 8)
    assert "resuming from" in result.stdout and "on cuda" in result.stdout
    assert_same_training(out, straight, rtol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the GPU tier: NCCL between ranks needs 2 CUDA GPUs")
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]])
def test_gpu_two_ranks_over_nccl_train_as_the_cpu_ranks(tmp_path, straight, sharding):
    run(tmp_path, tmp_path / "nccl", *sharding, "--batch-size", "4", "--save-every", "4", "--device", "cuda",
        env=EXACT_GPU)
    assert_same_training(tmp_path / "nccl", straight, rtol=1e-3)
