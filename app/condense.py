"""``d2c condense``: score → select → attach on Ray Data (DESIGN.md).

    listing ─► decode (CPU tasks) ─► encode + score (actor pool) ─► RUN/scores/ (shards)
    RUN/scores ─► groupby(label) + interval select ─► RUN/selection/
    selected rows ─► decode ─► latents + visual tokens (actor pool) ─► RUN/condensed/
    class prompts ─► text encoder ─► RUN/text_embeddings.safetensors;  RUN/manifest.json

Resumable: scores are written shard by shard (a shard file is its own completion
marker), so a rerun after a crash scores only the missing shards. A stage whose output
is complete for the same settings is skipped; changed scoring settings are refused.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.metrics import record
from app.ray_session import init_ray, quiet_data_context
from app.stages import (
    decoded,
    StageSettingsError,
    StageTimer,
    check_settings,
    listing_table,
    table_blocks,
    write_json_atomic,
)
from d2c.config import ConfigError, D2CConfig, build_config, check_paths
from d2c.data.condensed import to_arrow
from d2c.data.source import Listing, list_source
from d2c.select.baselines import FEATURE_METHODS, make_chooser
from d2c.select.interval import SELECTION_COLUMNS, ClassSelection, SelectionError, per_class_budget, select_class

SETTINGS_FILE = "_settings.json"
#: Scores rows per hash partition of the per-class groupby (DESIGN.md: too many partitions cost seconds).
GROUPBY_ROWS_PER_PARTITION = 50_000
SUCCESS_FILE = "_SUCCESS"


# ------------------------------------------------------------------------------------
# Run directory layout
# ------------------------------------------------------------------------------------


class RunDir:
    """Paths of a condense run (DESIGN.md, Artifacts)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.scores = self.root / "scores"
        self.rejects = self.root / "rejects"
        self.selection = self.root / "selection"
        self.condensed = self.root / "condensed"
        self.text = self.root / "text_embeddings.safetensors"
        self.manifest = self.root / "manifest.json"

    def score_shard(self, shard: int) -> Path:
        return self.scores / f"shard-{shard:05d}.parquet"

    def reject_shard(self, shard: int) -> Path:
        return self.rejects / f"shard-{shard:05d}.parquet"


# ------------------------------------------------------------------------------------
# Settings that define each stage's output
# ------------------------------------------------------------------------------------


def score_settings(cfg: D2CConfig, listing: Listing, scorer: str) -> dict[str, Any]:
    """Everything a score depends on; a rerun with other values is refused."""
    return {
        "listing_sha256": listing.fingerprint(),
        "rows": len(listing.rows),
        "data": {k: getattr(cfg.data, k) for k in ("source", "path", "split", "image_size", "channels", "preprocess", "max_per_class")},
        "autoencoder": cfg.autoencoder.model_dump(),
        "diffusion": cfg.diffusion.model_dump(),
        "scorer": scorer,
        "num_timesteps": cfg.score.num_timesteps,
        "seed": cfg.score.seed,
        "shard_rows": cfg.score.shard_rows,
        "forward_rows": cfg.score.forward_rows,
    }


def selection_settings(cfg: D2CConfig, scores_dir: Path) -> dict[str, Any]:
    sel = cfg.select.model_dump()
    return {"select": sel, "scores": json.loads((scores_dir / SETTINGS_FILE).read_text())}


