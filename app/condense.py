"""``d2c condense``: score → select → attach on Ray Data (docs/design.md).

    listing ─► decode (CPU tasks) ─► encode + score (actor pool) ─► RUN/scores/ (shards)
    [kcenter/herding] listing ─► decode ─► pooled visual features (actor pool) ─► RUN/features/ (shards)
    RUN/scores (∪ RUN/features) ─► groupby(label) + interval select / baseline ─► RUN/selection/
    selected rows ─► decode ─► latents + visual tokens (actor pool) ─► RUN/condensed/
    class prompts ─► text encoder ─► RUN/text_embeddings.safetensors;  RUN/manifest.json

Resumable: scores and features are written shard by shard (a shard file is its own
completion marker), so a rerun after a crash computes only the missing shards. A stage whose
output is complete for the same settings is skipped; changed settings are refused.

``run_dir`` (and ``score.reuse_from``) may be a local path or a ``s3://`` / ``gs://`` /
``file://`` URI (:mod:`d2c.storage`); so may every directory derived from them (scores,
features, selection, condensed). Directories are finished by a ``_SUCCESS`` marker written
last (object stores have no rename); one found without it is cleared and redone.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from app.metrics import record
from app.ray_session import check_shared_storage, init_ray, quiet_data_context
from app.resources import check_placement
from app.stages import ActorStep, ProgressLine, StageTimer, actor_device, actor_pipeline
from d2c.condense import (FEATURE_COLUMN, GATE_FILE, REPORTS_FILE, RunDir, attach_settings, check_finite_scores,
                          feature_settings, features_manifest, read_reports, score_settings, scores_summary, select_group,
                          selection_settings, selection_sha, unusable_features)
from d2c.config import ConfigError, D2CConfig, DataConfig, build_config, check_paths
from d2c.data.blocks import listing_table
from d2c.data.condensed import to_arrow
from d2c.data.source import Listing, list_source
from d2c.select.interval import SELECTION_COLUMNS, ClassSelection, SelectionError, all_class_reports, check_feasible, per_class_budget
from d2c.rundir import SETTINGS_FILE, SUCCESS_FILE, StageDir, StageSettingsError, versions
from d2c.storage import Location, location, write_json_atomic

#: Scores rows per hash partition of the per-class groupby (docs/design.md: too many partitions cost seconds).
GROUPBY_ROWS_PER_PARTITION = 50_000


# ------------------------------------------------------------------------------------
# Sharded passes over the listing (scores, features): resumable shard by shard
# ------------------------------------------------------------------------------------

#: Columns every sharded-pass actor passes through from the decoded batch.
PASS_THROUGH_COLUMNS = ("pos", "shard", "image_id", "label", "reject")


def passed_through(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The row bookkeeping of a decoded batch (position, shard, ids, reject reason)."""
    return {k: batch[k] for k in PASS_THROUGH_COLUMNS}


@dataclass(frozen=True)
class ShardedPass:
    """A pass that writes one parquet file per listing shard; the file is its completion marker.

    Attributes:
        name: the output's name in messages and errors ("scores", "features").
        verb: what the pass does to an image, in messages ("score", "encode").
        out_dir: where the shards go, with ``_settings.json`` and, once complete, ``_SUCCESS``
            (a local directory or a storage location).
        shard_path: shard index → its output file, a direct child of ``out_dir``.
        settings: what the output depends on; other settings than the saved ones are refused.
        fix: how to resolve changed settings (ends the refusal message).
        step: the actor step that turns decoded rows into output rows.
        write_shard: (shard, columns sorted by ``pos``, bool [m] reject mask) → writes that shard.
        metric: (stage tag, app.metrics name) of the pass's images/s gauge.
    """

    name: str
    verb: str
    out_dir: Location
    shard_path: Callable[[int], Location]
    settings: dict[str, Any]
    fix: str
    step: ActorStep
    write_shard: Callable[[int, dict[str, np.ndarray], np.ndarray], None]
    metric: tuple[str, str]


