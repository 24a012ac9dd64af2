"""``d2c evaluate``: class-balanced samples of a checkpoint → FID / sFID / KID / precision / recall.

    reference (dataset split or ADM .npz) ─► decode (CPU) ─► Inception pool ─► cached features + stats
    range(chunks) ─► sampling actor pool (EMA model, sampler, CFG, decoder) ─► Inception actor pool
      ─► driver: images + features ─► metrics (d2c.eval.fid) ─► EVAL/metrics.json, samples.npz, grids/

* Sampling and Inception feature extraction are Ray Data actor pools (``eval.min_actors`` /
  ``max_actors`` / ``num_gpus`` and ``eval.inception_*``), so FID-50K spreads over a cluster.
  The N samples are cut into chunks of ``eval.batch_size`` (one Ray row each); sample i's
  label and noise depend on i alone (:mod:`d2c.eval.sampling`), never on which actor drew it.
* ``checkpoint=`` is a ``step-*`` directory, a checkpoints directory (its newest step) or a train
  directory holding ``checkpoints/``. The EMA weights are used.
* Reference: ``eval.reference=test|train`` takes ``eval.reference_size`` class-balanced images of
  that split of ``data.*`` (the first ones of each class in source order, preprocessed like the
  training data); ``eval.reference=FILE.npz`` is an ADM reference batch (``mu``/``sigma`` give
  FID/sFID as ADM computes them; its ``arr_0`` images, when present, give KID and
  precision/recall). Reference features and statistics are cached under
  ``$D2C_CACHE_DIR/eval-reference`` (default ``~/.cache/d2c``) by a hash of the reference's
  content and the Inception id, so they are computed once.
* Skip: an EVAL directory complete for the same settings is reused (and says so); one made
  with other settings is refused.
* Storage: ``eval_dir``, ``checkpoint`` and ``eval.text_embeddings`` may be local paths or
  ``s3://`` / ``gs://`` / ``file://`` URIs (:mod:`d2c.storage`); the sampling actors fetch the
  checkpoint themselves, so it must be readable from every node.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from app.ray_session import check_shared_storage, init_ray, quiet_data_context
from app.resources import check_placement
from app.stages import ProgressLine, StageTimer, actor_device, decoded
from d2c.config import ConfigError, D2CConfig, DataConfig, build_config, check_model_path
from d2c.data.blocks import listing_table, table_blocks
from d2c.eval.artifacts import (EVAL_FORMAT, FEATURES_FILE, GRIDS_DIR, HOW, METRICS_FILE, SAMPLES_FILE,
                                 STATS_FROM_FEATURES, STATS_FROM_FILE, save_features)
from d2c.eval.plan import (SPLIT_REFERENCES, balanced_reference_rows, check_reference, class_names,
                           compute_all_metrics, eval_dir_of, eval_settings, fid_bootstrap, inception_source, reference_id,
                           resolve_eval_checkpoint, sampling_plan, text_embeddings_path)
from d2c.eval.reference import (NPZ_POOL_FEATURES, NPZ_SPATIAL_FEATURES, cache_file, cached_features, cached_stats,
                                 dataset_reference_key, npz_reference_key, read_npz_images)
from d2c.rundir import StageDir, StageSettingsError, cache_root, versions
from d2c.storage import Location, location, write_json_atomic



# ------------------------------------------------------------------------------------
# Ray Data actors
# ------------------------------------------------------------------------------------


class SampleActor:
    """Ray Data actor: chunk numbers ``{"id": [k]}`` → samples ``{"index", "label", "image"}``.

    Loads the EMA model, the autoencoder and the class text embeddings once. Each chunk c
    holds sample indices ``[c·batch_size, min((c+1)·batch_size, N))``.
    """

    def __init__(self, cfg_dict: dict, checkpoint: str, text_path: Optional[str]):
        from d2c.attach.text import load_text_embeddings
        from d2c.attach.visual import build_autoencoder
        from d2c.eval.sampling import ClassBalancedSampler
        from d2c.train.checkpoint import load_model
        from d2c.train.compile import compile_blocks

        cfg = build_config(cfg_dict)
        e = cfg.eval
        device = actor_device(e.num_gpus, e.num_cpus)
        with location(checkpoint).local_copy() as local_ckpt:  # a URI is fetched by each actor itself
            model, meta = load_model(local_ckpt, use_ema=True, device=device)
        compile_blocks(model.blocks, e.compile)
        text = None
        if text_path is not None:
            with location(text_path).local_copy() as local_text:
                emb, mask, _, _ = load_text_embeddings(local_text)
            text = (emb, mask)
        self.num_samples, self.batch_size = e.num_samples, e.batch_size
        self.sampler = ClassBalancedSampler(
            model, meta, sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale, guidance_interval=e.guidance_interval,
            seed=e.seed, batch_size=e.batch_size, text=text, autoencoder=build_autoencoder(cfg, device),
            clip_denoised=e.clip_denoised, precision=e.precision, device=device,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from d2c.eval.sampling import sample_indices

        indices = np.concatenate([sample_indices(self.num_samples, self.batch_size, int(c)) for c in batch["id"]])
        images, labels = self.sampler.sample(indices)
        return {"index": indices, "label": labels, "image": images}


class InceptionActor:
    """Ray Data actor: rows with uint8 ``image`` ``[B, H, W, C]`` → the same rows plus features.

    Adds ``pool`` float32 ``[B, 2048]``, ``spatial`` ``[B, 2023]`` (sFID) and, for a source with a
    classifier head, ``logits`` ``[B, 1008]``. ``keep_images=False`` drops the images (the
    reference pipeline only needs features on the driver).
    """

    def __init__(self, source: str, weights_path: Optional[str], batch_size: int, num_gpus: float, num_cpus: float,
                 keep_images: bool = True):
        from d2c.eval.inception import InceptionFeatures

        device = actor_device(num_gpus, num_cpus)
        self.extractor = InceptionFeatures(source, weights_path, device=device, batch_size=batch_size, progress=False)
        self.keep_images = keep_images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.require(batch["image"], requirements=["W"])  # Ray hands out read-only arrays; torch wants writable
        out = self.extractor.extract(images, spatial=True, logits=True)
        result = {k: v for k, v in batch.items() if self.keep_images or k != "image"}
        result["pool"] = out.pool.astype(np.float32)
        result["spatial"] = out.spatial.astype(np.float32)
        if out.logits is not None:
            result["logits"] = out.logits.astype(np.float32)
        return result


def _remote(num_gpus: float) -> dict[str, float]:
    """map_batches kwargs for GPUs: only when > 0 (docs/design.md, Ray idioms)."""
    return {"num_gpus": num_gpus} if num_gpus > 0 else {}


def add_inception_stage(ds, cfg: D2CConfig, keep_images: bool):
    """``ds.map_batches`` through the Inception actor pool configured by ``eval.inception_*``."""
    import ray

    e = cfg.eval
    source, weights = inception_source(cfg)
    return ds.map_batches(
        InceptionActor,
        fn_constructor_kwargs=dict(source=source, weights_path=weights, batch_size=e.inception_batch_size,
                                   num_gpus=e.inception_num_gpus, num_cpus=e.num_cpus, keep_images=keep_images),
        batch_size=e.inception_batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=e.inception_min_actors, max_size=e.inception_max_actors),
        num_cpus=e.num_cpus,
        **_remote(e.inception_num_gpus),
    )


def _collect(ds, columns: tuple[str, ...], stage: str, total: int) -> dict[str, np.ndarray]:
    """Every batch of ``ds`` on the driver, the given columns concatenated (missing ones skipped);
    ``stage`` and ``total`` (rows) name its plain progress line."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    progress, seen = ProgressLine(stage, total), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seen += len(next(iter(batch.values())))
        progress.update(seen)
        for c in columns:
            if c in batch:
                parts[c].append(batch[c])
    return {c: np.concatenate(v) for c, v in parts.items() if v}


