"""The record convention shared by every data source and by the Ray pipeline.

A source is read in two steps, so that the expensive part runs in parallel:

1. **List** (cheap, on the driver): every input becomes a plain ``dict`` *listing row*
   with ``image_id`` (str), ``label`` (int), ``class_name`` (str) and exactly one
   reference to its pixels:

   - ``image``: already-decoded pixels, ``np.ndarray`` uint8 ``[H, W, C]`` (Fashion-MNIST,
     whose images are tiny);
   - ``path``: a file to read and decode (ImageFolder; a parquet struct without bytes);
   - ``image_bytes``: encoded image bytes, or ``None`` when the source holds a null (parquet).

2. **Decode + preprocess** (parallel map tasks): a listing row becomes a *record*
   ``{"image_id", "label", "class_name", "image": np.ndarray uint8 [H, W, C]}``, or a
   :class:`Reject` when its bytes cannot be read or decoded
   (see :func:`d2c.data.preprocess.prepare_record`).

``image_id`` is stable, unique and deterministic across runs: it is derived from the
input itself (file path, row position, or an id column), never from listing order
after shuffling, worker count or time.

Errors: :class:`ImageDecodeError` is *per image* (the pipeline records a reject and
goes on); :class:`DataSourceError` means the source as a whole is unusable (missing
root, malformed idx file, a parquet file without a ``label`` column) and should stop
the run with its message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# ---------------------------------------------------------------------------
# Row keys
# ---------------------------------------------------------------------------
IMAGE_ID = "image_id"
LABEL = "label"
CLASS_NAME = "class_name"
IMAGE = "image"
PATH = "path"
IMAGE_BYTES = "image_bytes"

#: Keys of a decoded record, in order.
RECORD_KEYS = (IMAGE_ID, LABEL, CLASS_NAME, IMAGE)
#: Keys of a listing row that reference pixels; a listing row carries exactly one.
PIXEL_REFERENCE_KEYS = (IMAGE, PATH, IMAGE_BYTES)

#: The ten Fashion-MNIST class names, indexed by label, as published by Zalando Research.
CLASS_NAMES_FASHION_MNIST: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# ---------------------------------------------------------------------------
# Errors and rejects
# ---------------------------------------------------------------------------
class ImageDecodeError(Exception):
    """One image could not be read or decoded; ``reason`` is a short human sentence.

    Picklable (its only argument is the reason), so it crosses Ray process boundaries.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DataSourceError(Exception):
    """A data source as a whole is unusable; the message says which file and what to do."""


class DataSourceNotFoundError(DataSourceError, FileNotFoundError):
    """A data source's root or one of its required files does not exist."""


@dataclass(frozen=True)
class Reject:
    """An input that could not be read or decoded (one row of ``RUN/rejects/``).

    Attributes:
        image_id: the listing row's ``image_id``.
        reason: why, e.g. ``"zero-byte file"`` or ``"truncated or corrupt image: ..."``.
    """

    image_id: str
    reason: str

    def to_row(self) -> dict[str, str]:
        """Return ``{"image_id": str, "reason": str}``."""
        return asdict(self)


# ---------------------------------------------------------------------------
# Helpers shared by the sources
# ---------------------------------------------------------------------------
def check_max_per_class(max_per_class: int | None) -> None:
    """Raise ``ValueError`` unless ``max_per_class`` is ``None`` or an int >= 1."""
    if max_per_class is None:
        return
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, (int, np.integer)):
        raise ValueError(f"max_per_class must be an int >= 1 or None, got {max_per_class!r}")
    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")


def first_per_class(labels: Sequence[int] | np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices of the first ``max_per_class`` items of each class, in input order.

    Args:
        labels: int labels ``[N]`` in the source's own (deterministic) order.
        max_per_class: keep at most this many per class; ``None`` keeps everything.

    Returns:
        int64 ``[M]``: ascending indices into ``labels``.
    """
    check_max_per_class(max_per_class)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if max_per_class is None or labels.size == 0:
        return np.arange(labels.size, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    # Position of each item within its class's run in the stably sorted order.
    run_starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    run_lengths = np.diff(np.r_[run_starts, sorted_labels.size])
    rank_in_class = np.arange(sorted_labels.size) - np.repeat(run_starts, run_lengths)
    keep = order[rank_in_class < max_per_class]
    return np.sort(keep).astype(np.int64)