def written_shards(sp: ShardedPass, num_shards: int) -> set[int]:
    """The shards of ``sp`` whose files exist, from one listing of ``out_dir`` (not one request per
    shard: on an object store every existence check is a round trip)."""
    present = set(sp.out_dir.files(".parquet"))
    return {s for s in range(num_shards) if sp.shard_path(s) in present}


def run_sharded_pass(sp: ShardedPass, listing: Listing, shard_rows: int, data_cfg: DataConfig) -> dict[str, Any]:
    """Run ``sp`` over every listed image, resuming from complete shards.

    Returns:
        stats: shards, shards_reused, rows (written), rejected, seconds (absent when nothing ran).
    """
    stage = StageDir(sp.out_dir, sp.settings, f"RUN/{sp.name}",
                     f"{sp.name.capitalize()} are never mixed across settings: use a new run_dir, or delete "
                     f"the {sp.name} directory to {sp.fix}.")
    stage.begin()
    num_shards = -(-len(listing.rows) // shard_rows)
    done = written_shards(sp, num_shards)
    todo = [s for s in range(num_shards) if s not in done]
    stats = {"shards": num_shards, "shards_reused": len(done), "rows": 0, "rejected": 0}
    if stage.complete and not todo:
        print(f"[d2c] {sp.name}: complete in {sp.out_dir} ({num_shards} shards) — reused, nothing to {sp.verb}", flush=True)
        return stats
    if done:
        print(f"[d2c] {sp.name}: resuming — {len(done)} of {num_shards} shards already complete", flush=True)
    timer = StageTimer(sp.name)
    positions = [p for s in todo for p in range(s * shard_rows, min((s + 1) * shard_rows, len(listing.rows)))]
    table = listing_table([listing.rows[p] for p in positions], shard_rows, positions)
    expected = Counter(table.column("shard").to_pylist())
    pending: dict[int, list] = defaultdict(list)
    got: dict[int, int] = defaultdict(int)
    seen = 0
    progress = ProgressLine(sp.name, len(positions))
    for batch in actor_pipeline(table, data_cfg, sp.step).iter_batches(batch_size=None, batch_format="numpy"):
        seen += len(batch["pos"])
        progress.update(seen)
        record(*sp.metric, seen / max(time.perf_counter() - timer.start, 1e-9))
        for s in np.unique(batch["shard"]):
            m = batch["shard"] == s
            pending[int(s)].append({k: v[m] for k, v in batch.items()})
            got[int(s)] += int(m.sum())
            if got[int(s)] == expected[int(s)]:
                parts = pending.pop(int(s))
                cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                order = np.argsort(cols["pos"], kind="stable")
                cols = {k: v[order] for k, v in cols.items()}
                bad = np.asarray([r != "" for r in cols["reject"]], dtype=bool)
                sp.write_shard(int(s), cols, bad)
                stats["rows"] += int((~bad).sum())
                stats["rejected"] += int(bad.sum())
    written = written_shards(sp, num_shards)
    missing = [s for s in todo if s not in written]
    if missing:
        raise RuntimeError(f"the {sp.name} pass ended with {len(missing)} shards incomplete ({missing[:5]}...); rerun to resume")
    stage.commit()
    stats["seconds"] = timer.done(len(positions), f"{stats['rejected']} rejects, {len(done)} shards reused")
    return stats


def id_label_columns(cols: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, pa.Array]:
    """image_id (str) and label (int64) of the rows ``keep`` (bool [m]) of a shard's columns."""
    return {
        "image_id": pa.array([str(i) for i in cols["image_id"][keep]], pa.string()),
        "label": pa.array(cols["label"][keep].astype(np.int64)),
    }


# ------------------------------------------------------------------------------------
# Stage 1: scores
# ------------------------------------------------------------------------------------


class ScoreActor:
    """Ray Data actor: decoded images → latents → per-timestep difficulty losses.

    Holds the autoencoder and the scorer (loaded once). Rejected rows pass through
    with NaN scores.
    """

    def __init__(self, cfg_dict: dict, scorer_spec: str):
        from d2c.attach.visual import build_autoencoder
        from d2c.diffusion.ddpm import DDPMSchedule
        from d2c.select.score import stratified_timesteps
        from d2c.select.scorer import load_scorer
        from d2c.train.compile import compile_blocks
        from d2c.train.precision import autocast_model_fn

        cfg = build_config(cfg_dict)
        self.cfg = cfg
        self.device = actor_device(cfg.score.num_gpus, cfg.score.num_cpus)
        self.scorer = load_scorer(scorer_spec, self.device)
        compile_blocks(self.scorer.model.blocks, cfg.score.compile)
        self.model_fn = autocast_model_fn(self.scorer.model, cfg.score.precision, self.device)
        self.autoencoder = build_autoencoder(cfg, self.device)
        d = cfg.diffusion
        self.alphas_cumprod = DDPMSchedule(d.num_timesteps, d.beta_start, d.beta_end).alphas_cumprod
        self.timesteps = stratified_timesteps(cfg.score.num_timesteps, d.num_timesteps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from d2c.attach.visual import encode_latents
        from d2c.select.score import difficulty_scores

        n, t_count = len(batch["pos"]), len(self.timesteps)
        per_t = np.full((n, t_count), np.nan, np.float32)
        ok = np.asarray([r == "" for r in batch["reject"]])
        if ok.any():
            ids = [str(i) for i in batch["image_id"][ok]]
            z = encode_latents(self.autoencoder, batch["image"][ok], ids, self.cfg.score.seed, self.cfg.autoencoder.encode_rows)
            labels = torch.as_tensor(batch["label"][ok], dtype=torch.long)
            per_t[ok] = difficulty_scores(
                self.model_fn, z.to(self.device), labels, ids, self.alphas_cumprod, self.timesteps, self.cfg.score.seed,
                max_forward_batch=self.cfg.score.forward_rows, pad_rows=True,
            ).numpy()
            check_finite_scores(per_t[ok], ids, self.cfg.score.precision)
        return {**passed_through(batch), "score": per_t.mean(1).astype(np.float64), "score_t": per_t}


def _write_score_shard(run: RunDir, shard: int, cols: dict[str, np.ndarray], bad: np.ndarray) -> None:
    """Write one complete shard: rejects first, then the scores file (the completion marker)."""
    rej = pa.table({"image_id": pa.array([str(i) for i in cols["image_id"][bad]], pa.string()),
                    "reason": pa.array([str(r) for r in cols["reject"][bad]], pa.string())})
    good = ~bad
    score_t = cols["score_t"][good].astype(np.float32)
    scores = pa.table(
        {
            **id_label_columns(cols, good),
            "score": pa.array(cols["score"][good].astype(np.float64)),
            "score_t": pa.array(list(score_t), pa.list_(pa.float32())),
        }
    )
    run.reject_shard(shard).write_parquet(rej)
    run.score_shard(shard).write_parquet(scores)


def scorer_gate(cfg: D2CConfig, listing: Listing, run: RunDir, scorer_spec: str) -> Optional[dict[str, Any]]:
    """The scorer quality gate (:mod:`d2c.select.gate`) on ``score.gate_rows`` held-out images,
    scored by the same actor as every image. Refuses a scorer that is not clearly better than
    predicting zero noise, before anything is scored; returns the gate's numbers (None: off).
    A complete scores directory keeps the numbers it was gated with (``_scorer_gate.json``)."""
    from d2c.select.gate import gate, holdout_positions, trivial_loss

    s = cfg.score
    saved = run.scores / GATE_FILE
    if s.gate_rows == 0:
        return None
    if (run.scores / SUCCESS_FILE).is_file() and saved.is_file():
        return json.loads(saved.read_text())
    timer = StageTimer("scorer gate")
    positions = holdout_positions(len(listing.rows), s.gate_rows)
    table = listing_table([listing.rows[p] for p in positions], s.shard_rows, positions)
    step = ActorStep(ScoreActor, {"cfg_dict": cfg.to_dict(), "scorer_spec": scorer_spec}, s.batch_size, 1, 1, s.num_gpus, s.num_cpus)
    losses, ids = [], []
    for batch in actor_pipeline(table, cfg.data, step).iter_batches(batch_size=None, batch_format="numpy"):
        ok = np.asarray([r == "" for r in batch["reject"]], dtype=bool)
        losses.append(batch["score_t"][ok])
        ids += [str(i) for i in batch["image_id"][ok]]
    per_t = np.concatenate(losses) if losses else np.zeros((0, s.num_timesteps))
    trivial = trivial_loss(s.seed, ids, s.num_timesteps, (cfg.latent_channels, cfg.latent_size, cfg.latent_size))
    result = gate(per_t, trivial, s.gate_max_ratio)
    timer.done(result.rows, f"held-out loss {result.heldout_loss:.4f} vs {result.trivial_loss:.4f} for predicting zero "
                            f"(ratio {result.ratio:.3f}, at most {s.gate_max_ratio})")
    if not result.passed:
        trained = (f"the embedded scorer was trained {s.scorer_train_steps} steps: raise score.scorer_train_steps"
                   if s.scorer is None else f"check that score.scorer={s.scorer!r} is a trained checkpoint")
        raise ConfigError(
            f"score: the scorer is not clearly better than predicting zero noise, so its scores would rank images "
            f"at chance. Its loss on {result.rows} held-out images is {result.heldout_loss:.4f} against "
            f"{result.trivial_loss:.4f} for ε̂=0 (ratio {result.ratio:.3f} > score.gate_max_ratio={s.gate_max_ratio}). "
            f"Nothing was scored. Fix: {trained}; or raise score.gate_max_ratio to score anyway.")
    run.scores.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, result.to_dict() | {"scorer": scorer_spec})
    return result.to_dict() | {"scorer": scorer_spec}


def score_stage(cfg: D2CConfig, listing: Listing, run: RunDir, scorer_spec: str) -> dict[str, Any]:
    """Score every listed image (resuming from complete shards); returns stage stats."""
    run.rejects.mkdir(parents=True, exist_ok=True)
    s = cfg.score
    sp = ShardedPass(
        name="scores", verb="score", out_dir=run.scores, shard_path=run.score_shard,
        settings=score_settings(cfg, listing, scorer_spec), fix="rescore",
        step=ActorStep(ScoreActor, {"cfg_dict": cfg.to_dict(), "scorer_spec": scorer_spec}, s.batch_size,
                       s.min_actors, s.max_actors, s.num_gpus, s.num_cpus),
        write_shard=partial(_write_score_shard, run), metric=("score", "images_scored_per_s"),
    )
    stats = run_sharded_pass(sp, listing, s.shard_rows, cfg.data)
    stats["scored"] = stats.pop("rows")
    return stats


# ------------------------------------------------------------------------------------
# Stage 1b: pooled visual features (select.method = kcenter | herding)
# ------------------------------------------------------------------------------------


class FeatureActor:
    """Ray Data actor: decoded images → one pooled visual feature each (d2c.select.features).

    Holds the frozen ``attach.vision`` encoder at ``select.feature_image_size`` (loaded once), on
    ``attach.vision.num_cpus`` torch threads when on CPU.
    Rejected rows pass through with NaN features (the shard writer drops them).
    """

    def __init__(self, cfg_dict: dict):
        from d2c.models.encoders import load_vision_encoder

        cfg = build_config(cfg_dict)
        v = cfg.attach.vision
        device = actor_device(v.num_gpus, v.num_cpus)
        self.encoder = load_vision_encoder(v.encoder, v.path, cfg.feature_image_size, device=device)
        self.forward_rows = cfg.select.feature_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from d2c.select.features import pooled_features

        feats = np.full((len(batch["pos"]), self.encoder.dim), np.nan, np.float32)  # [B, d]
        ok = np.asarray([r == "" for r in batch["reject"]], dtype=bool)
        if ok.any():
            feats[ok] = pooled_features(self.encoder, batch["image"][ok], self.forward_rows)
        return {**passed_through(batch), FEATURE_COLUMN: feats}


#: Arrow list offsets are int32: one shard may hold at most this many feature values.
MAX_LIST_VALUES = 2**31 - 1


def _write_feature_shard(run: RunDir, shard: int, cols: dict[str, np.ndarray], bad: np.ndarray) -> None:
    """Write one features shard (image_id, label, feature list<float32>); rejected rows are left out."""
    good = ~bad
    feats = np.ascontiguousarray(cols[FEATURE_COLUMN][good], np.float32)  # [m, d]
    m, d = feats.shape
    if m * d > MAX_LIST_VALUES:
        raise ValueError(f"a features shard of {m} rows × {d} values exceeds Arrow's list size; lower score.shard_rows")
    offsets = pa.array(np.arange(m + 1, dtype=np.int32) * d, pa.int32())
    table = pa.table({**id_label_columns(cols, good),
                      FEATURE_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(feats.reshape(-1), pa.float32()))})
    run.feature_shard(shard).write_parquet(table)


