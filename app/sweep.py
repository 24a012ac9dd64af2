"""``d2c sweep``: Ray Tune over config values (by default interval k × data budget).

    scores (computed once, or ``score.reuse_from``) [+ kcenter/herding features, computed or reused
    once] ─► Tuner(grid | random, ASHA optional)
      trial: select from the scores table (no re-scoring, no re-encoding) ─► attach (latents + visual tokens
      cached by image_id across trials) ─► TorchTrainer inside the trial ─► FID-N every
      ``sweep.eval_every`` steps ─► tune.report
    ─► SWEEP/results.csv (+ .parquet), best value per budget, the report's FID-vs-k plot

A trial driver reserves only ``sweep.trial_cpus`` (its TorchTrainer workers reserve their own),
so small clusters do not deadlock. An interrupted sweep resumes with ``Tuner.restore`` and
finished trials are not redone; a trial's own checkpoints make its training resumable too.

``sweep.dir`` may be a local path or a ``s3://`` / ``gs://`` / ``file://`` URI
(:mod:`d2c.storage`): Tune's experiment state, every trial's condensed set, checkpoints and
FID reports, and the results table all go there.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import pandas as pd
import pyarrow as pa

from app.condense import attach_stage, prepare_features, resolve_scorer, reused_scores, score_stage, select_stage
from app.ray_session import check_shared_storage, init_ray, quiet_data_context
from d2c.condense import RunDir
from d2c.config import ConfigError, D2CConfig, apply_overrides, build_config, check_paths
from d2c.data.source import Listing, list_source
from d2c.rundir import StageDir
from d2c.storage import Location, location, write_json_atomic
from d2c.sweep import (RESULTS_CSV, RESULTS_PARQUET, SWEEP_CONTEXT, grid_points, results_table, sweep_dir_of,
                       sweep_feature_config, trial_name, trial_overrides, write_fid_plot)

# ------------------------------------------------------------------------------------
# Attach with a cross-trial cache
# ------------------------------------------------------------------------------------


def _cache_parts(cache: Location) -> list[Location]:
    """The parquet files of the attach cache's complete parts (``part-*/condensed/`` with ``_SUCCESS``)."""
    files = []
    for part in cache.glob("part-*"):
        condensed = RunDir(part).condensed
        if StageDir(condensed, {}, "condensed").complete:
            files.extend(condensed.files(".parquet"))
    return files


