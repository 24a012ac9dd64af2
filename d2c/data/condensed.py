"""The condensed-dataset format (docs/design.md, ``RUN/condensed/``): a public contract.

A condensed set is a directory of parquet shards with one row per selected image:

=============  ====================================================================
column         content
=============  ====================================================================
image_id       str — the source's stable id
label          int64
latent         float32 [C, h, w] — z = E(x), scaled (SD-VAE) or the pixels in [-1, 1]
latent_flip    float32 [C, h, w] — E(flip(x)) (present when attach.flip is on)
visual         float16 [T, d] — the vision encoder's first h patch tokens (absent if off)
visual_flip    float16 [T, d] — the same tokens of the flipped image
=============  ====================================================================

Tensors are stored as Arrow ``FixedSizeList`` columns of the flattened values; their
per-row shapes are recorded in the schema metadata under ``d2c.shapes`` (JSON), so a
shard is readable with plain pyarrow and no Ray. The text embeddings live beside the
set in ``text_embeddings.safetensors`` (one per class, not per row).

The readers take a local path or a storage URI (``s3://``, ``gs://``, ``file://``; see
:mod:`d2c.storage`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d2c.storage import Location, location

SHAPES_KEY = b"d2c.shapes"
ID_COLUMNS = ("image_id", "label")
TENSOR_COLUMNS = ("latent", "latent_flip", "visual", "visual_flip")
#: Storage dtype of each tensor column (visual tokens halve their size in float16).
TENSOR_DTYPES = {"latent": np.float32, "latent_flip": np.float32, "visual": np.float16, "visual_flip": np.float16}


class CondensedFormatError(ValueError):
    """A directory or table that is not a condensed set of this format."""


def to_arrow(batch: Mapping[str, np.ndarray]) -> pa.Table:
    """A batch of rows → an Arrow table of this format.

    Args:
        batch: image_id str [N], label int [N], and any of TENSOR_COLUMNS as arrays [N, ...].
    """
    arrays, fields, shapes = [], [], {}
    n = len(batch["image_id"])
    arrays.append(pa.array([str(i) for i in batch["image_id"]], pa.string()))
    fields.append(pa.field("image_id", pa.string()))
    arrays.append(pa.array(np.asarray(batch["label"], np.int64)))
    fields.append(pa.field("label", pa.int64()))
    for name in TENSOR_COLUMNS:
        if name not in batch:
            continue
        values = np.ascontiguousarray(np.asarray(batch[name]), dtype=TENSOR_DTYPES[name])
        if values.shape[0] != n:
            raise CondensedFormatError(f"column {name} has {values.shape[0]} rows, expected {n}")
        row_shape = list(values.shape[1:])
        size = int(np.prod(row_shape))
        flat = pa.array(values.reshape(-1))
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, size))
        fields.append(pa.field(name, pa.list_(flat.type, size)))
        shapes[name] = row_shape
    schema = pa.schema(fields, metadata={SHAPES_KEY: json.dumps(shapes).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def shapes_of(schema: pa.Schema) -> dict[str, list[int]]:
    """Per-row tensor shapes recorded in a condensed table's schema."""
    meta = schema.metadata or {}
    if SHAPES_KEY not in meta:
        raise CondensedFormatError("no d2c.shapes metadata: not a d2c condensed table")
    return json.loads(meta[SHAPES_KEY])


def from_arrow(table: pa.Table, columns: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """An Arrow table of this format → numpy arrays (tensors reshaped to [N, ...])."""
    shapes = shapes_of(table.schema)
    wanted = list(columns) if columns is not None else table.column_names
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in table.column_names:
            raise CondensedFormatError(f"condensed set has no column {name!r} (has {table.column_names})")
        col = table.column(name).combine_chunks()
        if name in shapes:
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shapes[name])
        elif name == "image_id":
            out[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy()
    return out


def condensed_files(path: Union[str, Path, Location]) -> list:
    """The parquet shards of a condensed set, sorted: Paths for a local set, Locations for a URI."""
    loc = location(path)
    if loc.is_local:
        root = loc.local_path
        if not root.is_dir():
            raise CondensedFormatError(f"condensed set {str(root)!r} does not exist or is not a directory")
        files = sorted(root.glob("*.parquet"))
    else:
        if not loc.is_dir():
            raise CondensedFormatError(f"condensed set {str(loc)!r} does not exist or is not a directory")
        files = loc.files(".parquet")
    if not files:
        raise CondensedFormatError(f"condensed set {str(loc)!r} holds no parquet shards")
    return files


def _read_table(file) -> pa.Table:
    return file.read_table() if isinstance(file, Location) else pq.read_table(file)


def read_condensed(path: Union[str, Path, Location], columns: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """Read a whole condensed set (plain pyarrow), rows sorted by (label, image_id)."""
    tables = [_read_table(f) for f in condensed_files(path)]
    table = pa.concat_tables(tables).sort_by([("label", "ascending"), ("image_id", "ascending")])
    return from_arrow(table, columns)


def condensed_shapes(path: Union[str, Path, Location]) -> dict[str, list[int]]:
    """Per-row tensor shapes of a condensed set, read from its first shard's schema."""
    first = condensed_files(path)[0]
    return shapes_of(first.read_schema() if isinstance(first, Location) else pq.read_schema(first))
