"""Build the CIFAR-10 slice bundled with vitc (vitc/data/cifar10-slice/).

    python scripts/make_bundled_slice.py --data ../shared/data/cifar10

calib.tar: 500 training images (50 per class), eval.tar: 1,000 test images (100 per class),
each a class-stratified draw with seed 0 by vitc.calibration.sources.ImageSource.select,
copied byte for byte (no re-encoding) in <class>/<file> layout. Calibration images come from
the training archive and evaluation images from the test archive, so the two never overlap.
"""
import argparse
import io
import os
import tarfile
from pathlib import Path

from vitc.calibration.sources import BUNDLED_DIR, open_source


def write_slice(archive: Path, n: int, out: Path, seed: int = 0) -> None:
    src = open_source(archive).select(n, seed)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for sample, data in src.iter_bytes():
            cls = Path(sample.key).parts[-2]
            info = tarfile.TarInfo(f"{cls}/{Path(sample.key).name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    print(f"{out}: {len(src)} images from {archive}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cifar10")
    args = ap.parse_args()
    BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
    write_slice(Path(args.data) / "train.tar.gz", 500, BUNDLED_DIR / "calib.tar")
    write_slice(Path(args.data) / "test.tar.gz", 1000, BUNDLED_DIR / "eval.tar")
