"""Smoke and correctness tests on micro models: python -m pytest -q test_fd.py

Each test checks behaviour against an independent computation written here, not against the code
under test; subprocess tests run the real torchrun.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import distill
from data import SeededTransform, SyntheticShapes, fd_transform, image_dataset
from models import Attention, VisionTransformer, build_student, load_model_file, load_teacher, relative_position_index

REPO = Path(__file__).resolve().parent
MICRO = ["--teacher", "vit_micro_patch8", "--student", "vit_micro_patch8", "--img-size", "32",
         "--synthetic-images", "64", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--amp", "fp32"]


def parse(*argv):
    return distill.get_args_parser().parse_args(list(argv))


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def micro_pair(drop_path=0.0, seed=0):
    torch.manual_seed(seed)
    teacher = load_teacher("vit_micro_patch8", grid=4)
    model = distill.FDStudent(build_student("vit_micro_patch8", 32, drop_path), teacher.embed_dim)
    return teacher, model


def fd_closure(teacher):
    def compute_loss(model, images):
        prediction = model(images)
        return distill.fd_loss(prediction, distill.distillation_target(teacher, images, prediction.shape[1]))
    return compute_loss


# ----------------------------------------------------------------------------- models
def test_relative_position_index_layout():
    h, w = 3, 4
    index = relative_position_index(h, w)
    num_offsets = (2 * h - 1) * (2 * w - 1)
    assert index.shape == (1 + h * w, 1 + h * w)
    assert (index[0, 1:] == num_offsets).all()  # class -> token
    assert (index[1:, 0] == num_offsets + 1).all()  # token -> class
    assert index[0, 0] == num_offsets + 2
    # Patch pairs share an entry exactly when their (row, column) offsets are equal.
    cells = [(r, c) for r in range(h) for c in range(w)]
    entry_of_offset = {}
    for i, (ri, ci) in enumerate(cells):
        for j, (rj, cj) in enumerate(cells):
            entry = entry_of_offset.setdefault((ri - rj, ci - cj), index[1 + i, 1 + j].item())
            assert index[1 + i, 1 + j] == entry
    assert len(set(entry_of_offset.values())) == num_offsets == len(entry_of_offset)
    assert min(entry_of_offset.values()) == 0 and max(entry_of_offset.values()) == num_offsets - 1


def test_sdpa_path_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    dim, heads, n = 32, 4, 10
    attn = Attention(dim, heads, qv_bias=True)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x, bias = torch.randn(2, n, dim), torch.randn(heads, n, n)
    # Independent reference: softmax(Q K^T / sqrt(d) + B) V with q and v biases, k unbiased.
    w = attn.qkv.weight
    q = x @ w[:dim].T + attn.q_bias
    k = x @ w[dim:2 * dim].T
    v = x @ w[2 * dim:].T + attn.v_bias
    split = lambda t: t.view(2, n, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads) + bias, dim=-1)
    reference = attn.proj((probs @ v).transpose(1, 2).reshape(2, n, dim))

    fused, none = attn(x, bias)
    explicit, returned = attn(x, bias, return_attn=True)
    assert none is None
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returned, probs, atol=1e-6, rtol=1e-5)


def test_model_attention_path_returns_probabilities_and_same_tokens():
    torch.manual_seed(0)
    model = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.rand(2, 3, 32, 32)
    tokens, attns = model(images, return_attn=True)
    torch.testing.assert_close(tokens, model(images), atol=1e-5, rtol=1e-5)
    assert tokens.shape == (2, 1 + 16, 32) and len(attns) == 2
    assert attns[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(attns[1].sum(-1), torch.ones(2, 2, 17))
    with pytest.raises(ValueError, match="32 px"):
        model(torch.rand(1, 3, 48, 48))


def test_shared_bias_copied_into_every_block_keeps_the_function():
    # Fine-tuning gives every block its own table, each starting as a copy of the shared one.
    torch.manual_seed(0)
    shared = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        shared.rel_pos_bias.relative_position_bias_table.normal_()
    per_block = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  rel_pos="per_block").eval()
    state = shared.state_dict()
    table = state.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(2):
        state[f"blocks.{i}.rel_pos_bias.relative_position_bias_table"] = table.clone()
    per_block.load_state_dict(state)
    assert per_block.rel_pos_bias is None
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(per_block(images), shared(images))


def test_official_initialisation():
    model = build_student("vit_tiny_patch16", 224)
    table = model.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 14 - 1) ** 2 + 3, 3) and (table == 0).all()
    assert (model.blocks[5].gamma_1 == 0.1).all() and model.pos_embed is None
    assert "rel_pos_bias.index" not in model.state_dict()  # index tables are not saved
    # Output projections shrink as 1/sqrt(2 (i+1)): block 3's are half as large as block 0's.
    ratio = model.blocks[0].mlp.fc2.weight.std() / model.blocks[3].mlp.fc2.weight.std()
    assert abs(ratio - 2.0) < 0.05
    # A normal of std .02 truncated at one std (the official FD student): std .02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
    phi1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    expected_std = 0.02 * math.sqrt(1 - 2 * phi1 / mass)
    for weight in (model.blocks[0].attn.qkv.weight, model.patch_embed.weight):
        assert abs(weight.std() - expected_std) < 0.0003 and weight.abs().max() <= 0.02
    assert (model.patch_embed.bias == 0).all()
    rates = [block.drop_path.p for block in build_student("vit_tiny_patch16", 224, 0.2).blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_every_student_parameter_gets_a_gradient():
    teacher, model = micro_pair(drop_path=0.1)
    fd_closure(teacher)(model, torch.rand(4, 3, 32, 32)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


# ----------------------------------------------------------------------------- the FD objective
def test_fd_loss_equals_independent_computation():
    torch.manual_seed(0)
    teacher_tokens = torch.randn(3, 17, 24) * 5 + 2
    prediction = torch.randn(3, 17, 24) * 3
    mean = teacher_tokens.mean(-1, keepdim=True)
    var = ((teacher_tokens - mean) ** 2).mean(-1, keepdim=True)
    whitened = (teacher_tokens - mean) / torch.sqrt(var + 1e-5)
    diff = (prediction - whitened).abs()
    expected = torch.where(diff <= 2.0, 0.5 * diff ** 2 / 2.0, diff - 1.0).mean()
    target = distill.distillation_target(lambda images: teacher_tokens, None, 17)
    torch.testing.assert_close(distill.fd_loss(prediction, target), expected)
    assert (diff > 2).any() and (diff <= 2).any()  # both branches of smooth L1 exercised


def test_teacher_tokens_resized_to_student_grid():
    tokens = torch.randn(2, 1 + 16 * 16, 8)
    assert distill.resize_tokens(tokens, 257) is tokens
    constant = torch.ones(2, 1 + 16 * 16, 8) * torch.arange(8.0)
    constant[:, 0] = -1
    resized = distill.resize_tokens(constant, 1 + 14 * 14)
    assert resized.shape == (2, 197, 8)
    assert (resized[:, 0] == -1).all()
    torch.testing.assert_close(resized[:, 1:], torch.ones(2, 196, 8) * torch.arange(8.0))


def test_overfitting_one_batch_drives_the_loss_down():
    teacher, model = micro_pair()
    images = torch.rand(8, 3, 32, 32)
    optimizer = torch.optim.AdamW(distill.param_groups(model, 0.05), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [distill.optimizer_step(model, [images], fd_closure(teacher), optimizer, scaler, 3.0,
                                     torch.enable_grad).item() for _ in range(40)]
    assert losses[-1] < 0.3 * losses[0]


def test_gradient_accumulation_equals_one_step_on_the_double_batch():
    teacher, model_a = micro_pair()
    _, model_b = micro_pair()
    images = torch.rand(8, 3, 32, 32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for model, micro_batches in ((model_a, [images[:4], images[4:]]), (model_b, [images])):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses.append(distill.optimizer_step(model, micro_batches, fd_closure(teacher), optimizer, scaler, 1e9,
                                             torch.enable_grad))
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert any((a != b0).any() for a, b0 in zip(model_a.parameters(), micro_pair()[1].parameters()))


def test_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    # A one-process gloo group is enough to count DDP's gradient reductions.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        teacher, model = micro_pair()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        ddp.register_comm_hook(None, counting_hook)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        images = torch.rand(8, 3, 32, 32)
        distill.optimizer_step(ddp, [images], fd_closure(teacher), optimizer, scaler, 3.0, torch.enable_grad)
        per_step = len(reductions)
        distill.optimizer_step(ddp, [images[:2], images[2:4], images[4:6], images[6:]], fd_closure(teacher),
                               optimizer, scaler, 3.0, torch.enable_grad)
        assert per_step >= 1 and len(reductions) == 2 * per_step  # 4 micro-steps, one reduction
    finally:
        torch.distributed.destroy_process_group()


def test_weight_decay_groups_and_lr_schedule():
    _, model = micro_pair()
    groups = distill.param_groups(model, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {f"student.blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} | {
        "student.patch_embed.weight", "projector.weight"}
    # Warmup from warmup_lr to lr, then cosine to min_lr, by hand.
    kw = dict(total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1, warmup_lr=0.0)
    assert distill.lr_at(0, **kw) == 0.0 and distill.lr_at(5, **kw) == 0.5
    assert distill.lr_at(10, **kw) == 1.0 and distill.lr_at(110, **kw) == pytest.approx(0.1)
    assert distill.lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)


def test_compiled_run_matches_eager_and_saves_plain_keys(tmp_path):
    # A cold torch.compile takes about a minute on a 2-core CPU: the one compile in the suite.
    argv = [*MICRO, "--epochs", "1"]
    eager = distill.main(parse(*argv, "--out", str(tmp_path / "eager")))
    distill.main(parse(*argv, "--compile", "--out", str(tmp_path / "compiled")))
    state = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)
    assert set(state["student"]) == set(eager.state_dict())  # no _orig_mod. prefixes
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_presets_fill_unset_flags_and_flags_override():
    args = distill.apply_preset(parse("--teacher", "clip"))
    assert (args.student, args.drop_path, args.lr, args.epochs, args.img_size) == ("vit_base_patch16", 0.2, 3e-4,
                                                                                   300, 224)
    args = distill.apply_preset(parse("--teacher", "esvit", "--lr", "1e-3", "--drop-path", "0"))
    assert (args.lr, args.drop_path, args.min_lr) == (1e-3, 0.0, 1e-5)
    args = distill.apply_preset(parse("--teacher", "vit_small_patch16"))  # no preset: the paper's recipe
    assert (args.student, args.lr, args.epochs, args.img_size) == ("vit_small_patch16", 3e-4, 300, 224)


# ----------------------------------------------------------------------------- data
def test_synthetic_dataset_is_deterministic_labelled_and_split():
    train, val = SyntheticShapes(40, 64), SyntheticShapes(40, 64, split="val")
    a, label = train[7]
    assert a.size == (64, 64) and a.mode == "RGB" and label == 7
    assert a.tobytes() == train[7][0].tobytes() != val[7][0].tobytes()
    assert sorted(train[i][1] for i in range(40)) == sorted(list(range(10)) * 4)
    seeded = SeededTransform(train, fd_transform(32), seed=1)
    torch.manual_seed(123)
    first = seeded[3][0]
    state = torch.get_rng_state()
    assert torch.equal(first, seeded[3][0]) and torch.equal(state, torch.get_rng_state())
    seeded.epoch = 1
    assert first.shape == (3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert not torch.equal(first, seeded[3][0])  # a new epoch, a new crop


def write_images(folder, count, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folders_and_clear_errors(tmp_path):
    write_images(tmp_path / "imnet" / "train" / "cat", 5)
    write_images(tmp_path / "imnet" / "train" / "dog", 5)
    write_images(tmp_path / "flat", 6)
    labelled = image_dataset(tmp_path / "imnet")
    assert len(labelled) == 10 and labelled.classes == ["cat", "dog"] and labelled[9][1] == 1
    flat = image_dataset(tmp_path / "flat")
    assert len(flat) == 6 and flat[0][1] == -1 and flat[0][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="--data .*missing"):
        image_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data .*no images"):
        image_dataset(tmp_path / "empty")


# ----------------------------------------------------------------------------- end to end
def test_distill_on_image_folder_writes_checkpoint_student_and_log(tmp_path):
    write_images(tmp_path / "flat", 16)
    out = tmp_path / "run"
    student = distill.main(parse(*MICRO, "--data", str(tmp_path / "flat"), "--epochs", "2", "--out", str(out)))
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(set(r) >= {"step", "epoch", "loss", "lr", "img_per_s"} for r in log)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 4 and state["args"]["teacher"] == "vit_micro_patch8"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["student"])
    # The distilled student is a model file: it rebuilds, and can even serve as a teacher.
    rebuilt = load_model_file(out / "student.pth")
    images = torch.rand(2, 3, 32, 32)
    student.eval()
    torch.testing.assert_close(rebuilt.eval()(images), student(images))
    as_teacher = load_teacher("ignored", weights=out / "student.pth", grid=4)
    torch.testing.assert_close(as_teacher(images), student(images))
    with pytest.raises(ValueError, match="checkpoint.pth: not a model file"):
        load_model_file(out / "checkpoint.pth")


def test_resume_after_a_crash_continues_exactly(tmp_path, monkeypatch):
    argv = [*MICRO, "--epochs", "2", "--save-every", "5"]  # 8 steps per epoch, 16 in all
    full = distill.main(parse(*argv, "--out", str(tmp_path / "full")))

    real_step, calls = distill.optimizer_step, []

    def crash_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(distill, "optimizer_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))
    assert torch.load(tmp_path / "crashed" / "checkpoint.pth", weights_only=True)["step"] == 5
    monkeypatch.setattr(distill, "optimizer_step", real_step)
    resumed = distill.main(parse(*argv, "--out", str(tmp_path / "crashed")))

    steps = [r["step"] for r in read_log(tmp_path / "crashed")]
    assert steps == [1, 2, 3, 4, 5, 6] + list(range(6, 17))  # step 6 was logged, then redone
    full_log = {r["step"]: r for r in read_log(tmp_path / "full")}
    for record in read_log(tmp_path / "crashed")[6:]:
        assert record["lr"] == full_log[record["step"]]["lr"]
        assert record["loss"] == full_log[record["step"]]["loss"]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--student vit_micro_patch8 -> vit_tiny_patch8"):
        distill.main(parse(*argv, "--student", "vit_tiny_patch8", "--out", str(tmp_path / "crashed")))
    with pytest.raises(ValueError, match="--batch-size 8 -> 4"):
        distill.main(parse(*argv, "--batch-size", "4", "--out", str(tmp_path / "crashed")))


def test_non_finite_loss_stops_before_overwriting_the_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = distill.fd_loss, []

    def nan_from_step_3(prediction, target):
        calls.append(1)
        loss = real_loss(prediction, target)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(distill, "fd_loss", nan_from_step_3)
    out = tmp_path / "nan"
    argv = [*MICRO, "--epochs", "1", "--save-every", "2", "--log-every", "5", "--out", str(out)]
    with pytest.raises(FloatingPointError, match="step 4: the loss is nan; .*checkpoint.pth holds the last good"):
        distill.main(parse(*argv))
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["student"].values())


def test_torchrun_two_cpu_ranks_with_accumulation_hold_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import distill\n"
        "student = distill.main(distill.get_args_parser().parse_args(sys.argv[1:]))\n"
        f"torch.save(student.state_dict(), os.path.join({str(out)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(driver), *MICRO, "--accum", "2", "--batch-size", "4", "--epochs", "1", "--out", str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) x 4 images x 2 micro-steps = 16 images per step" in result.stdout
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]  # 64 images / 16 per step
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == 4
    torch.manual_seed(0)
    start = build_student("vit_micro_patch8", 32)  # the initialisation of the run: training moved it
    assert not torch.equal(rank0["blocks.0.attn.qkv.weight"], start.state_dict()["blocks.0.attn.qkv.weight"])
