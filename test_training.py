"""FSDP2 and sharded checkpoints of training.py (distill.py, finetune.py --fsdp): 2 CPU ranks, gloo, real torchrun.

What must hold: FSDP, DDP and one process compute the same training for the same global batch; a sharded
checkpoint written by 2 ranks resumes on 1 and on 2 (resharding) and continues the run it came from; a
rank killed under `torchrun --max-restarts 1` is recovered by the restarted ranks themselves; a run stopped by
SIGTERM saves its step, and the same command ends it as if uninterrupted."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FT_TWO_RANKS, distill_cli_in_process, finetune_on_two_ranks, stop_signals_restored

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier: needs a CUDA GPU")

REPO = Path(__file__).resolve().parent
# 64 synthetic images, a global batch of 8: 8 steps per epoch, 16 in all. No drop path, so that runs on
# different numbers of processes (whose drop-path draws differ) compute the same function.
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
         "64", "--workers", "0", "--log-every", "1", "--amp", "fp32", "--warmup-epochs", "0.5", "--drop-path", "0",
         "--epochs", "2", "--lr", "0.05", "--device", "cpu"]  # gloo ranks on the CPU, also on a GPU machine
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


def run(tmp_path, out, *argv, processes=2, fault=None, at=0, restarts=0, check=True, torchrun=None, env=()):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "--max-restarts", str(restarts)] if torchrun or processes > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1", FD_FAULT=fault or "", FD_FAULT_AT=str(at), **dict(env))
    result = subprocess.run([*launcher, str(driver), *MICRO, *argv, "--out", str(out)], env=env,
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
    """The uninterrupted run in one process (no torchrun), the same global batch of 8."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    run(tmp_path, tmp_path / "one", "--batch-size", "8", processes=1)
    return tmp_path / "one"


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """The FSDP run on 2 ranks, every rank crashing in step 7: its folder, as the crash left it, and the launch's
    result. Tests resume copies of it."""
    tmp_path = tmp_path_factory.mktemp("crashed")
    result = run(tmp_path, tmp_path / "crashed", "--fsdp", "--batch-size", "4", "--save-every", "4", fault="raise",
                 at=7, check=False)
    return tmp_path / "crashed", result


def assert_same_training(out, reference, rtol):
    ours, theirs = losses(out), losses(reference)
    assert sorted(ours) == list(range(1, 17))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=rtol), step
    a, b = student(out), student(reference)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=rtol, msg=key)


def test_fsdp_ddp_and_one_process_train_alike(tmp_path, straight, one_process):
    # DDP on 2 ranks with 2 micro-batches of 2; one process with 8: the same global batch of 8.
    run(tmp_path, tmp_path / "ddp", "--batch-size", "2", "--accum", "2")
    assert_same_training(tmp_path / "ddp", straight, rtol=1e-4)
    assert_same_training(one_process, straight, rtol=1e-4)
    assert losses(straight)[16] < 0.8 * losses(straight)[1]  # it trained
    meta = torch.load(straight / "checkpoint.dcp" / "meta.pth", weights_only=True)
    assert meta["step"] == 16 and meta["world_size"] == 2 and len(meta["rng"]) == 2 and "student" not in meta
    assert sorted(p.name for p in (straight / "checkpoint.dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_sharded_checkpoint_resumes_on_one_or_two_processes(tmp_path, straight, crashed, processes, capsys):
    left, result = crashed
    assert result.returncode != 0 and not (left / "student.pth").exists()
    assert torch.load(left / "checkpoint.dcp" / "meta.pth", weights_only=True)["step"] == 4
    assert not (left / "checkpoint.dcp.tmp").exists()
    out = tmp_path / "crashed"
    shutil.copytree(left, out)  # each number of processes resumes its own copy of the crashed run
    # The same global batch of 8 on another number of processes: the shards are redistributed. One process needs
    # no launcher: it resumes in this one.
    argv = ["--fsdp", "--batch-size", str(8 // processes), "--save-every", "4"]
    if processes == 1:
        import distill
        distill.main(distill.get_args_parser().parse_args([*MICRO, *argv, "--out", str(out)]))
        stdout = capsys.readouterr().out
    else:
        stdout = run(tmp_path, out, *argv, processes=processes).stdout
    assert f"resuming from {out / 'checkpoint.dcp'} at step 4" in stdout
    assert_same_training(out, straight, rtol=1e-4 if processes == 1 else 1e-6)


def test_a_killed_rank_is_recovered_by_torchrun_restarts(tmp_path, straight):
    out = tmp_path / "killed"
    result = run(tmp_path, out, "--fsdp", "--batch-size", "4", "--save-every", "4", fault="kill", at=10, restarts=1)
    assert "resuming from" in result.stdout  # the restarted ranks found the checkpoint of step 8 by themselves
    assert_same_training(out, straight, rtol=1e-6)


def test_sigterm_saves_the_step_and_the_same_command_resumes_bitwise(tmp_path, straight, one_process):
    # One process gets SIGTERM in step 6; torchrun gets it in rank 0's step 3 and forwards it to both ranks.
    for processes, reference in ((1, one_process), (2, straight)):
        out, argv = tmp_path / f"stopped{processes}", ["--batch-size", str(8 // processes), "--save-every", "4"]
        argv += ["--fsdp"] * (processes == 2)
        result = run(tmp_path, out, *argv, processes=processes, fault="term", at=6 if processes == 1 else 3,
                     check=False)
        stop = re.search(r"stopped by SIGTERM at step (\d+): rerun the same command to resume", result.stderr)
        assert result.returncode != 0 and stop, result.stderr[-3000:]
        assert processes == 2 or (result.returncode == 128 + signal.SIGTERM and stop[1] == "6")
        saved = out / ("checkpoint.dcp/meta.pth" if processes == 2 else "checkpoint.pth")
        assert torch.load(saved, weights_only=True)["step"] == int(stop[1]) < 16
        run(tmp_path, out, *argv, processes=processes)  # the same command
        assert_same_training(out, reference, rtol=0)  # every step logged once; the same weights, bit for bit


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
        distill_cli_in_process(monkeypatch, *MICRO, "--batch-size", "8", "--out", str(out))  # no --fsdp
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
    distill.main(distill.get_args_parser().parse_args([*MICRO, *short, "--batch-size", "8", "--out",
                                                       str(tmp_path / "autocast")]))
    autocast, fsdp = losses(tmp_path / "autocast"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == sorted(autocast) == [1, 2, 3, 4]
    assert all(fsdp[k] == pytest.approx(autocast[k], rel=2e-2) for k in autocast)
    assert {value.dtype for value in student(tmp_path / "fsdp").values()} == {torch.float32}


def test_a_folder_left_by_a_save_killed_mid_swap_does_not_block_the_next(tmp_path):
    sys.path.insert(0, str(REPO))
    import distill
    argv = [*MICRO, "--fsdp", "--batch-size", "8", "--save-every", "4", "--out", str(tmp_path / "run")]
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


# ----------------------------------------------------------------------------- GPU only
EXACT_GPU = dict(NVIDIA_TF32_OVERRIDE="0")  # no TF32 in cuDNN and cuBLAS: the GPU computes the CPU's function


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
