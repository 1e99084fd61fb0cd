"""Image sources: layouts, deterministic stratified subsets, streaming, and bad data."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitc.calibration.data import iter_batches, label_map, load_tensors
from vitc.calibration.sources import open_source
from vitc.errors import VitcError
from vitc.models.preprocess import Preprocess
from conftest import CIFAR, IMAGENET


def _jpeg(color=(200, 10, 10), mode="RGB", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, color if mode != "L" else 128)
    img.save(buf, format="PNG" if mode in ("RGBA", "LA") else "JPEG")
    return buf.getvalue()


def _folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_bundled_slice_is_disjoint_and_balanced():
    calib, ev = open_source("bundled:calib"), open_source("bundled:eval")
    assert (len(calib), len(ev)) == (500, 1000)
    assert np.bincount([s.label for s in calib.samples]).tolist() == [50] * 10
    assert np.bincount([s.label for s in ev.samples]).tolist() == [100] * 10
    assert calib.classes == ev.classes and calib.classes[0] == "airplane"
    # the slice was copied from the shared archives: eval images are CIFAR-10 *test* images
    if CIFAR.exists():
        test_names = {s.key.split("/", 1)[1] for s in open_source(CIFAR / "test.tar.gz").samples}
        assert {s.key for s in ev.samples} <= test_names


def test_select_is_deterministic_and_stratified():
    src = open_source("bundled:eval")
    a, b, c = src.select(100, seed=3), src.select(100, seed=3), src.select(100, seed=4)
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    assert [s.key for s in a.samples] != [s.key for s in c.samples]
    assert np.bincount([s.label for s in a.samples]).tolist() == [10] * 10
    head, rest = src.split_off(50, seed=0)
    assert len(head) + len(rest) == len(src) and not {s.key for s in head.samples} & {s.key for s in rest.samples}


def test_archive_folder_and_flat_layouts_agree(tmp_path):
    files = {f"{c}/{i}.jpg": _jpeg((i * 40, 0, 0)) for c in ("cat", "dog") for i in range(3)}
    folder = _folder(tmp_path / "imgs", files)
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(folder / "cat", arcname="split/cat")
        tar.add(folder / "dog", arcname="split/dog")
    a, b = open_source(folder), open_source(tmp_path / "imgs.tar.gz")
    assert a.classes == b.classes == ["cat", "dog"]
    assert [s.label for s in a.samples] == [s.label for s in b.samples] == [0, 0, 0, 1, 1, 1]
    pre = Preprocess(8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    xa, _ = load_tensors(a, pre)
    xb, _ = load_tensors(b, pre)
    assert xa.shape == (6, 3, 8, 8) and np.allclose(xa.numpy(), xb.numpy())

    flat = _folder(tmp_path / "flat", {"x.jpg": _jpeg(), "y.jpg": _jpeg()})
    (tmp_path / "labels.tsv").write_text("index\twnid\tname\tfile\n7\tn1\ta\tx.jpg\n3\tn2\tb\ty.jpg\n")
    src = open_source(flat, tmp_path / "labels.tsv")
    assert [s.label for s in src.samples] == [7, 3] and label_map(src, ["l"] * 10) is None


@pytest.mark.skipif(not IMAGENET.exists(), reason="../shared/data/imagenet-samples not present")
def test_imagenet_samples_flat_archive_with_labels_beside():
    src = open_source(IMAGENET)
    assert len(src) == 1000 and src.samples[0].label == 0 and src.samples[-1].label == 999
    x, y = next(iter_batches(src.select(4), Preprocess(224, 256), batch_size=4))
    assert x.shape == (4, 3, 224, 224)


def test_streaming_reads_lazily(tmp_path):
    src = open_source("bundled:eval")
    reads = []
    whole = src.iter_bytes

    def counted():
        for item in whole():
            reads.append(item[0].key)
            yield item

    src.iter_bytes = counted
    it = iter_batches(src, Preprocess(32, 32), batch_size=10)
    x, y = next(it)
    assert x.shape == (10, 3, 32, 32) and y.dtype.is_floating_point is False
    import time

    time.sleep(0.5)  # let the decode-ahead thread run as far as it will
    # one batch handed out, at most two queued and one being built: 40 of 1,000 images read, not all
    assert 10 <= len(reads) <= 41, len(reads)
    it.close()


def test_label_map_by_name():
    src = open_source("bundled:eval")
    model_labels = list(reversed(src.classes))
    m = label_map(src, model_labels)
    assert m.tolist() == list(range(9, -1, -1))
    with pytest.raises(VitcError, match="do not match the model's labels"):
        label_map(src, ["a", "b", "c"])


@pytest.mark.parametrize("files, message", [
    ({}, "no images in"),
    ({"cat/.hidden.jpg": b"x"}, "no images in"),
    ({"cat/a.jpg": _jpeg(), "cat/notes.txt": b"hello"}, "not an image: cat/notes.txt"),
    ({"a.jpg": _jpeg()}, "no class folders and no labels file"),
])
def test_bad_folders(tmp_path, files, message):
    root = tmp_path / "d"
    root.mkdir()
    _folder(root, files)
    with pytest.raises(VitcError, match=message):
        open_source(root)


@pytest.mark.parametrize("mode, word", [("L", "grayscale"), ("RGBA", "RGBA")])
def test_grayscale_and_rgba_images_are_refused_unless_converted(tmp_path, mode, word):
    root = _folder(tmp_path / "d", {"cat/a.jpg": _jpeg(), "cat/b.png": _jpeg(mode=mode)})
    src = open_source(root)
    with pytest.raises(VitcError, match=f"cat/b.png is a {word} image.*--convert-rgb"):
        load_tensors(src, Preprocess(8, 8))
    x, _ = load_tensors(src, Preprocess(8, 8), convert_rgb=True)
    assert x.shape == (2, 3, 8, 8)


def test_corrupt_image_is_named(tmp_path):
    root = _folder(tmp_path / "d", {"cat/a.jpg": _jpeg(), "cat/broken.jpg": b"\xff\xd8not really"})
    with pytest.raises(VitcError, match="cat/broken.jpg is not a readable image"):
        load_tensors(open_source(root), Preprocess(8, 8))


def test_empty_and_bad_archives(tmp_path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(VitcError, match="archive .*empty.tar is empty"):
        open_source(tmp_path / "empty.tar")
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(VitcError, match="cannot read archive"):
        open_source(tmp_path / "bad.tar.gz")
    with pytest.raises(VitcError, match="does not exist"):
        open_source(tmp_path / "nothing")
    with pytest.raises(VitcError, match="unknown bundled split"):
        open_source("bundled:train")
