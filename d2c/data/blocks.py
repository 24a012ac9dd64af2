"""The listing as Arrow blocks, and the decode body that runs on each block.

The listing (see :mod:`d2c.data.source`) becomes an Arrow table whose rows keep a position
``pos`` (the row's index in the listing) and a ``shard`` number; :func:`decode_batch` (a Ray
Data map task in ``app/stages.py``) never raises for a bad image: it returns a row with an
empty image and a ``reject`` reason instead.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from d2c.config import DataConfig
from d2c.data.preprocess import prepare_record
from d2c.data.records import Reject

#: Rows per Ray block of the listing (small blocks keep every actor busy).
LISTING_BLOCK_ROWS = 1024


def listing_table(rows: list[dict[str, Any]], shard_rows: int, positions: Optional[Iterable[int]] = None) -> pa.Table:
    """Listing rows → Arrow table with pos, shard, image_id, label and one pixel reference.

    Decoded pixels (Fashion-MNIST) travel as raw bytes + shape; files as paths; parquet
    images as their encoded bytes.
    """
    pos = list(range(len(rows))) if positions is None else list(positions)
    raw, shape, path, enc = [], [], [], []
    for row in rows:
        img = row.get("image")
        raw.append(None if img is None else np.ascontiguousarray(img, np.uint8).tobytes())
        shape.append(None if img is None else list(np.shape(img)))
        path.append(row.get("path"))
        enc.append(row.get("image_bytes"))
    return pa.table(
        {
            "pos": pa.array(pos, pa.int64()),
            "shard": pa.array([p // shard_rows for p in pos], pa.int64()),
            "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.int64()),
            "raw": pa.array(raw, pa.binary()),
            "raw_shape": pa.array(shape, pa.list_(pa.int32())),
            "path": pa.array(path, pa.string()),
            "image_bytes": pa.array(enc, pa.binary()),
        }
    )


def table_blocks(table: pa.Table, block_rows: int = LISTING_BLOCK_ROWS) -> list[pa.Table]:
    """Slice a table into blocks of at most ``block_rows`` rows (the Ray Data input blocks)."""
    return [table.slice(i, block_rows) for i in range(0, max(len(table), 1), block_rows)] if len(table) else []


def decode_batch(batch: pa.Table, data_cfg: dict) -> dict[str, np.ndarray]:
    """Ray Data map task: listing rows → uint8 images [B, S, S, C] + reject reasons.

    A row that cannot be read or decoded keeps its ids, gets an all-zero image and a
    non-empty ``reject`` string; the stage downstream skips it and records the reject.
    """
    cfg = DataConfig.model_validate(data_cfg)
    n = len(batch)
    images = np.zeros((n, cfg.image_size, cfg.image_size, cfg.channels), np.uint8)
    rejects = np.full(n, "", dtype=object)
    cols = {name: batch.column(name).to_pylist() for name in ("image_id", "raw", "raw_shape", "path", "image_bytes")}
    for i in range(n):
        row: dict[str, Any] = {"image_id": cols["image_id"][i], "label": 0, "class_name": ""}
        if cols["raw"][i] is not None:
            row["image"] = np.frombuffer(cols["raw"][i], np.uint8).reshape(cols["raw_shape"][i])
        elif cols["path"][i] is not None:
            row["path"] = cols["path"][i]
        else:
            row["image_bytes"] = cols["image_bytes"][i]
        rec = prepare_record(row, channels=cfg.channels, image_size=cfg.image_size, method=cfg.preprocess)
        if isinstance(rec, Reject):
            rejects[i] = rec.reason
        else:
            images[i] = rec["image"]
    return {
        "pos": batch.column("pos").to_numpy(),
        "shard": batch.column("shard").to_numpy(),
        "image_id": np.asarray(cols["image_id"], dtype=object),
        "label": batch.column("label").to_numpy(),
        "image": images,
        "reject": rejects,
    }


def image_keys(image_ids) -> np.ndarray:
    """A stable int64 per image_id (sha256-derived): a sortable row key for numeric-only loaders."""
    import hashlib

    return np.asarray(
        [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "little") >> 1 for i in image_ids], np.int64
    )


def add_image_key(batch: pa.Table) -> pa.Table:
    """Ray Data map: append the ``key`` column (see :func:`image_keys`)."""
    return batch.append_column("key", pa.array(image_keys(batch.column("image_id").to_pylist()), pa.int64()))
