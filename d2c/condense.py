"""A condense run's directory (docs/design.md, Artifacts) and what defines each of its stages,
without Ray: the layout, the settings every stage directory is checked against, and the
per-class selection body and checks that the Ray stages of ``app/condense.py`` run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from d2c.config import FEATURE_SELECT_KEYS, ConfigError, D2CConfig
from d2c.data.source import Listing
from d2c.rundir import SETTINGS_FILE, StageDir, non_default
from d2c.select.baselines import make_chooser
from d2c.select.interval import ClassSelection, SelectionError, select_class
from d2c.storage import Location, location, write_json_atomic

#: RUN/scores' record of the scorer quality gate it passed ("_": Parquet readers skip it).
GATE_FILE = "_scorer_gate.json"
#: RUN/selection's per-class reports; "_"-prefixed so Parquet readers of the directory skip it.
REPORTS_FILE = "_reports.json"
#: Its name before REPORTS_FILE (a reused older selection is renamed to REPORTS_FILE).
OLD_REPORTS_FILE = "reports.json"
#: Column of RUN/features holding each image's pooled visual feature (list<float32>, length d).
FEATURE_COLUMN = "feature"



class RunDir:
    """Locations of a condense run (docs/design.md, Artifacts): a local path or a storage URI."""

    def __init__(self, root: str | Path | Location):
        self.root = location(root)
        self.scores = self.root / "scores"
        self.features = self.root / "features"
        self.rejects = self.root / "rejects"
        self.selection = self.root / "selection"
        self.condensed = self.root / "condensed"
        self.text = self.root / "text_embeddings.safetensors"
        self.manifest = self.root / "manifest.json"

    def score_shard(self, shard: int) -> Location:
        return self.scores / f"shard-{shard:05d}.parquet"

    def reject_shard(self, shard: int) -> Location:
        return self.rejects / f"shard-{shard:05d}.parquet"

    def feature_shard(self, shard: int) -> Location:
        return self.features / f"shard-{shard:05d}.parquet"


def listing_settings(cfg: D2CConfig, listing: Listing) -> dict[str, Any]:
    """What a pass over the listing reads: the listed rows and how they are decoded."""
    return {
        "listing_sha256": listing.fingerprint(),
        "rows": len(listing.rows),
        "data": {k: getattr(cfg.data, k) for k in ("source", "path", "split", "image_size", "channels", "preprocess", "max_per_class")},
    }


def score_settings(cfg: D2CConfig, listing: Listing, scorer: str) -> dict[str, Any]:
    """Everything a score depends on; a rerun with other values is refused."""
    return {
        **listing_settings(cfg, listing),
        "autoencoder": cfg.autoencoder.settings(),
        "diffusion": cfg.diffusion.model_dump(),
        "scorer": scorer,
        "num_timesteps": cfg.score.num_timesteps,
        "seed": cfg.score.seed,
        "shard_rows": cfg.score.shard_rows,
        "forward_rows": cfg.score.forward_rows,
        **non_default(cfg.score, "precision", "compile"),
    }


def feature_settings(cfg: D2CConfig, listing: Listing) -> dict[str, Any]:
    """Everything a pooled visual feature depends on (not the scorer: features never read scores)."""
    from d2c.select.features import FEATURE_POOLING  # imports torch: not at module level (Ray Data tasks load this module)

    v = cfg.attach.vision
    return {
        **listing_settings(cfg, listing),
        "encoder": v.encoder,
        "path": v.path,
        "image_size": cfg.feature_image_size,
        "pooling": FEATURE_POOLING,
        "forward_rows": cfg.select.feature_batch_size,
        "shard_rows": cfg.score.shard_rows,
    }


def selection_settings(cfg: D2CConfig, scores_dir: Location, features_dir: Optional[Location] = None) -> dict[str, Any]:
    """The select.* keys that shape the selection, the scores' settings and (kcenter/herding) the features'."""
    sel = cfg.select.model_dump()
    if not cfg.select.needs_features:
        sel = {k: v for k, v in sel.items() if k not in FEATURE_SELECT_KEYS}
    settings = {"select": sel, "scores": json.loads((scores_dir / SETTINGS_FILE).read_text())}
    if features_dir is not None:
        settings["features"] = json.loads((features_dir / SETTINGS_FILE).read_text())
    return settings


def attach_settings(cfg: D2CConfig, selection_sha: str) -> dict[str, Any]:
    attach = cfg.attach.model_dump()
    if cfg.attach.vision.encoder != "efficientnet_lite0":  # the token keys only shape EfficientNet's output
        for key in ("layer", "normalize"):
            attach["vision"].pop(key)
    return {
        "selection_sha256": selection_sha,
        "attach": attach,
        "autoencoder": cfg.autoencoder.settings(),
        "num_tokens": cfg.num_tokens,
        "use_visual": cfg.model.use_visual,
        "seed": cfg.score.seed,
    }


def check_finite_scores(per_t: np.ndarray, image_ids: list[str], precision: str) -> None:
    """Refuse non-finite losses ``[B, T]`` (an fp16 overflow, or a broken scorer) naming the fix:
    a NaN would sort anywhere and silently corrupt the selection."""
    bad = ~np.isfinite(per_t).all(axis=1)
    if not bad.any():
        return
    first = image_ids[int(np.flatnonzero(bad)[0])]
    if precision == "fp16":
        fix = ("fp16 overflowed inside the scorer: score into a new run_dir with score.precision=bf16 (fp32's range) "
               "or fp32 (score shards already written are kept, but other settings are refused in the same run_dir)")
    else:
        fix = "the scorer itself produces inf/NaN: check the score.scorer checkpoint"
    raise ConfigError(f"score: the scorer gave non-finite losses for {int(bad.sum())} image(s) (first: {first!r}) "
                      f"at score.precision={precision}; {fix}")


def unusable_features(features_dir: Location, settings: dict[str, Any]) -> Optional[str]:
    """None if ``features_dir`` holds complete features made with ``settings``, else why not."""
    stage = StageDir(features_dir, settings, "RUN/features")
    saved = stage.saved_settings()
    if saved is None:
        return "it holds none"
    if not stage.complete:
        return "they are incomplete"
    diffs = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    return f"they were made with other {', '.join(diffs)}" if diffs else None


def split_features(group: pd.DataFrame, label: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One class of :func:`scores_with_features` rows → (its scores rows, {image_id: feature float32 [d]}).

    Raises:
        SelectionError: a scored image has no feature (the features do not cover the scores).
    """
    is_feature = group[FEATURE_COLUMN].notna().to_numpy()
    scored = group.loc[~is_feature, ["image_id", "label", "score"]]
    rows = group.loc[is_feature]
    features = {str(i): np.asarray(f, np.float32) for i, f in zip(rows["image_id"], rows[FEATURE_COLUMN])}
    missing = [i for i in scored["image_id"] if i not in features]
    if missing:
        raise SelectionError(
            f"class {label}: {len(missing)} scored images have no feature in RUN/features (e.g. {missing[:3]}); "
            "the features were made from another listing than the scores: delete the features directory and rerun"
        )
    return scored, features


