"""``d2c train``: DiT/SiT on a condensed set (or a full dataset) with Ray Train.

    condensed parquet ─► Ray Dataset ─► streaming split ─► each worker: iter_torch_batches
      ─► Trainer.train_step (L_diff + λ·L_proj, AMP, clipping, EMA) ─► rank 0: checkpoint + report

* ``condensed=RUN/condensed``: latents, visual tokens (and flipped copies) from the set; class
  text embeddings from ``RUN/text_embeddings.safetensors`` beside it.
* ``data.full=true``: the raw dataset, plain class conditioning, no projection loss — how a
  scorer is trained from scratch; its checkpoint is accepted by ``d2c condense``.
* Resume: a rerun with a larger ``train.steps`` continues from ``TRAIN/checkpoints``' latest
  step (model, EMA, optimizer, scaler, RNG states, data position); after a worker failure
  Ray Train restarts the workers from the last reported checkpoint.
* Storage: ``train_dir`` and ``condensed`` may be local paths or ``s3://`` / ``gs://`` /
  ``file://`` URIs (:mod:`d2c.storage`). Ray Train's own storage (``TRAIN/ray_storage``) goes
  through the same pyarrow file system. On an object store a checkpoint is written locally
  and uploaded (``model.json`` last), and ``metrics.jsonl`` — which cannot be appended to
  there — is rewritten whole at every checkpoint and at most every ``METRICS_FLUSH_S`` seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from app.metrics import record
from app.ray_session import check_shared_storage, init_ray, quiet_data_context, quiet_train_worker, train_logging_config
from app.stages import ActorStep, ProgressLine, actor_device, actor_pipeline
from d2c.config import ConfigError, D2CConfig, build_config, check_paths
from d2c.data.blocks import add_image_key, image_keys, listing_table
from d2c.condense import manifest_class_names
from d2c.rundir import SUCCESS_FILE, StageDir
from d2c.train.loop import check_batch_fits, train_dir_of
from d2c.storage import JsonlLog, Location, append_line, location

#: Start/restore events of the workers (one JSON line each), beside metrics.jsonl.
EVENTS_FILE = "events.jsonl"
#: Checkpoints Ray Train keeps in its own storage (ours are pruned separately).
RAY_CHECKPOINTS_KEPT = 2
#: Rows kept in the local shuffle buffer of each worker's batch iterator, in batches.
SHUFFLE_BATCHES = 4
#: On an object store, metrics.jsonl is rewritten at least this often (seconds) besides every checkpoint.
METRICS_FLUSH_S = 30.0


# ------------------------------------------------------------------------------------
# Inputs: condensed set or full dataset → Ray Dataset + what the model needs
# ------------------------------------------------------------------------------------


def condensed_inputs(cfg: D2CConfig) -> dict[str, Any]:
    """The condensed set as a Ray Dataset plus its shapes, text embeddings and class count."""
    import ray

    from d2c.attach.text import TEXT_FILE, load_text_embeddings
    from d2c.data.condensed import CondensedFormatError, condensed_shapes

    if not cfg.condensed:
        raise ConfigError("condensed is required: pass condensed=RUN/condensed (or data.full=true to train on the raw data)")
    path = location(cfg.condensed)
    stage = StageDir(path, {}, "condensed")
    if stage.saved_settings() is not None and not stage.complete:
        raise ConfigError(f"condensed: {cfg.condensed!r} is incomplete (no {SUCCESS_FILE}: `d2c condense` was "
                          "interrupted while writing it); rerun `d2c condense` to finish it")
    try:
        shapes = condensed_shapes(path)
    except CondensedFormatError as err:
        raise ConfigError(f"condensed: {err}") from None
    text = None
    text_path = path.parent / TEXT_FILE
    if cfg.model.use_text:
        if not text_path.is_file():
            raise ConfigError(f"model.use_text is on but {text_path} is missing; rerun `d2c condense` or set model.use_text=false")
        with text_path.local_copy() as local_text:
            emb, mask, names, _ = load_text_embeddings(local_text)
        text = (emb, mask)
        num_classes = emb.shape[0]
    else:
        names = manifest_class_names(path)
        num_classes = len(names) if names else None
    read_path, read_fs = path.for_ray()
    ds = ray.data.read_parquet(read_path, filesystem=read_fs)
    if num_classes is None:
        num_classes = int(ds.max("label")) + 1
    return {"dataset": ds, "shapes": shapes, "text": text, "num_classes": num_classes, "rows": ds.count()}


class EncodeFull:
    """Ray Data actor: decoded images → latents (for training on the full dataset), on the
    scoring pool's resources (``score.num_gpus``, ``score.num_cpus``, its actor counts)."""

    def __init__(self, cfg_dict: dict):
        from d2c.attach.visual import build_autoencoder

        self.cfg = build_config(cfg_dict)
        self.autoencoder = build_autoencoder(self.cfg, actor_device(self.cfg.score.num_gpus, self.cfg.score.num_cpus))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from d2c.attach.visual import encode_latents

        ok = np.asarray([r == "" for r in batch["reject"]])
        ids = [str(i) for i in batch["image_id"][ok]]
        z = encode_latents(self.autoencoder, batch["image"][ok], ids, self.cfg.score.seed, self.cfg.autoencoder.encode_rows).cpu().numpy()
        return {"label": batch["label"][ok].astype(np.int64), "latent": z.reshape(len(z), -1), "key": image_keys(ids)}