def feature_stage(cfg: D2CConfig, listing: Listing, run: RunDir) -> dict[str, Any]:
    """Pooled visual features of every listed image into RUN/features (resuming from complete shards)."""
    v = cfg.attach.vision
    sp = ShardedPass(
        name="features", verb="encode", out_dir=run.features, shard_path=run.feature_shard,
        settings=feature_settings(cfg, listing), fix="recompute them",
        step=ActorStep(FeatureActor, {"cfg_dict": cfg.to_dict()}, cfg.select.feature_batch_size,
                       v.min_actors, v.max_actors, v.num_gpus, v.num_cpus),
        write_shard=partial(_write_feature_shard, run), metric=("features", "images_encoded_per_s"),
    )
    stats = run_sharded_pass(sp, listing, cfg.score.shard_rows, cfg.data)
    stats["encoded"] = stats.pop("rows")
    return stats


def prepare_features(cfg: D2CConfig, listing: Listing, run: RunDir, source: RunDir) -> tuple[Location, dict[str, Any]]:
    """The features the selection of ``run`` reads: those of the scores run ``source`` when they are
    complete and made with the same settings (baselines and sweeps never recompute them per run),
    else this run's own, computed (or resumed) here.

    Returns:
        (the features directory, the feature pass's stats: {} when reused from ``source``).
    """
    if not source.root.same_as(run.root):
        why = unusable_features(source.features, feature_settings(cfg, listing))
        if why is None:
            print(f"[d2c] features: reusing {source.features} (same settings) — nothing to encode", flush=True)
            return source.features, {}
        print(f"[d2c] features: not reusing {source.features} ({why}) — using {run.features}", flush=True)
    return run.features, feature_stage(cfg, listing, run)


