"""models.py: the ViT student (relative position bias, attention paths and backends, initialisation, gradients, drop
path), Swin V1 and V2, the published parameter counts, and activation checkpointing, each checked against an
independent computation written here."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
import teachers
from conftest import (ESVIT_TINY, REPO, fd_closure, layer_norm, micro_pair, needs_cuda, randomise_,
                      reference_window_attention)
from diagnose import attention_maps
from models import (Attention, Classifier, SWIN_SIZES, SwinTransformer, VisionTransformer, build_student,
                    log_spaced_offsets, relative_position_index, window_partition, window_position_index,
                    window_reverse)
from teachers import build_from_arch, load_teacher, shared_bias_to_per_block


def build_swin(name, img_size, drop_path=0.0):
    return SwinTransformer(**models.swin_arch(name, img_size, drop_path))


def vit_student_params(c, depth, heads, patch, hidden, grid):
    """The FD ViT student's parameter count from its description (BEiT layout, no head): per block two
    LayerNorms, qkv without bias plus q and v biases, proj, the GELU MLP, two LayerScale vectors; then the
    patch embedding, class token, one shared relative position table ((2g-1)^2 + 3 rows) and the final norm."""
    block = 4 * c + 3 * c * c + 2 * c + c * c + c + 2 * c * hidden + hidden + c + 2 * c
    return depth * block + 3 * patch * patch * c + c + c + ((2 * grid - 1) ** 2 + 3) * heads + 2 * c


def swinv2_student_params(c, depths, heads):
    """SwinV2's count from the official swin_transformer_v2.py layout (no head): per block two post-norms,
    qkv without bias plus q and v biases, a per-head logit scale, the continuous position bias MLP
    (2 -> 512 -> heads), proj, the MLP (ratio 4); patch merging (4C -> 2C, no bias, norm on 2C); 4 px
    patch embedding with its norm; the final norm."""
    total = 3 * 16 * c + c + 2 * c
    for i, (depth, h) in enumerate(zip(depths, heads)):
        d = c * 2 ** i
        total += depth * (4 * d + 3 * d * d + 2 * d + h + (2 * 512 + 512 + 512 * h) + d * d + d + 8 * d * d + 5 * d)
        if i < len(depths) - 1:
            total += 8 * d * d + 4 * d
    return total + 2 * c * 2 ** (len(depths) - 1)


# ----------------------------------------------------------------------------- the ViT student
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

    fused = attn(x, bias)
    attn.keep_probs = True  # the explicit path, which keeps the probabilities
    explicit, returned = attn(x, bias), attn.probs
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returned, probs, atol=1e-6, rtol=1e-5)


def test_model_attention_path_returns_probabilities_and_same_tokens():
    torch.manual_seed(0)
    model = build_student("vit_micro_patch8", 32).eval()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.rand(2, 3, 32, 32)
    tokens, attns = attention_maps(model, images)
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
    assert (model.blocks[5].gamma_1 == 0.1).all() and not hasattr(model, "pos_embed")
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


def test_drop_path_scales_the_kept_samples_by_one_over_keep():
    torch.manual_seed(0)
    drop, x = models.DropPath(0.25).train(), torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 1 / 0.75) and torch.all(y[~kept] == 0)  # exactly 1/keep, or nothing
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop.eval()(x), x)


def test_the_vit_section_of_models_runs_alone_in_a_notebook(tmp_path):
    # A course copies the top of models.py, up to the Swin banner, into a notebook: it must run
    # with torch and einops alone and give the same student as the project.
    source = (REPO / "models.py").read_text()
    banner = "# ============================================================================= Swin"
    section = source[:source.index(banner)]
    imported = {line.split()[1].split(".")[0] for line in section.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"math", "re", "collections", "torch", "einops"}, imported
    (tmp_path / "notebook.py").write_text(section + (
        "\ntorch.manual_seed(0)\n"
        "student = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()\n"
        "torch.save({'state': student.state_dict(), 'out': student(torch.ones(1, 3, 32, 32))}, 'out.pt')\n"))
    result = subprocess.run([sys.executable, "notebook.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    student = build_student("vit_micro_patch8", 32).eval()
    student.load_state_dict(saved["state"])
    torch.testing.assert_close(student(torch.ones(1, 3, 32, 32)), saved["out"])


# ----------------------------------------------------------------------------- Swin
def test_window_partition_round_trip_and_order():
    x = torch.randn(2, 8, 12, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 3)
    torch.testing.assert_close(windows[1], x[0, 0:4, 4:8].reshape(16, 3), rtol=0, atol=0)  # raster order
    torch.testing.assert_close(windows[6 + 5], x[1, 4:8, 8:12].reshape(16, 3), rtol=0, atol=0)
    torch.testing.assert_close(window_reverse(windows, 4, 8, 12), x, rtol=0, atol=0)


def test_relative_index_and_log_spaced_offsets_against_offset_map():
    w = 3
    index, coords = window_position_index(w), log_spaced_offsets(w)
    cells = [(r, c) for r in range(w) for c in range(w)]
    assert index.shape == (w * w, w * w) and coords.shape == ((2 * w - 1) ** 2, 2)
    log8 = lambda t: math.copysign(math.log2(1 + abs(t) * 8 / (w - 1)) / 3, t)
    for i, (r1, c1) in enumerate(cells):
        for j, (r2, c2) in enumerate(cells):
            dr, dc = r1 - r2, c1 - c2
            assert index[i, j] == (dr + w - 1) * (2 * w - 1) + (dc + w - 1)
            assert coords[index[i, j]].tolist() == pytest.approx([log8(dr), log8(dc)], abs=1e-6)


@pytest.mark.parametrize("version", [1, 2])
def test_shifted_windows_give_zero_probability_across_regions(version):
    # At initialisation every visible pair has a clearly positive probability (randomised
    # weights with V2's temperature of 100 can push some below the smallest float).
    torch.manual_seed(0)
    model = build_swin(f"swin{'v2' if version == 2 else ''}_micro_window4", 32).eval()
    _, attns = attention_maps(model, torch.rand(2, 3, 32, 32))
    H, shift = 8, 2
    for block, probs in enumerate(attns[:2]):  # stage 0: an 8x8 map in 2x2 windows of 4x4
        assert probs.shape == (2 * 4, model.arch["num_heads"][0], 16, 16)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
        for window in range(4):
            top, left = 4 * (window // 2), 4 * (window % 2)
            wrapped = [(top + r >= H - shift, left + c >= H - shift) for r in range(4) for c in range(4)]
            allowed = torch.tensor([[a == b for b in wrapped] for a in wrapped])
            if block == 0:  # no shift: everything is visible
                allowed[:] = True
            for image in range(2):
                p = probs[image * 4 + window]  # (heads, 16, 16)
                assert (p[:, ~allowed] == 0).all() and (p[:, allowed] > 0).all()
    assert block == 1 and not allowed.all()  # the last window really was masked


def test_window_shrinks_to_the_map_and_then_does_not_shift():
    def layout(model):
        return [(stage.window, stage.blocks[1].shift, stage.blocks[1].attn_mask is not None)
                for stage in model.layers]

    assert layout(SwinTransformer(version=1, position_bias="per_block", **ESVIT_TINY)) == [
        (4, 2, True), (4, 2, True), (4, 0, False), (2, 0, False)]  # maps 16, 8, 4, 2
    narrow_w14 = SwinTransformer(version=1, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1],
                                 window_size=14, position_bias="per_block")  # EsViT's at 224 px
    assert layout(narrow_w14) == [(14, 7, True), (14, 7, True), (14, 0, False), (7, 0, False)]
    # maps 56, 28, 14, 7
    assert layout(build_swin("swinv2_micro_window7", 224)) == [(7, 3, True), (7, 3, True)]
    with pytest.raises(ValueError, match="windows"):
        build_swin("swin_micro_window5", 64)  # a 16x16 map does not split into 5x5 windows


def test_shapes_through_all_stages():
    model = build_swin("swinv2_tiny_window7", 224).eval()
    with torch.no_grad():
        tokens, attns = attention_maps(model, torch.rand(1, 3, 224, 224))
    assert tokens.shape == (1, 49, 768) and model.grid == (7, 7) and model.embed_dim == 768
    expected = [(64, 3)] * 2 + [(16, 6)] * 2 + [(4, 12)] * 6 + [(1, 24)] * 2  # (windows, heads)
    assert [tuple(a.shape) for a in attns] == [(n, h, 49, 49) for n, h in expected]
    micro = build_swin("swin_micro_window4", 32)
    images = torch.rand(3, 3, 32, 32)
    features = micro.forward_features(images)
    assert features.shape == (3, 16, 64) and micro.grid == (4, 4) and micro.num_prefix_tokens == 0
    torch.testing.assert_close(micro.norm(features), micro(images))  # forward = features + final norm


@pytest.mark.parametrize("version", [1, 2])
def test_block_fast_and_explicit_paths_equal_a_loop_over_windows(version):
    torch.manual_seed(1)
    model = randomise_(build_swin("swinv2_micro_window4_shared" if version == 2 else "swin_micro_window4", 32)).eval()
    stage, eps, w, heads = model.layers[0], model.norm.eps, 4, model.arch["num_heads"][0]
    x = torch.randn(2, 8, 8, 32)
    state = {k: v for k, v in stage.state_dict().items()}
    if version == 2:  # the stage's bias MLP evaluated on every (row, column) offset
        steps = [math.copysign(math.log2(1 + abs(t) * 8 / (w - 1)) / 3, t) for t in range(1 - w, w)]
        grid = torch.tensor([[[a, b] for b in steps] for a in steps])  # (2w-1, 2w-1, 2)
        hidden = torch.relu(grid @ state["rel_pos_bias.rpe_mlp.0.weight"].T
                            + state["rel_pos_bias.rpe_mlp.0.bias"])
        offset_bias_v2 = 16 * torch.sigmoid(hidden @ state["rel_pos_bias.rpe_mlp.2.weight"].T)
    for j, shift in enumerate([0, 2]):
        p = f"blocks.{j}."
        if version == 1:
            y = layer_norm(x, state, p + "norm1", eps)
            y = x + reference_window_attention(
                y, w, shift, heads, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"],
                state[p + "attn.proj.weight"], state[p + "attn.proj.bias"],
                state[p + "attn.relative_position_bias_table"].view(2 * w - 1, 2 * w - 1, -1))
            mlp_in = layer_norm(y, state, p + "norm2", eps)
        else:
            qkv_bias = torch.cat([state[p + "attn.q_bias"], torch.zeros(32), state[p + "attn.v_bias"]])
            temperature = state[p + "attn.logit_scale"].flatten().exp().clamp(max=100)
            y = reference_window_attention(
                x, w, shift, heads, state[p + "attn.qkv.weight"], qkv_bias, state[p + "attn.proj.weight"],
                state[p + "attn.proj.bias"], offset_bias_v2, temperature)
            y = x + layer_norm(y, state, p + "norm1", eps)
            mlp_in = y
        mlp = F.gelu(mlp_in @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"])
        mlp = mlp @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
        expected = y + (mlp if version == 1 else layer_norm(mlp, state, p + "norm2", eps))
        bias = stage.rel_pos_bias() if version == 2 else None
        fast = stage.blocks[j](x, bias)
        stage.blocks[j].attn.keep_probs = True
        explicit, probs = stage.blocks[j](x, bias), stage.blocks[j].attn.probs
        assert probs.shape == (8, heads, 16, 16)
        torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(explicit, expected, rtol=1e-4, atol=1e-4)


def test_v2_shared_bias_copied_into_every_block_keeps_the_function():
    shared = randomise_(build_swin("swinv2_micro_window4", 32)).eval()
    per_block = SwinTransformer(**dict(shared.arch, position_bias="per_block")).eval()
    converted = shared_bias_to_per_block(shared.state_dict())
    assert not any(".rel_pos_bias." in k and ".blocks." not in k for k in converted)
    per_block.load_state_dict(converted)  # strict
    assert sum(".blocks.1.rel_pos_bias.rpe_mlp.0.weight" in k for k in converted) == 2
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(per_block(images), shared(images))


@pytest.mark.parametrize("name", ["swin_micro_window4", "swinv2_micro_window4"])
def test_every_swin_parameter_gets_a_gradient(name):
    model = build_swin(name, 32, drop_path=0.1).train()
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    for key, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), key


def test_swin_official_initialisation():
    torch.manual_seed(0)
    v1, v2 = build_swin("swin_micro_window4", 32), build_swin("swinv2_micro_window4", 32)
    block1, block2 = v1.layers[0].blocks[0], v2.layers[0].blocks[0]
    assert block1.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert (block1.attn.qkv.bias == 0).all() and (block1.norm1.weight == 1).all() and v1.norm.eps == 1e-6
    assert block1.attn.relative_position_bias_table.std().item() == pytest.approx(0.02, rel=0.3)
    assert (block2.norm1.weight == 1e-5).all() and (block2.norm2.weight == 1e-5).all()  # post-norm gains
    assert (v2.norm.weight == 1).all() and v2.norm.eps == 1e-5
    torch.testing.assert_close(block2.attn.logit_scale.exp(), torch.full((2, 1, 1), 10.0))
    assert (block2.attn.q_bias == 0).all() and not hasattr(block2.attn, "k_bias")
    # fix_init_weight (models/swin_transformer_v2.py): block i of 4, counted from 1 across stages, has its
    # attn.proj and mlp.fc2 weights divided by sqrt(2 i); V1 has no such rescaling.
    for i, block in enumerate([b for stage in v2.layers for b in stage.blocks], start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * i), rel=0.1)
    assert v1.layers[1].blocks[1].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    # The classifier's head: trunc-normal .02 for Swin (its _init_weights), 1000 times smaller for the ViT.
    assert Classifier(v2, 1000).head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    vit = Classifier(build_student("vit_micro_patch8", 32), 1000)
    assert vit.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)


def test_names_and_rebuild_from_arch():
    model = randomise_(build_swin("swinv2_micro_window4_shared", 32, drop_path=0.2))
    assert model.arch["version"] == 2 and model.arch["position_bias"] == "shared"
    # Without the suffix, the official FD-EsViT student: a bias MLP in every block, none per stage.
    per_block = build_swin("swinv2_micro_window4", 32)
    assert per_block.arch["position_bias"] == "per_block" and per_block.layers[0].rel_pos_bias is None
    assert all(block.rel_pos_bias is not None for stage in per_block.layers for block in stage.blocks)
    assert model.arch["window_size"] == 4 and model.arch["drop_path"] == 0.2
    rates = [block.drop_path.p for stage in model.layers for block in stage.blocks]
    assert rates == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])  # linear over all blocks
    v1 = build_swin("swin_micro_window2", 16)
    assert (v1.arch["version"], v1.arch["window_size"], v1.arch["position_bias"]) == (1, 2, "per_block")
    assert SWIN_SIZES["base"] == (128, (2, 2, 18, 2), (4, 8, 16, 32))  # Swin-B, EsViT's and FD's
    assert SWIN_SIZES["tiny"] == (96, (2, 2, 6, 2), (3, 6, 12, 24))
    rebuilt = SwinTransformer(**model.arch).eval()
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(images), model.eval()(images))
    for bad in ("swin_huge_window7", "swinv2_base", "vit_base_patch16", "swin_micro_window4_shared"):
        with pytest.raises(ValueError, match="unknown Swin name"):
            models.swin_arch(bad, 224)


# ----------------------------------------------------------------------------- sizes
def test_large_student_sizes_match_published_parameter_counts():
    """ViT-B to ViT-g and SwinV2-G built on the meta device (no memory): exactly the count written out
    from the architecture, and within 1% of the published ones. Our students differ from the published
    models by: no classification head, no absolute position embedding (ViT-H/14 at 224: 257 x 1280 = 0.33M)
    but one shared relative position table (964 x 16 = 15k), no k bias, two LayerScale vectors per block;
    together under 0.5% for every ViT. SwinV2-G's 3.0B (SwinV2 paper, Table 1) may count a head (4096 x 1000,
    0.14%) and has an extra LayerNorm every 6 blocks of SwinV2-H/G (about 29k); we build neither."""
    # (name, published count, its source): rounded as published, hence the 1% tolerance.
    published = [("vit_base_patch16", 86e6, "ViT paper (arXiv 2010.11929) Table 1, ViT-B"),
                 ("vit_large_patch16", 304e6, "timm vit_large_patch16_224: 304.3M (303.3M without head)"),
                 ("vit_huge_patch14", 632e6, "ViT paper Table 1, ViT-H; timm vit_huge_patch14_224: 630.8M, no head"),
                 ("vit_giant_patch14", 1011e6, "EVA (arXiv 2211.07636) ViT-g/14; timm vit_giant_patch14_224: "
                                               "1012.6M with a 1000-class head, 1011.2M without"),
                 ("swinv2_giant_window7", 3.0e9, "SwinV2 paper (arXiv 2111.09883) Table 1, SwinV2-G")]
    expected = {"vit_base_patch16": vit_student_params(768, 12, 12, 16, 3072, 14),  # 85,665,360
                "vit_large_patch16": vit_student_params(1024, 24, 16, 16, 4096, 14),  # 303,136,192
                "vit_huge_patch14": vit_student_params(1280, 32, 16, 14, 5120, 16),  # 630,492,224
                "vit_giant_patch14": vit_student_params(1408, 40, 16, 14, 6144, 16),  # 1,010,912,320
                "swinv2_giant_window7": swinv2_student_params(512, (2, 2, 42, 4), (16, 32, 64, 128))}  # 2,997,815,008
    # The timm layout of ViT-H/14 without head (qkv bias, absolute positions, no LayerScale) gives the 630.8M above.
    c, hidden = 1280, 5120
    timm_huge = 32 * (4 * c + 4 * c * c + 4 * c + 2 * c * hidden + hidden + c) + 3 * 14 * 14 * c + 259 * c + 2 * c
    assert timm_huge == 630_764_800
    with torch.device("meta"):
        for name, count, source in published:
            model = build_student(name, 224)
            n = sum(p.numel() for p in model.parameters())
            assert n == expected[name], name
            assert abs(n - count) / count < 0.01, f"{name}: {n:,} vs {count:,.0f} ({source})"
            if name == "vit_giant_patch14":  # the 48/11 MLP ratio survives the arch round trip
                assert model.blocks[0].mlp.fc1.out_features == 6144
                assert build_from_arch(model.arch).blocks[-1].mlp.fc1.out_features == 6144
    assert teachers.teacher_arch("giant", 14)["mlp_ratio"] == 48 / 11  # a plain ViT-g teacher too


# ----------------------------------------------------------------------------- speed options keep the maths
@pytest.mark.parametrize("backend", ["MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
@pytest.mark.parametrize("name", ["vit_micro_patch8", "teacher"])
def test_every_attention_backend_equals_the_explicit_computation(backend, name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = (load_teacher("vit_micro_patch8", grid=4).encoder.requires_grad_(True) if name == "teacher"
             else build_student(name, 32)).to(device)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))  # a non-zero position bias, LayerScale off 0.1
    images = torch.rand(2, 3, 32, 32, device=device)
    explicit, _ = attention_maps(model, images)
    explicit.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            fused = model(images)
            fused.square().mean().backward()
    except RuntimeError as error:
        pytest.skip(f"{backend} has no kernel for this case on {device}: {str(error)[:60]}")
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["vit_micro_patch8", "swinv2_micro_window4", "swin_v1"])
def test_position_biases_reach_sdpa_contiguous(name, monkeypatch):
    """The GPU's fused SDPA kernels refuse a mask with a strided last dimension: the student would
    silently run the unfused math kernel."""
    model = (SwinTransformer(version=1, position_bias="per_block", **ESVIT_TINY) if name == "swin_v1"
             else build_student(name, 64))
    strides = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        strides.append(attn_mask.stride(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model(torch.rand(2, 3, 64, 64))
    assert strides and set(strides) == {1}


@pytest.mark.parametrize("name", ["vit_micro_patch8", "swinv2_micro_window4"])
def test_activation_checkpointing_gives_identical_gradients(name):
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_student(name, 32, drop_path=0.2).train()
        models.set_grad_checkpointing(model, checkpointed)
        torch.manual_seed(1)  # the same drop-path draws
        model(torch.rand(2, 3, 32, 32)).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- GPU only
@needs_cuda
@pytest.mark.parametrize("backend", ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"])
def test_gpu_fused_attention_takes_the_learned_bias_in_bf16(backend):
    # The student's bias requires grad, and the float mask rules out FlashAttention: the memory-efficient kernel
    # must take it (cuDNN's may refuse a bias that needs a gradient).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = build_student("vit_small_patch16", 64).cuda()  # 64-wide heads, as the real students have
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
    images = torch.rand(4, 3, 64, 64, device="cuda")
    explicit, _ = attention_maps(model, images)  # fp32, the probabilities' path
    explicit.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)), torch.autocast("cuda", dtype=torch.bfloat16):
            fused = model(images).float()
            fused.square().mean().backward()
    except RuntimeError as error:
        if backend == "EFFICIENT_ATTENTION":
            raise
        pytest.skip(f"{backend} takes no learned bias on this GPU: {str(error)[:80]}")
    torch.testing.assert_close(fused, explicit, rtol=5e-2, atol=5e-2)
    for n, p in model.named_parameters():  # bf16 gradients point where fp32's do
        assert F.cosine_similarity(p.grad.flatten(), expected[n].flatten(), dim=0) > 0.99, n
