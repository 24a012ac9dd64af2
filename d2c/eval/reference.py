"""The FID reference cache: the reference images' Inception features and statistics, computed
once per content and kept as an ADM-format ``.npz`` under the cache root.

A cache file ``<root>/eval-reference/ref-<key[:32]>.npz`` holds ADM's ``mu``, ``sigma``,
``mu_s``, ``sigma_s`` (so it is itself a valid ADM reference batch), the ``n`` behind them, the
pool and spatial features with their labels (the bootstrap resamples them), the full ``key`` and
the extractor id. The key is the sha256 of what the features depend on:

* a dataset split (:func:`dataset_reference_key`): every row's id, label and pixel digest
  (the decoded array, the encoded bytes, or the file's path, size and mtime), the
  preprocessing and the extractor id;
* an ADM ``.npz`` of images (:func:`npz_reference_key`): the file's digest and the extractor id.

A file whose stored key differs from the one asked for, or that lacks the features, is a miss.
:func:`cached_features` is the get-or-compute step; how the features are computed (the Ray
Inception pool in ``app/evaluate.py``) is the caller's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from d2c.eval.fid import (
    CACHE_PREFIX,
    NPZ_EXTRACTOR_ID,
    NPZ_IMAGES,
    NPZ_KEY,
    NPZ_MU,
    NPZ_MU_SPATIAL,
    NPZ_N,
    NPZ_N_SPATIAL,
    NPZ_SIGMA,
    NPZ_SIGMA_SPATIAL,
    FeatureStats,
    save_stats_npz,
)

#: Subdirectory of the cache root holding reference features and statistics.
REFERENCE_CACHE_SUBDIR = "eval-reference"
#: Version of the reference cache key (bump when what the key covers changes).
REFERENCE_KEY_VERSION = "d2c-reference-v1"
#: Hex digits of the key in cache file names.
CACHE_NAME_CHARS = 32
#: Arrays stored in a reference cache file beside ADM's mu/sigma/mu_s/sigma_s.
NPZ_POOL_FEATURES = "pool_features"
NPZ_SPATIAL_FEATURES = "spatial_features"
NPZ_REF_LABELS = "labels"


def row_digest(row: Mapping[str, Any]) -> str:
    """Content digest of one listing row's pixels: its decoded ``image`` array, else its encoded
    ``image_bytes``, else its file's real path, size and mtime."""
    h = hashlib.sha256()
    if row.get("image") is not None:
        arr = np.ascontiguousarray(row["image"])
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif row.get("image_bytes") is not None:
        h.update(bytes(row["image_bytes"]))
    elif row.get("path") is not None:
        st = os.stat(row["path"])
        h.update(f"{os.path.realpath(row['path'])}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode())
    return h.hexdigest()


def dataset_reference_key(rows: Sequence[Mapping[str, Any]], preprocess: Mapping[str, Any], extractor_id: str) -> str:
    """sha256 over the key version, the extractor id, the preprocessing settings and every row's
    (image_id, label, :func:`row_digest`) in order."""
    h = hashlib.sha256()
    h.update(f"{REFERENCE_KEY_VERSION}\x1e{extractor_id}\x1e{json.dumps(dict(preprocess), sort_keys=True)}\x1e".encode())
    for row in rows:
        h.update(f"{row['image_id']}\x1f{row['label']}\x1f{row_digest(row)}\x1e".encode())
    return h.hexdigest()


def npz_reference_key(path: str | os.PathLike, extractor_id: str) -> str:
    """sha256 over the key version, the extractor id and the ADM file's content digest."""
    from d2c.eval.inception import file_digest

    return hashlib.sha256(f"{REFERENCE_KEY_VERSION}\x1e{extractor_id}\x1e{file_digest(str(path))}".encode()).hexdigest()


def cache_file(root: str | os.PathLike, key: str) -> Path:
    """Where the reference of ``key`` is cached under the cache ``root``."""
    return Path(root) / REFERENCE_CACHE_SUBDIR / f"{CACHE_PREFIX}{key[:CACHE_NAME_CHARS]}.npz"


def load_cached(path: str | os.PathLike, key: str) -> Optional[dict[str, np.ndarray]]:
    """Every array of the cache file at ``path`` if it holds ``key``'s features; None on a miss."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if NPZ_KEY not in z.files or str(z[NPZ_KEY]) != key or NPZ_POOL_FEATURES not in z.files:
            return None
        return {name: z[name] for name in z.files}


def save_cached(path: str | os.PathLike, key: str, extractor_id: str, pool: np.ndarray, spatial: np.ndarray,
                labels: np.ndarray) -> None:
    """Write the cache file (atomically): statistics of ``pool`` / ``spatial`` and the arrays themselves."""
    save_stats_npz(
        str(path), FeatureStats.from_features(pool), FeatureStats.from_features(spatial),
        **{NPZ_KEY: np.str_(key), NPZ_EXTRACTOR_ID: np.str_(extractor_id), NPZ_POOL_FEATURES: pool.astype(np.float32),
           NPZ_SPATIAL_FEATURES: spatial.astype(np.float32), NPZ_REF_LABELS: labels.astype(np.int64)},
    )


def cached_stats(cached: Mapping[str, np.ndarray]) -> tuple[FeatureStats, FeatureStats]:
    """(pool, spatial) :class:`FeatureStats` stored in a cache file (ADM's mu/sigma, mu_s/sigma_s)."""

    def stats(mu: str, sigma: str, n: str) -> FeatureStats:
        return FeatureStats(np.asarray(cached[mu], np.float64), np.asarray(cached[sigma], np.float64), int(cached[n]))

    return stats(NPZ_MU, NPZ_SIGMA, NPZ_N), stats(NPZ_MU_SPATIAL, NPZ_SIGMA_SPATIAL, NPZ_N_SPATIAL)


def cached_features(path: str | os.PathLike, key: str, extractor_id: str,
                    compute: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """The cache file's arrays for ``key``, computing them on a miss.

    Args:
        compute: returns (pool [N, 2048], spatial [N, 2023], labels [N]) of the reference; called
            only on a miss, and its result is written before it is read back.
    Returns:
        (the arrays as :func:`load_cached` gives them, whether they were cached before).
    """
    cached = load_cached(path, key)
    if cached is not None:
        return cached, True
    pool, spatial, labels = compute()
    save_cached(path, key, extractor_id, pool, spatial, labels)
    again = load_cached(path, key)
    if again is None:  # written but not readable as the same key: another writer raced with another key
        raise RuntimeError(f"the reference cache file {path} does not hold key {key} right after writing it")
    return again, False


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 images ``[N, H, W, 3]`` (or grey ``[N, H, W]`` / ``[N, H, W, 1]``) of an ADM ``.npz``'s
    ``arr_0``; raises ValueError naming the file and what is wrong."""
    from d2c.eval.inception import image_layout

    with np.load(path, allow_pickle=False) as z:
        if NPZ_IMAGES not in z.files:
            raise ValueError(f"{path}: no '{NPZ_IMAGES}' images (found {list(z.files)})")
        try:
            images = z[NPZ_IMAGES]
        except ValueError as e:  # object arrays (pickles) are refused
            raise ValueError(f"{path}: '{NPZ_IMAGES}' cannot be read without pickle ({e})") from e
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: '{NPZ_IMAGES}' must be uint8 images N x H x W x 3, got dtype {images.dtype}")
    try:
        image_layout(images.shape)
    except ValueError as e:
        raise ValueError(f"{path}: '{NPZ_IMAGES}': {e}") from e
    return images