# ------------------------------------------------------------------------------------
# Stage 2: selection (groupby per class)
# ------------------------------------------------------------------------------------


def _with_null(table: pa.Table, name: str, dtype: pa.DataType, index: int) -> pa.Table:
    """Ray Data map: insert an all-null column ``name`` at ``index`` (gives two tables one schema)."""
    return table.add_column(index, name, pa.nulls(len(table), dtype))


def scores_with_features(scores, features_dir: Location):
    """Scores rows ∪ features rows, one schema: image_id, label, score, feature.

    A scores row has a null feature, a features row a null score; grouped by label, each
    class gets its scored images and their features in one shuffle (``Dataset.join`` would
    need polars, which Ray Data does not install, and a second shuffle).
    """
    import ray

    feature_type = pa.list_(pa.float32())
    left = scores.map_batches(_with_null, fn_kwargs=dict(name=FEATURE_COLUMN, dtype=feature_type, index=3), batch_format="pyarrow")
    features_path, features_fs = features_dir.for_ray()
    right = ray.data.read_parquet(features_path, filesystem=features_fs).select_columns(["image_id", "label", FEATURE_COLUMN])
    right = right.map_batches(_with_null, fn_kwargs=dict(name="score", dtype=pa.float64(), index=2), batch_format="pyarrow")
    return left.union(right)


