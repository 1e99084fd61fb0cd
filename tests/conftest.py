"""Shared fixtures: tiny transformers models (random weights, saved with save_pretrained) and
real images from the bundled CIFAR-10 slice. Tiny models keep every test fast; tests that
need trained weights use the zoo and skip with the reason when it is not trained."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VITC_TEST_THREADS", "1")))

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
IMAGENET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-samples"


def _labels():
    from vitc.models.zoo import CIFAR10_CLASSES

    return dict(enumerate(CIFAR10_CLASSES)), {c: i for i, c in enumerate(CIFAR10_CLASSES)}


def _save(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path


def _preprocessor(path: Path, size: int) -> None:
    import json

    from vitc.models.zoo import CIFAR10_MEAN, CIFAR10_STD

    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 2, "do_normalize": True, "image_mean": list(CIFAR10_MEAN), "image_std": list(CIFAR10_STD)}))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    import transformers as T

    torch.manual_seed(0)
    id2label, label2id = _labels()
    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, num_labels=10, id2label=id2label, label2id=label2id, layer_norm_eps=1e-6)
    path = _save(T.ViTForImageClassification(cfg).eval(), tmp_path_factory.mktemp("tiny") / "vit")
    _preprocessor(path, 32)
    return path


@pytest.fixture(scope="session")
def tiny_mobilevit_dir(tmp_path_factory) -> Path:
    import transformers as T

    torch.manual_seed(0)
    id2label, label2id = _labels()
    cfg = T.MobileViTConfig(image_size=64, num_labels=10, neck_hidden_sizes=[8, 8, 16, 24, 32, 40, 64],
                            hidden_sizes=[32, 40, 48], expand_ratio=2.0, id2label=id2label, label2id=label2id)
    path = _save(T.MobileViTForImageClassification(cfg).eval(), tmp_path_factory.mktemp("tiny") / "mobilevit")
    _preprocessor(path, 64)
    return path


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory) -> Path:
    import transformers as T

    torch.manual_seed(0)
    id2label, label2id = _labels()
    cfg = T.ResNetConfig(num_labels=10, embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                         layer_type="basic", id2label=id2label, label2id=label2id)
    path = _save(T.ResNetForImageClassification(cfg).eval(), tmp_path_factory.mktemp("tiny") / "resnet")
    _preprocessor(path, 64)
    return path


@pytest.fixture()
def tiny_vit(tiny_vit_dir):
    from vitc.models.intake import load_model

    return load_model(f"hf:{tiny_vit_dir}")


@pytest.fixture()
def tiny_mobilevit(tiny_mobilevit_dir):
    from vitc.models.intake import load_model

    return load_model(f"hf:{tiny_mobilevit_dir}")


@pytest.fixture()
def tiny_resnet(tiny_resnet_dir):
    from vitc.models.intake import load_model

    return load_model(f"hf:{tiny_resnet_dir}")


def _convstem_vit(seed: int = 0, layers: int = 2, edit=None):
    """A tiny ViT whose patch projection is a BatchNorm conv stem (the zoo hybrid's shape), with
    trained-looking BatchNorm statistics; ``edit(stem)`` may alter the stem before wrapping."""
    import transformers as T

    from vitc.backbone import Backbone
    from vitc.models.convstem import ConvStem
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(seed)
    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, num_labels=10)
    m = T.ViTForImageClassification(cfg)
    m.vit.embeddings.patch_embeddings.projection = ConvStem(3, [8, 16, 16], 32, 4)
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    if edit is not None:
        edit(m.vit.embeddings.patch_embeddings.projection)
    module = LogitsModule(m.eval()).eval()
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    return Backbone(module, Preprocess(32, 32, mean, std), [str(i) for i in range(10)], "test:hybrid")


@pytest.fixture(scope="session")
def make_convstem_vit():
    """The factory of tiny conv-stem hybrids: ``make_convstem_vit(seed=0, layers=2, edit=None)``."""
    return _convstem_vit


@pytest.fixture(scope="session")
def eval_images():
    """64 real CIFAR-10 test images from the bundled slice at 32 px (uint8 -> float via the model's preprocess)."""
    from vitc.calibration.sources import open_source

    return open_source("bundled:eval").select(64, seed=0)


@pytest.fixture(scope="session")
def calib_images():
    from vitc.calibration.sources import open_source

    return open_source("bundled:calib").select(64, seed=0)


def zoo_or_skip(name: str):
    """Load a trained zoo model, or skip with the reason when its weights are not in this checkout."""
    from vitc.errors import VitcError
    from vitc.models.intake import load_model

    try:
        return load_model(f"zoo:{name}")
    except VitcError as exc:
        pytest.skip(f"zoo:{name} is not trained in this checkout ({exc.problem})")
