"""The FD paper's diagnosis tools (arXiv 2205.14141): average attention distance, head diversity, averaged attention
maps and loss landscapes, plus linear CKA between layers and the top Hessian eigenvalue.

    python distill.py && python diagnose.py      # default: the random teacher vs its FD student, synthetic images
    python diagnose.py --out figures             # the README's figures, regenerated on purpose
    python diagnose.py --model "CLIP=clip" --model "FD-CLIP=out/fd_clip/student.pth" --data /data/imagenet --images 128

A model is `[LABEL=]SPEC`: a model file this project wrote (a distillation checkpoint.pth: its student) or a teacher
NAME[:WEIGHTS]. All see the same images in [0, 1] in eval mode and fp32. Each tool writes OUT/<tool>.json and PNGs.
"""
import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from data import SeededTransform, SyntheticShapes, eval_transform, image_dataset
from models import Classifier, relative_position_index
from teachers import load_model_file, load_pretrained
from training import NON_NEGATIVE, POSITIVE, number, run_cli

TOOLS = ("distance", "diversity", "maps", "landscape", "cka", "hessian")
DEFAULT_MODELS = ["Original=vit_tiny_patch16", "Distilled=out/distill/student.pth"]  # distill.py's default run


# ----------------------------------------------------------------------------- math (pure functions)
def patch_block(attn, num_prefix=1, renorm=True, eps=1e-32):
    """attn (B, H, P+N, P+N) -> the patch block (B, H, N, N) and the mass patch queries put on the P prefix tokens,
    mean over queries (B, H). `renorm` makes rows (A + eps) / sum(A + eps) as cl-vs-mim does; else that mass is lost."""
    patches = attn[:, :, num_prefix:, num_prefix:].float()
    if renorm:
        patches = (patches + eps) / (patches + eps).sum(-1, keepdim=True)
    return patches, attn[:, :, num_prefix:, :num_prefix].float().sum(-1).mean(-1)


def token_distances(grid):
    """Euclidean distance between all pairs of tokens of an (h, w) grid in raster order, in tokens (N, N)."""
    coords = torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1])).float()  # (N, 2): (row, column)
    return torch.cdist(coords, coords)


def attention_distance(patches, grid):
    """Mean attention distance in tokens (B, H): sum_j A_ij d(i, j), averaged over the queries i."""
    return (patches * token_distances(grid)).sum(-1).mean(-1)


def head_cosine(patches):
    """Cosine similarity between the heads' flattened N x N attention maps (B, H, H)."""
    flat = F.normalize(patches.flatten(2), dim=-1)
    return flat @ flat.transpose(1, 2)


def head_kl(patches, eps=1e-8):
    """Head diversity as KL(head h || head g) (B, H, H) of the rows smoothed by eps, mean over queries."""
    p = (patches + eps) / (patches + eps).sum(-1, keepdim=True)
    cross = torch.einsum("bhij,bgij->bhg", p, p.log()) / p.shape[-2]  # mean_i sum_j p_h log p_g
    return cross.diagonal(dim1=1, dim2=2)[:, :, None] - cross


def off_diagonal_mean(matrices):
    """(..., H, H) -> the mean over pairs h != g (...)."""
    h = matrices.shape[-1]
    return (matrices.sum((-2, -1)) - matrices.diagonal(dim1=-2, dim2=-1).sum(-1)) / (h * (h - 1))


def explained(maps, fit):
    """1 - |M - fit|^2 / |M - mean(M)|^2 over the last two dims: the share of M's variance `fit` explains, or NaN."""
    return 1 - (maps - fit).square().sum((-2, -1)) / (maps - maps.mean((-2, -1), keepdim=True)).square().sum((-2, -1))


def diag_score(maps, grid):
    """How much of maps (..., N, N) one value per (row, column) offset explains: FD students' diagonal patterns."""
    index = relative_position_index(*grid)[1:, 1:].flatten()  # the offset of every (query, key) pair
    sums = maps.new_zeros(*maps.shape[:-2], int(index.max()) + 1).index_add_(-1, index, maps.flatten(-2))
    return explained(maps, (sums / torch.bincount(index))[..., index].view(maps.shape))  # each pair: its offset's mean


