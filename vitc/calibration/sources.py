"""Image sources for calibration and evaluation.

A source is an ordered, labelled list of images that is read lazily: listing a source reads
names only, and image bytes are read when a sample is iterated, so a 50,000-image archive is
never held in memory. Four layouts are understood:

* an ImageFolder directory (``root/<class>/<image>``);
* a ``.tar``/``.tar.gz`` archive in that layout, optionally under one split folder
  (``test/<class>/<image>``, as in ``../shared/data/cifar10``);
* a flat folder or archive of images plus a labels file (``labels.tsv`` with ``index`` and
  ``file`` columns, as in ``../shared/data/imagenet-samples``);
* the slice of CIFAR-10 bundled with the package (``bundled:calib``, ``bundled:eval``).

Subsets are deterministic: ``select(n, seed)`` draws a class-stratified sample that depends
only on the file names and the seed.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vitc.errors import VitcError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "cifar10-slice"
BUNDLED_SPLITS = {"calib": "calib.tar", "eval": "eval.tar"}


@dataclass(frozen=True)
class Sample:
    key: str  # path of the image inside its folder or archive
    label: int  # -1 when the source has no labels


@dataclass
class ImageSource:
    """A lazily read, labelled list of images (see the module docstring)."""

    location: str
    samples: list[Sample]
    classes: list[str] = field(default_factory=list)
    _archive: Path | None = None
    _root: Path | None = None
    labels_file: str | None = None  # the labels file the labels came from, if any
    label_lines: dict[str, int] = field(default_factory=dict)  # sample key -> its line in labels_file

    def _like(self, samples: list[Sample]) -> "ImageSource":
        return ImageSource(self.location, samples, self.classes, self._archive, self._root, self.labels_file, self.label_lines)

    def check_label_range(self, num_classes: int, model: str = "the model") -> None:
        """Refuse labels the model cannot predict (a class id past its last class), naming the line."""
        if num_classes <= 0:
            return
        for s in self.samples:
            if s.label >= num_classes:
                where = f"labels file {self.labels_file} line {self.label_lines.get(s.key, '?')}" if self.labels_file else self.location
                raise VitcError(f"{where}: class id {s.label} of {Path(s.key).name} is out of range for {model} "
                                f"({num_classes} classes: 0-{num_classes - 1})", "fix the labels file, or evaluate a model with these classes")

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return f"{self.location} ({len(self)} images, {len(self.classes) or 'no'} classes)"

    def select(self, n: int | None, seed: int = 0) -> "ImageSource":
        """A deterministic, class-stratified subset of ``n`` images (all when ``n`` is None)."""
        if n is None or n >= len(self.samples):
            return self
        if n <= 0:
            raise VitcError(f"asked for {n} images from {self.location}", "ask for at least one")
        rng = np.random.default_rng(seed)
        by_class: dict[int, list[Sample]] = {}
        for s in sorted(self.samples, key=lambda s: s.key):
            by_class.setdefault(s.label, []).append(s)
        queues = []
        for label in sorted(by_class):
            items = by_class[label]
            queues.append([items[i] for i in rng.permutation(len(items))])
        picked: list[Sample] = []
        depth = 0
        while len(picked) < n:
            for q in queues:
                if depth < len(q) and len(picked) < n:
                    picked.append(q[depth])
            depth += 1
        picked.sort(key=lambda s: s.key)
        return self._like(picked)

    def split_off(self, n: int, seed: int = 0) -> tuple["ImageSource", "ImageSource"]:
        """Split into (a stratified subset of n images, the rest): calibrate on one, evaluate on the other."""
        head = self.select(n, seed)
        chosen = {s.key for s in head.samples}
        rest = [s for s in self.samples if s.key not in chosen]
        return head, self._like(rest)

    def iter_bytes(self) -> Iterator[tuple[Sample, bytes]]:
        """Yield (sample, encoded image bytes) in the source's order, reading lazily."""
        if self._archive is None:
            for s in self.samples:
                assert self._root is not None
                yield s, (self._root / s.key).read_bytes()
            return
        wanted = {s.key: s for s in self.samples}
        found: dict[str, bytes] = {}
        order = [s.key for s in self.samples]
        next_i = 0
        # One sequential pass (gzip has no random access); emit in the source's order and
        # buffer only what arrives early, which is little for sorted archives.
        with _open_tar(self._archive) as tar:
            for member in tar:
                if member.name in wanted:
                    f = tar.extractfile(member)
                    found[member.name] = f.read() if f else b""
                    while next_i < len(order) and order[next_i] in found:
                        key = order[next_i]
                        yield wanted[key], found.pop(key)
                        next_i += 1
        if next_i < len(order):  # pragma: no cover - archive changed between listing and reading
            raise VitcError(f"{self._archive} changed while it was read", "read it again")


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VitcError(f"cannot read archive {path} ({_one_line(exc)})", "check that it is a .tar or .tar.gz file") from exc


