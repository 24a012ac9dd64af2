"""Shared pieces of the Ray stages: listing blocks → decode tasks → a model-holding actor pool,
and each stage's progress line (the decode body itself: :mod:`d2c.data.blocks`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from d2c.config import DataConfig
from d2c.data.blocks import decode_batch, table_blocks

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