def select_stage(
    cfg: D2CConfig, scores_dir: Location, out_dir: Location, num_classes: int, features_dir: Optional[Location] = None
) -> tuple[pd.DataFrame, list[ClassSelection]]:
    """Interval (or baseline) selection over a scores table with a Ray Data groupby.

    Args:
        features_dir: RUN/features (:func:`prepare_features`), required for select.method=kcenter|herding.
    Returns:
        (selection sorted by (label, rank), one report per class).
    """
    import ray

    if cfg.select.needs_features and features_dir is None:
        raise ValueError(f"select.method={cfg.select.method} needs the features directory (prepare_features)")
    features_dir = features_dir if cfg.select.needs_features else None
    n = per_class_budget(cfg.select.budget, num_classes)
    stage = StageDir(out_dir, selection_settings(cfg, scores_dir, features_dir), "selection",
                     "Use a new run_dir, or delete the selection directory to select again.")
    if stage.reusable():
        sel = (out_dir / "selection.parquet").read_pandas()
        reports = read_reports(out_dir)
        print(f"[d2c] selection: complete in {out_dir} — reused", flush=True)
        return sel, reports
    timer = StageTimer("selection")
    scores_path, scores_fs = scores_dir.for_ray()
    ds = ray.data.read_parquet(scores_path, filesystem=scores_fs).select_columns(["image_id", "label", "score"])
    parts = cfg.ray.groupby_partitions or max(1, min(num_classes, ds.count() // GROUPBY_ROWS_PER_PARTITION))
    if features_dir is not None:
        ds = scores_with_features(ds, features_dir)
    grouped = ds.groupby("label", num_partitions=parts).map_groups(
        select_group,
        batch_format="pandas",
        fn_kwargs=dict(n=n, method=cfg.select.method, k=cfg.select.k, shortfall=cfg.select.shortfall, seed=cfg.select.seed),
    )
    df = grouped.to_pandas()
    found = {}
    for rep in df.drop_duplicates("label")["report"] if len(df) else []:
        r = ClassSelection(**json.loads(rep))
        found[r.label] = r
    reports = all_class_reports(found, num_classes, n, cfg.select.method, cfg.select.k, cfg.select.shortfall)
    sel = df[SELECTION_COLUMNS].sort_values(["label", "rank"], kind="stable").reset_index(drop=True) if len(df) else pd.DataFrame(columns=SELECTION_COLUMNS)
    sel["label"] = sel["label"].astype(np.int64)
    sel["rank"] = sel["rank"].astype(np.int64)
    stage.begin(clear=True)
    (out_dir / "selection.parquet").write_parquet(sel)
    write_json_atomic(out_dir / REPORTS_FILE, [r.to_dict() for r in reports])
    stage.commit()
    record("select", "rows_selected", len(sel))
    clamped = [r for r in reports if r.note]
    timer.done(len(sel), f"{len(clamped)} classes clamped/short" if clamped else "")
    return sel, reports


# ------------------------------------------------------------------------------------
# Stage 3: attach
# ------------------------------------------------------------------------------------


class AttachActor:
    """Ray Data actor: decoded images → condensed rows (latents + visual tokens, flipped too)."""

    def __init__(self, cfg_dict: dict):
        from d2c.attach.visual import AttachEncoder

        cfg = build_config(cfg_dict)
        self.encoder = AttachEncoder(cfg, actor_device(cfg.attach.vision.num_gpus, cfg.attach.vision.num_cpus))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        if any(r != "" for r in batch["reject"]):
            bad = [(i, r) for i, r in zip(ids, batch["reject"]) if r != ""]
            raise RuntimeError(f"selected images failed to decode in attach (they decoded when scored): {bad[:3]}")
        feats = self.encoder(batch["image"], ids)
        return to_arrow({"image_id": np.asarray(ids, dtype=object), "label": batch["label"], **feats})


def attach_stage(cfg: D2CConfig, listing: Listing, sel: pd.DataFrame, run: RunDir) -> dict[str, Any]:
    """Text embeddings once per class; latents + visual tokens for the selected images only."""
    from d2c.attach.text import compute_text_embeddings, save_text_embeddings

    stats: dict[str, Any] = {}
    stage = StageDir(run.condensed, attach_settings(cfg, selection_sha(sel)), "condensed",
                     "Use a new run_dir, or delete the condensed directory to attach again.")
    complete = stage.complete
    if complete and stage.matches() and (run.text.is_file() or cfg.attach.text.encoder == "none"):
        print(f"[d2c] attach: complete in {run.condensed} — reused", flush=True)
        return stats
    if cfg.attach.text.encoder != "none" and cfg.model.use_text:
        t = StageTimer("text embeddings")
        emb, mask = compute_text_embeddings(cfg.attach.text, listing.class_names)
        with run.text.local_output() as staged:
            save_text_embeddings(staged, emb, mask, listing.class_names, cfg.attach.text)
        stats["text_shape"] = list(emb.shape)
        t.done(len(listing.class_names))
    timer = StageTimer("attach")
    wanted = set(sel["image_id"])
    positions = [p for p, r in enumerate(listing.rows) if r["image_id"] in wanted]
    table = listing_table([listing.rows[p] for p in positions], cfg.score.shard_rows, positions)
    v = cfg.attach.vision
    step = ActorStep(AttachActor, {"cfg_dict": cfg.to_dict()}, v.batch_size, v.min_actors, v.max_actors,
                     v.num_gpus, v.num_cpus)
    ds = actor_pipeline(table, cfg.data, step)
    # Object stores cannot rename a directory into place: clear it, write the shards in place,
    # _SUCCESS last.
    if run.condensed.exists() and not complete:
        print(f"[d2c] attach: {run.condensed} has no {SUCCESS_FILE} (an interrupted run) — clearing it and redoing it", flush=True)
    stage.begin(clear=True)
    out_path, out_fs = run.condensed.for_ray()
    ds.write_parquet(out_path, filesystem=out_fs)
    stage.commit()
    stats["rows"] = len(positions)
    stats["seconds"] = timer.done(len(positions))
    return stats


# ------------------------------------------------------------------------------------
# The whole job
# ------------------------------------------------------------------------------------


def reused_scores(cfg: D2CConfig, listing: Listing) -> RunDir:
    """The run whose complete scores ``score.reuse_from`` names, checked against this listing."""
    path = location(cfg.score.reuse_from)
    source = RunDir(path.parent if path.name == "scores" else path)
    saved = StageDir(source.scores, {}, "RUN/scores").saved_settings()
    if not (source.scores / SUCCESS_FILE).is_file() or saved is None:
        raise ConfigError(f"score.reuse_from: {str(source.scores)!r} holds no complete scores; run `d2c condense` there first")
    if saved.get("listing_sha256") != listing.fingerprint():
        raise ConfigError(
            f"score.reuse_from: {str(source.scores)!r} scored another listing ({saved.get('rows')} rows, data {saved.get('data')}); "
            "point it at scores of the same data.* settings"
        )
    print(f"[d2c] scores: reusing {source.scores} (scorer {saved.get('scorer')}) — nothing to score", flush=True)
    return source


def resolve_scorer(cfg: D2CConfig) -> str:
    """``score.scorer``, or the cached embedded scorer (trained first if missing)."""
    if cfg.score.scorer is not None:
        return cfg.score.scorer
    from app.train import ensure_embedded_scorer

    return str(ensure_embedded_scorer(cfg))


def run_condense(cfg: D2CConfig) -> int:
    """Run (or resume) the whole condense job for ``cfg``; returns a process exit code."""
    check_paths(cfg, ("data", "score", "attach"))
    t0 = time.perf_counter()
    listing = list_source(cfg.data)
    try:
        check_feasible(listing.class_counts(), cfg.select.budget, cfg.select.method, cfg.select.k, cfg.select.shortfall)
    except SelectionError as err:
        raise ConfigError(str(err)) from None
    if cfg.select.shortfall == "error" and listing.empty_classes:
        raise ConfigError(f"classes {listing.empty_classes} are empty and select.shortfall=error")
    run = RunDir(cfg.run_dir)
    init_ray(cfg)
    check_shared_storage(cfg, {"run_dir": cfg.run_dir, "score.reuse_from": cfg.score.reuse_from})
    check_placement(cfg, "attach")
    if not cfg.score.reuse_from:
        check_placement(cfg, "score")
    if cfg.select.needs_features:
        check_placement(cfg, "features")
    run.root.mkdir(parents=True, exist_ok=True)
    print(f"[d2c] condense: {len(listing.rows)} images in {listing.num_classes} classes -> {run.root}", flush=True)
    for note in listing.notes:
        print(f"[d2c] note: {note}", flush=True)
    quiet_data_context(cfg=cfg)
    timings: dict[str, float] = {}
    try:
        if cfg.score.reuse_from:
            source = reused_scores(cfg, listing)
            scorer, score_stats = json.loads((source.scores / SETTINGS_FILE).read_text())["scorer"], {}
            gate_file = source.scores / GATE_FILE
            gate_stats = json.loads(gate_file.read_text()) if gate_file.is_file() else None
        else:
            source = run
            scorer = resolve_scorer(cfg)
            gate_stats = scorer_gate(cfg, listing, run, scorer)
            score_stats = score_stage(cfg, listing, run, scorer)
        features_dir, feature_stats = prepare_features(cfg, listing, run, source) if cfg.select.needs_features else (None, {})
        sel, reports = select_stage(cfg, source.scores, run.selection, listing.num_classes, features_dir)
        attach_stats = attach_stage(cfg, listing, sel, run)
    except StageSettingsError as err:
        raise ConfigError(str(err)) from None
    timings.update({"scores": score_stats.get("seconds", 0.0), "features": feature_stats.get("seconds", 0.0),
                    "attach": attach_stats.get("seconds", 0.0)})
    rejects = source.rejects.read_pandas() if source.rejects.files(".parquet") else pd.DataFrame(columns=["image_id", "reason"])
    counts = listing.class_counts()
    manifest = {
        "config": cfg.to_dict(),
        "versions": versions(),
        "scorer": scorer,
        "scorer_gate": gate_stats,
        "class_names": listing.class_names,
        "notes": listing.notes,
        "rows": {
            "listed": len(listing.rows),
            "rejected": int(len(rejects)),
            "scored": int(sum(counts) - len(rejects)),
            "selected": int(len(sel)),
        },
        "per_class": [r.to_dict() | {"listed": counts[r.label]} for r in reports],
        "clamped_classes": [r.label for r in reports if r.k is not None and r.k_used is not None and r.k_used != r.k],
        "scores_dir": str(source.scores),
        "features": features_manifest(features_dir),
        "score_stats": scores_summary(source.scores, listing.num_classes),
        "shapes": {"num_tokens": cfg.num_tokens, "latent": [cfg.latent_channels, cfg.latent_size, cfg.latent_size]},
        "timings_s": timings | {"total": time.perf_counter() - t0},
    }
    write_json_atomic(run.manifest, manifest)
    print(f"[d2c] condense: done — {len(sel)} images selected, manifest at {run.manifest}", flush=True)
    return 0