# ------------------------------------------------------------------------------------
# Reference statistics (cached)
# ------------------------------------------------------------------------------------


def featurise_dataset(cfg: D2CConfig, rows: list[dict[str, Any]], data_cfg: DataConfig) -> dict[str, np.ndarray]:
    """Decode (CPU tasks) + Inception actor pool over listing rows → pool/spatial/label/reject on the driver."""
    import ray

    table = listing_table(rows, shard_rows=max(1, len(rows)))
    ds = ray.data.from_arrow(table_blocks(table, cfg.eval.inception_batch_size))
    ds = decoded(ds, data_cfg)
    ds = add_inception_stage(ds, cfg, keep_images=False)
    out = _collect(ds, ("pos", "label", "reject", "pool", "spatial"), "reference features", len(rows))
    order = np.argsort(out["pos"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def featurise_images(cfg: D2CConfig, images: np.ndarray) -> dict[str, np.ndarray]:
    """Inception actor pool over uint8 images ``[N, H, W, C]`` → pool/spatial in image order."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    e = cfg.eval
    # One block per Inception batch: positions and pixels travel together through the object store.
    step = e.inception_batch_size
    tables = [pa.table({"pos": pa.array(np.arange(s, min(s + step, len(images))), pa.int64()),
                        "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[s : s + step]))})
              for s in range(0, len(images), step)]
    ds = ray.data.from_arrow(tables)
    ds = add_inception_stage(ds, cfg, keep_images=False)
    out = _collect(ds, ("pos", "pool", "spatial"), "reference features", len(images))
    order = np.argsort(out["pos"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def reference_statistics(cfg: D2CConfig, num_classes: int, extractor_id: str) -> dict[str, Any]:
    """The reference's features/statistics (from the cache when possible) and a description of it.

    Returns:
        ``{"feats": pool [N, 2048] | None, "stats": FeatureStats, "spatial": FeatureStats | None,
        "spatial_feats": [N, 2023] | None,
        "info": JSON description}``.
    """
    from d2c.eval.bootstrap import NO_LABEL
    from d2c.eval.fid import NPZ_IMAGES, NPZ_MU, NPZ_SIGMA, load_reference_npz

    ref = cfg.eval.reference
    if ref in SPLIT_REFERENCES:
        rows, data_cfg, per_class = balanced_reference_rows(cfg, num_classes)
        key = dataset_reference_key(rows, {k: getattr(data_cfg, k) for k in ("image_size", "channels", "preprocess")},
                                    extractor_id)
        info: dict[str, Any] = dict(kind="dataset_split", source=data_cfg.source, path=data_cfg.path, split=ref,
                                    size=len(rows), per_class=per_class,
                                    selection="the first images of each class in source order, class-balanced",
                                    preprocess=f"{data_cfg.preprocess} to {data_cfg.image_size} px, {data_cfg.channels} channel(s)",
                                    fid_statistics_from="features", statistics=STATS_FROM_FEATURES)

        def compute():
            out = featurise_dataset(cfg, rows, data_cfg)
            ok = np.asarray([r == "" for r in out["reject"]])
            return out["pool"][ok], out["spatial"][ok], out["label"][ok]

        cached = _reference_features(info, key, extractor_id, compute, len(rows))
        info["rejected"] = int(len(rows) - len(cached[NPZ_POOL_FEATURES]))
        pool_stats, spatial_stats = cached_stats(cached)
        return dict(feats=cached[NPZ_POOL_FEATURES], stats=pool_stats, spatial=spatial_stats,
                    spatial_feats=cached.get(NPZ_SPATIAL_FEATURES), info=info)

    # An ADM reference batch.
    with np.load(ref, allow_pickle=False) as z:
        files = list(z.files)
    info = dict(kind="adm_npz", path=str(Path(ref).resolve()), arrays=files)
    stats = spatial = feats = spatial_feats = None
    if NPZ_MU in files and NPZ_SIGMA in files:
        loaded = load_reference_npz(ref)
        stats, spatial = loaded.pool, loaded.spatial
        info["fid_statistics_from"] = "the file's mu/sigma (and mu_s/sigma_s for sFID), as ADM's evaluator"
        info["statistics"] = STATS_FROM_FILE
    if NPZ_IMAGES in files:
        def compute():
            try:
                images = read_npz_images(ref)
            except ValueError as err:
                raise ConfigError(f"eval.reference: {err}") from None
            out = featurise_images(cfg, images)
            return out["pool"], out["spatial"], np.full(len(images), NO_LABEL)

        cached = _reference_features(info, npz_reference_key(ref, extractor_id), extractor_id, compute, None)
        feats, spatial_feats = cached[NPZ_POOL_FEATURES], cached.get(NPZ_SPATIAL_FEATURES)
        info["size"] = int(len(feats))
        if stats is None:
            stats, spatial = cached_stats(cached)
            info["fid_statistics_from"] = "features of the file's arr_0 images"
            info["statistics"] = STATS_FROM_FEATURES
    if stats is None:
        raise ConfigError(f"eval.reference: {ref!r} holds neither mu/sigma nor arr_0 images (found {files})")
    return dict(feats=feats, stats=stats, spatial=spatial, spatial_feats=spatial_feats, info=info)


def _reference_features(info: dict[str, Any], key: str, extractor_id: str, compute, rows: Optional[int]) -> dict[str, np.ndarray]:
    """:func:`d2c.eval.reference.cached_features` under the cache root, with a progress line and
    ``info``'s cache_file / key / cached_before."""
    path = cache_file(cache_root(), key)
    timer = StageTimer("reference features")
    cached, before = cached_features(path, key, extractor_id, compute)
    info.update(cache_file=str(path), key=key, cached_before=before)
    if before:
        print(f"[d2c] evaluate: reference statistics cached in {path} — reused", flush=True)
    else:
        timer.done(rows if rows is not None else len(cached[NPZ_POOL_FEATURES]), f"cached in {path}")
    return cached


# ------------------------------------------------------------------------------------
# Samples and metrics
# ------------------------------------------------------------------------------------


def draw_samples(cfg: D2CConfig, ckpt: Location, text_path: Optional[Location]) -> dict[str, np.ndarray]:
    """The Ray pipeline: chunks → sampling actors → Inception actors → driver (sorted by index).

    Returns:
        ``{"index" [N], "label" [N], "image" uint8 [N, H, W, C], "pool" [N, 2048],
        "spatial" [N, 2023], ("logits" [N, 1008])}``.
    """
    import ray

    from d2c.eval.sampling import num_chunks

    e = cfg.eval
    chunks = num_chunks(e.num_samples, e.batch_size)
    # Chunk numbers made on the driver (no read task: on a small machine a read task could wait for the
    # CPUs the two actor pools hold); one block per chunk so that every sampling actor gets work.
    ds = ray.data.from_items([{"id": c} for c in range(chunks)], override_num_blocks=chunks)
    ds = ds.map_batches(
        SampleActor,
        fn_constructor_kwargs=dict(cfg_dict=cfg.to_dict(), checkpoint=str(ckpt.absolute()),
                                   text_path=str(text_path.absolute()) if text_path else None),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=e.min_actors, max_size=e.max_actors),
        num_cpus=e.num_cpus,
        **_remote(e.num_gpus),
    )
    ds = add_inception_stage(ds, cfg, keep_images=True)
    out = _collect(ds, ("index", "label", "image", "pool", "spatial", "logits"), "samples", e.num_samples)
    order = np.argsort(out["index"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if not np.array_equal(out["index"], np.arange(e.num_samples)):
        raise RuntimeError(f"sampling returned {len(out['index'])} samples for eval.num_samples={e.num_samples}")
    return out


def run_evaluate(cfg: D2CConfig) -> int:
    """``d2c evaluate``: validate, reuse or compute, write EVAL/; returns a process exit code."""
    from d2c.eval.fid import save_samples_npz
    from d2c.eval.grid import write_grids
    from d2c.eval.inception import extractor_id as inception_extractor_id
    from d2c.eval.sampling import class_counts

    t_start = time.perf_counter()
    ckpt, meta = resolve_eval_checkpoint(cfg.checkpoint)
    sampling = sampling_plan(cfg, meta).describe()
    check_reference(cfg)
    check_model_path("autoencoder.path", cfg.autoencoder.path)
    text_path = text_embeddings_path(cfg, meta)
    source, weights = inception_source(cfg)
    ext_id = inception_extractor_id(source, weights)
    num_classes = int(meta["dit_kwargs"]["num_classes"])
    out_dir = eval_dir_of(cfg)
    settings = eval_settings(cfg, ckpt, meta, text_path, reference_id(cfg), ext_id)
    stage = StageDir(out_dir, settings, "EVAL", "Use another eval_dir, or delete that directory to evaluate again.")
    try:
        reuse = stage.reusable()
    except StageSettingsError as err:
        raise ConfigError(f"eval_dir: {err}") from None
    if reuse and (out_dir / METRICS_FILE).is_file() and (out_dir / SAMPLES_FILE).is_file():
        prev = json.loads((out_dir / METRICS_FILE).read_text())
        print(f"[d2c] evaluate: {out_dir} is complete for the same settings — reused, nothing to do "
              f"(FID {prev.get('fid'):.3f} on {prev.get('num_samples')} samples)", flush=True)
        return 0
    init_ray(cfg)
    check_placement(cfg, "evaluate")
    # the sampling actors read the checkpoint and text embeddings on whichever node they run
    check_shared_storage(cfg, {"checkpoint": str(ckpt), "eval.text_embeddings": str(text_path) if text_path else None})
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[d2c] evaluate: {ckpt} ({meta['arch']}, step {meta.get('step')}, EMA) — {cfg.eval.num_samples} samples, "
          f"{cfg.eval.sampler} {cfg.eval.steps} steps, CFG {cfg.eval.cfg_scale} -> {out_dir}", flush=True)
    quiet_data_context(cfg=cfg)
    t0 = time.perf_counter()
    ref = reference_statistics(cfg, num_classes, ext_id)
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    timer = StageTimer("samples + Inception features")
    samples = draw_samples(cfg, ckpt, text_path)
    timer.done(cfg.eval.num_samples)
    t_samples = time.perf_counter() - t0

    t0 = time.perf_counter()
    values, metric_settings = compute_all_metrics(cfg, samples, ref)
    t_metrics = time.perf_counter() - t0
    t0 = time.perf_counter()
    boot, boot_note = fid_bootstrap(cfg, samples, ref["info"])
    if boot is not None:
        values["fid_bootstrap"] = boot
    t_bootstrap = time.perf_counter() - t0

    with (out_dir / SAMPLES_FILE).local_output() as staged:
        save_samples_npz(str(staged), samples["image"], samples["label"])
    save_features(out_dir / FEATURES_FILE, samples["pool"], samples["label"])
    names = class_names(meta, text_path)
    with (out_dir / GRIDS_DIR).local_output_dir() as grids_dir:
        grids = write_grids(grids_dir, samples["image"], samples["label"], num_classes, cfg.eval.grid_per_class, names)
        grid_files = [str(Path(GRIDS_DIR) / p.relative_to(grids_dir)) for p in grids]

    e = cfg.eval
    not_computed = {}
    if "is_mean" not in values:
        not_computed["is_mean"] = not_computed["is_std"] = (
            "the shipped TorchScript Inception has no classifier head; set eval.inception_path to torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth for the Inception Score")
    if boot_note:
        not_computed["fid_bootstrap"] = boot_note
    if "kid_mean" not in values:
        not_computed["kid_mean"] = not_computed["precision"] = not_computed["recall"] = (
            "the reference holds statistics only (no images): KID and precision/recall need reference features")
    total = time.perf_counter() - t_start
    metrics: dict[str, Any] = {
        "format": EVAL_FORMAT,
        **values,
        "num_samples": e.num_samples,
        "num_classes": num_classes,
        "samples_per_class": class_counts(e.num_samples, num_classes),
        "sampler": e.sampler,
        "steps": e.steps,
        "cfg_scale": e.cfg_scale,
        "guidance_interval": list(e.guidance_interval) if e.guidance_interval else None,
        "seed": e.seed,
        "sampling": sampling,
        "checkpoint": {"path": str(ckpt.absolute()), "step": meta.get("step"), "arch": meta["arch"], "weights": "ema",
                       "text_embeddings": str(text_path.absolute()) if text_path else None},
        "reference": ref["info"],
        "feature_extractor": {"id": ext_id, "source": source, "weights_path": weights,
                              "network": "Inception-v3, TF 2015-12-05 weights (ADM evaluator / torch-fidelity inception-v3-compat)"},
        "metric_settings": metric_settings,
        "not_computed": not_computed,
        "files": {"samples": SAMPLES_FILE, "features": FEATURES_FILE, "grids": grid_files},
        "timing": {"reference_s": round(t_ref, 3), "sampling_and_features_s": round(t_samples, 3),
                   "samples_per_s": round(e.num_samples / t_samples, 3), "metrics_s": round(t_metrics, 3),
                   "bootstrap_s": round(t_bootstrap, 3),
                   "total_s": round(total, 3)},
        "how": HOW,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    stage.commit()
    shown = ", ".join(f"{k} {values[k]:.4g}" for k in ("fid", "sfid", "kid_mean", "precision", "recall", "is_mean") if k in values)
    print(f"[d2c] evaluate: {shown} ({e.num_samples} samples vs {ref['info'].get('size', '?')} reference) -> {out_dir / METRICS_FILE}",
          flush=True)
    return 0
