"""Models of the pruning/2:4 generality matrix: tiny transformers configs (random weights, saved
with ``save_pretrained``) and hand-written modules that vitc has no adapter for.

``write(name, folder)`` saves one and returns the ``--model`` spec and ``--weights`` a user
would pass; the hand-written ones load as ``generality_prune_models:<factory>`` (this folder on the
path), the transformers ones as ``hf:<folder>``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class MyConv(nn.Conv2d):
    """A third-party style conv subclass with its own forward (as EfficientNet ports have)."""

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MyLinear(nn.Linear):
    pass


class SE(nn.Module):
    def __init__(self, ch: int, red: int):
        super().__init__()
        self.reduce = MyConv(ch, red, 1)
        self.expand = MyConv(red, ch, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class InvertedResidual(nn.Module):
    def __init__(self, ch: int, expand: int):
        super().__init__()
        hid = ch * expand
        self.pw = MyConv(ch, hid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hid)
        self.dw = MyConv(hid, hid, 3, padding=1, groups=hid, bias=False)
        self.bn2 = nn.BatchNorm2d(hid)
        self.se = SE(hid, 16)
        self.project = MyConv(hid, ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(ch)

    def forward(self, x):
        y = F.relu6(self.bn1(self.pw(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.se(y)
        return x + self.bn3(self.project(y))


class SubclassedCNN(nn.Module):
    """Stem, two inverted-residual blocks with SE (subclassed convs), a concat, a strided conv, a Linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = MyConv(3, 64, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(64)
        self.block1 = InvertedResidual(64, 2)
        self.block2 = InvertedResidual(64, 2)
        self.side = MyConv(64, 64, 1)
        self.down = MyConv(128, 128, 3, stride=2, padding=1)
        self.bn4 = nn.BatchNorm2d(128)
        self.head = MyLinear(128, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self.block2(self.block1(x))
        x = torch.cat([x, F.relu(self.side(x))], dim=1)
        x = F.relu(self.bn4(self.down(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FusedAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = MyLinear(dim, dim * 3)
        self.proj = MyLinear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = FusedAttention(dim, heads)
        self.fc1, self.fc2 = MyLinear(dim, hidden), MyLinear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FusedViT(nn.Module):
    """A timm-style ViT written by hand: fused qkv, matmul attention, cls token, position embedding."""

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, hidden: int = 256, patch: int = 8, size: int = 32,
                 classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _with_preprocess(model: nn.Module, size: int) -> nn.Module:
    from vitc.models.preprocess import Preprocess

    model.vitc_preprocess = Preprocess(size, size)  # what intake reads from a factory's model
    return model


def subclassed_cnn():
    torch.manual_seed(0)
    return _with_preprocess(SubclassedCNN(), 32)


def fused_vit():
    torch.manual_seed(0)
    return _with_preprocess(FusedViT(), 32)


def _hf(name: str):
    import transformers as T

    torch.manual_seed(0)
    labels = {"num_labels": 10}
    if name == "mobilenetv2":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=64, depth_multiplier=0.5, **labels)), 64
    if name == "efficientnet":
        return T.EfficientNetForImageClassification(T.EfficientNetConfig(
            image_size=64, width_coefficient=0.5, depth_coefficient=0.25, hidden_dim=640, **labels)), 64
    if name == "convnext":
        return T.ConvNextForImageClassification(T.ConvNextConfig(
            image_size=64, hidden_sizes=[64, 64, 128, 128], depths=[1, 1, 2, 1], **labels)), 64
    if name == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=32, hidden_sizes=[64, 64, 128, 128], depths=[1, 1, 1, 1], layer_type="basic", **labels)), 64
    if name == "dinov2":
        return T.Dinov2ForImageClassification(T.Dinov2Config(
            image_size=56, patch_size=14, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, **labels)), 56
    raise KeyError(name)


HF = ("mobilenetv2", "efficientnet", "convnext", "resnet", "dinov2")
HANDWRITTEN = {"subclassed-cnn": (subclassed_cnn, 32), "fused-vit": (fused_vit, 32)}
NAMES = ("mobilenetv2", "efficientnet", "convnext", "subclassed-cnn", "dinov2", "fused-vit")


# the quantization generality matrix's rows (tests/generality_models.py), pruned and sparsified too
QUANT_ROWS = ("effnet_like", "functional_vit", "mha_vit", "hf_swin", "hf_mobilevit", "hf_segformer", "hf_yolos")


def write(name: str, folder: Path) -> tuple[str, str | None]:
    """Save model ``name`` under ``folder``: (``--model`` spec, ``--weights`` file or None)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name in QUANT_ROWS:
        import generality_models

        w = folder / f"{name}.pt"
        torch.save(getattr(generality_models, name)().state_dict(), w)
        return f"generality_models:{name}", str(w)
    if name in HANDWRITTEN:
        factory, _ = HANDWRITTEN[name]
        w = folder / f"{name}.pt"
        torch.save(factory().state_dict(), w)
        return f"generality_prune_models:{factory.__name__}", str(w)
    model, size = _hf(name)
    out = folder / name
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": size, "width": size}, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return f"hf:{out}", None


def input_size(name: str) -> int:
    return HANDWRITTEN[name][1] if name in HANDWRITTEN else _hf(name)[1]