def col_score(maps):
    """How much of the maps one key profile shared by every query explains: column patterns."""
    return explained(maps, maps.mean(-2, keepdim=True).expand(maps.shape))


def linear_cka(x, y):
    """Linear CKA of representations (n, ...) of the same n examples, centred: |Y^T X|_F^2 / (|X^T X|_F |Y^T Y|_F)."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    return ((k * l).sum() / (k.norm() * l.norm())).item()


def is_excluded(name, param):
    """Left alone by the landscape: 1-D (ignore='biasbn'), filterless tokens, position tables and MLPs, temperatures."""
    return param.ndim <= 1 or name.endswith(("cls_token", "reg_tokens", "pos_embed", "logit_scale")) or any(
        key in name for key in ("relative_position", "rpe_mlp", "cpb_mlp"))


def filter_normalized_direction(model, seed):
    """A Gaussian direction, each filter (dim-0 slice) at its weights' norm (Li et al. 2018); 0 where excluded."""
    generator, direction = torch.Generator().manual_seed(seed), {}
    for name, param in model.named_parameters():
        d = torch.randn(param.shape, generator=generator)  # drawn for all: excluding one changes no other
        if is_excluded(name, param):
            direction[name] = d.zero_()
        else:
            w, v = param.detach().flatten(1), d.flatten(1)
            direction[name] = (v * w.norm(dim=1, keepdim=True) / (v.norm(dim=1, keepdim=True) + 1e-10)).view_as(param)
    return direction


def top_hessian_eigenvalue(loss_fn, params, iters=50, tol=1e-3, seed=0):
    """Largest-magnitude Hessian eigenvalue of loss_fn(params) and its trace, by power iteration (double backprop)."""
    params = [p.detach().requires_grad_(True) for p in params]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        grads = torch.autograd.grad(loss_fn(params), params, create_graph=True)
    generator = torch.Generator().manual_seed(seed)
    hv, trace = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params], []
    for _ in range(iters):
        norm = math.sqrt(sum((x * x).sum().item() for x in hv))
        v = [x / norm for x in hv]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        trace.append(sum((a * b).sum() for a, b in zip(v, hv)).item())
        if len(trace) > 1 and abs(trace[-1] - trace[-2]) <= tol * abs(trace[-1]):
            break
    return trace[-1], trace


def flatness(alphas, curves, radii=(0.25, 0.5, 1.0)):
    """Of 1-D curves (seeds, alphas) averaged over seeds: the value at 0, the rise at the grid point nearest each radius
    r (mean of -r and +r), the curvature 2a of c + b x + a x^2 fitted over |alpha| <= 0.25 or the 3 points nearest 0."""
    alphas, curve = torch.tensor(alphas, dtype=torch.float64), torch.tensor(curves, dtype=torch.float64).mean(0)
    zero, rise = int(alphas.abs().argmin()), {}
    for r in radii:
        i = int(torch.where(alphas > 0, (alphas - r).abs(), math.inf).argmin())
        j = int((alphas + alphas[i]).abs().argmin())
        rise[f"{alphas[i].item():g}"] = ((curve[i] + curve[j]) / 2 - curve[zero]).item()
    near = alphas.abs() <= max(0.25, alphas.abs().sort().values[2].item())
    fit = torch.linalg.lstsq(torch.vander(alphas[near], 3, increasing=True), curve[near, None]).solution  # [1, x, x^2]
    return dict(at_0=curve[zero].item(), rise=rise, curvature=2 * fit[2, 0].item())


# ----------------------------------------------------------------------------- model plumbing
def attention_maps(encoder, images):
    """The encoder's output and every attention layer's probabilities in order (B or B * windows, heads, T, T)."""
    layers = [m for m in encoder.modules() if hasattr(m, "keep_probs")]
    for layer in layers:
        layer.keep_probs = True  # for this one forward
    try:
        return encoder(images), [layer.__dict__.pop("probs") for layer in layers]
    finally:
        for layer in layers:
            del layer.keep_probs  # back to the class's False


