"""Image grids of samples: one PNG per class and one overview (a row per class).

Inputs are uint8 images ``[N, H, W, C]`` (C = 1 grey or 3 RGB, or ``[N, H, W]``) with their
labels ``[N]``; outputs are PIL images (mode ``"L"`` for grey, ``"RGB"`` for colour) that
:func:`write_grids` saves as ``class-<label>.png`` and ``overview.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

#: Pixels of background between tiles and around the grid.
GRID_PADDING = 2
#: Background value (uint8) of the padding.
GRID_BACKGROUND = 255
#: File names written by :func:`write_grids`.
OVERVIEW_FILE = "overview.png"
CLASS_FILE_TEMPLATE = "class-{label:04d}.png"
GREY_CHANNELS = 1
RGB_CHANNELS = 3


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]`` or ``[N, H, W, C]`` (C in 1, 3) → ``[N, H, W, C]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"grid images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (GREY_CHANNELS, RGB_CHANNELS):
        raise ValueError(f"grid images must be [N, H, W] or [N, H, W, C] with C in (1, 3); got {images.shape}")
    return images


def _to_pil(canvas: np.ndarray) -> Image.Image:
    """``[H, W, C]`` uint8 → PIL ("L" for C = 1, "RGB" for C = 3)."""
    return Image.fromarray(canvas[..., 0] if canvas.shape[-1] == GREY_CHANNELS else canvas)


def tile(images: np.ndarray, columns: int, rows: Optional[int] = None, padding: int = GRID_PADDING) -> Image.Image:
    """Lay images ``[N, H, W, C]`` out row by row on a ``rows × columns`` grid (empty cells stay background).

    Returns:
        PIL image of ``(rows·(H+p)+p) × (columns·(W+p)+p)`` pixels.
    """
    images = _as_nhwc(images)
    n, h, w, c = images.shape
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = rows if rows is not None else max(1, math.ceil(n / columns))
    if n > rows * columns:
        raise ValueError(f"{n} images do not fit a {rows} x {columns} grid")
    canvas = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), GRID_BACKGROUND, np.uint8)
    for k in range(n):
        r, col = divmod(k, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        canvas[top : top + h, left : left + w] = images[k]
    return _to_pil(canvas)


def class_grid(images: np.ndarray, columns: Optional[int] = None, padding: int = GRID_PADDING) -> Image.Image:
    """A near-square grid of one class's images ``[n, H, W, C]`` (``columns`` default ⌈√n⌉)."""
    n = len(images)
    if n == 0:
        raise ValueError("no images for the grid")
    return tile(images, columns or math.ceil(math.sqrt(n)), padding=padding)


def overview_grid(
    images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int, padding: int = GRID_PADDING
) -> Image.Image:
    """One row per class (label order) with its first ``per_class`` images in sample order.

    Returns:
        PIL image of ``num_classes`` rows × ``min(per_class, largest class count)`` columns; a
        class with fewer samples leaves its remaining cells blank.
    """
    images = _as_nhwc(images)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"labels must be [N={len(images)}], got {labels.shape}")
    n, h, w, c = images.shape
    columns = max(1, min(per_class, int(np.bincount(labels, minlength=num_classes).max(initial=0))))
    cells = np.full((num_classes * columns, h, w, c), GRID_BACKGROUND, np.uint8)
    for label in range(num_classes):
        chosen = np.flatnonzero(labels == label)[:columns]
        cells[label * columns : label * columns + len(chosen)] = images[chosen]
    return tile(cells, columns, rows=num_classes, padding=padding)


def write_grids(
    out_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    per_class: int,
    class_names: Optional[Sequence[str]] = None,
) -> list[Path]:
    """Write ``class-<label>.png`` for every class that has samples, and ``overview.png``.

    Args:
        images: uint8 ``[N, H, W, C]``; labels: ``[N]``.
        per_class: images per class in each grid (the first ones in sample order).
        class_names: unused in the pixels; recorded in each PNG's ``class_name`` text chunk.
    Returns:
        the written paths, overview first.
    """
    from PIL import PngImagePlugin

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _as_nhwc(images)
    labels = np.asarray(labels)
    paths = [out / OVERVIEW_FILE]
    overview_grid(images, labels, num_classes, per_class).save(paths[0])
    for label in range(num_classes):
        chosen = np.flatnonzero(labels == label)[:per_class]
        if len(chosen) == 0:
            continue
        info = PngImagePlugin.PngInfo()
        info.add_text("label", str(label))
        if class_names is not None and label < len(class_names):
            info.add_text("class_name", str(class_names[label]))
        path = out / CLASS_FILE_TEMPLATE.format(label=label)
        class_grid(images[chosen]).save(path, pnginfo=info)
        paths.append(path)
    return paths
