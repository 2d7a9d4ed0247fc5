"""Fixtures shared by several test files: launches that more than one file's tests check."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
# Fine-tuning on 2 torchrun CPU ranks: 32 training images, a global batch of 8 (4 steps an epoch, 8 in all), and 17
# validation images: 9 on rank 0 (3 batches of 4 or fewer), 8 on rank 1 (2), an uneven split that must still count
# every image once.
FT_TWO_RANKS = ["--recipe", "vit_tiny_patch16", "--model", "vit_micro_patch8", "--img-size", "32", "--synthetic-images",
                "32", "--synthetic-val-images", "17", "--batch-size", "4", "--workers", "0", "--log-every", "1",
                "--amp", "fp32", "--epochs", "2", "--lr", "0.05", "--device", "cpu"]


def finetune_on_two_ranks(out, *extra):
    """finetune.py FT_TWO_RANKS under torchrun, 2 ranks; its result (stdout, stderr), having checked it succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "finetune.py"), *FT_TWO_RANKS, *extra, "--out", str(out)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def finetuned_with_ddp_on_two_ranks(tmp_path_factory):
    """finetune.py with DDP on 2 ranks (FT_TWO_RANKS): its folder and the launch's result. The reference of the FSDP
    fine-tuning (test_training.py) and the run whose uneven evaluation test_fd.py counts again."""
    out = tmp_path_factory.mktemp("finetune") / "ddp"
    return out, finetune_on_two_ranks(out)


@contextlib.contextmanager
def stop_signals_restored():
    """Around training.run_cli called in this process: after it, SIGTERM and Ctrl-C end pytest again (the handlers
    run_cli installs are put back) and no stop signal it received stays recorded for the next run."""
    import signal

    import training
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
    import distill
    import training
    monkeypatch.setattr(sys, "argv", ["distill.py", *argv])
    with stop_signals_restored():
        return training.run_cli(distill.main, distill.get_args_parser().parse_args(list(argv)))


def script_in_process(script, *argv):
    """`python SCRIPT ARGV` in this process: runpy runs the script's __main__ block, as a user's command does, with
    sys.argv set and stdout and stderr captured. A subprocess.CompletedProcess, as subprocess.run(..., text=True)
    gives, for commands that end within a second, where a new process would add seconds of imports."""
    import io
    import runpy
    from unittest import mock
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    try:
        with stop_signals_restored(), mock.patch.object(sys, "argv", [script, *map(str, argv)]), \
                contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    return subprocess.CompletedProcess([script, *argv], status, stdout.getvalue(), stderr.getvalue())