def encoder_of(model):
    return model.encoder if isinstance(model, Classifier) else model


def load_model(spec, is_file, img_size):
    """A model file this project wrote, the student of a distillation checkpoint.pth, or a teacher NAME[:WEIGHTS]."""
    name, _, weights = (spec, "", spec) if is_file else spec.partition(":")
    if is_file:
        with contextlib.suppress(ValueError):  # else a checkpoint.pth: load_pretrained reads its student
            return load_model_file(spec)
    flags = dict(name="--model", weights=f"as --model {name}:FILE")  # the messages speak of diagnose's own flag
    return load_pretrained(name, weights or None, img_size, flags=flags)


def load_models(specs, img_size=None):
    """([(label, spec, model)] frozen in eval mode, img size). Model files load first: the first one's size is the
    default, also for the teachers (whose position embeddings are resized to it)."""
    parsed = [s.split("=", 1) if "=" in s else (None, s) for s in specs]
    is_file = [Path(spec).is_file() or (":" not in spec and spec.endswith((".pth", ".pt"))) for _, spec in parsed]
    labels = [label or (Path(spec).with_suffix("").as_posix() if file else spec)
              for (label, spec), file in zip(parsed, is_file)]
    for i, label in enumerate(labels):  # results are keyed by label: a second model would replace the first
        if label in labels[:i]:
            raise ValueError(f"--model {specs[labels.index(label)]} and --model {specs[i]} are both labelled "
                             f"{label!r}: give each its own LABEL=, e.g. --model {label}-2={parsed[i][1]}")
    models = {i: load_model(spec, True, None) for i, (_, spec) in enumerate(parsed) if is_file[i]}
    img_size = img_size or next((encoder_of(m).arch["img_size"] for m in models.values()), None)
    models.update({i: load_model(spec, False, img_size) for i, (_, spec) in enumerate(parsed) if not is_file[i]})
    img_size = img_size or encoder_of(models[0]).arch["img_size"]  # teachers alone: the first one's own
    for i, (_, spec) in enumerate(parsed):
        if encoder_of(models[i]).arch["img_size"] != img_size:
            raise ValueError(f"--model {spec} takes {encoder_of(models[i]).arch['img_size']} px images, not "
                             f"{img_size}: all models must see the same images (set --img-size)")
    return [(labels[i], spec, models[i].eval().requires_grad_(False)) for i, (_, spec) in enumerate(parsed)], img_size


def load_images(data, count, img_size):
    """`count` images in [0, 1] spread over the dataset (unreadable: the next readable), labels (-1: none), source."""
    dataset = image_dataset(data, split="val") if data else SyntheticShapes(count, split="val")
    n, seen, dataset = len(dataset), {}, SeededTransform(dataset, eval_transform(img_size))  # unreadable: warned
    for start in torch.linspace(0, n - 1, min(count, n)).round().long().tolist():
        for i in (j % n for j in range(start, start + n)):  # this spread point, else the next readable image
            if i not in seen and isinstance(seen.setdefault(i, dataset[i]), tuple):
                break
    indices = sorted(i for i, sample in seen.items() if isinstance(sample, tuple))
    if len(indices) < count:
        raise ValueError(f"--data {data}: {len(indices)} readable images ({len(seen) - len(indices)} unreadable, named "
                         f"in the warnings), fewer than --images {count}: lower --images or add images")
    return torch.stack([seen[i][0] for i in indices]), torch.tensor([seen[i][1] for i in indices]), dict(
        data=str(data or "SyntheticShapes(split='val')"), indices=indices, unreadable=len(seen) - len(indices))


def token_layout(attn, batch, num_prefix, img_size):
    """The square token grid of a map and a token's size in px. Swin's maps (B * windows, H, w*w, w*w) are per window,
    so distances are measured inside windows (those between tokens a shifted window wraps are masked anyway)."""
    n, windows = attn.shape[-1] - num_prefix, attn.shape[0] // batch
    side = math.isqrt(n)
    if side * side != n or attn.shape[0] % batch:
        raise ValueError(f"attention of shape {tuple(attn.shape)} for {batch} images is not over square grids")
    return (side, side), img_size / math.sqrt(windows * n)


