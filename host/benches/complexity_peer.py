#!/usr/bin/env python3
"""Python peer of `ccnet complexity` for the throughput benchmark (docs/complexity.md).

Computes J and B the way ccnet does, with the reference tools: Pillow's libjpeg
encoder (quality 75, on the BT.601 luma image, whole file counted) and scikit-image's
`blob_log` (sigma 2..16, 7 log-spaced scales, threshold 0.1, overlap 0.5) on the image
and on its negative (bright + dark blobs), counted per 32 px^2.

    python3 complexity_peer.py [--json] DATASET_OR_FOLDER...

Each argument is a dataset folder (with `images/`, or a bare folder of images) or a
folder of such datasets (e.g. ../shared/datasets), which is expanded to its datasets
in name order. For each dataset it prints the number of images, mean and sample
standard deviation of J and B, the CPU seconds of the measuring loop
(`time.process_time`, decoding included, interpreter start-up and imports excluded)
and images per CPU-second; with --json, one JSON object per line instead.
Run it with OMP_NUM_THREADS=1 (and the other BLAS thread variables) for a one-core
figure; the script itself is single-threaded.
"""

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import blob_log

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
BLOB = dict(min_sigma=2, max_sigma=16, num_sigma=7, log_scale=True, threshold=0.1, overlap=0.5)
CELL = 32.0  # px^2: (2*sqrt(2)*sigma_min)^2


def measure(path):
    """(J, B) of one image."""
    gray = Image.open(path).convert("L")  # BT.601 luma, as ccnet's default
    buf = io.BytesIO()
    gray.save(buf, format="JPEG", quality=75)
    w, h = gray.size
    g = np.asarray(gray, dtype=np.float64) / 255.0
    n = len(blob_log(g, **BLOB)) + len(blob_log(1.0 - g, **BLOB))  # bright + dark
    return buf.tell() / (w * h), n * CELL / (w * h)


def image_files(d):
    folder = d / "images" if (d / "images").is_dir() else d
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def datasets(args):
    for a in args:
        d = Path(a)
        if not d.is_dir():
            sys.exit(f"{d}: not a folder")
        if (d / "images").is_dir() or any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()):
            yield d
        else:
            subs = sorted(s for s in d.iterdir() if s.is_dir() and (s / "images").is_dir())
            if not subs:
                sys.exit(f"{d}: no images/ folder and no datasets inside")
            yield from subs


def main(argv):
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if not args:
        sys.exit(__doc__)
    total_n, total_cpu = 0, 0.0
    for d in datasets(args):
        files = image_files(d)
        c = time.process_time()
        vals = np.array([measure(p) for p in files])
        cpu = time.process_time() - c
        mean = vals.mean(axis=0)
        std = vals.std(axis=0, ddof=1) if len(files) > 1 else np.zeros(2)
        total_n += len(files)
        total_cpu += cpu
        row = dict(dataset=d.name, images=len(files), j=mean[0], j_std=std[0], b=mean[1],
                   b_std=std[1], cpu_s=cpu, img_per_cpu_s=len(files) / cpu)
        if as_json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{d.name:<16} n={len(files):4d}  J {mean[0]:.4f} ± {std[0]:.4f}  "
                  f"B {mean[1]:.4f} ± {std[1]:.4f}  {cpu:7.1f} CPU-s  "
                  f"{len(files) / cpu:6.2f} img/CPU-s", flush=True)
    if not as_json and total_cpu > 0:
        print(f"{'all':<16} n={total_n:4d}  {total_cpu:.1f} CPU-s  {total_n / total_cpu:.2f} img/CPU-s")


if __name__ == "__main__":
    main(sys.argv[1:])