def attach_settings(cfg: D2CConfig, selection_sha: str) -> dict[str, Any]:
    return {
        "selection_sha256": selection_sha,
        "attach": cfg.attach.model_dump(),
        "autoencoder": cfg.autoencoder.model_dump(),
        "num_tokens": cfg.num_tokens,
        "use_visual": cfg.model.use_visual,
        "seed": cfg.score.seed,
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
        import torch

        from d2c.attach.visual import build_autoencoder
        from d2c.diffusion.ddpm import DDPMSchedule
        from d2c.select.score import stratified_timesteps
        from d2c.select.scorer import load_scorer

        cfg = build_config(cfg_dict)
        self.cfg = cfg
        self.device = "cuda" if cfg.score.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(cfg.score.num_cpus)))
        self.scorer = load_scorer(scorer_spec, self.device)
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
            z = encode_latents(self.autoencoder, batch["image"][ok], ids, self.cfg.score.seed)
            labels = torch.as_tensor(batch["label"][ok], dtype=torch.long)
            per_t[ok] = difficulty_scores(
                self.scorer.model, z.to(self.device), labels, ids, self.alphas_cumprod, self.timesteps, self.cfg.score.seed,
                max_forward_batch=self.cfg.score.forward_rows, pad_rows=True,
            ).numpy()
        return {
            "pos": batch["pos"],
            "shard": batch["shard"],
            "image_id": batch["image_id"],
            "label": batch["label"],
            "score": per_t.mean(1).astype(np.float64),
            "score_t": per_t,
            "reject": batch["reject"],
        }


def _write_shard(run: RunDir, shard: int, parts: list[dict[str, np.ndarray]]) -> tuple[int, int]:
    """Write one complete shard: rejects first, then the scores file (the completion marker)."""
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["pos"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    bad = np.asarray([r != "" for r in cols["reject"]])
    rej = pa.table({"image_id": pa.array([str(i) for i in cols["image_id"][bad]], pa.string()),
                    "reason": pa.array([str(r) for r in cols["reject"][bad]], pa.string())})
    good = ~bad
    score_t = cols["score_t"][good].astype(np.float32)
    scores = pa.table(
        {
            "image_id": pa.array([str(i) for i in cols["image_id"][good]], pa.string()),
            "label": pa.array(cols["label"][good].astype(np.int64)),
            "score": pa.array(cols["score"][good].astype(np.float64)),
            "score_t": pa.array(list(score_t), pa.list_(pa.float32())),
        }
    )
    for table, path in ((rej, run.reject_shard(shard)), (scores, run.score_shard(shard))):
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
    return int(good.sum()), int(bad.sum())


def score_stage(cfg: D2CConfig, listing: Listing, run: RunDir, scorer_spec: str) -> dict[str, Any]:
    """Score every listed image (resuming from complete shards); returns stage stats."""
    import ray

    run.scores.mkdir(parents=True, exist_ok=True)
    run.rejects.mkdir(parents=True, exist_ok=True)
    settings = score_settings(cfg, listing, scorer_spec)
    check_settings(
        run.scores / SETTINGS_FILE, settings, "RUN/scores",
        "Scores are never mixed across settings: use a new run_dir, or delete the scores directory to rescore.",
    )
    write_json_atomic(run.scores / SETTINGS_FILE, settings)
    shard_rows = cfg.score.shard_rows
    num_shards = -(-len(listing.rows) // shard_rows)
    done = {s for s in range(num_shards) if run.score_shard(s).is_file()}
    todo = [s for s in range(num_shards) if s not in done]
    stats = {"shards": num_shards, "shards_reused": len(done), "scored": 0, "rejected": 0}
    if (run.scores / SUCCESS_FILE).is_file() and not todo:
        print(f"[d2c] scores: complete in {run.scores} ({num_shards} shards) — reused, nothing to score", flush=True)
        return stats
    if done:
        print(f"[d2c] scores: resuming — {len(done)} of {num_shards} shards already complete", flush=True)
    timer = StageTimer("scores")
    positions = [p for s in todo for p in range(s * shard_rows, min((s + 1) * shard_rows, len(listing.rows)))]
    table = listing_table([listing.rows[p] for p in positions], shard_rows, positions)
    expected = defaultdict(int)
    for s in table.column("shard").to_pylist():
        expected[s] += 1
    ds = ray.data.from_arrow(table_blocks(table, cfg.score.batch_size))
    ds = decoded(ds, cfg.data)
    remote = {"num_gpus": cfg.score.num_gpus} if cfg.score.num_gpus > 0 else {}
    ds = ds.map_batches(
        ScoreActor,
        num_cpus=cfg.score.num_cpus,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "scorer_spec": scorer_spec},
        batch_size=cfg.score.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.score.min_actors, max_size=cfg.score.max_actors),
        **remote,
    )
    pending: dict[int, list] = defaultdict(list)
    got: dict[int, int] = defaultdict(int)
    seen = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        seen += len(batch["pos"])
        record("score", "images_scored_per_s", seen / max(time.perf_counter() - timer.start, 1e-9))
        for s in np.unique(batch["shard"]):
            m = batch["shard"] == s
            part = {k: v[m] for k, v in batch.items()}
            pending[int(s)].append(part)
            got[int(s)] += int(m.sum())
            if got[int(s)] == expected[int(s)]:
                n_ok, n_bad = _write_shard(run, int(s), pending.pop(int(s)))
                stats["scored"] += n_ok
                stats["rejected"] += n_bad
    missing = [s for s in todo if not run.score_shard(s).is_file()]
    if missing:
        raise RuntimeError(f"scoring ended with {len(missing)} shards incomplete ({missing[:5]}...); rerun to resume")
    (run.scores / SUCCESS_FILE).write_text("")
    stats["seconds"] = timer.done(len(positions), f"{stats['rejected']} rejects, {len(done)} shards reused")
    return stats