@torch.no_grad()
def run_attention(model, images, batch_size, renorm, keep_layers, desc=""):
    """Per layer attention statistics averaged over images (windows); each block's output per image; pooled features."""
    encoder = encoder_of(model)
    prefix = encoder.num_prefix_tokens + getattr(encoder, "num_registers", 0)  # DINOv2's registers attend too
    blocks = [m for m in encoder.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    layers, sums, features = [[] for _ in blocks], [], []
    hooks = [b.register_forward_hook(lambda m, i, o, l=l: layers[l].append(
        (o[0] if isinstance(o, tuple) else o).flatten(1))) for l, b in enumerate(blocks)] if keep_layers else []
    try:
        for x in tqdm(images.split(batch_size), desc=desc, leave=False):
            tokens, attns = attention_maps(encoder, x)
            features.append(tokens[:, encoder.num_prefix_tokens:].mean(1))  # the output has no registers
            sums = sums or [dict(n=0) for _ in attns]
            for s, attn in zip(sums, attns):
                s["grid"], s["pixels"] = token_layout(attn, len(x), prefix, images.shape[-1])
                patches, prefix_mass = patch_block(attn, prefix, renorm)
                s["n"] += len(patches)
                for key, value in dict(distance=attention_distance(patches, s["grid"]), prefix=prefix_mass,
                                       cosine=head_cosine(patches), kl=head_kl(patches), maps=patches).items():
                    s[key] = s.get(key, 0) + value.sum(0)  # summed over images (windows) here, divided by n below
    finally:
        for hook in hooks:
            hook.remove()
    stats = [{k: v / s["n"] if torch.is_tensor(v) else v for k, v in s.items()} for s in sums]
    return stats, [torch.cat(x) for x in layers if x], torch.cat(features)


class LinearProbe(nn.Module):
    """An encoder read out linearly from its mean output patch token; the readout in buffers, never perturbed."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("weight", head.weight.detach())
        self.register_buffer("bias", head.bias.detach())

    def forward(self, images):
        return F.linear(self.encoder(images)[:, self.encoder.num_prefix_tokens:].mean(1), self.weight, self.bias)


def fit_linear_head(features, labels, num_classes, weight_decay=1e-3, steps=100):
    """A Linear head by full-batch L-BFGS from zero on standardised features (folded in after): cheap, deterministic."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    z, head = (features - mean) / std, nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(z), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        head.bias -= (head.weight / std) @ mean
        head.weight /= std
    return head.requires_grad_(False)


def classifiers_of(models, features, labels, weight_decay):
    """{label: (classifier, its head in words)}: an encoder has no head for the loss, so it gets a probe."""
    own = "the model's own fine-tuned head; encoder and head perturbed"
    probe = (f"a linear head fitted on the frozen mean output patch token of these images (L-BFGS, "
             f"L2 {weight_decay:g}), then held fixed; only the encoder perturbed")
    heads = {label: fit_linear_head(features[label], labels, int(labels.max()) + 1, weight_decay)
             for label, _, model in models if not isinstance(model, Classifier)}
    return {label: (LinearProbe(model, heads[label]), probe) if label in heads else (model, own)
            for label, _, model in models}


@torch.no_grad()
def landscape(model, images, labels, alphas, seeds, batch_size, plane=None, desc=""):
    """Loss and accuracy at theta + alpha d for a filter-normalised direction d per seed ([seed][alpha]); with `plane`
    (steps), also at theta + a d + b e for the first seed's d and e from seed + 1000 ([a][b])."""
    theta = {n: p.detach() for n, p in model.named_parameters() if not is_excluded(n, p)}

    def evaluate(*steps):  # mean cross-entropy and top-1 accuracy at theta + the sum of step * direction
        params = {n: t + sum(a * d[n] for a, d in steps) for n, t in theta.items()}
        batches = zip(images.split(batch_size), labels.split(batch_size))
        outputs = [(functional_call(model, params, (x,)), y) for x, y in batches]
        loss = sum(F.cross_entropy(logits, y, reduction="sum").item() for logits, y in outputs)
        return loss / len(images), sum((logits.argmax(-1) == y).sum().item() for logits, y in outputs) / len(images)
    rows = []  # [seed][alpha]: (loss, accuracy)
    for seed in seeds:
        d = filter_normalized_direction(model, seed)  # one at a time: a direction is as large as the model
        rows.append([evaluate((a, d)) for a in tqdm(alphas, desc=f"{desc} seed {seed}", leave=False)])
    curves = {key: [[p[k] for p in row] for row in rows] for k, key in enumerate(("loss", "acc"))}
    if plane:
        d, e = filter_normalized_direction(model, seeds[0]), filter_normalized_direction(model, seeds[0] + 1000)
        grid = [[evaluate((a, d), (b, e)) for b in plane] for a in tqdm(plane, desc=f"{desc} 2-D", leave=False)]
        curves["loss_2d"], curves["acc_2d"] = ([[p[k] for p in row] for row in grid] for k in (0, 1))
    return curves


# ----------------------------------------------------------------------------- the tools
def attention_distance_tool(models, stats, renorm, report):
    """The paper's Fig. 1: a dot per head at (layer, mean attention distance in px), one y-range for all."""
    results = {}
    for label, spec, model in models:
        layers = stats[label]
        px = [(s["distance"] * s["pixels"]).tolist() for s in layers]
        results[label] = dict(
            source=spec, grids=[s["grid"] for s in layers], pixels_per_token=[s["pixels"] for s in layers],
            distance_px=px, distance_tokens=[s["distance"].tolist() for s in layers],
            cls_mass=[s["prefix"].tolist() for s in layers] if encoder_of(model).num_prefix_tokens else None,
            layer_mean=[sum(h) / len(h) for h in px], layer_range=[[min(h), max(h)] for h in px],
            layer_std=[torch.tensor(h).std(unbiased=False).item() for h in px],
            uniform_px=[(token_distances(s["grid"]).mean() * s["pixels"]).item() for s in layers])
    report.json("attn_distance.json", renorm=renorm, eps=1e-32, models=results)
    top = 1.1 * max(max(max(map(max, r["distance_px"])), max(r["uniform_px"])) for r in results.values())
    with report.figure("attn_distance.png", len(results), 3.6, 3) as (fig, axes):
        for ax, (label, r) in zip(axes, results.items()):
            for layer, heads in enumerate(r["distance_px"]):
                ax.scatter([layer] * len(heads), heads, c=list(range(len(heads))), cmap="viridis", s=14,
                           label=None if layer else "a head (colour: its index)")
            ax.plot(r["uniform_px"], "--", color="grey", lw=1, label="uniform attention")
            ax.set(title=label, xlabel="Network layer", ylabel="Attention distance (px)", ylim=(0, top),
                   xticks=range(0, len(r["distance_px"]), max(1, len(r["distance_px"]) // 6)))
        axes[0].legend(fontsize=7)


def head_diversity_tool(stats, renorm, report):
    """Per layer, the mean cosine similarity and KL divergence between heads; the KL also per head."""
    results = {label: dict(
        cosine=[off_diagonal_mean(s["cosine"]).item() for s in layers],
        kl=[off_diagonal_mean(s["kl"]).item() for s in layers],
        kl_per_head=[(s["kl"].sum(1) / max(1, len(s["kl"]) - 1)).tolist() for s in layers],
        cosine_matrix=[s["cosine"].tolist() for s in layers], kl_matrix=[s["kl"].tolist() for s in layers])
        for label, layers in stats.items()}
    report.json("head_diversity.json", renorm=renorm, kl_eps=1e-8, models=results)
    with report.figure("head_diversity.png", 2, 4, 3) as (fig, (cos_ax, kl_ax)):
        for label, r in results.items():
            line, = cos_ax.plot(r["cosine"], "o-", label=label, ms=4)
            for layer, heads in enumerate(r["kl_per_head"]):
                kl_ax.scatter([layer] * len(heads), heads, s=6, color=line.get_color(), alpha=0.5)
            kl_ax.plot(r["kl"], "o", ms=7, color=line.get_color())  # the layer mean
        cos_ax.set(xlabel="Network layer", ylabel="Cosine similarity between heads")
        kl_ax.set(xlabel="Network layer", ylabel="KL divergence between heads")
        cos_ax.legend(fontsize=8)


def attention_maps_tool(stats, report):
    """Averaged maps, scored for diagonal and column patterns; per layer a figure: a row per model, a head each."""
    maps = {label: [s["maps"] for s in layers] for label, layers in stats.items()}
    scores = {label: dict(diag_score=[diag_score(s["maps"], s["grid"]).tolist() for s in layers],
                          col_score=[col_score(s["maps"]).tolist() for s in layers]) for label, layers in stats.items()}
    torch.save(maps, report.folder / "attn_maps.pt")  # {label: [(heads, N, N) per layer]}: too large for JSON
    report.json("attn_maps.json", maps_file="attn_maps.pt", models=scores)
    for layer in range(max(len(m) for m in maps.values())):
        shown = {label: m[layer] for label, m in maps.items() if layer < len(m)}  # (heads, N, N) per model
        columns = max(map(len, shown.values()))
        with report.figure(f"attn_maps_L{layer}.png", columns, 2.4, 2.4, rows=len(shown)) as (fig, axes):
            for row, (label, heads) in zip(axes, shown.items()):
                for ax in row[len(heads):]:  # a model with fewer heads than another
                    ax.axis("off")
                for h, (ax, m) in enumerate(zip(row, heads)):
                    image = ax.imshow(m.numpy(), cmap="viridis", interpolation="nearest")
                    fig.colorbar(image, ax=ax, fraction=0.046).ax.tick_params(labelsize=6)  # each its own scale
                    ax.set(xticks=[], yticks=[], xlabel="key", ylabel="query")
                    ax.set_title(f"{label} h{h}\ndiag {scores[label]['diag_score'][layer][h]:.2f} "
                                 f"col {scores[label]['col_score'][layer][h]:.2f}", fontsize=7)
            fig.suptitle(f"Averaged attention maps, layer {layer}", fontsize=9)


def cka_tool(layers, report):
    """Linear CKA between every layer of one model and every layer of another (or of itself, if alone)."""
    labels = list(layers)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]] or [(labels[0], labels[0])]
    results = [dict(x=a, y=b, cka=[[linear_cka(u, v) for v in layers[b]] for u in layers[a]])
               for a, b in tqdm(pairs, desc="CKA", leave=False)]
    report.json("cka.json", representation="each block's output tokens, flattened per image", pairs=results)
    with report.figure("cka.png", len(results), 3.6, 3.2) as (fig, axes):
        for ax, pair in zip(axes, results):  # colours span the values: CKA near 1 everywhere still shows structure
            low, high = min(map(min, pair["cka"])), max(map(max, pair["cka"]))
            image = ax.imshow(pair["cka"], origin="lower", vmin=low, vmax=high, cmap="magma", aspect="auto")
            ax.set(xlabel=f"{pair['y']}: layer", ylabel=f"{pair['x']}: layer",
                   title=f"Linear CKA\n{low:.6g} to {high:.6g}")
            ax.locator_params(integer=True)  # layers are whole numbers
            fig.colorbar(image, ax=ax, format="%.6g")


def landscape_tool(classifiers, images, labels, args, report):
    """Loss and accuracy along random directions, mean +- std over seeds; with --grid-2d, log-loss contours."""
    alphas = torch.linspace(-1, 1, args.points).tolist()
    plane = torch.linspace(-1, 1, args.grid_2d).tolist() if args.grid_2d else None
    seeds, results = [args.seed + i for i in range(args.seeds)], {}
    for label, (model, head) in classifiers.items():
        r = landscape(model, images, labels, alphas, seeds, args.batch_size, plane, desc=label)
        results[label] = dict(r, head=head, loss_flatness=flatness(alphas, r["loss"]),
                              acc_flatness=flatness(alphas, r["acc"]),
                              excluded_keys=[n for n, p in model.named_parameters() if is_excluded(n, p)])
    report.json("loss_landscape.json", alphas=alphas, plane_2d=plane, seeds=seeds, norm="filter", ignore="biasbn",
                models=results)
    with report.figure("loss_landscape_1d.png", 2, 4, 3) as (fig, axes):
        for label, r in results.items():
            for ax, key in zip(axes, ("loss", "acc")):
                std, mean = torch.std_mean(torch.tensor(r[key]), 0, unbiased=False)  # over the seeds
                line, = ax.plot(alphas, mean, label=label)
                ax.fill_between(alphas, mean - std, mean + std, alpha=0.25, color=line.get_color())
        axes[0].set(xlabel="alpha (filter-normalised direction)", ylabel="Cross-entropy", yscale="log")
        axes[1].set(xlabel="alpha (filter-normalised direction)", ylabel="Top-1 accuracy", ylim=(0, 1))
        axes[0].legend(fontsize=8)
    if plane:
        with report.figure("loss_landscape_2d.png", len(results), 3.4, 3) as (fig, axes):
            for ax, (label, r) in zip(axes, results.items()):
                ax.contour(plane, plane, torch.tensor(r["loss_2d"]).log10().T.tolist(), levels=12)
                ax.set(title=f"{label}: log10 loss", xlabel="alpha", ylabel="beta")


def hessian_tool(classifiers, images, labels, args, report):
    """The top Hessian eigenvalue in the parameters the landscape perturbs, and its power iteration."""
    x, y, results = images[:args.hessian_images], labels[:args.hessian_images], {}
    for label, (model, head) in tqdm(classifiers.items(), desc="Hessian", leave=False):
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if not is_excluded(n, p)])
        loss_fn = lambda ps: F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)  # noqa: E731
        value, trace = top_hessian_eigenvalue(loss_fn, params, args.hessian_iters, seed=args.seed)
        results[label] = dict(lambda_max=value, trace=trace, head=head, n_params=sum(p.numel() for p in params))
    report.json("hessian.json", n_images=len(x), params="those the landscape perturbs", models=results)
    with report.figure("hessian.png", 1, 4, 3) as (fig, (ax,)):
        for label, r in results.items():
            ax.plot(r["trace"], label=f"{label}: {r['lambda_max']:.3g}")
        ax.set(xlabel="Power iteration", ylabel="v.Hv", title="Top Hessian eigenvalue", yscale="symlog")
        ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- outputs
