"""K-Center greedy and Herding on pooled visual features: d2c.select.features and the Ray
condense pipeline end to end (RUN/features, reuse, resume, refusal), against references."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.condense import run_condense
from d2c.condense import RunDir, selection_settings
from conftest import FMNIST, ROOT, TINY_MODEL, tiny_cfg
from d2c.config import ConfigError, load_config
from d2c.models.build import build_model
from d2c.models.encoders import load_vision_encoder
from d2c.select.baselines import herding, kcenter_greedy
from d2c.select.features import pooled_features
from d2c.train.checkpoint import checkpoint_meta, save_checkpoint

#: Feature-pass input side in these tests (2×2 EfficientNet grid → 4 tokens pooled to 1280).
FEATURE_SIZE = 64
#: Attach's input side in these tests: another size, so the feature pass must use its own.
ATTACH_SIZE = 128
EFFICIENTNET_DIM = 1280
FEATURE_OVERRIDES = (f"select.feature_image_size={FEATURE_SIZE}", "select.feature_batch_size=8",
                     f"attach.vision.image_size={ATTACH_SIZE}", "attach.text.encoder=none", "model.use_text=false")
ALGORITHMS = {"kcenter": kcenter_greedy, "herding": herding}


def _features(run: Path) -> pd.DataFrame:
    return pd.read_parquet(RunDir(run).features)


def _reference_selection(scores: pd.DataFrame, features: pd.DataFrame, method: str, per_class: int) -> dict[int, list]:
    """label → the (rank, image_id) pairs K-Center / Herding choose when called directly on the
    class's features in (score, image_id) order (sorted here with Python's sort, independently)."""
    by_id = dict(zip(features.image_id, features.feature))
    out = {}
    for label, group in scores.groupby("label"):
        ordered = [i for _, i in sorted(zip(group.score, group.image_id))]
        x = np.stack([np.asarray(by_id[i], np.float32) for i in ordered])
        ranks = sorted(int(r) for r in ALGORITHMS[method](x, per_class))
        out[int(label)] = [(r, ordered[r]) for r in ranks]
    return out


def _selected(run: Path) -> dict[int, list]:
    sel = pd.read_parquet(RunDir(run).selection / "selection.parquet")
    return {int(lbl): list(zip(g["rank"].astype(int), g.image_id)) for lbl, g in sel.groupby("label")}


# -- d2c: pooled features ------------------------------------------------------------


def test_pooled_features_are_the_token_mean_and_ignore_batching():
    enc = load_vision_encoder("efficientnet_lite0", None, FEATURE_SIZE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    got = pooled_features(enc, images, forward_rows=4)
    assert got.shape == (5, EFFICIENTNET_DIM) and got.dtype == np.float32
    tokens = enc.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))  # [5, 4, 1280]
    assert tokens.shape == (5, (FEATURE_SIZE // 32) ** 2, EFFICIENTNET_DIM)
    np.testing.assert_allclose(got, tokens.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    # every forward pass is padded to 4 images: a feature is bitwise the same in any batch
    np.testing.assert_array_equal(pooled_features(enc, images[3:], forward_rows=4), got[3:])
    np.testing.assert_array_equal(pooled_features(enc, images[::-1], forward_rows=4), got[::-1])
    with pytest.raises(ValueError, match="uint8 images"):
        pooled_features(enc, images.astype(np.float32), forward_rows=4)
    with pytest.raises(ValueError, match="select.feature_batch_size"):
        pooled_features(enc, images, forward_rows=0)


def test_feature_methods_need_a_vision_encoder():
    with pytest.raises(ConfigError, match="attach.vision.encoder is 'none'"):
        load_config(ROOT / "configs" / "embedded.yaml", ["select.method=kcenter", "attach.vision.encoder=none"])
    cfg = load_config(ROOT / "configs" / "embedded.yaml", ["select.method=herding", "attach.vision.image_size=96"])
    assert cfg.feature_image_size == 64  # configs/embedded.yaml sets it
    cfg = load_config(None, ["select.method=herding", "attach.vision.image_size=96"])
    assert cfg.feature_image_size == 96  # None = attach's size


def test_a_scored_image_without_a_feature_is_an_error_not_a_skip():
    from d2c.condense import split_features
    from d2c.select.interval import SelectionError

    feature = np.ones(3, np.float32)
    group = pd.DataFrame({"image_id": ["a", "b", "a"], "label": [0, 0, 0], "score": [0.5, 0.2, np.nan],
                          "feature": [None, None, feature]})  # two scores rows, one features row
    with pytest.raises(SelectionError, match=r"class 0: 1 scored images have no feature.*\['b'\]"):
        split_features(group, 0)
    scored, features = split_features(group.iloc[[0, 2]], 0)
    assert scored.image_id.tolist() == ["a"] and list(features) == ["a"]
    np.testing.assert_array_equal(features["a"], feature)


def test_baselines_sweep_config_runs_every_method_on_one_feature_setting():
    from d2c.sweep import grid_points, sweep_feature_config
    from d2c.data.source import Listing

    cfg = load_config(ROOT / "tune_configs" / "baselines.yaml")
    points = grid_points(cfg)
    assert {p["select.method"] for p in points} == {"d2c", "random", "min", "max", "kcenter", "herding"}
    listing = Listing([{"image_id": f"img{i}", "label": i % 2} for i in range(4)], ["a", "b"])  # only fingerprinted
    feature_cfg = sweep_feature_config(cfg, listing, points)
    assert feature_cfg is not None and feature_cfg.feature_image_size == FEATURE_SIZE
    d2c_only = load_config(ROOT / "tune_configs" / "baselines.yaml", ['sweep.grid={"select.method": ["d2c", "random"]}'])
    assert sweep_feature_config(d2c_only, listing, grid_points(d2c_only)) is None


# -- Ray: condense with kcenter / herding --------------------------------------------


@pytest.fixture(scope="module")
def kcenter_run(ray_session, scorer_ckpt, tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    run = tmp_path_factory.mktemp("kcenter")
    cfg = tiny_cfg(run, scorer_ckpt, "select.method=kcenter", *FEATURE_OVERRIDES)
    assert run_condense(cfg) == 0
    return run, cfg


def test_kcenter_selection_equals_the_direct_reference(kcenter_run):
    run, cfg = kcenter_run
    r = RunDir(run)
    table = pq.read_table(r.features)
    assert table.schema.field("image_id").type == pa.string() and table.schema.field("label").type == pa.int64()
    assert table.schema.field("feature").type == pa.list_(pa.float32())
    feats = table.to_pandas()
    assert len(feats) == 120 and feats.image_id.is_unique
    assert all(len(f) == EFFICIENTNET_DIM for f in feats.feature)
    scores = pd.read_parquet(r.scores)
    assert set(feats.image_id) == set(scores.image_id)
    assert _selected(run) == _reference_selection(scores, feats, "kcenter", 3)
    sel = pd.read_parquet(r.selection / "selection.parquet")
    assert set(sel.method) == {"kcenter"} and len(sel) == 30
    manifest = json.loads(r.manifest.read_text())
    assert manifest["features"]["dir"] == str(r.features)
    assert manifest["features"]["settings"]["image_size"] == FEATURE_SIZE
    assert manifest["features"]["settings"]["pooling"] == "mean_over_patch_tokens"
    # the selection's settings carry the features' settings (so other features re-select)
    saved = json.loads((r.selection / "_settings.json").read_text())
    assert saved["features"] == manifest["features"]["settings"]
    assert saved == selection_settings(cfg, r.scores, r.features)


def test_features_and_selection_read_as_parquet_datasets(kcenter_run):
    from test_parquet_outputs import read_both

    run, _ = kcenter_run
    rows = json.loads((run / "manifest.json").read_text())["rows"]
    assert len(read_both(run / "features")) == rows["listed"] - rows["rejected"] == 120
    assert len(read_both(run / "selection")) == rows["selected"] == 30


def test_features_equal_a_plain_computation_of_the_unflipped_image(kcenter_run):
    run, _ = kcenter_run
    from d2c.data.fashion_mnist import list_fashion_mnist
    from d2c.data.preprocess import pad_to

    rows = list_fashion_mnist(None, "train", 12)[:8]
    images = np.stack([pad_to(r["image"], 32) for r in rows])
    images = images[..., None] if images.ndim == 3 else images
    enc = load_vision_encoder("efficientnet_lite0", None, FEATURE_SIZE)
    ref = enc.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).mean(1).numpy()
    got = _features(run).set_index("image_id").loc[[r["image_id"] for r in rows], "feature"]
    np.testing.assert_allclose(np.stack(got.to_list()), ref, rtol=1e-4, atol=1e-5)


def test_rerun_reuses_resumes_and_refuses_other_feature_settings(kcenter_run, scorer_ckpt, capsys):
    run, cfg = kcenter_run
    r = RunDir(run)
    shards = sorted(r.features.local_path.glob("shard-*.parquet"))  # RunDir holds d2c.storage Locations
    assert len(shards) == 3  # 120 rows, score.shard_rows=40
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    assert run_condense(cfg) == 0
    out = capsys.readouterr().out
    assert "features: complete in" in out and "nothing to encode" in out and "selection: complete" in out
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # a run killed mid-pass: one shard lost; the rerun encodes only it, bit for bit the same
    victim = r.feature_shard(1)
    original = victim.read_bytes()
    victim.unlink()
    (r.features / "_SUCCESS").unlink()
    assert run_condense(cfg) == 0
    out = capsys.readouterr().out
    assert "features: resuming — 2 of 3 shards already complete" in out
    assert victim.read_bytes() == original
    assert before[shards[0]][0] == shards[0].stat().st_mtime_ns
    with pytest.raises(ConfigError, match=f"image_size: {FEATURE_SIZE} -> 32.*delete the features directory"):
        run_condense(tiny_cfg(run, scorer_ckpt, "select.method=kcenter", *FEATURE_OVERRIDES, "select.feature_image_size=32"))


def test_herding_reuses_the_scores_runs_features(kcenter_run, tmp_path, capsys):
    source, _ = kcenter_run
    out_run = tmp_path / "herding"
    cfg = tiny_cfg(out_run, "null", f"score.reuse_from={source}", "select.method=herding", *FEATURE_OVERRIDES)
    assert run_condense(cfg) == 0
    out = capsys.readouterr().out
    assert f"features: reusing {RunDir(source).features} (same settings)" in out
    r = RunDir(out_run)
    assert not r.features.exists() and not r.scores.exists()
    scores = pd.read_parquet(RunDir(source).scores)
    assert _selected(out_run) == _reference_selection(scores, _features(source), "herding", 3)
    assert set(pd.read_parquet(r.selection / "selection.parquet").method) == {"herding"}
    manifest = json.loads(r.manifest.read_text())
    assert manifest["features"]["dir"] == str(RunDir(source).features)
    # other feature settings than the scores run's: computed into this run's own features dir
    other = tmp_path / "herding32"
    assert run_condense(tiny_cfg(other, "null", f"score.reuse_from={source}", "select.method=herding",
                                 *FEATURE_OVERRIDES, "select.feature_image_size=32")) == 0
    out = capsys.readouterr().out
    assert "features: not reusing" in out and "other image_size" in out
    own = json.loads((RunDir(other).features / "_settings.json").read_text())
    assert own["image_size"] == 32
    assert json.loads(RunDir(other).manifest.read_text())["features"]["dir"] == str(RunDir(other).features)
    assert _selected(other) == _reference_selection(scores, _features(other), "herding", 3)


def test_rejected_images_get_no_feature(ray_session, tmp_path):
    from test_condense import _imagefolder

    data = tmp_path / "data"
    _imagefolder(data)  # 3 classes (one empty), 6 images each + one corrupt JPEG
    model = dict(TINY_MODEL, in_channels=3, num_classes=3)
    torch.manual_seed(0)
    net = build_model(model)
    ckpt = save_checkpoint(tmp_path / "scorer", 0, net, net, {"step": 0},
                           checkpoint_meta("dit", model, {"arch": "dit", "num_timesteps": 1000}, {}))
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [
        f"run_dir={tmp_path / 'run'}", f"score.scorer={ckpt}", "data.source=imagefolder", f"data.path={data}",
        "data.channels=3", "data.preprocess=center_crop", "select.budget=6", "select.k=2", "score.num_timesteps=2",
        "model.patch_size=8", "select.method=kcenter", "score.gate_rows=0", *FEATURE_OVERRIDES])  # untrained scorer: rejects only
    assert run_condense(cfg) == 0
    r = RunDir(tmp_path / "run")
    feats = _features(tmp_path / "run")
    assert len(feats) == 12 and "n00000000/corrupt.jpg" not in set(feats.image_id)
    assert pd.read_parquet(r.rejects).image_id.tolist() == ["n00000000/corrupt.jpg"]
    scores = pd.read_parquet(r.scores)
    assert _selected(tmp_path / "run") == _reference_selection(scores, feats, "kcenter", 2)