def full_inputs(cfg: D2CConfig, holdout: int = 0) -> dict[str, Any]:
    """The raw dataset as a materialised Ray Dataset of (latent, label), without the ``holdout``
    rows of the scorer quality gate (:func:`d2c.select.gate.holdout_positions`)."""
    from d2c.data.source import list_source
    from d2c.select.gate import holdout_positions

    listing = list_source(cfg.data)
    held = set(holdout_positions(len(listing.rows), holdout).tolist())
    rows = [r for i, r in enumerate(listing.rows) if i not in held]
    s = cfg.score
    step = ActorStep(EncodeFull, {"cfg_dict": cfg.to_dict()}, s.batch_size, s.min_actors, s.max_actors, s.num_gpus, s.num_cpus)
    ds = actor_pipeline(listing_table(rows, s.shard_rows), cfg.data, step).materialize()
    shapes = {"latent": [cfg.latent_channels, cfg.latent_size, cfg.latent_size]}
    return {"dataset": ds, "shapes": shapes, "text": None, "num_classes": listing.num_classes, "rows": ds.count()}


# ------------------------------------------------------------------------------------
# The per-worker loop
# ------------------------------------------------------------------------------------


class ShardBatches:
    """One worker's batches, epoch by epoch, from its Ray Data shard.

    Cached (the default): the shard is read once into a :class:`~d2c.train.loop.RowBatches`,
    whose epochs depend on the data and (train.seed, epoch, rank) only, so a resume at
    (epoch, index) replays the same stream; re-creating a Ray Data iterator per epoch costs
    seconds, which dominates on small sets. Streaming (``train.cache_in_memory=false``): each
    epoch re-reads the shard with a local shuffle seeded the same way.
    """

    #: Rows per read when filling the cache.
    READ_BATCH = 1024

    def __init__(self, shard, per_worker: int, seed: int, rank: int, cache: bool):
        self.shard, self.per_worker, self.seed, self.rank, self.cache = shard, per_worker, seed, rank, cache
        self.rows = None

    def epoch(self, epoch: int):
        """Iterate one epoch's raw batches (``per_worker`` rows each; the last partial one dropped)."""
        from d2c.train.loop import RowBatches, epoch_seed

        if not self.cache:
            yield from self.shard.iter_torch_batches(
                batch_size=self.per_worker, drop_last=True,
                local_shuffle_buffer_size=self.per_worker * SHUFFLE_BATCHES,
                local_shuffle_seed=epoch_seed(self.seed, epoch, self.rank),
            )
            return
        if self.rows is None:
            parts = self.shard.iter_torch_batches(batch_size=self.READ_BATCH)
            self.rows = RowBatches.from_parts(parts, self.per_worker, self.seed, self.rank)
        yield from self.rows.epoch(epoch)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker body (every rank runs it; rank 0 writes checkpoints and metrics): the
    model, the :class:`Trainer`, the shard and the reporting around :func:`d2c.train.loop.train_loop`."""
    import functools

    import ray.train
    import torch
    from ray.train import Checkpoint

    from d2c.models.build import build_model
    from d2c.train.checkpoint import checkpoint_meta, load_checkpoint
    from d2c.train.loop import assemble_batch, restore_latest, save_state, train_loop
    from d2c.train.objective import D2CObjective
    from d2c.train.trainer import Trainer

    quiet_train_worker()
    cfg = build_config(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    kwargs = config["dit_kwargs"]
    model = build_model(kwargs, seed=cfg.train.seed)
    objective = D2CObjective.from_config(cfg)
    if world > 1:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": kwargs.get("proj_dim") is not None and objective.proj_coeff == 0})
    trainer = Trainer(model, objective, cfg.train, device=device, rank=rank)
    train_dir = location(config["train_dir"])
    ckpt_dir = train_dir / "checkpoints"
    meta = checkpoint_meta(cfg.model.arch, kwargs, objective.describe(), cfg.to_dict())
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            position = trainer.restore(load_checkpoint(d, map_location=device)) or {"epoch": 0, "index": 0}
        source = "Ray Train checkpoint (worker restart)"
    else:
        position, found = restore_latest(trainer, ckpt_dir)
        source = None if found is None else str(found)
    if rank == 0:
        event = {"event": "restore" if source else "start", "step": trainer.step, "source": source, "workers": world,
                 "torch_threads": torch.get_num_threads(), "time": time.time()}
        append_line(train_dir / EVENTS_FILE, event)
        print(f"[d2c] train: {'restored' if source else 'started'} at step {trainer.step}{' from ' + source if source else ''} "
              f"on {world} worker(s), {event['torch_threads']} torch threads each", flush=True)
    per_worker = max(1, cfg.train.batch_size // world)
    use_visual = cfg.model.use_visual and not config["full"] and objective.proj_coeff > 0
    log = JsonlLog(train_dir / "metrics.jsonl", flush_every_s=METRICS_FLUSH_S)
    if rank == 0 and source is not None and (dropped := log.keep_through(trainer.step)):
        print(f"[d2c] train: dropped {dropped} metrics rows logged after step {trainer.step}, the checkpoint resumed from", flush=True)
    batches = ShardBatches(ray.train.get_dataset_shard("train"), per_worker, cfg.train.seed, rank, cfg.train.cache_in_memory)
    assemble = functools.partial(assemble_batch, shapes=config["shapes"], text=config["text"], use_visual=use_visual,
                                 hflip=cfg.train.hflip and not config["full"], generator=trainer.generator)
    progress = ProgressLine("train", cfg.train.steps, unit="steps", start=trainer.step, enabled=rank == 0)

    def report(metrics: dict, position: Optional[dict]) -> None:
        checkpoint = staging = None
        if rank == 0:
            log.append(metrics)
            progress.update(trainer.step, f"loss {metrics['loss']:.4f}, {metrics['images_per_s']:.1f} images/s")
            record("train", "train_images_per_s", metrics["images_per_s"])
            record("train", "train_loss", metrics["loss"])
            if position is not None:
                staging = None if ckpt_dir.is_local else tempfile.TemporaryDirectory(prefix="d2c-ckpt-")
                _, local_ckpt = save_state(trainer, position, ckpt_dir, meta, keep=config["keep"],
                                           staging=staging.name if staging else None)
                log.flush()
                checkpoint = Checkpoint.from_directory(str(local_ckpt))
        ray.train.report(metrics, checkpoint=checkpoint)
        if staging is not None:  # report() has persisted the checkpoint: the staged copy may go
            staging.cleanup()

    train_loop(trainer, batches.epoch, assemble, cfg.train.steps, position=position, log_every=cfg.train.log_every,
               ckpt_every=cfg.train.ckpt_every, report=report, images_per_step=per_worker * world)


# ------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------


def worker_resources(cfg: D2CConfig) -> dict[str, float]:
    """What each Ray Train worker reserves: ``train.cpus_per_worker`` CPUs (+ one GPU with use_gpu)."""
    resources = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        resources["GPU"] = 1.0
    return resources


def fit(cfg: D2CConfig, train_dir: str | Path | Location, full: bool, holdout: int = 0) -> Optional[Location]:
    """Build the inputs and run the TorchTrainer; returns the latest checkpoint's location.
    ``holdout``: with ``full``, leave out the scorer gate's held-out rows."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from d2c.data.condensed import TENSOR_COLUMNS
    from d2c.models.build import dit_kwargs
    from d2c.train.checkpoint import latest_checkpoint_at
    from d2c.train.trainer import ShapeMismatchError, check_shapes

    from app.resources import check_placement

    train_dir = location(train_dir)
    check_placement(cfg, "train")
    if full:
        check_placement(cfg, "encode_full")
    inputs = full_inputs(cfg, holdout) if full else condensed_inputs(cfg)
    check_batch_fits(inputs["rows"], cfg.train.batch_size, cfg.train.num_workers, "the dataset" if full else f"condensed set {cfg.condensed!r}")
    shapes, text = inputs["shapes"], inputs["text"]
    use_visual = cfg.model.use_visual and not full and "visual" in shapes
    kwargs = dit_kwargs(
        cfg,
        inputs["num_classes"],
        text_dim=None if (full or text is None) else int(text[0].shape[-1]),
        proj_dim=int(shapes["visual"][-1]) if use_visual else None,
    )
    try:
        check_shapes(kwargs, shapes, None if text is None else tuple(text[0].shape), None if text is None else tuple(text[1].shape),
                     hflip=cfg.train.hflip and not full)
    except ShapeMismatchError as err:
        raise ConfigError(f"condensed set {cfg.condensed!r} does not fit the model: {err}") from None
    train_dir.mkdir(parents=True, exist_ok=True)
    latest = latest_checkpoint_at(train_dir / "checkpoints")
    if latest is not None:
        step = int(json.loads((latest / "model.json").read_text()).get("step", 0))
        if step >= cfg.train.steps:
            print(f"[d2c] train: {latest} is at step {step} >= train.steps={cfg.train.steps} — nothing to do", flush=True)
            return latest
        print(f"[d2c] train: resuming at step {step} from {latest}", flush=True)
    ds = inputs["dataset"]
    # the read's schema comes from the files' metadata; after a map it would take an execution
    names = set(ds.schema().names)
    if "key" not in names:
        ds = ds.map_batches(add_image_key, batch_format="pyarrow")
        names.add("key")
    keep_cols = ["key", "label", "latent"] + [c for c in TENSOR_COLUMNS if c in shapes and c != "latent"]
    ds = ds.select_columns([c for c in keep_cols if c in names])
    print(f"[d2c] train: {inputs['rows']} rows, {inputs['num_classes']} classes, model {cfg.model.arch} "
          f"{kwargs['hidden_size']}x{kwargs['depth']} (text {'on' if kwargs.get('text_dim') else 'off'}, "
          f"REPA {'on' if kwargs.get('proj_dim') else 'off'}) -> {train_dir}", flush=True)
    loop_config = {
        "cfg": cfg.to_dict(),
        "dit_kwargs": kwargs,
        "shapes": shapes,
        "text": text,
        "full": full,
        "train_dir": str(train_dir.absolute()),
        "keep": max(2, RAY_CHECKPOINTS_KEPT),
    }
    storage_path, storage_fs = (train_dir / "ray_storage").absolute().for_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name="ray",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=RAY_CHECKPOINTS_KEPT),
            logging_config=train_logging_config(),
        ),
        datasets={"train": ds},
    )
    start = time.perf_counter()
    trainer.fit()
    latest = latest_checkpoint_at(train_dir / "checkpoints")
    print(f"[d2c] train: reached step {cfg.train.steps} in {time.perf_counter() - start:.1f} s; latest checkpoint {latest}", flush=True)
    return latest


