"""A sweep's grid, trial names and results table, without Ray (``app/sweep.py`` runs the trials
with Ray Tune): every grid point is validated as a config before anything runs, and the
results table has one row per (trial, FID report).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, Optional

import pandas as pd

from d2c.condense import feature_settings
from d2c.config import ConfigError, D2CConfig, apply_overrides, build_config
from d2c.data.source import Listing
from d2c.storage import Location, location

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
FID_PLOT = "fid_vs_k.png"
# What every trial shares (base config, scores/features/sweep locations), written once per sweep.
# It reaches trials through ``tune.with_parameters``, not the search space, so Tune's console
# reports and each trial's params.json hold only the swept values.
SWEEP_CONTEXT = "sweep_context.json"
#: Columns of the results table besides one column per swept key.
RESULT_COLUMNS = ["k", "k_used", "budget", "method", "steps", "fid", "kid", "wall_time_s", "trial_dir"]


def sweep_dir_of(cfg: D2CConfig) -> Location:
    """``sweep.dir``, default ``run_dir/sweep`` (a local path or a storage URI)."""
    return location(cfg.sweep.dir) if cfg.sweep.dir else location(cfg.run_dir) / "sweep"


def trial_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]


def trial_name(params: dict[str, Any]) -> str:
    """A readable, stable directory name for one point of the search space."""
    text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "=,-_." else "_" for c in text)
    return f"{safe}-{digest}"


def grid_points(cfg: D2CConfig) -> list[dict[str, Any]]:
    """Every point of ``sweep.grid``, each validated as a config before anything runs."""
    keys = sorted(cfg.sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(cfg.sweep.grid[k] for k in keys))]
    for p in points:
        try:
            build_config(apply_overrides(cfg.to_dict(), trial_overrides(p)))
        except ConfigError as err:
            raise ConfigError(f"sweep.grid point {p} is not a valid config: {err}") from None
    return points


def interval_used(per_class: list[dict[str, Any]]) -> Optional[int]:
    """The interval a selection applied: the largest ``k_used`` of its classes (``per_class`` as in a
    condense manifest). Equal to the requested k unless the budget clamped it in every class; None
    for methods without an interval.
    """
    used = [r["k_used"] for r in per_class if r.get("k_used") is not None]
    return max(used) if used else None


def results_table(grid, sweep_dir: Location, keys: list[str], base: dict[str, Any]) -> pd.DataFrame:
    """Every FID report of every trial: one row per (trial, steps); ``base`` is the sweep context's config."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        if df is None or not len(df):
            continue
        params = result.config["params"]
        cfg = build_config(apply_overrides(base, trial_overrides(params)))
        manifest = location(df["trial_dir"].iloc[0]) / "condense" / "manifest.json"  # one trial dir per trial
        k_used = interval_used(manifest.read_json()["per_class"]) if manifest.is_file() else None
        for _, r in df.iterrows():
            row = {k: params.get(k) for k in keys}
            row.update(k=cfg.select.k, k_used=k_used, budget=cfg.select.budget, method=cfg.select.method, steps=int(r["steps"]),
                       fid=float(r["fid"]), kid=float(r["kid"]), wall_time_s=float(r["wall_time_s"]), trial_dir=r["trial_dir"])
            rows.append(row)
    return pd.DataFrame(rows, columns=keys + [c for c in RESULT_COLUMNS if c not in keys])


def write_fid_plot(final: pd.DataFrame, sweep_dir: Location) -> Location:
    """``sweep_dir/FID_PLOT`` (written atomically): FID against k, one curve per budget, from each trial's last report."""
    from d2c.report.plots import plot_sweep, to_png

    path = sweep_dir / FID_PLOT
    path.write_bytes(to_png(plot_sweep(final)))
    return path


def sweep_feature_config(cfg: D2CConfig, listing: Listing, points: list[dict[str, Any]]) -> Optional[D2CConfig]:
    """The config whose visual features every kcenter/herding trial selects by; None if no trial needs any.

    A sweep computes (or reuses) the features once, so its feature-method trials must all ask
    for the same ones: a grid that varies them is refused before any work starts.
    """
    trial_cfgs = [build_config(apply_overrides(cfg.to_dict(), trial_overrides(p))) for p in points]
    needing = [c for c in trial_cfgs if c.select.needs_features]
    distinct = {json.dumps(feature_settings(c, listing), sort_keys=True, default=str) for c in needing}
    if len(distinct) > 1:
        raise ConfigError(
            "sweep.grid: its kcenter/herding trials ask for different visual features, but a sweep computes them once; "
            "keep select.feature_image_size, select.feature_batch_size, attach.vision.encoder, attach.vision.path "
            "and score.shard_rows out of sweep.grid (or sweep them in separate sweeps)"
        )
    return needing[0] if needing else None
