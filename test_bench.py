"""bench.py: the search for the largest batch that fits, and the timings of the distillation step (with one teacher
or several) and of the data pipeline."""
import argparse

import pytest
import torch

import bench
from conftest import needs_cuda


def test_bench_finds_the_largest_batch_that_fits(monkeypatch):
    import bench
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench.gc, "collect", lambda: 0)  # a full collection per try: half a minute in this process
    monkeypatch.setattr(bench, "random_images", lambda batch_size, cfg, device: batch_size)
    for capacity in (8, 13, 100, 130, 1000):
        def step(batch_size):
            if batch_size > capacity:
                raise torch.cuda.OutOfMemoryError("out of memory")
        for start, limit in ((8, 4096), (16, 128), (8, 64)):
            cfg = argparse.Namespace(batch_size=start, max_batch=limit)
            if start > capacity:
                with pytest.raises(SystemExit, match="does not fit"):
                    bench.largest_batch(step, cfg, None)
                continue
            found = bench.largest_batch(step, cfg, None)
            assert found <= min(capacity, limit) and (found == limit or found + 8 > capacity), (capacity, start, limit)


def test_bench_times_the_distill_step_and_the_data_pipeline(capsys):
    import bench
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8", "--img-size", "32", "--batch-size", "4",
            "--steps", "2", "--warmup", "1", "--amp", "bf16", "--compare"]
    bench.main(bench.get_args_parser().parse_args(argv))
    last = dict(field.split("=") for field in capsys.readouterr().out.strip().splitlines()[-1].split()[1:])
    assert set(last) == {"img/s", "step_ms", "peak_mem_mb", "mfu", "ratio"}
    assert float(last["img/s"]) > 0 and float(last["ratio"]) > 0
    step_ms = float(last["step_ms"])  # printed to 0.1 ms: a micro step of a few ms is known to 0.05 ms
    assert 4000 / (step_ms + 0.05) * 0.999 <= float(last["img/s"]) <= 4000 / (step_ms - 0.05) * 1.001
    bench.bench_data_pipeline(bench.get_args_parser().parse_args(["--img-size", "32"]), count=4)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("data img/s_per_worker=") and "device_decode_img/s=" in last


def test_bench_times_several_teachers_at_once(capsys):
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8,vit_micro_patch4", "--img-size", "32",
            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--amp", "fp32"]
    bench.main(bench.get_args_parser().parse_args(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "distill: vit_micro_patch8 + vit_micro_patch8,vit_micro_patch4 teachers, 32 px" in lines[-2]
    last = dict(field.split("=") for field in lines[-1].split()[1:])
    step_ms = float(last["step_ms"])  # printed to 0.1 ms: a micro step of a few ms is known to 0.05 ms
    assert 4000 / (step_ms + 0.05) * 0.999 <= float(last["img/s"]) <= 4000 / (step_ms - 0.05) * 1.001
    assert float(last["peak_mem_mb"]) > 0


# ----------------------------------------------------------------------------- GPU only
@needs_cuda
def test_gpu_bench_finds_the_largest_batch_and_reports_mfu(capsys):
    argv = ["--student", "vit_micro_patch8", "--teacher", "vit_micro_patch8", "--img-size", "32", "--batch-size", "8",
            "--max-batch", "96", "--steps", "2", "--warmup", "1", "--amp", "bf16"]
    bench.main(bench.get_args_parser().parse_args(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert "batch 96," in lines[-2]  # a micro step fits at the limit: doubled from 8 up to it
    last = dict(field.split("=") for field in lines[-1].split()[1:])
    assert float(last["img/s"]) > 0 and float(last["peak_mem_mb"]) > 0
    assert last["mfu"] == "n/a" or 0 < float(last["mfu"]) < 1