def select_group(group: pd.DataFrame, n: int, method: str, k: int, shortfall: str, seed: int) -> pd.DataFrame:
    """map_groups body: one class's rows → its selection, plus its report as JSON.

    With a ``feature`` column (kcenter / herding) the group holds the class's scores rows and
    features rows (:func:`scores_with_features`), and the chooser reads the features.
    """
    label = int(group["label"].iloc[0])
    features = None
    if FEATURE_COLUMN in group:
        group, features = split_features(group, label)
    sel, report = select_class(group, label, n, method, k, shortfall, make_chooser(method, seed, features))
    sel["report"] = json.dumps(report.to_dict())
    return sel


def read_reports(out_dir: Location) -> list[ClassSelection]:
    """The per-class reports of a complete selection; one written under OLD_REPORTS_FILE is moved to
    REPORTS_FILE (a non-"_" file makes the directory unreadable as a Parquet dataset)."""
    old = out_dir / OLD_REPORTS_FILE
    if not (out_dir / REPORTS_FILE).is_file() and old.is_file():
        write_json_atomic(out_dir / REPORTS_FILE, json.loads(old.read_text()))
        old.unlink()
    return [ClassSelection(**r) for r in json.loads((out_dir / REPORTS_FILE).read_text())]


def selection_sha(sel: pd.DataFrame) -> str:
    import hashlib

    h = hashlib.sha256()
    for i, lbl in zip(sel["image_id"], sel["label"]):
        h.update(f"{i}\x1f{lbl}\x1e".encode())
    return h.hexdigest()


def scores_summary(scores_dir: Location, num_classes: int) -> dict[str, Any]:
    df = scores_dir.read_pandas(columns=["label", "score"])
    per = df.groupby("label")["score"].agg(["count", "mean", "std", "min", "max"])
    return {
        "overall": {k: float(v) for k, v in df["score"].agg(["count", "mean", "std", "min", "max"]).items()},
        "per_class": {int(i): {k: float(v) for k, v in row.items()} for i, row in per.iterrows()},
    }


def features_manifest(features_dir: Optional[Location]) -> Optional[dict[str, Any]]:
    """The manifest's record of the features a kcenter/herding selection read (None for other methods)."""
    if features_dir is None:
        return None
    return {"dir": str(features_dir), "settings": json.loads((features_dir / SETTINGS_FILE).read_text())}


def manifest_class_names(condensed: str | Location) -> Optional[list[str]]:
    """The class names in the manifest beside a condensed set (``RUN/manifest.json``), or None."""
    manifest = location(condensed).parent / "manifest.json"
    return manifest.read_json().get("class_names") if manifest.is_file() else None