# ------------------------------------------------------------------------------------
# Stage 2: selection (groupby per class)
# ------------------------------------------------------------------------------------


def _select_group(group: pd.DataFrame, n: int, method: str, k: int, shortfall: str, seed: int) -> pd.DataFrame:
    """map_groups body: one class's rows → its selection, plus its report as JSON."""
    label = int(group["label"].iloc[0])
    sel, report = select_class(group, label, n, method, k, shortfall, make_chooser(method, seed))
    sel["report"] = json.dumps(report.to_dict())
    return sel


def select_stage(cfg: D2CConfig, scores_dir: Path, out_dir: Path, num_classes: int) -> tuple[pd.DataFrame, list[ClassSelection]]:
    """Interval (or baseline) selection over a scores table with a Ray Data groupby.

    Returns:
        (selection sorted by (label, rank), one report per class).
    """
    import ray

    if cfg.select.method in FEATURE_METHODS:
        raise NotImplementedError(
            f"select.method={cfg.select.method} needs per-image features over whole classes, which the Ray "
            "pipeline does not compute yet; use d2c, random, min or max (the d2c.select.baselines functions "
            "exist for library use)"
        )
    n = per_class_budget(cfg.select.budget, num_classes)
    settings = selection_settings(cfg, scores_dir)
    if check_settings(out_dir / SETTINGS_FILE, settings, "selection", "") and (out_dir / SUCCESS_FILE).is_file():
        sel = pd.read_parquet(out_dir / "selection.parquet")
        reports = [ClassSelection(**r) for r in json.loads((out_dir / "reports.json").read_text())]
        print(f"[d2c] selection: complete in {out_dir} — reused", flush=True)
        return sel, reports
    timer = StageTimer("selection")
    ds = ray.data.read_parquet(str(scores_dir)).select_columns(["image_id", "label", "score"])
    parts = cfg.ray.groupby_partitions or max(1, min(num_classes, ds.count() // GROUPBY_ROWS_PER_PARTITION))
    grouped = ds.groupby("label", num_partitions=parts).map_groups(
        _select_group,
        batch_format="pandas",
        fn_kwargs=dict(n=n, method=cfg.select.method, k=cfg.select.k, shortfall=cfg.select.shortfall, seed=cfg.select.seed),
    )
    df = grouped.to_pandas()
    reports_by_label = {}
    for rep in df.drop_duplicates("label")["report"] if len(df) else []:
        r = ClassSelection(**json.loads(rep))
        reports_by_label[r.label] = r
    for label in range(num_classes):
        if label not in reports_by_label:
            if cfg.select.shortfall == "error":
                raise SelectionError(f"class {label} is empty; remove it from the data or use select.shortfall=clamp")
            reports_by_label[label] = ClassSelection(label, 0, n, 0, cfg.select.k if cfg.select.method == "d2c" else None, None, "empty class")
    reports = [reports_by_label[i] for i in range(num_classes)]
    sel = df[SELECTION_COLUMNS].sort_values(["label", "rank"], kind="stable").reset_index(drop=True) if len(df) else pd.DataFrame(columns=SELECTION_COLUMNS)
    sel["label"] = sel["label"].astype(np.int64)
    sel["rank"] = sel["rank"].astype(np.int64)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    sel.to_parquet(out_dir / "selection.parquet", index=False)
    write_json_atomic(out_dir / "reports.json", [r.to_dict() for r in reports])
    write_json_atomic(out_dir / SETTINGS_FILE, settings)
    (out_dir / SUCCESS_FILE).write_text("")
    record("select", "rows_selected", len(sel))
    clamped = [r for r in reports if r.note]
    timer.done(len(sel), f"{len(clamped)} classes clamped/short" if clamped else "")
    return sel, reports


def selection_sha(sel: pd.DataFrame) -> str:
    import hashlib

    h = hashlib.sha256()
    for i, lbl in zip(sel["image_id"], sel["label"]):
        h.update(f"{i}\x1f{lbl}\x1e".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------
# Stage 3: attach
# ------------------------------------------------------------------------------------


class AttachActor:
    """Ray Data actor: decoded images → condensed rows (latents + visual tokens, flipped too)."""

    def __init__(self, cfg_dict: dict):
        import torch

        from d2c.attach.visual import AttachEncoder

        cfg = build_config(cfg_dict)
        device = "cuda" if cfg.attach.vision.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cfg.attach.vision.num_cpus)))
        self.encoder = AttachEncoder(cfg, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = [str(i) for i in batch["image_id"]]
        if any(r != "" for r in batch["reject"]):
            bad = [(i, r) for i, r in zip(ids, batch["reject"]) if r != ""]
            raise RuntimeError(f"selected images failed to decode in attach (they decoded when scored): {bad[:3]}")
        feats = self.encoder(batch["image"], ids)
        return to_arrow({"image_id": np.asarray(ids, dtype=object), "label": batch["label"], **feats})


def attach_stage(cfg: D2CConfig, listing: Listing, sel: pd.DataFrame, run: RunDir) -> dict[str, Any]:
    """Text embeddings once per class; latents + visual tokens for the selected images only."""
    import ray

    from d2c.attach.text import compute_text_embeddings, save_text_embeddings

    stats: dict[str, Any] = {}
    settings = attach_settings(cfg, selection_sha(sel))
    done = check_settings(run.condensed / SETTINGS_FILE, settings, "condensed", "") if run.condensed.is_dir() else False
    if done and (run.condensed / SUCCESS_FILE).is_file() and (run.text.is_file() or cfg.attach.text.encoder == "none"):
        print(f"[d2c] attach: complete in {run.condensed} — reused", flush=True)
        return stats
    if cfg.attach.text.encoder != "none" and cfg.model.use_text:
        t = StageTimer("text embeddings")
        emb, mask = compute_text_embeddings(cfg.attach.text, listing.class_names)
        save_text_embeddings(run.text, emb, mask, listing.class_names, cfg.attach.text)
        stats["text_shape"] = list(emb.shape)
        t.done(len(listing.class_names))
    timer = StageTimer("attach")
    wanted = set(sel["image_id"])
    positions = [p for p, r in enumerate(listing.rows) if r["image_id"] in wanted]
    table = listing_table([listing.rows[p] for p in positions], cfg.score.shard_rows, positions)
    ds = ray.data.from_arrow(table_blocks(table, max(1, cfg.attach.vision.batch_size)))
    ds = decoded(ds, cfg.data)
    v = cfg.attach.vision
    remote = {"num_gpus": v.num_gpus} if v.num_gpus > 0 else {}
    ds = ds.map_batches(
        AttachActor,
        num_cpus=v.num_cpus,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict()},
        batch_size=v.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=v.min_actors, max_size=v.max_actors),
        **remote,
    )
    tmp = run.root / f"condensed.tmp-{int(time.time())}"
    ds.write_parquet(str(tmp))
    write_json_atomic(tmp / SETTINGS_FILE, settings)
    (tmp / SUCCESS_FILE).write_text("")
    if run.condensed.exists():
        shutil.rmtree(run.condensed)
    tmp.rename(run.condensed)
    stats["rows"] = len(positions)
    stats["seconds"] = timer.done(len(positions))
    return stats