def cached_attach(cfg: D2CConfig, listing: Listing, sel: pd.DataFrame, cache: Location, out: Location) -> int:
    """Write ``out`` (a condensed set) for ``sel``, encoding only images not yet in ``cache``.

    The cache is a directory of parts, one per encoding pass: ``part-<ns>/condensed/`` in the
    condensed format, counted once its ``_SUCCESS`` marker is there (an interrupted pass is
    ignored), keyed by image_id (duplicates from concurrent trials are harmless).
    Returns the number of images encoded by this call.
    """
    cache, out = location(cache), location(out)
    cache.mkdir(parents=True, exist_ok=True)
    parts = _cache_parts(cache)
    have = set()
    for p in parts:
        have.update(p.read_table(columns=["image_id"]).column("image_id").to_pylist())
    missing = sel[~sel["image_id"].isin(have)]
    if len(missing):
        part = RunDir(cache / f"part-{time.time_ns()}")
        part.root.mkdir(parents=True)
        # the cache always holds every feature the attach config can give (trials may differ in
        # model.use_visual); text embeddings are per class and live beside the sweep instead
        attach = cfg.attach.model_copy(update={"text": cfg.attach.text.model_copy(update={"encoder": "none"})})
        enc = build_config(cfg.model_copy(update={"attach": attach, "model": cfg.model.model_copy(update={"use_visual": True})}).to_dict())
        attach_stage(enc, listing, missing, part)
        parts = _cache_parts(cache)
    wanted = set(sel["image_id"])
    tables = []
    for p in parts:
        t = p.read_table()
        mask = pa.array([i in wanted for i in t.column("image_id").to_pylist()])
        tables.append(t.filter(mask))
    table = pa.concat_tables(tables)
    # one row per image (a concurrent trial may have encoded the same image)
    ids = table.column("image_id").to_pylist()
    first = {i: n for n, i in reversed(list(enumerate(ids)))}
    table = table.take(sorted(first.values()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "part-00000.parquet").write_parquet(table)
    return len(missing)


# ------------------------------------------------------------------------------------
# The trial
# ------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: one point of the search space, reporting FID periodically."""
    import ray
    from ray import tune

    from app.evaluate import run_evaluate
    from app.train import fit

    start = time.perf_counter()
    cfg = build_config(apply_overrides(ctx["base"], trial_overrides(params)))
    quiet_data_context(cfg=cfg)  # this trial's own process builds datasets
    sweep_dir = location(ctx["sweep_dir"])
    tdir = sweep_dir / "trials" / trial_name(params)
    condense = tdir / "condense"
    condensed = condense / "condensed"
    listing = list_source(cfg.data)
    if not (condensed / "part-00000.parquet").is_file():
        features_dir = ctx.get("features_dir") if cfg.select.needs_features else None
        select = ray.remote(num_cpus=0, scheduling_strategy="DEFAULT")(_select_outside_trial)
        sel, reports = ray.get(select.remote(cfg, location(ctx["scores_dir"]), condense / "selection", listing.num_classes,
                                             None if features_dir is None else location(features_dir)))
        write_json_atomic(condense / "manifest.json", {"class_names": listing.class_names, "params": params,
                                                       "per_class": [r.to_dict() for r in reports],
                                                       "features_dir": features_dir})
        text = sweep_dir / "text_embeddings.safetensors"
        if text.is_file():
            text.copy_to(condense / text.name)
        cached_attach(cfg, listing, sel, sweep_dir / "attach_cache", condensed)
    total = cfg.train.steps
    every = cfg.sweep.eval_every or total
    ends = sorted(set(list(range(every, total, every)) + [total]))
    for end in ends:
        step_cfg = build_config(cfg.model_copy(update={
            "condensed": str(condensed), "train_dir": str(tdir / "train"), "checkpoint": str(tdir / "train" / "checkpoints"),
            "eval_dir": str(tdir / f"eval-{end:07d}"), "train": cfg.train.model_copy(update={"steps": end}),
            "eval": cfg.eval.model_copy(update={"num_samples": cfg.sweep.fid_samples}),
        }).to_dict())
        fit(step_cfg, tdir / "train", full=False)
        run_evaluate(step_cfg)
        m = (tdir / f"eval-{end:07d}" / "metrics.json").read_json()
        tune.report({"fid": float(m["fid"]), "kid": float(m.get("kid_mean", float("nan"))), "steps": end,
                     "wall_time_s": time.perf_counter() - start, "trial_dir": str(tdir)})


# ------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------


def prepare_scores(cfg: D2CConfig, listing: Listing) -> Location:
    """The scores every trial selects from: reused, or computed once in ``run_dir``.

    Returned absolute: trials run in their own working directories, where a relative path
    names nothing.
    """
    if cfg.score.reuse_from:
        return reused_scores(cfg, listing).scores.absolute()
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    score_stage(cfg, listing, run, resolve_scorer(cfg))
    return run.scores.absolute()


def prepare_sweep_features(cfg: D2CConfig, feature_cfg: Optional[D2CConfig], listing: Listing,
                           scores_dir: Location) -> Optional[Location]:
    """The features of ``feature_cfg`` (:func:`sweep_feature_config`), once for every trial.

    Reused from the scores run when it holds them with the same settings, else computed into
    ``run_dir``. None when no trial needs features.
    """
    if feature_cfg is None:
        return None
    run = RunDir(cfg.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    features_dir, _ = prepare_features(feature_cfg, listing, run, RunDir(scores_dir.parent))
    return features_dir.absolute()


def _select_outside_trial(cfg: D2CConfig, scores_dir: Location, out_dir: Location, num_classes: int,
                          features_dir: Optional[Location]):
    """:func:`select_stage` as a task of its own (with ``scheduling_strategy="DEFAULT"``): inside a
    trial, the groupby's shuffle tasks would be captured by the trial's placement group, whose one
    small bundle cannot hold them."""
    quiet_data_context(cfg=cfg)
    return select_stage(cfg, scores_dir, out_dir, num_classes, features_dir)


def trial_entry(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune's trainable (wrapped by ``tune.with_parameters``): ``config`` is ``{"params": {key: value}}``."""
    run_trial(config["params"], ctx)


def sweep_context(cfg: D2CConfig, sweep_dir: Location, scores_dir: Location,
                  features_dir: Optional[Location], resuming: bool) -> dict[str, Any]:
    """The context shared by all trials: stored in ``sweep_dir/SWEEP_CONTEXT`` on the first run.

    A resumed sweep uses the stored context, so its remaining trials run with the settings the
    finished ones had; it says so when this run's settings differ.
    """
    ctx = {"base": cfg.to_dict(), "sweep_dir": str(sweep_dir), "scores_dir": str(scores_dir),
           "features_dir": None if features_dir is None else str(features_dir)}
    stored = sweep_dir / SWEEP_CONTEXT
    if resuming and stored.is_file():
        kept = stored.read_json()
        if kept != json.loads(json.dumps(ctx)):
            print(f"[d2c] sweep: this run's settings differ from the interrupted sweep's; its remaining trials "
                  f"keep the stored ones ({stored}). Use a new sweep.dir to sweep other settings.", flush=True)
        return kept
    write_json_atomic(stored, ctx)
    return ctx


def run_sweep(cfg: D2CConfig) -> int:
    """``d2c sweep``: validate the grid, score once, tune, write the results table."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    check_paths(cfg, ("data", "score", "attach"))
    points = grid_points(cfg)
    sweep_dir = sweep_dir_of(cfg).absolute()
    listing = list_source(cfg.data)
    feature_cfg = sweep_feature_config(cfg, listing, points)
    init_ray(cfg)
    # run_dir is written when the scores are computed here, or the features (kcenter/herding trials)
    writes_run_dir = not cfg.score.reuse_from or feature_cfg is not None
    check_shared_storage(cfg, {"sweep.dir": str(sweep_dir), "score.reuse_from": cfg.score.reuse_from,
                               "run_dir": cfg.run_dir if writes_run_dir else None})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    quiet_data_context(cfg=cfg)
    scores_dir = prepare_scores(cfg, listing)
    features_dir = prepare_sweep_features(cfg, feature_cfg, listing, scores_dir)
    if cfg.attach.text.encoder != "none" and cfg.model.use_text:
        from d2c.attach.text import compute_text_embeddings, save_text_embeddings

        text = sweep_dir / "text_embeddings.safetensors"
        if not text.is_file():
            emb, mask = compute_text_embeddings(cfg.attach.text, listing.class_names)
            with text.local_output() as staged:
                save_text_embeddings(staged, emb, mask, listing.class_names, cfg.attach.text)
    path = sweep_dir / "tune"
    storage_path, storage_fs = sweep_dir.for_ray()
    tune_path = path.for_ray()[0]
    resuming = tune.Tuner.can_restore(tune_path, storage_filesystem=storage_fs)
    ctx = sweep_context(cfg, sweep_dir, scores_dir, features_dir, resuming)
    if cfg.sweep.search_alg == "grid":
        space = {"params": tune.grid_search(points)}
        num_samples = 1
    else:
        space = {"params": {k: tune.choice(v) for k, v in cfg.sweep.grid.items()}}
        num_samples = cfg.sweep.num_samples
    trainable = tune.with_resources(tune.with_parameters(trial_entry, ctx=ctx), {"cpu": cfg.sweep.trial_cpus})
    scheduler = ASHAScheduler(grace_period=cfg.sweep.asha_grace_period, time_attr="steps") if cfg.sweep.asha else None
    print(f"[d2c] sweep: {len(points) if cfg.sweep.search_alg == 'grid' else num_samples} trials over {sorted(cfg.sweep.grid)} "
          f"reusing {scores_dir} -> {sweep_dir}", flush=True)
    start = time.perf_counter()
    if resuming:
        print(f"[d2c] sweep: resuming {path} (finished trials are kept)", flush=True)
        try:
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True, storage_filesystem=storage_fs)
        except ValueError as err:  # Tune refuses a trainable other than the one the experiment started with
            if "trainable" not in str(err):
                raise
            raise ConfigError(
                f"cannot resume the sweep in {path}: it was started by another d2c version ({err}). Delete {path} "
                f"and rerun the same command: every finished trial's condensed set, checkpoints and FID under "
                f"{sweep_dir / 'trials'} are reused, so only the unfinished trials do work.") from None
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric="fid", mode="min", num_samples=num_samples, scheduler=scheduler,
                                        max_concurrent_trials=cfg.sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=storage_fs),
        )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    table = results_table(grid, sweep_dir, sorted(cfg.sweep.grid), ctx["base"])
    (sweep_dir / RESULTS_CSV).write_text(table.to_csv(index=False))
    (sweep_dir / RESULTS_PARQUET).write_parquet(table)
    write_json_atomic(sweep_dir / "sweep.json", {"config": cfg.to_dict(), "scores_dir": str(scores_dir),
                                                 "features_dir": ctx["features_dir"],
                                                 "wall_time_s": time.perf_counter() - start, "trials": len(grid),
                                                 "errors": [str(e) for e in errors]})
    if len(table):
        final = table.sort_values("steps").groupby("trial_dir").tail(1)
        print(f"[d2c] sweep: FID against k plotted in {write_fid_plot(final, sweep_dir)}", flush=True)
        best = final.loc[final.groupby("budget")["fid"].idxmin()]
        for _, r in best.iterrows():
            applied = "" if pd.isna(r["k_used"]) or r["k_used"] == r["k"] else f", applied as k={int(r['k_used'])}"
            print(f"[d2c] sweep: budget {r['budget']}: best k={r['k']}{applied} (FID {r['fid']:.2f} after {r['steps']} steps)", flush=True)
    print(f"[d2c] sweep: results in {sweep_dir / RESULTS_CSV}", flush=True)
    if errors:
        print(f"[d2c] sweep: {len(errors)} trial(s) failed; rerun the same command to retry them", flush=True)
        return 1
    return 0
