"""ImageNet-style folders: ``root/<class folder>/<image file>``.

- Classes are the non-hidden sub-directories of ``root``, sorted by name (Python string
  order, as torchvision's ``ImageFolder``); a class's label is its index in that list.
  A class folder with no image files stays in the list, so labels stay aligned with the
  full class set, and is reported in :attr:`ImageFolderListing.empty_classes`.
- Files are found recursively inside each class folder (sub-directory symlinks are not
  followed; an unreadable folder is an error), sorted by class, then by path relative to
  ``root``. A file is an image when its
  suffix, lower-cased, is in ``extensions``; other files are not silently dropped but
  reported in :attr:`ImageFolderListing.ignored_files`. The decoder identifies formats by
  content, so a PNG named ``.JPEG`` (ImageNet has some) still decodes.
- ``image_id`` is the file's path relative to ``root`` in POSIX form
  (``n01440764/n01440764_10026.JPEG``): stable across machines and runs.
- Class names come from an optional mapping file in ImageNet's ``LOC_synset_mapping.txt``
  format (``n01440764 tench, Tinca tinca`` → ``tench``, the first comma-separated name);
  without one, the folder name is the class name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.data.decode import DEFAULT_MAX_PIXELS, decode_image
from d2c.data.records import (
    CLASS_NAME,
    IMAGE_ID,
    LABEL,
    PATH,
    DataSourceError,
    DataSourceNotFoundError,
    ImageDecodeError,
    first_per_class,
)

#: torchvision's ImageFolder extensions (compared lower-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
#: How many offending entries an error message lists before "...".
_MAX_LISTED = 5


@dataclass(frozen=True)
class ImageFolderListing:
    """The result of :func:`list_imagefolder`.

    Attributes:
        root: the absolute root directory.
        class_dirs: folder names, sorted; ``label`` indexes this tuple.
        class_names: human class names, aligned with ``class_dirs``.
        rows: listing rows ``{"image_id": str, "label": int, "class_name": str, "path": str}``
            (``path`` absolute), sorted by (label, ``image_id``). Pass these to the pipeline.
        empty_classes: folder names (from ``class_dirs``) that hold no image file.
        ignored_files: ``image_id``-style relative paths skipped for their extension.
    """

    root: str
    class_dirs: tuple[str, ...]
    class_names: tuple[str, ...]
    rows: list[dict[str, Any]] = field(repr=False)
    empty_classes: tuple[str, ...] = ()
    ignored_files: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes, empty ones included."""
        return len(self.class_dirs)


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _raise_walk_error(error: OSError) -> None:
    raise DataSourceError(f"cannot list {error.filename}: {error.strerror or error}")


def read_class_mapping(path: str | Path) -> dict[str, str]:
    """Parse a ``LOC_synset_mapping.txt``-style file: ``<folder> <name>[, <other names>]``.

    The folder name and the names are separated by the first whitespace; the class name is
    the first comma-separated name, stripped. Blank lines are skipped.

    Returns:
        ``{folder name: class name}``.

    Raises:
        DataSourceNotFoundError: the file does not exist.
        DataSourceError: a line without a name, or a folder listed twice (file and line named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataSourceNotFoundError(f"class-name mapping file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"cannot read class-name mapping file {path}: {e}") from None
    mapping: dict[str, str] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        name = parts[1].split(",")[0].strip() if len(parts) == 2 else ""
        if not name:
            raise DataSourceError(
                f"{path}:{line_number}: expected '<folder> <name>[, ...]', got {line!r}"
            )
        if parts[0] in mapping:
            raise DataSourceError(f"{path}:{line_number}: folder {parts[0]!r} is listed twice")
        mapping[parts[0]] = name
    return mapping


def list_imagefolder(
    root: str | Path,
    max_per_class: int | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    class_names_file: str | Path | None = None,
) -> ImageFolderListing:
    """List an ImageFolder tree without opening any image.

    Args:
        root: the directory holding one folder per class.
        max_per_class: keep the first m files of each class (in sorted order); ``None`` = all.
        extensions: file suffixes to treat as images, compared case-insensitively.
        class_names_file: optional ``LOC_synset_mapping.txt``-style file; it must name
            every class folder.

    Returns:
        :class:`ImageFolderListing` (rows, classes, empty classes, ignored files).

    Raises:
        DataSourceNotFoundError: ``root`` does not exist or is not a directory.
        DataSourceError: ``root`` has no class folders, or the mapping misses some folders.
    """
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise DataSourceNotFoundError(
            f"ImageFolder root not found or not a directory: {root_path}. Set config key "
            "`data.path` to a directory laid out as <root>/<class>/<image>."
        )
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    try:
        class_dirs = sorted(
            entry.name
            for entry in os.scandir(root_path)
            if entry.is_dir() and not entry.name.startswith(".")
        )
    except OSError as e:
        raise DataSourceError(f"cannot list ImageFolder root {root_path}: {e}") from None
    if not class_dirs:
        raise DataSourceError(
            f"ImageFolder root {root_path} has no class sub-directories; expected "
            "<root>/<class>/<image> (config key `data.path`)."
        )

    if class_names_file is None:
        class_names = tuple(class_dirs)
    else:
        mapping = read_class_mapping(class_names_file)
        missing = [d for d in class_dirs if d not in mapping]
        if missing:
            raise DataSourceError(
                f"class-name mapping file {class_names_file} has no entry for class folders "
                f"{_listed(missing)}"
            )
        class_names = tuple(mapping[d] for d in class_dirs)

    rows: list[dict[str, Any]] = []
    empty: list[str] = []
    ignored: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        images: list[str] = []
        for dirpath, _, filenames in os.walk(root_path / class_dir, onerror=_raise_walk_error):
            rel_dir = Path(dirpath).relative_to(root_path).as_posix()
            for filename in filenames:
                rel = f"{rel_dir}/{filename}"
                (images if filename.lower().endswith(suffixes) else ignored).append(rel)
        images.sort()
        if not images:
            empty.append(class_dir)
        rows.extend(
            {
                IMAGE_ID: rel,
                LABEL: label,
                CLASS_NAME: class_names[label],
                PATH: str(root_path / rel),
            }
            for rel in images
        )
    keep = first_per_class(np.array([r[LABEL] for r in rows], dtype=np.int64), max_per_class)
    return ImageFolderListing(
        root=str(root_path),
        class_dirs=tuple(class_dirs),
        class_names=class_names,
        rows=[rows[i] for i in keep],
        empty_classes=tuple(empty),
        ignored_files=tuple(sorted(ignored)),
    )


def read_image_file(
    path: str | Path,
    channels: int,
    *,
    alpha: str = "white",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> np.ndarray:
    """Read and decode one image file (see :func:`d2c.data.decode.decode_image`).

    Returns:
        uint8 ``[H, W, channels]``.

    Raises:
        ImageDecodeError: the file is missing, unreadable (permissions, a directory) or
            does not decode.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageDecodeError(f"cannot read file: {e.strerror or e}") from None
    return decode_image(
        data, channels, alpha=alpha, max_pixels=max_pixels, exif_transpose=exif_transpose
    )