def run_train(cfg: D2CConfig) -> int:
    """``d2c train``: validate, then fit; returns a process exit code."""
    check_paths(cfg, ("data",) if cfg.data.full else ())
    if not cfg.data.full:
        if not cfg.condensed:
            raise ConfigError("condensed is required: pass condensed=RUN/condensed (or data.full=true to train on the raw data)")
        if not location(cfg.condensed).is_dir():
            raise ConfigError(f"condensed: {cfg.condensed!r} does not exist; run `d2c condense` first")
    init_ray(cfg)
    check_shared_storage(cfg, {"train_dir": str(train_dir_of(cfg)), "condensed": None if cfg.data.full else cfg.condensed})
    quiet_data_context(cfg=cfg)
    fit(cfg, train_dir_of(cfg), full=cfg.data.full)
    return 0


# ------------------------------------------------------------------------------------
# The embedded scorer (trained from scratch, cached by its settings)
# ------------------------------------------------------------------------------------


def ensure_embedded_scorer(cfg: D2CConfig) -> Path:
    """The cached embedded scorer for ``cfg`` — trained from scratch first if missing."""
    from d2c.select.scorer import embedded_scorer_dir, scorer_config, scorer_settings
    from d2c.train.checkpoint import latest_checkpoint

    settings = scorer_settings(cfg)
    out = embedded_scorer_dir(cfg)

    stage = StageDir(out, settings, "the embedded scorer cache")
    if stage.complete and latest_checkpoint(out / "checkpoints") is not None:
        print(f"[d2c] scorer: reusing the cached embedded scorer {out}", flush=True)
        return out / "checkpoints"
    print(f"[d2c] scorer: no score.scorer given — training the embedded scorer from scratch "
          f"({cfg.score.scorer_train_steps} steps) into {out}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    quiet_data_context(cfg=cfg)
    fit(scorer_config(cfg, out), out, full=True, holdout=cfg.score.gate_rows)
    stage.commit()
    return out / "checkpoints"