def _one_line(exc: BaseException) -> str:
    # tarfile's "r:*" lists every compression it tried, one per line
    lines = str(exc).splitlines()
    return lines[0] if len(lines) == 1 else "not a tar archive in any compression tarfile reads (gz, bz2, xz, none)"


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") for part in Path(name).parts)


def _class_layout(names: Sequence[str], location: str) -> tuple[list[str], list[Sample]]:
    """Interpret file names as ``[split/]class/image`` and return (classes, samples)."""
    files = [n for n in names if not _is_hidden(n)]
    if not files:
        raise VitcError(f"no images in {location}", "point --data at a folder or archive of images in <class>/<image> layout")
    depth = {len(Path(n).parts) for n in files}
    if depth == {1}:
        raise VitcError(
            f"{location} holds images with no class folders and no labels file",
            "arrange them as <class>/<image>, or pass --labels FILE (or put labels.tsv beside them)",
        )
    non_images = [n for n in files if not _is_image_name(n)]
    if non_images:
        raise VitcError(f"{location} contains a file that is not an image: {non_images[0]}", "remove it or move it out of the data folder")
    class_of = {n: Path(n).parts[-2] for n in files}
    classes = sorted(set(class_of.values()))
    index = {c: i for i, c in enumerate(classes)}
    samples = sorted((Sample(n, index[class_of[n]]) for n in files), key=lambda s: s.key)
    return classes, samples


@dataclass
class LabelsFile:
    path: Path
    labels: dict[str, int]  # file name -> class index
    lines: dict[str, int]  # file name -> line number (1-based, the header is line 1)


