"""Shared pieces of the Ray stages: listing → Ray Dataset, decode tasks, stage settings files.

The listing (see :mod:`d2c.data.source`) becomes an Arrow table whose rows keep a
position ``pos`` (the row's index in the listing) and a ``shard`` number; the decode
step runs as plain CPU map tasks and never raises for a bad image — it returns a row
with an empty image and a ``reject`` reason instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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


def decoded(ds, data_cfg: DataConfig):
    """Append the decode step (CPU tasks) to a listing dataset."""
    return ds.map_batches(decode_batch, fn_kwargs={"data_cfg": data_cfg.model_dump()}, batch_format="pyarrow",
                          num_cpus=data_cfg.decode_num_cpus)


@dataclass(frozen=True)
class ActorStep:
    """A model-holding Ray Data step: a callable class (its model loads once, in ``__init__``).

    Attributes:
        cls: the callable class; ``cls(**kwargs)(decoded numpy batch)`` → output batch.
        kwargs: its constructor kwargs (plain data: they travel to every actor).
        batch_size: rows per call (also the rows per input block of the listing).
        min_actors, max_actors: the actor pool's size.
        num_gpus: GPUs per actor (0 = none requested).
        num_cpus: CPUs per actor (None = Ray Data's default).
    """

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: Optional[float] = None


def actor_device(num_gpus: float, num_cpus: float) -> str:
    """Where a model-holding actor runs: "cuda" when it was given GPUs and sees one, else "cpu"
    with ``num_cpus`` torch threads (what it reserved). Call it in the actor's ``__init__``."""
    import torch  # here, not at module level: Ray Data task workers import this module

    if num_gpus > 0 and torch.cuda.is_available():
        return "cuda"
    torch.set_num_threads(max(1, int(num_cpus)))
    return "cpu"


def actor_pipeline(table: pa.Table, data_cfg: DataConfig, step: ActorStep):
    """Listing table → Ray Dataset: blocks of ``step.batch_size`` rows → decode (CPU tasks) → the actor pool."""
    import ray

    ds = decoded(ray.data.from_arrow(table_blocks(table, step.batch_size)), data_cfg)
    remote: dict[str, float] = {"num_gpus": step.num_gpus} if step.num_gpus > 0 else {}
    if step.num_cpus is not None:
        remote["num_cpus"] = step.num_cpus
    return ds.map_batches(
        step.cls,
        fn_constructor_kwargs=step.kwargs,
        batch_size=step.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=step.min_actors, max_size=step.max_actors),
        **remote,
    )


def image_keys(image_ids) -> np.ndarray:
    """A stable int64 per image_id (sha256-derived): a sortable row key for numeric-only loaders."""
    import hashlib

    return np.asarray(
        [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "little") >> 1 for i in image_ids], np.int64
    )


def add_image_key(batch: pa.Table) -> pa.Table:
    """Ray Data map: append the ``key`` column (see :func:`image_keys`)."""
    return batch.append_column("key", pa.array(image_keys(batch.column("image_id").to_pylist()), pa.int64()))


# ------------------------------------------------------------------------------------
# Progress and timing
# ------------------------------------------------------------------------------------


#: Seconds between two plain progress lines of a stage.
PROGRESS_EVERY_S = 30.0


class ProgressLine:
    """A stage's plain progress line, at most one per ``every_s`` seconds:
    ``[d2c] scores: 12000/60000 rows (20 %), 118.0 rows/s``.

    It shows progress where Ray Data's bars are off (``enabled`` None: whenever this process's
    DataContext has them off, as :func:`app.ray_session.quiet_data_context` sets off a terminal).
    The rate counts the work after ``start`` (e.g. the step a run resumed at).
    """

    def __init__(self, stage: str, total: int, unit: str = "rows", start: int = 0, every_s: float = PROGRESS_EVERY_S,
                 enabled: Optional[bool] = None, clock=time.perf_counter):
        if enabled is None:
            import ray.data

            enabled = not ray.data.DataContext.get_current().enable_progress_bars
        self.stage, self.total, self.unit, self.start, self.every_s, self.enabled = stage, total, unit, start, every_s, enabled
        self.clock = clock
        self.t_start = self.t_last = clock()

    def update(self, done: int, extra: str = "") -> bool:
        """Note ``done`` of ``total``; prints (and returns True) once ``every_s`` passed since the last line."""
        if not self.enabled:
            return False
        now = self.clock()
        if now - self.t_last < self.every_s:
            return False
        self.t_last = now
        rate = (done - self.start) / max(now - self.t_start, 1e-9)
        pct = f" ({100 * done / self.total:.0f} %)" if self.total else ""
        print(f"[d2c] {self.stage}: {done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{'; ' + extra if extra else ''}",
              flush=True)
        return True


class StageTimer:
    """Prints a one-line summary per stage: rows, seconds, rows/s."""

    def __init__(self, stage: str):
        self.stage = stage
        self.start = time.perf_counter()

    def done(self, rows: int, extra: str = "") -> float:
        dt = time.perf_counter() - self.start
        rate = rows / dt if dt > 0 else float("inf")
        print(f"[d2c] {self.stage}: {rows} rows in {dt:.1f} s ({rate:.1f} rows/s){'; ' + extra if extra else ''}", flush=True)
        return dt
