"""A synthetic ImageNet-shaped image table for scale runs: generated on demand, never shipped.

``classes`` classes (ImageNet: 1,000) of ``per_class`` images each, written as d2c's Parquet
source (``data.source=parquet``): columns ``image`` (PNG bytes), ``label``, ``image_id`` and
``class_name``, in files of ``rows_per_file`` rows, class after class as an ImageNet export
lists them. Image ``(c, i)`` is ``size`` px RGB: class ``c``'s colour plus noise drawn from
``numpy.random.default_rng([seed, c])``, so classes differ and a rerun writes the same bytes.
The images are small (32 px is enough to exercise listing, shuffles, shards and files).

    python benchmarks/synthetic_imagenet.py --out /tmp/in1k --per-class 1281
"""

from __future__ import annotations

import argparse
import io
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: ImageNet-1k's class count and its training images per class (1,281,167 / 1,000, rounded).
IMAGENET_CLASSES = 1000
IMAGENET_PER_CLASS = 1281
#: Written last: the parameters of a complete table (a rerun with the same ones reuses it).
MANIFEST = "_synthetic.json"
#: Noise amplitude around the class colour (uint8 levels).
NOISE = 48


def class_name(label: int) -> str:
    """An ImageNet-like synset name for ``label``."""
    return f"n{label:08d}"


def class_images(label: int, per_class: int, size: int, seed: int) -> np.ndarray:
    """Class ``label``'s images, uint8 ``[per_class, size, size, 3]``."""
    rng = np.random.default_rng([seed, label])
    colour = np.random.default_rng([seed, label, 1]).integers(NOISE, 256 - NOISE, 3)
    noise = rng.integers(-NOISE, NOISE + 1, (per_class, size, size, 3))
    return (colour + noise).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_file(path: str, labels: list[int], per_class: int, size: int, seed: int) -> int:
    """One Parquet file holding every image of ``labels``; returns its bytes."""
    images, label_col, ids, names = [], [], [], []
    for c in labels:
        for i, img in enumerate(class_images(c, per_class, size, seed)):
            images.append(_png(img))
            label_col.append(c)
            ids.append(f"{class_name(c)}_{i:05d}")
            names.append(class_name(c))
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(label_col, pa.int64()),
                      "image_id": pa.array(ids, pa.string()), "class_name": pa.array(names, pa.string())})
    tmp = Path(path).with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=max(1, min(len(table), 16384)))
    tmp.replace(path)
    return Path(path).stat().st_size


def write_source(out: str | Path, classes: int = IMAGENET_CLASSES, per_class: int = IMAGENET_PER_CLASS, size: int = 32,
                 rows_per_file: int = 100_000, seed: int = 0, workers: int = 1) -> dict[str, Any]:
    """Write the table under ``out`` (reused when a complete one with these parameters is there).

    Returns:
        its manifest: the parameters, ``rows``, ``files``, ``bytes`` and ``seconds`` (0 when reused).
    """
    out = Path(out)
    params = dict(classes=classes, per_class=per_class, size=size, rows_per_file=rows_per_file, seed=seed)
    manifest = out / MANIFEST
    if manifest.is_file():
        done = json.loads(manifest.read_text())
        if {k: done.get(k) for k in params} == params:
            return dict(done, seconds=0.0)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    manifest.unlink(missing_ok=True)
    per_file = max(1, rows_per_file // per_class)  # whole classes per file
    groups = [list(range(s, min(s + per_file, classes))) for s in range(0, classes, per_file)]
    paths = [str(out / f"part-{k:05d}.parquet") for k in range(len(groups))]
    start = time.perf_counter()
    args = [(p, g, per_class, size, seed) for p, g in zip(paths, groups)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            sizes = list(pool.map(_write_file, *zip(*args)))
    else:
        sizes = [_write_file(*a) for a in args]
    info = dict(params, rows=classes * per_class, files=len(paths), bytes=int(sum(sizes)))
    manifest.write_text(json.dumps(info, indent=2))
    return dict(info, seconds=round(time.perf_counter() - start, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    ap.add_argument("--per-class", type=int, default=IMAGENET_PER_CLASS)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rows-per-file", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(write_source(a.out, a.classes, a.per_class, a.size, a.rows_per_file, a.seed, a.workers)))


if __name__ == "__main__":
    main()