def _read_labels_file(path: Path) -> LabelsFile:
    """Read a TSV/CSV with ``index`` and ``file`` columns, refusing (with the line number) a
    non-numeric or negative class id, a short row and a file listed twice."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise VitcError(f"cannot read labels file {path} ({getattr(exc, 'strerror', None) or 'not UTF-8 text'})",
                        "pass a readable --labels file") from exc
    if not lines:
        raise VitcError(f"labels file {path} is empty", "give it a header with 'index' and 'file' columns")
    sep = "\t" if "\t" in lines[0] else ","
    header = [h.strip().lower() for h in lines[0].split(sep)]
    if "index" not in header or "file" not in header:
        raise VitcError(f"labels file {path} has no 'index' and 'file' columns", "use a header like: index<TAB>file")
    i_idx, i_file = header.index("index"), header.index("file")
    out, where = {}, {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cols = line.split(sep)
        if len(cols) <= max(i_idx, i_file) or not cols[i_file].strip():
            raise VitcError(f"labels file {path} line {number} has no '{'file' if len(cols) > i_idx else 'index'}' value",
                            f"give every line an index and a file, separated by {'a tab' if sep == chr(9) else 'a comma'}")
        name, text = cols[i_file].strip(), cols[i_idx].strip()
        try:
            label = int(text)
        except ValueError:
            raise VitcError(f"labels file {path} line {number}: class id '{text}' is not a whole number",
                            "the index column holds the model's class indices (0, 1, ...)") from None
        if label < 0:
            raise VitcError(f"labels file {path} line {number}: class id {label} is negative", "class indices start at 0")
        if name in out:
            raise VitcError(f"labels file {path} line {number}: {name} is listed again (first on line {where[name]})",
                            "give each image one line")
        out[name], where[name] = label, number
    if not out:
        raise VitcError(f"labels file {path} lists no images", "add one line per image: index<TAB>file")
    return LabelsFile(path, out, where)


def _flat_layout(names: Sequence[str], labels: LabelsFile, location: str, allow_unlabelled: bool = False) -> list[Sample]:
    """Samples of a flat folder/archive: every listed file must exist and every image must be
    listed (unless ``allow_unlabelled``), so no image is dropped or scored without a word."""
    samples, unlabelled, present = [], [], set()
    for n in names:
        if _is_hidden(n):
            continue
        base = Path(n).name
        if base not in labels.labels:
            if _is_image_name(n):
                unlabelled.append(n)
            continue
        if not _is_image_name(n):
            raise VitcError(f"{location} contains a file that is not an image: {n}", "remove it from the data folder")
        if base in present:
            raise VitcError(f"{location} holds two images named {base}; the labels file cannot tell them apart", "rename one")
        present.add(base)
        samples.append(Sample(n, labels.labels[base]))
    missing = [name for name in labels.labels if name not in present]
    if missing:
        first = min(missing, key=labels.lines.get)
        raise VitcError(f"labels file {labels.path} line {labels.lines[first]} lists {first}, which is not in {location}"
                        + (f" ({len(missing)} listed files are missing)" if len(missing) > 1 else ""),
                        "remove the lines of missing images, or point --data at the folder that holds them")
    if unlabelled and not allow_unlabelled:
        raise VitcError(f"{len(unlabelled)} of {len(unlabelled) + len(samples)} images in {location} have no line in "
                        f"{labels.path} (first: {sorted(unlabelled)[0]})", "label them, or pass --allow-unlabelled to leave them out")
    return sorted(samples, key=lambda s: s.key)


def _list_archive(path: Path) -> list[str]:
    with _open_tar(path) as tar:
        try:
            return [m.name for m in tar.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise VitcError(f"cannot read archive {path} ({exc})", "check that the file is complete") from exc


def open_source(spec: str | os.PathLike, labels: str | os.PathLike | None = None, allow_unlabelled: bool = False) -> ImageSource:
    """Open an image source from a path or ``bundled:<split>``; see the module docstring."""
    spec = str(spec)
    if spec in ("bundled", "bundled:calib", "bundled:eval"):
        split = "eval" if spec == "bundled" else spec.split(":", 1)[1]
        return open_source(BUNDLED_DIR / BUNDLED_SPLITS[split])
    if spec.startswith("bundled:"):
        raise VitcError(f"unknown bundled split '{spec}'", "use bundled:calib or bundled:eval")
    path = Path(spec).expanduser()
    if not path.exists():
        raise VitcError(f"data path {path} does not exist", "pass --data a folder, a .tar/.tar.gz archive, or bundled:eval")
    labels_path = Path(labels) if labels else None
    if labels_path is None:
        beside = (path if path.is_dir() else path.parent) / "labels.tsv"
        labels_path = beside if beside.exists() else None

    if path.is_dir():
        archives = sorted(p for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        if labels_path is not None and archives and not any(_is_image_name(p.name) for p in path.iterdir()):
            # e.g. imagenet-samples/: labels.tsv beside val.tar
            return open_source(archives[0], labels_path, allow_unlabelled)
        names = [str(p.relative_to(path)) for p in sorted(path.rglob("*")) if p.is_file() and p.name != "labels.tsv"]
        if labels_path is not None:
            table = _read_labels_file(labels_path)
            samples = _flat_layout(names, table, str(path), allow_unlabelled)
            return ImageSource(str(path), samples, [], None, path, str(labels_path), _lines_of(samples, table))
        classes, samples = _class_layout(names, str(path))
        return ImageSource(str(path), samples, classes, None, path)

    if not path.name.endswith((".tar", ".tar.gz", ".tgz")):
        raise VitcError(f"{path} is neither a folder nor a .tar/.tar.gz archive", "pass --data a folder of images or an archive")
    names = _list_archive(path)
    if labels_path is not None:
        table = _read_labels_file(labels_path)
        samples = _flat_layout(names, table, str(path), allow_unlabelled)
        return ImageSource(str(path), samples, [], path, None, str(labels_path), _lines_of(samples, table))
    if not names:
        raise VitcError(f"archive {path} is empty", "pass an archive that holds images in <class>/<image> layout")
    # parts[-2] is the class both for <class>/<image> and <split>/<class>/<image>.
    classes, samples = _class_layout(names, str(path))
    return ImageSource(str(path), samples, classes, path, None)


def _lines_of(samples: list[Sample], table: LabelsFile) -> dict[str, int]:
    return {s.key: table.lines[Path(s.key).name] for s in samples}


def decode_rgb(data: bytes, key: str, convert: bool = False):
    """Decode image bytes to an RGB ``PIL.Image``; grayscale/RGBA are errors unless ``convert``."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise VitcError(f"{key} is not a readable image", "remove it from the data folder or replace it") from exc
    if img.mode != "RGB":
        if not convert:
            kind = {"L": "grayscale", "LA": "grayscale+alpha", "RGBA": "RGBA", "P": "palette", "CMYK": "CMYK"}.get(img.mode, img.mode)
            raise VitcError(
                f"{key} is a {kind} image (mode {img.mode}); models expect 3-channel RGB",
                "convert the images to RGB, or pass --convert-rgb to convert them on load",
            )
        img = img.convert("RGB")
    return img
