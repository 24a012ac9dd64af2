"""Parquet sources: encoded images plus integer labels, e.g. a Hugging Face ``datasets`` export.

Columns:

- ``image`` (required): encoded image bytes (``binary`` / ``large_binary``), or a struct with a
  ``bytes`` field (and optionally ``path``) as written by HF ``datasets``' ``Image`` feature.
  A struct whose ``bytes`` is null but whose ``path`` is set is listed with that path, which
  is then read from disk at decode time; a null image is listed with ``image_bytes=None``
  and becomes a reject at decode time.
- ``label`` (required): integer, non-null, >= 0.
- ``image_id`` (optional): a unique id per row; without it the id is ``<file stem>-<row>``
  (row = position within that file). Ids must be unique across all files.
- ``class_name`` (optional): a per-row class name.

Class names are taken from, in order: the ``class_names`` argument (indexed by label), the
``class_name`` column, the ``ClassLabel`` names in HF's ``huggingface`` schema metadata,
and finally ``str(label)``.

Files are listed in sorted path order (a directory is searched recursively for
``*.parquet``, skipping names that start with ``.`` or ``_``) and rows in file order, so
the listing — and ``max_per_class``'s "first m of each class" — is deterministic.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from d2c.data.records import (
    CLASS_NAME,
    IMAGE_BYTES,
    IMAGE_ID,
    LABEL,
    PATH,
    DataSourceError,
    DataSourceNotFoundError,
    first_per_class,
)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
ID_COLUMN = IMAGE_ID
CLASS_NAME_COLUMN = CLASS_NAME
#: Field names inside HF's ``Image`` struct.
STRUCT_BYTES_FIELD = "bytes"
STRUCT_PATH_FIELD = "path"
#: Schema-metadata key under which HF ``datasets`` stores its features.
HF_METADATA_KEY = b"huggingface"
PARQUET_SUFFIX = ".parquet"
_HIDDEN_PREFIXES = (".", "_")
_MAX_LISTED = 5


def parquet_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand a file, a directory (recursive ``*.parquet``) or a list of them, sorted.

    Raises:
        DataSourceNotFoundError: a path does not exist.
        DataSourceError: no parquet file was found.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(
                f
                for f in p.rglob(f"*{PARQUET_SUFFIX}")
                if f.is_file()
                and not any(part.startswith(_HIDDEN_PREFIXES) for part in f.relative_to(p).parts)
            )
        else:
            raise DataSourceNotFoundError(
                f"parquet path not found: {p}. Set config key `data.path` to a parquet file "
                "or a directory of parquet files."
            )
    if not files:
        raise DataSourceError(f"no {PARQUET_SUFFIX} files under {', '.join(map(str, paths))}")
    return sorted(files)


def hf_class_names(schema: pa.Schema) -> list[str] | None:
    """The ``ClassLabel`` names of the ``label`` column from HF metadata, or ``None``."""
    metadata = schema.metadata or {}
    if HF_METADATA_KEY not in metadata:
        return None
    try:
        info = json.loads(metadata[HF_METADATA_KEY])
        feature = info["info"]["features"][LABEL_COLUMN]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataSourceError(f"cannot read parquet file {path}: {e}") from None


def _check_schema(path: Path, schema: pa.Schema) -> None:
    names = schema.names
    for column in (IMAGE_COLUMN, LABEL_COLUMN):
        if column not in names:
            raise DataSourceError(
                f"{path}: missing column {column!r} (columns: {names}); a parquet source needs "
                f"{IMAGE_COLUMN!r} (encoded bytes) and {LABEL_COLUMN!r} (int)"
            )
    label_type = schema.field(LABEL_COLUMN).type
    if not pa.types.is_integer(label_type):
        raise DataSourceError(
            f"{path}: column {LABEL_COLUMN!r} has type {label_type}, expected int"
        )
    image_type = schema.field(IMAGE_COLUMN).type
    if pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type):
        return
    if pa.types.is_struct(image_type) and image_type.get_field_index(STRUCT_BYTES_FIELD) >= 0:
        return
    raise DataSourceError(
        f"{path}: column {IMAGE_COLUMN!r} has type {image_type}; expected binary or a struct "
        f"with a {STRUCT_BYTES_FIELD!r} field"
    )


def _image_reference(value: Any) -> dict[str, Any]:
    """One ``image`` cell → ``{"image_bytes": bytes|None}`` or ``{"path": str}``."""
    if isinstance(value, dict):
        data = value.get(STRUCT_BYTES_FIELD)
        if data is None and value.get(STRUCT_PATH_FIELD):
            return {PATH: str(value[STRUCT_PATH_FIELD])}
        return {IMAGE_BYTES: data}
    return {IMAGE_BYTES: value}


def list_parquet(
    path: str | Path | Sequence[str | Path],
    max_per_class: int | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """List parquet rows, carrying each image's encoded bytes.

    Labels and ids are read first; the ``image`` column is read only for the rows kept by
    ``max_per_class``, one file at a time.

    Args:
        path: a parquet file, a directory of them, or a list of either.
        max_per_class: keep the first m rows of each class (files sorted, rows in order).
        class_names: optional names indexed by label (overrides the file's names).

    Returns:
        Rows ``{"image_id": str, "label": int, "class_name": str, "image_bytes": bytes|None}``
        (or ``"path": str`` instead of ``image_bytes`` for an HF struct holding only a path).

    Raises:
        DataSourceNotFoundError / DataSourceError: missing path, unreadable file, missing or
            mistyped columns, null or negative labels, a label without a name in
            ``class_names``, duplicate ids (each message names the file).
    """
    files = parquet_files(path)
    per_file: list[tuple[Path, pq.ParquetFile, np.ndarray, list[str], list[str]]] = []
    for file in files:
        pf = _open(file)
        schema = pf.schema_arrow
        _check_schema(file, schema)
        columns = [LABEL_COLUMN] + [c for c in (ID_COLUMN, CLASS_NAME_COLUMN) if c in schema.names]
        try:
            table = pf.read(columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataSourceError(f"cannot read parquet file {file}: {e}") from None
        label_col = table.column(LABEL_COLUMN)
        if label_col.null_count:
            raise DataSourceError(
                f"{file}: column {LABEL_COLUMN!r} has {label_col.null_count} nulls"
            )
        labels = label_col.to_numpy().astype(np.int64)
        if labels.size and labels.min() < 0:
            raise DataSourceError(f"{file}: negative label {int(labels.min())}")
        if class_names is not None and labels.size and labels.max() >= len(class_names):
            raise DataSourceError(
                f"{file}: label {int(labels.max())} has no name in the {len(class_names)} "
                "class names given"
            )
        if ID_COLUMN in table.column_names:
            id_col = table.column(ID_COLUMN)
            if id_col.null_count:
                raise DataSourceError(f"{file}: column {ID_COLUMN!r} has {id_col.null_count} nulls")
            ids = [str(v) for v in id_col.to_pylist()]
        else:
            ids = [f"{file.stem}-{row}" for row in range(len(labels))]
        if class_names is not None:
            names = [class_names[label] for label in labels]
        elif CLASS_NAME_COLUMN in table.column_names:
            names = [str(v) for v in table.column(CLASS_NAME_COLUMN).to_pylist()]
        else:
            hf_names = hf_class_names(schema)
            names = [
                hf_names[label] if hf_names is not None and label < len(hf_names) else str(label)
                for label in labels
            ]
        per_file.append((file, pf, labels, ids, names))

    all_ids = [i for (_, _, _, ids, _) in per_file for i in ids]
    if len(set(all_ids)) != len(all_ids):
        duplicates = sorted(i for i, count in Counter(all_ids).items() if count > 1)
        shown = ", ".join(duplicates[:_MAX_LISTED])
        raise DataSourceError(
            f"duplicate image ids across {[str(f) for f in files]}: {shown}; give the files an "
            f"{ID_COLUMN!r} column or unique file names"
        )

    all_labels = np.concatenate([labels for (_, _, labels, _, _) in per_file])
    keep = first_per_class(all_labels, max_per_class)
    offsets = np.cumsum([0] + [len(labels) for (_, _, labels, _, _) in per_file])
    rows: list[dict[str, Any]] = []
    for k, (file, pf, labels, ids, names) in enumerate(per_file):
        local = keep[(keep >= offsets[k]) & (keep < offsets[k + 1])] - offsets[k]
        if local.size == 0:
            continue
        try:
            images = pf.read(columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN)
        except (pa.ArrowException, OSError) as e:
            raise DataSourceError(f"cannot read parquet file {file}: {e}") from None
        cells = images.take(pa.array(local)).to_pylist()
        for row, cell in zip(local.tolist(), cells):
            rows.append(
                {IMAGE_ID: ids[row], LABEL: int(labels[row]), CLASS_NAME: names[row]}
                | _image_reference(cell)
            )
    return rows