# ------------------------------------------------------------------------------------
# The whole job
# ------------------------------------------------------------------------------------


def reused_scores(cfg: D2CConfig, listing: Listing) -> RunDir:
    """The run whose complete scores ``score.reuse_from`` names, checked against this listing."""
    path = Path(cfg.score.reuse_from)
    source = RunDir(path.parent if path.name == "scores" else path)
    settings_file = source.scores / SETTINGS_FILE
    if not (source.scores / SUCCESS_FILE).is_file() or not settings_file.is_file():
        raise ConfigError(f"score.reuse_from: {str(source.scores)!r} holds no complete scores; run `d2c condense` there first")
    saved = json.loads(settings_file.read_text())
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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("d2c", "torch", "ray", "numpy", "pyarrow", "pandas", "diffusers", "transformers", "timm", "torch-fidelity"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _score_stats(scores_dir: Path, num_classes: int) -> dict[str, Any]:
    df = pd.read_parquet(scores_dir, columns=["label", "score"])
    per = df.groupby("label")["score"].agg(["count", "mean", "std", "min", "max"])
    return {
        "overall": {k: float(v) for k, v in df["score"].agg(["count", "mean", "std", "min", "max"]).items()},
        "per_class": {int(i): {k: float(v) for k, v in row.items()} for i, row in per.iterrows()},
    }


def run_condense(cfg: D2CConfig) -> int:
    """Run (or resume) the whole condense job for ``cfg``; returns a process exit code."""
    check_paths(cfg, ("data", "score", "attach"))
    t0 = time.perf_counter()
    listing = list_source(cfg.data)
    try:
        per_class_budget(cfg.select.budget, listing.num_classes)
    except SelectionError as err:
        raise ConfigError(str(err)) from None
    if cfg.select.shortfall == "error" and listing.empty_classes:
        raise ConfigError(f"classes {listing.empty_classes} are empty and select.shortfall=error")
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    print(f"[d2c] condense: {len(listing.rows)} images in {listing.num_classes} classes -> {run.root}", flush=True)
    for note in listing.notes:
        print(f"[d2c] note: {note}", flush=True)
    init_ray(cfg)
    quiet_data_context()
    timings: dict[str, float] = {}
    try:
        if cfg.score.reuse_from:
            source = reused_scores(cfg, listing)
            scorer, score_stats = json.loads((source.scores / SETTINGS_FILE).read_text())["scorer"], {}
        else:
            source = run
            scorer = resolve_scorer(cfg)
            score_stats = score_stage(cfg, listing, run, scorer)
        sel, reports = select_stage(cfg, source.scores, run.selection, listing.num_classes)
        attach_stats = attach_stage(cfg, listing, sel, run)
    except StageSettingsError as err:
        raise ConfigError(str(err)) from None
    timings.update({"scores": score_stats.get("seconds", 0.0), "attach": attach_stats.get("seconds", 0.0)})
    rejects = pd.read_parquet(source.rejects) if any(source.rejects.glob("*.parquet")) else pd.DataFrame(columns=["image_id", "reason"])
    counts = listing.class_counts()
    manifest = {
        "config": cfg.to_dict(),
        "versions": _versions(),
        "scorer": scorer,
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
        "score_stats": _score_stats(source.scores, listing.num_classes),
        "shapes": {"num_tokens": cfg.num_tokens, "latent": [cfg.latent_channels, cfg.latent_size, cfg.latent_size]},
        "timings_s": timings | {"total": time.perf_counter() - t0},
    }
    write_json_atomic(run.manifest, manifest)
    print(f"[d2c] condense: done — {len(sel)} images selected, manifest at {run.manifest}", flush=True)
    return 0
