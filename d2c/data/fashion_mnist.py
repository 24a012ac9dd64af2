"""Fashion-MNIST from its idx files (gzipped or not), as installed by Debian's
``dataset-fashion-mnist`` package.

Files (``<prefix>`` is ``train`` or ``t10k``), each optionally with a ``.gz`` suffix:
``<prefix>-images-idx3-ubyte`` (magic 0x00000803, uint8 ``[N, 28, 28]``) and
``<prefix>-labels-idx1-ubyte`` (magic 0x00000801, uint8 ``[N]``). Compression is detected
from the content (gzip magic), not the suffix.

The idx format: two zero bytes, a type code, the number of dimensions, then each
dimension as a big-endian uint32, then the data in C order (big-endian for multi-byte types).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from d2c.data.records import (
    CLASS_NAME,
    CLASS_NAMES_FASHION_MNIST,
    IMAGE,
    IMAGE_ID,
    LABEL,
    DataSourceError,
    DataSourceNotFoundError,
    first_per_class,
)

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: split name → file-name prefix.
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
#: Image side length.
FASHION_MNIST_SIZE = 28
#: Digits of the zero-padded index in ``image_id`` (``fmnist-train-00123``); 60,000 rows fit.
ID_DIGITS = 5
ID_PREFIX = "fmnist"

IDX_IMAGES_MAGIC = 0x00000803  # ubyte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # ubyte, 1 dimension
#: idx type code → numpy dtype (big-endian, as the format stores them).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_PREAMBLE = 4  # two zero bytes, type code, ndim
_IDX_DIM_BYTES = 4

_INSTALL_HINT = (
    "Install it with `apt-get install dataset-fashion-mnist` (files go to "
    f"{DEFAULT_FASHION_MNIST_DIR}) or set config key `data.path` to a directory holding "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."
)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataSourceError(f"cannot read {path}: {e.strerror or e}") from None
    if raw[: len(_GZIP_MAGIC)] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataSourceError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one idx file (gzipped or not).

    Args:
        path: the file.
        expected_magic: if given, the 4-byte big-endian magic number the file must start with.

    Returns:
        An array of the file's dtype (native byte order) and shape ``dims``.

    Raises:
        DataSourceError: unreadable file, bad magic number or type code, or a data
            length that does not match the header; the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < _IDX_PREAMBLE:
        raise DataSourceError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:_IDX_PREAMBLE], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataSourceError(
            f"{path}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; "
            "is this the right idx file?"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataSourceError(f"{path}: not an idx file (magic 0x{magic:08x})")
    dtype = IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = _IDX_PREAMBLE + _IDX_DIM_BYTES * ndim
    if len(raw) < header:
        raise DataSourceError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[_IDX_PREAMBLE:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataSourceError(
            f"{path}: header says {dims} of {dtype} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupt"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(root: Path, name: str) -> Path:
    candidates = [root / name, root / f"{name}.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataSourceNotFoundError(
        f"Fashion-MNIST file not found: tried {', '.join(map(str, candidates))}. {_INSTALL_HINT}"
    )


def fashion_mnist_files(root: str | Path | None, split: str) -> tuple[Path, Path]:
    """Return the (images, labels) idx paths of ``split`` ("train" or "test") under ``root``.

    ``root=None`` means :data:`DEFAULT_FASHION_MNIST_DIR`.
    """
    if split not in SPLIT_PREFIXES:
        raise ValueError(f"split must be one of {sorted(SPLIT_PREFIXES)}, got {split!r}")
    root = DEFAULT_FASHION_MNIST_DIR if root is None else Path(root)
    if not root.is_dir():
        raise DataSourceNotFoundError(f"Fashion-MNIST directory not found: {root}. {_INSTALL_HINT}")
    prefix = SPLIT_PREFIXES[split]
    return _find(root, f"{prefix}-images-idx3-ubyte"), _find(root, f"{prefix}-labels-idx1-ubyte")


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split.

    Args:
        root: directory of the idx files; ``None`` is :data:`DEFAULT_FASHION_MNIST_DIR`.
        split: "train" (60,000 images) or "test" (10,000).

    Returns:
        ``(images uint8 [N, 28, 28], labels int64 [N])`` in file order.

    Raises:
        DataSourceNotFoundError: missing directory or file (the message says how to install).
        DataSourceError: bad magic number, wrong image size, count mismatch, labels not in 0..9.
    """
    images_path, labels_path = fashion_mnist_files(root, split)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (FASHION_MNIST_SIZE, FASHION_MNIST_SIZE):
        raise DataSourceError(
            f"{images_path}: images are {images.shape[1:]}, expected "
            f"({FASHION_MNIST_SIZE}, {FASHION_MNIST_SIZE})"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataSourceError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds "
            f"{images.shape[0]} images"
        )
    num_classes = len(CLASS_NAMES_FASHION_MNIST)
    if labels.size and int(labels.max()) >= num_classes:
        raise DataSourceError(
            f"{labels_path}: label {int(labels.max())} is out of range 0..{num_classes - 1}"
        )
    return images, labels.astype(np.int64)


def fashion_mnist_image_id(split: str, index: int) -> str:
    """``fmnist-<split>-<index zero-padded to 5>``, e.g. ``fmnist-train-00123``."""
    return f"{ID_PREFIX}-{split}-{index:0{ID_DIGITS}d}"


def list_fashion_mnist(
    root: str | Path | None = None, split: str = "train", max_per_class: int | None = None
) -> list[dict[str, Any]]:
    """List one split as records that already carry their pixels.

    Args:
        root: directory of the idx files; ``None`` is :data:`DEFAULT_FASHION_MNIST_DIR`.
        split: "train" or "test".
        max_per_class: keep the first m of each class in file order; ``None`` keeps all.

    Returns:
        Rows in file order: ``{"image_id": "fmnist-<split>-<index>", "label": int,
        "class_name": str, "image": uint8 [28, 28, 1]}`` (index = position in the file).
    """
    images, labels = load_fashion_mnist(root, split)
    keep = first_per_class(labels, max_per_class)
    return [
        {
            IMAGE_ID: fashion_mnist_image_id(split, int(i)),
            LABEL: int(labels[i]),
            CLASS_NAME: CLASS_NAMES_FASHION_MNIST[labels[i]],
            IMAGE: images[i][:, :, None].copy(),
        }
        for i in keep
    ]