class Report:
    """The output folder: OUT/<name>.json, each opening with the images measured, and OUT/<name>.png."""

    def __init__(self, folder, dpi, **images):
        self.folder, self.dpi, self.images = Path(folder), dpi, images
        self.folder.mkdir(parents=True, exist_ok=True)

    def json(self, name, **fields):
        """NaN (the score of a constant map) written as null: JSON has no NaN."""
        text = json.dumps(dict(self.images, **fields))
        (self.folder / name).write_text(json.dumps(json.loads(text, parse_constant=lambda constant: None), indent=1))

    @contextlib.contextmanager
    def figure(self, name, count, width, height, rows=None):
        """Yields a figure of rows x count panels of width x height inches, and its axes (rows=None: a row's)."""
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")  # files only: no display needed
        fig, axes = plt.subplots(rows or 1, count, figsize=(width * count, height * (rows or 1)), squeeze=False,
                                 layout="constrained")  # room for titles, labels and colour bars
        yield fig, axes[0] if rows is None else axes
        fig.savefig(self.folder / name, dpi=self.dpi)
        plt.close(fig)


# ----------------------------------------------------------------------------- parser and main
def checked(parse, test, expected):
    """An argparse type: `parse` (training.number), then a value failing `test` refused, saying what is expected."""
    def check(text):
        if not test(value := parse(text)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {expected}")
        return value
    return check


def tool_list(text):
    tools, valid = {t.strip() for t in text.split(",")} - {""}, ", ".join(TOOLS)
    if not tools or tools - set(TOOLS):
        raise argparse.ArgumentTypeError(f"unknown tool {', '.join(sorted(tools - set(TOOLS)))}: the tools are {valid}"
                                         if tools else f"no tool named: give one or more of {valid}, comma-separated")
    return tools


def get_args_parser():
    p = argparse.ArgumentParser("diagnose.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", help="[LABEL=]SPEC, repeatable: a model file (student.pth, "
                   f"checkpoint.pth, a fine-tuned classifier) or a teacher NAME[:WEIGHTS] [{' '.join(DEFAULT_MODELS)}]")
    p.add_argument("--data", help="ImageFolder root (val/ if present) or a flat image folder [the synthetic val split]")
    p.add_argument("--out", default="out/diagnose", help="output folder for the JSON and PNG files")
    p.add_argument("--tools", type=tool_list, default=",".join(TOOLS), help="comma-separated subset of the tools")
    p.add_argument("--images", type=POSITIVE, default=64, help="images, spread over the dataset (paper: 128+)")
    p.add_argument("--img-size", type=POSITIVE, help="image size [the first model file's, else the first teacher's]")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="images per forward pass")
    p.add_argument("--no-renorm", dest="renorm", action="store_false", help="drop the class token's attention "
                   "without renormalising the patch rows (renormalise: %(default)s)")
    p.add_argument("--points", type=checked(POSITIVE, lambda v: v % 2, "an odd number (alpha 0 on the grid)"),
                   default=17, help="alphas in [-1, 1] of the 1-D landscape (odd: 0 included)")
    p.add_argument("--seeds", type=POSITIVE, default=3, help="random directions per model in the 1-D landscape")
    p.add_argument("--grid-2d", type=checked(number(int), lambda v: v == 0 or v >= 2, "0 (none) or at least 2"),
                   default=0, help="points per axis of a 2-D landscape (0: none)")
    p.add_argument("--probe-wd", type=NON_NEGATIVE, default=1e-3, help="L2 penalty of the linear probe of encoders")
    p.add_argument("--hessian-images", type=POSITIVE, default=16, help="images in the batch the Hessian is taken on")
    p.add_argument("--hessian-iters", type=POSITIVE, default=20, help="most power iterations (stops at 1e-3 change)")
    p.add_argument("--dpi", type=POSITIVE, default=80, help="resolution of the PNG figures")
    p.add_argument("--seed", type=int, default=0, help="seeds the landscape directions and the Hessian's start")
    return p


