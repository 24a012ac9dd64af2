"""One entry point over every data source: list a dataset from its config section.

``list_source(cfg.data)`` returns a :class:`Listing` (the rows of
:mod:`d2c.data.records`, the class names, notes such as empty classes) without
decoding anything but Fashion-MNIST's tiny in-memory images. The listing's order is
the order of the ``scores/`` shards, so it is deterministic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from d2c.config import DataConfig
from d2c.data.fashion_mnist import list_fashion_mnist
from d2c.data.imagefolder import list_imagefolder
from d2c.data.parquet_source import list_parquet
from d2c.data.records import CLASS_NAMES_FASHION_MNIST, DataSourceError


@dataclass
class Listing:
    """A listed dataset.

    Attributes:
        rows: listing rows (image_id, label, class_name, and image | path | image_bytes).
        class_names: names indexed by label; empty classes included.
        empty_classes: labels with no rows.
        notes: human-readable remarks for the manifest (ignored files, …).
    """

    rows: list[dict[str, Any]]
    class_names: list[str]
    empty_classes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 over the ordered (image_id, label) pairs: changes whenever the listing does."""
        h = hashlib.sha256()
        for row in self.rows:
            h.update(f"{row['image_id']}\x1f{row['label']}\x1e".encode())
        return h.hexdigest()

    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for row in self.rows:
            counts[row["label"]] += 1
        return counts


def list_source(cfg: DataConfig) -> Listing:
    """List the dataset named by ``cfg`` (``data.*`` config keys)."""
    if cfg.source == "fashion_mnist":
        rows = list_fashion_mnist(cfg.path, cfg.split, cfg.max_per_class)
        listing = Listing(rows, list(CLASS_NAMES_FASHION_MNIST))
    elif cfg.source == "imagefolder":
        if cfg.path is None:
            raise DataSourceError("data.path is required for data.source=imagefolder (the folder of class folders)")
        folder = list_imagefolder(cfg.path, cfg.max_per_class, class_names_file=cfg.class_names_file)
        names = list(folder.class_names)
        notes = [f"{len(folder.ignored_files)} files skipped for their extension"] if folder.ignored_files else []
        listing = Listing(folder.rows, names, notes=notes)
    elif cfg.source == "parquet":
        if cfg.path is None:
            raise DataSourceError("data.path is required for data.source=parquet (a file or a directory of them)")
        rows = list_parquet(cfg.path, cfg.max_per_class)
        num = max((r["label"] for r in rows), default=-1) + 1
        names = [""] * num
        for r in rows:
            names[r["label"]] = names[r["label"]] or str(r.get("class_name") or r["label"])
        listing = Listing(rows, [n or str(i) for i, n in enumerate(names)])
    else:  # the config schema makes this unreachable; keep the message for library users
        raise DataSourceError(f"unknown data.source {cfg.source!r}")
    counts = listing.class_counts()
    listing.empty_classes = [i for i, c in enumerate(counts) if c == 0]
    for i in listing.empty_classes:
        listing.notes.append(f"class {i} ({listing.class_names[i]}) is empty")
    return listing
