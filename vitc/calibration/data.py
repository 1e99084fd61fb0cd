"""Batches of preprocessed images from an ImageSource, streamed.

NNCF-style: the data stays the user's (an ImageSource over their folder or archive) and a
``transform`` (the Backbone's preprocessing) turns each image into a model input; nothing
is loaded ahead of the batch being built, except a small decode-ahead queue.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from vitc.calibration.sources import ImageSource, decode_rgb, open_source
from vitc.errors import VitcError
from vitc.models.preprocess import Preprocess


@dataclass(frozen=True)
class DataSpec:
    """What ``--data``, ``--labels``, ``--eval-size``/``--calib-size``, ``--seed`` and ``--convert-rgb`` asked for."""

    location: str = "bundled:eval"
    labels: str | None = None
    size: int | None = None
    seed: int = 0
    convert_rgb: bool = False
    allow_unlabelled: bool = False  # images a labels file does not list are left out instead of refused
    size_flag: str | None = None  # the flag that asked for ``size`` (e.g. --calib-size): more than the data holds is then an error

    def open(self) -> ImageSource:
        source = open_source(self.location, self.labels, self.allow_unlabelled)
        if self.size is not None and self.size <= 0:
            raise VitcError(f"{self.size_flag or 'the image count'} {self.size} is not positive", "ask for 1 or more images")
        if self.size_flag and self.size is not None and self.size > len(source):
            raise VitcError(f"{self.size_flag} {self.size} is more than the {len(source)} images in {source.location}",
                            f"pass {self.size_flag} {len(source)} or fewer, or point at more images")
        return source.select(self.size, self.seed)


def iter_batches(source: ImageSource, preprocess: Preprocess, batch_size: int = 64,
                 convert_rgb: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images float NCHW, labels int64 N) in the source's order.

    Decoding runs one batch ahead in a thread (PIL releases the GIL while decoding), so the
    model and the JPEG decoder overlap.
    """
    if batch_size <= 0:
        raise VitcError(f"batch size {batch_size} is not positive", "pass a batch size of 1 or more")

    def produce(q: queue.Queue):
        try:
            xs, ys = [], []
            for sample, data in source.iter_bytes():
                img = decode_rgb(data, sample.key, convert_rgb)
                xs.append(preprocess.pil(img))
                ys.append(sample.label)
                if len(xs) == batch_size:
                    q.put((torch.stack(xs), torch.tensor(ys, dtype=torch.int64)))
                    xs, ys = [], []
            if xs:
                q.put((torch.stack(xs), torch.tensor(ys, dtype=torch.int64)))
            q.put(None)
        except BaseException as exc:  # hand the error to the consumer
            q.put(exc)

    q: queue.Queue = queue.Queue(maxsize=2)
    t = threading.Thread(target=produce, args=(q,), daemon=True)
    t.start()
    while True:
        item = q.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    t.join()


def load_tensors(source: ImageSource, preprocess: Preprocess, convert_rgb: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a (small) source as one tensor: for calibration sets of a few hundred images."""
    xs, ys = [], []
    for x, y in iter_batches(source, preprocess, 256, convert_rgb):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise VitcError(f"no images in {source.location}", "pass a data source with images")
    return torch.cat(xs), torch.cat(ys)


def label_map(source: ImageSource, model_labels: list[str]) -> np.ndarray | None:
    """Map the source's class indices onto the model's label indices.

    Class folders are matched to the model's labels by name (case-insensitive); sources with
    a labels file already use the model's indices. Returns None when indices are used as-is.
    """
    if not source.classes:
        return None
    norm = {l.lower().replace(" ", "_"): i for i, l in enumerate(model_labels)}
    mapped = [norm.get(c.lower().replace(" ", "_")) for c in source.classes]
    if all(m is not None for m in mapped):
        return np.asarray(mapped)
    if len(source.classes) == len(model_labels):
        return None  # same count, different names: assume the same order
    raise VitcError(f"the classes of {source.location} ({', '.join(source.classes[:3])}, ...) do not match the model's labels",
                    "evaluate on data with the model's classes, or use a labels file with the model's class indices")