def main(args):
    start, tools = time.perf_counter(), set(args.tools)
    if args.model is None and not Path(student := DEFAULT_MODELS[1].split("=")[1]).is_file():
        raise ValueError(f"no --model given and {student} is missing: run `python distill.py` first, or name the "
                         "models (python diagnose.py --help)")
    models, img_size = load_models(args.model or DEFAULT_MODELS, args.img_size)
    images, labels, source = load_images(args.data, args.images, img_size)
    report = Report(args.out, args.dpi, images=source, n_images=len(images), img_size=img_size)
    print(f"{len(images)} images at {img_size} px ({source['unreadable']} unreadable skipped); models: "
          + ", ".join(f"{l} ({s})" for l, s, _ in models))
    runs = {label: run_attention(model, images, args.batch_size, args.renorm, "cka" in tools, label)
            for label, _, model in models}
    stats, layers, features = ({label: run[k] for label, run in runs.items()} for k in range(3))
    if "distance" in tools:
        attention_distance_tool(models, stats, args.renorm, report)
    if "diversity" in tools:
        head_diversity_tool(stats, args.renorm, report)
    if "maps" in tools:
        attention_maps_tool(stats, report)
    if "cka" in tools:
        cka_tool(layers, report)
    if tools & {"landscape", "hessian"} and (labels < 0).any():
        print("skipping the landscape and the Hessian: they need labelled images (an ImageFolder --data)")
        tools -= {"landscape", "hessian"}
    if tools & {"landscape", "hessian"}:
        classifiers = classifiers_of(models, features, labels, args.probe_wd)
    if "landscape" in tools:
        landscape_tool(classifiers, images, labels, args, report)
    if "hessian" in tools:
        hessian_tool(classifiers, images, labels, args, report)
    print(f"wrote {len(list(report.folder.iterdir()))} files to {report.folder} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
