"""The one training loop: the Ray Train worker (``app/train.py``), the tests and the benchmarks
all run it.

* :func:`assemble_batch` turns one worker's flat rows (as Ray Data hands them over) into the
  :class:`~d2c.train.trainer.Trainer`'s batch: shapes, the class text, and the flipped copies
  picked by a draw from the trainer's generator (so a checkpoint's generator state restores them).
* :class:`RowBatches` holds a worker's rows in memory. Epoch ``e`` visits them (sorted by their
  ``key``) in a permutation drawn from a generator seeded by (seed, e, rank), so the data
  position (epoch, index) alone replays the stream.
* :func:`train_loop` steps until ``trainer.step == steps`` from a data position, and calls
  ``report(metrics, position)`` at log and checkpoint steps (``position`` set when a checkpoint
  is due); :func:`save_state` and :func:`restore_latest` are the checkpoint side of that.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from d2c.storage import Location, location
from d2c.train.checkpoint import latest_checkpoint_at, load_checkpoint, prune_checkpoints_at, save_checkpoint_at
from d2c.train.trainer import Trainer

#: A data position: the epoch and the number of its batches already consumed.
Position = dict


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of ``rank``'s order in ``epoch`` (distinct per (seed, epoch, rank))."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def row_shapes(rows: Mapping[str, Tensor]) -> dict[str, list[int]]:
    """Per-row shapes of shaped columns (what :func:`assemble_batch` reshapes flat rows to)."""
    return {k: list(v.shape[1:]) for k, v in rows.items()}


def assemble_batch(raw: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], text: Optional[tuple[Tensor, Tensor]],
                   use_visual: bool, hflip: bool, generator: torch.Generator) -> dict[str, Tensor]:
    """Flat CPU rows → the Trainer's batch on ``generator``'s device.

    Reshape ``latent`` (and ``visual``) to ``shapes``, gather each row's class text
    ``text = (emb [classes, L, d], mask [classes, L])``, copy to the device (from pinned memory
    on a GPU, without waiting), then with ``hflip`` take row i from ``latent_flip`` /
    ``visual_flip`` where ``u_i < 0.5``, ``u ~ U[0, 1)^n`` drawn on the device from ``generator``
    (a CUDA generator cannot draw CPU tensors). Stored float16 features become float32 there.
    """
    device = generator.device
    n = raw["label"].shape[0]
    label = raw["label"].long()
    host = {"label": label, "latent": raw["latent"].reshape(n, *shapes["latent"])}
    use_visual = use_visual and "visual" in raw
    if use_visual:
        host["visual"] = raw["visual"].reshape(n, *shapes["visual"])
    hflip = hflip and "latent_flip" in raw
    if hflip:
        host["latent_flip"] = raw["latent_flip"].reshape(n, *shapes["latent"])
        if use_visual:
            host["visual_flip"] = raw["visual_flip"].reshape(n, *shapes["visual"])
    if text is not None:
        emb, mask = text
        host["text_emb"], host["text_mask"] = emb[label], mask[label]
    cuda = device.type == "cuda"
    dev = {k: (v.pin_memory().to(device, non_blocking=True) if cuda else v) for k, v in host.items()}
    batch = {"label": dev["label"], "latent": dev["latent"].float()}
    if use_visual:
        batch["visual"] = dev["visual"].float()
    if hflip:
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        batch["latent"] = torch.where(flip.view(n, 1, 1, 1), dev["latent_flip"].float(), batch["latent"])
        if use_visual:
            batch["visual"] = torch.where(flip.view(n, 1, 1), dev["visual_flip"].float(), batch["visual"])
    if text is not None:
        batch["text_emb"], batch["text_mask"] = dev["text_emb"], dev["text_mask"]
    return batch


class RowBatches:
    """A worker's rows in memory, batch by batch, epoch by epoch.

    Args:
        rows: equal-length columns (tensors or arrays; strings are dropped); an optional ``key``
            column fixes the canonical order (else the given order is canonical).
        per_worker: rows per batch; an epoch's last partial batch is dropped.
        seed, rank: with the epoch, seed the epoch's permutation.
    """

    def __init__(self, rows: Mapping[str, Any], per_worker: int, seed: int, rank: int = 0):
        cols = {k: torch.as_tensor(v) for k, v in rows.items() if not _is_text(v)}
        n = len(cols["label"]) if "label" in cols else 0
        if n == 0:
            raise RuntimeError("this worker's data shard is empty: use fewer train.num_workers than condensed rows")
        if n < per_worker:
            raise RuntimeError(f"this worker's shard has {n} rows, fewer than one batch of {per_worker}: "
                               "lower train.batch_size")
        if "key" in cols:
            order = torch.argsort(cols["key"], stable=True)
            cols = {k: v[order] for k, v in cols.items()}
        self.rows, self.num_rows, self.per_worker, self.seed, self.rank = cols, n, per_worker, seed, rank
        self.batches_per_epoch = n // per_worker

    @classmethod
    def from_parts(cls, parts: Iterable[Mapping[str, Tensor]], per_worker: int, seed: int, rank: int = 0) -> "RowBatches":
        """Concatenate read batches (e.g. a Ray Data shard's ``iter_torch_batches``)."""
        parts = list(parts)
        rows = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return cls(rows, per_worker, seed, rank)

    def order(self, epoch: int) -> Tensor:
        """Row indices of ``epoch``'s batches, in order (``batches_per_epoch * per_worker`` of them)."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank))
        return torch.randperm(self.num_rows, generator=gen)[: self.batches_per_epoch * self.per_worker]

    def epoch(self, epoch: int) -> Iterator[dict[str, Tensor]]:
        """Iterate ``epoch``'s batches (dicts of row tensors, ``per_worker`` rows each)."""
        perm = self.order(epoch)
        for i in range(self.batches_per_epoch):
            idx = perm[i * self.per_worker : (i + 1) * self.per_worker]
            yield {k: v[idx] for k, v in self.rows.items()}


def batch_stream(rows: RowBatches, assemble: Callable[[Mapping[str, Tensor]], dict[str, Tensor]],
                 epoch: int = 0) -> Iterator[dict[str, Tensor]]:
    """Assembled batches one after another, epoch after epoch, from ``epoch`` on (for a loop of
    one's own, e.g. a benchmark timing single steps)."""
    for e in itertools.count(epoch):
        for raw in rows.epoch(e):
            yield assemble(raw)


def _is_text(v: Any) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind in "OUS"


def train_loop(
    trainer: Trainer,
    epochs: Callable[[int], Iterable[Mapping[str, Tensor]]],
    assemble: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
    steps: int,
    position: Optional[Mapping[str, int]] = None,
    log_every: int = 1,
    ckpt_every: Optional[int] = None,
    report: Optional[Callable[[dict[str, float], Optional[Position]], None]] = None,
    images_per_step: int = 0,
) -> Optional[dict[str, float]]:
    """Train until ``trainer.step == steps``, continuing at data ``position`` (default: the start).

    Args:
        epochs: ``epochs(e)`` iterates epoch ``e``'s raw batches (the same ones on a rerun).
        assemble: raw batch → the Trainer's batch (:func:`assemble_batch` with its settings).
        position: ``{"epoch", "index"}``: the first ``index`` batches of ``epoch`` were trained on.
        log_every, ckpt_every: report every this many steps (and at the last); with a checkpoint
            position every ``ckpt_every`` steps (None: only at the last).
        report: ``report(metrics, position)``; ``metrics`` are floats with ``epoch``,
            ``images_per_s`` (``images_per_step`` over the time since the last report) and
            ``skipped_steps`` added; ``position`` is None unless a checkpoint is due.
    Returns:
        the last reported metrics (None if no step was run).
    """
    epoch = int((position or {}).get("epoch", 0))
    skip = int((position or {}).get("index", 0))
    t_last, imgs, reported = time.perf_counter(), 0, None
    while trainer.step < steps:
        index = 0  # batches of this epoch seen so far, the skipped ones of a resumed epoch included
        for raw in epochs(epoch):
            if index < skip:
                index += 1
                continue
            metrics = trainer.train_step(assemble(raw))
            index += 1
            imgs += images_per_step
            last = trainer.step >= steps
            do_ckpt = last or (ckpt_every is not None and trainer.step % ckpt_every == 0)
            if do_ckpt or trainer.step % log_every == 0:
                now = time.perf_counter()
                reported = {k: float(v) for k, v in metrics.items()}  # with train.sync_free: the one host sync
                reported.update(epoch=epoch, images_per_s=imgs / max(now - t_last, 1e-9), skipped_steps=trainer.skipped_steps)
                t_last, imgs = now, 0
                if report is not None:
                    report(reported, {"epoch": epoch, "index": index} if do_ckpt else None)
            if last:
                break
        if index == 0:  # an epoch without a batch: looping again would spin forever
            raise RuntimeError(f"epoch {epoch} gave this worker no batch; lower train.batch_size")
        epoch, skip = epoch + 1, 0
    return reported


def save_state(trainer: Trainer, position: Position, ckpt_dir: Location | str, meta: Mapping[str, Any],
               keep: Optional[int] = None, staging: Optional[str] = None):
    """Checkpoint the trainer and the data ``position`` at ``trainer.step`` under ``ckpt_dir``,
    then prune to the newest ``keep``; returns ``save_checkpoint_at``'s (location, local dir)."""
    state = dict(trainer.state_dict(), data=dict(position))
    saved = save_checkpoint_at(ckpt_dir, trainer.step, trainer.module, trainer.ema.model, state, meta, staging=staging)
    if keep is not None:
        prune_checkpoints_at(ckpt_dir, keep=keep)
    return saved


def restore_latest(trainer: Trainer, ckpt_dir: Location | str) -> tuple[Position, Optional[Location]]:
    """Restore the newest checkpoint under ``ckpt_dir`` into ``trainer``; returns its data
    position (the start when there is none or it has none) and its location (None: none)."""
    path = latest_checkpoint_at(location(ckpt_dir))
    if path is None:
        return {"epoch": 0, "index": 0}, None
    with path.local_copy() as local:
        position = trainer.restore(load_checkpoint(local, map_location=trainer.device))
    return dict(position or {"epoch": 0, "index": 0}), path


def checkpointing(trainer: Trainer, ckpt_dir: Location | str, meta: Mapping[str, Any], keep: Optional[int] = None,
                  log_fn: Optional[Callable[[dict[str, float]], None]] = None):
    """A ``report`` for one process without Ray: ``log_fn(metrics)``, and a checkpoint when due."""

    def report(metrics: dict[str, float], position: Optional[Position]) -> None:
        if log_fn is not None:
            log_fn(metrics)
        if position is not None:
            save_state(trainer, position, ckpt_dir, meta, keep)

    return report


def train_dir_of(cfg) -> Location:
    """``train_dir``, default ``run_dir/train`` (a local path or a storage URI)."""
    return location(cfg.train_dir) if cfg.train_dir else location(cfg.run_dir) / "train"


def check_batch_fits(rows: int, batch_size: int, num_workers: int, what: str) -> None:
    """Refuse a set that gives a worker less than one batch (its epochs would hold no batch)."""
    from d2c.config import ConfigError  # here: this module is imported without pydantic (GPU benchmarks)

    per_worker = max(1, batch_size // num_workers)
    if rows // num_workers >= per_worker:
        return
    most = rows // num_workers * num_workers
    if most == 0:
        raise ConfigError(f"train: {what} has {rows} rows for train.num_workers={num_workers}: "
                          f"use at most train.num_workers={max(rows, 1)}")
    raise ConfigError(f"train: {what} has {rows} rows, fewer than one batch per worker (train.batch_size={batch_size} "
                      f"over train.num_workers={num_workers} = {per_worker} rows each); set train.batch_size to at most {most}")
