"""Train a reference backbone of the zoo on CIFAR-10 (seeded, resumable).

    python -m vitc.models.train_zoo --model vit-c10 --data ../shared/data/cifar10

Decodes the training and test archives once into a uint8 cache, trains with the entry's
recipe (random crop with 4 px padding and horizontal flip, label smoothing, warm-up then
cosine learning rate), checkpoints after every epoch and resumes from the last checkpoint
when run again, then evaluates on the full 10,000-image test set and writes the entry's
folder (fp16 safetensors, config.json, card.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitc.calibration.sources import decode_rgb, open_source
from vitc.models.zoo import CIFAR10_CLASSES, ZOO_DIR, build_model, get_entry


def load_split_uint8(archive: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of a CIFAR-10 archive as (N,32,32,3) uint8 and labels, cached as .npz."""
    cache = cache_dir / (archive.name.replace(".tar.gz", "") + ".npz")
    if cache.exists():
        z = np.load(cache)
        return z["x"], z["y"]
    src = open_source(archive)
    assert src.classes == CIFAR10_CLASSES, src.classes
    xs, ys = [], []
    for s, data in src.iter_bytes():
        xs.append(np.asarray(decode_rgb(data, s.key), dtype=np.uint8))
        ys.append(s.label)
    x, y = np.stack(xs), np.asarray(ys, dtype=np.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, cache)
    return x, y


def augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (4 px reflect padding) and horizontal flip on a uint8 NCHW batch."""
    n, _, h, w = xb.shape
    padded = F.pad(xb.float(), (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n,h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n,w
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def evaluate(model, pre, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        xb = pre.uint8_batch(torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2))
        correct += (model(pixel_values=xb).logits.argmax(-1) == torch.from_numpy(y[i : i + batch])).sum().item()
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="../shared/data/cifar10", help="folder holding train.tar.gz and test.tar.gz")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/vitc/train"), help="checkpoints and decoded data")
    ap.add_argument("--epochs", type=int, default=None, help="override the entry's recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for the trained entry (default: the package zoo)")
    ap.add_argument("--finalize", action="store_true", help="only re-check an entry already written: evaluate the shipped "
                    "fp16 weights through vitc's own data pipeline and record the figure in its card")
    args = ap.parse_args(argv)
    if args.finalize:
        finalize_entry(args.model, Path(args.data) / "test.tar.gz", Path(args.out) if args.out else None)
        return 0

    import transformers

    entry = get_entry(args.model)
    recipe = dict(entry.recipe)
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    data = Path(args.data)
    work = Path(args.work)
    x_train, y_train = load_split_uint8(data / "train.tar.gz", work / "cifar10")
    x_test, y_test = load_split_uint8(data / "test.tar.gz", work / "cifar10")

    model = build_model(entry)
    pre = entry.preprocess
    bs, epochs = recipe["batch_size"], recipe["epochs"]
    steps_per_epoch = len(x_train) // bs
    total = steps_per_epoch * epochs
    warm = steps_per_epoch * recipe["warmup_epochs"]
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "embeddings" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe["optimizer"] == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )

    ckpt_dir = work / entry.name / f"seed{args.seed}"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "last.pt"
    start_epoch, log = 0, []
    gen = torch.Generator().manual_seed(args.seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start_epoch, log = state["epoch"], state["log"]
        print(f"resumed {entry.name} at epoch {start_epoch}", flush=True)

    t_start = time.time()
    for epoch in range(start_epoch, epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        t0, loss_sum = time.time(), 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * bs : (step + 1) * bs]
            xb = augment(torch.from_numpy(x_train[idx.numpy()]).permute(0, 3, 1, 2), gen)
            logits = model(pixel_values=pre.uint8_batch(xb)).logits
            loss = F.cross_entropy(logits, torch.from_numpy(y_train[idx.numpy()]), label_smoothing=recipe["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            loss_sum += loss.item()
            if step % 100 == 0:
                print(f"{entry.name} epoch {epoch + 1}/{epochs} step {step}/{steps_per_epoch} loss {loss.item():.3f}", flush=True)
        # every 5th test image: 200 per class (the archive is sorted by class), a balanced progress monitor
        acc = evaluate(model, pre, x_test[::5], y_test[::5]) if (epoch + 1) % 2 == 0 or epoch + 1 == epochs else None
        log.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "monitor_top1": acc, "seconds": time.time() - t0})
        print(json.dumps(log[-1]), flush=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "epoch": epoch + 1, "log": log}, tmp)
        os.replace(tmp, ckpt)

    top1 = evaluate(model, pre, x_test, y_test)
    print(f"{entry.name}: top-1 on the full CIFAR-10 test set {top1:.4f}", flush=True)
    out = Path(args.out) if args.out else ZOO_DIR / entry.name
    write_entry(model, entry, out, top1, recipe, args, log, time.time() - t_start)
    finalize_entry(entry.name, data / "test.tar.gz", out)
    return 0


def finalize_entry(name: str, test_archive: Path, folder: Path | None = None) -> dict:
    """Evaluate the shipped (fp16) weights as a user would load them, and complete the folder.

    Writes ``preprocessor_config.json`` so the folder also loads as ``hf:<folder>`` with the
    right preprocessing, and records ``shipped_test_top1`` (the zoo loader, the bundled data
    pipeline, all 10,000 test images) in the card next to the training-time figure.
    """
    from vitc.calibration.sources import open_source
    from vitc.evaluate import evaluate
    from vitc.models.intake import load_model

    entry = get_entry(name)
    folder = folder or entry.folder
    p = entry.preprocess
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": p.resize, "width": p.resize},
        "resample": 2, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std)}, indent=2) + "\n")
    backbone = load_model(f"zoo:{name}") if folder == entry.folder else load_model(f"hf:{folder}")
    result = evaluate(backbone, open_source(test_archive), backbone.preprocess, backbone.labels, batch_size=250)
    card = json.loads((folder / "card.json").read_text())
    card["shipped_test_top1"] = round(result["top1"], 4)
    card["shipped_test_note"] = ("fp16 weights as shipped, loaded by vitc (hf loader) and evaluated through vitc's data "
                                 "pipeline (PIL decode, torch bilinear resize) on all 10,000 CIFAR-10 test images")
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"{name}: shipped fp16 weights, full test set top-1 {result['top1']:.4f}", flush=True)
    return card


def write_entry(model, entry, out: Path, top1: float, recipe: dict, args, log, seconds: float) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    model.config.to_json_file(str(out / "config.json"))
    card = {
        "name": entry.name,
        "kind": entry.kind,
        "architecture": f"transformers {type(model).__name__} ({entry.model_type})"
                        + (" with a BatchNorm conv stem (vitc.models.convstem.ConvStem) replacing the patch projection" if entry.conv_stem else ""),
        "conv_stem": list(entry.conv_stem) if entry.conv_stem else None,
        "config": entry.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "preprocess": entry.preprocess.to_dict(),
        "training_command": f"python -m vitc.models.train_zoo --model {entry.name} --data {args.data} --seed {args.seed}",
        "seed": args.seed,
        "recipe": recipe,
        "data": "CIFAR-10 JPEG archives (../shared/data/cifar10/train.tar.gz, 50,000 images); "
                "augmentation: random crop with 4 px reflect padding, horizontal flip",
        "test_top1": round(top1, 4),
        "test_set": "CIFAR-10 test.tar.gz, all 10,000 images, evaluated from the fp32 weights before the fp16 cast",
        "weights_dtype": "float16",
        "training_log": log,
        "training_seconds": round(seconds),
        "trained_on": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
