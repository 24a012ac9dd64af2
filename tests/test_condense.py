"""`d2c condense` on Ray Data, end to end on real Fashion-MNIST rows (tiny sizes)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from app.condense import run_condense
from d2c.condense import RunDir
from d2c.attach.text import load_text_embeddings
from d2c.config import ConfigError, load_config
from d2c.data.condensed import read_condensed
from d2c.diffusion.ddpm import DDPMSchedule
from d2c.models.build import build_model
from d2c.select.interval import select_table
from d2c.select.score import difficulty_scores, stratified_timesteps
from d2c.train.checkpoint import checkpoint_meta, load_model, save_checkpoint
from conftest import TINY_MODEL, tiny_cfg as _cfg

ROOT = Path(__file__).resolve().parents[1]

def test_outputs_exist_and_match_the_contract(condensed_run):
    run, cfg = condensed_run
    r = RunDir(run)
    scores = pd.read_parquet(r.scores)
    assert len(scores) == 120 and list(scores.columns) == ["image_id", "label", "score", "score_t"]
    assert scores.image_id.is_unique and set(scores.label) == set(range(10))
    assert all(len(t) == 2 for t in scores.score_t)
    np.testing.assert_allclose(scores.score, [np.mean(t) for t in scores.score_t], rtol=1e-6)
    sel = pd.read_parquet(r.selection / "selection.parquet")
    assert len(sel) == 30 and (sel.groupby("label").size() == 3).all()
    # the selection equals interval sampling recomputed independently from RUN/scores
    ref, _ = select_table(scores[["image_id", "label", "score"]], budget=30, method="d2c", k=3)
    assert sel.image_id.tolist() == ref.image_id.tolist()
    assert sel["rank"].tolist() == [0, 3, 6] * 10
    data = read_condensed(r.condensed)
    assert sorted(data["image_id"]) == sorted(sel.image_id)
    assert data["latent"].shape == (30, 1, 32, 32) and data["latent_flip"].shape == (30, 1, 32, 32)
    assert data["visual"].shape == (30, 16, 1280) and data["visual"].dtype == np.float16
    # flip consistency: the flipped latent is the mirror image of the latent (identity autoencoder)
    np.testing.assert_array_equal(data["latent_flip"], data["latent"][..., ::-1])
    assert not np.allclose(data["visual_flip"], data["visual"])
    emb, mask, names, _ = load_text_embeddings(r.text)
    assert emb.shape == (10, 16, 384) and mask.shape == (10, 16) and names[0] == "T-shirt/top"
    manifest = json.loads(r.manifest.read_text())
    assert manifest["rows"] == {"listed": 120, "rejected": 0, "scored": 120, "selected": 30}
    assert manifest["per_class"][0]["k_used"] == 3 and manifest["clamped_classes"] == []
    assert manifest["versions"]["ray"] == "2.60.0"


def test_scores_equal_a_plain_pytorch_computation(condensed_run, scorer_ckpt):
    run, cfg = condensed_run
    from d2c.data.fashion_mnist import list_fashion_mnist
    from d2c.data.preprocess import pad_to, to_model_tensor

    rows = list_fashion_mnist(None, "train", 12)[:20]
    x = to_model_tensor(np.stack([pad_to(r["image"], 32) for r in rows]))
    model, _ = load_model(scorer_ckpt)
    model.eval()
    ref = difficulty_scores(model, x, torch.tensor([r["label"] for r in rows]), [r["image_id"] for r in rows],
                            DDPMSchedule().alphas_cumprod, stratified_timesteps(2), seed=cfg.score.seed).mean(1)
    got = pd.read_parquet(RunDir(run).scores).set_index("image_id").loc[[r["image_id"] for r in rows], "score"]
    np.testing.assert_allclose(got.to_numpy(), ref.numpy(), rtol=1e-5)


def test_rerun_is_a_noop_and_changed_scoring_is_refused(condensed_run, capsys, scorer_ckpt):
    run, cfg = condensed_run
    before = {p: p.read_bytes() for p in sorted(RunDir(run).scores.glob("*.parquet"))}
    assert run_condense(cfg) == 0
    out = capsys.readouterr().out
    assert "reused, nothing to score" in out and "selection: complete" in out and "attach: complete" in out
    assert before == {p: p.read_bytes() for p in sorted(RunDir(run).scores.glob("*.parquet"))}
    with pytest.raises(ConfigError, match="num_timesteps: 2 -> 3"):
        run_condense(_cfg(run, scorer_ckpt, "score.num_timesteps=3"))


def _decoded_batch(rows, rejects=None):
    """Fashion-MNIST records as the decode stage hands them to the scoring actors (padded to 32 px)."""
    from d2c.data.preprocess import pad_to

    n = len(rows)
    return dict(pos=np.arange(n), shard=np.zeros(n, np.int64), image_id=np.array([r["image_id"] for r in rows], object),
                label=np.array([r["label"] for r in rows]), reject=np.array(rejects or [""] * n, object),
                image=np.stack([pad_to(r["image"], 32) for r in rows]))


def test_score_precision_and_compile_keep_the_scores_and_are_part_of_the_settings(condensed_run, scorer_ckpt):
    """score.precision=bf16 runs the scorer under autocast (fp32 = exactly the scores on disk);
    score.compile compiles its blocks (aot_eager here: capture without code generation)."""
    from app.condense import ScoreActor
    from d2c.data.fashion_mnist import list_fashion_mnist

    run, cfg = condensed_run
    batch = _decoded_batch(list_fashion_mnist(None, "train", 12)[:48])
    fp32 = ScoreActor(cfg.to_dict(), scorer_ckpt)(batch)
    on_disk = pd.read_parquet(RunDir(run).scores).set_index("image_id").loc[list(batch["image_id"]), "score"]
    np.testing.assert_array_equal(fp32["score"], on_disk.to_numpy())
    bf16 = ScoreActor(_cfg(run, scorer_ckpt, "score.precision=bf16").to_dict(), scorer_ckpt)(batch)
    assert bf16["score_t"].dtype == np.float32 and np.isfinite(bf16["score_t"]).all()
    assert not np.array_equal(bf16["score_t"], fp32["score_t"])  # autocast took effect
    rel = np.abs(bf16["score"] - fp32["score"]) / fp32["score"]
    assert rel.max() < 0.02, rel.max()
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(bf16["score"]), rank(fp32["score"]))[0, 1] > 0.99  # Spearman
    with pytest.raises(ConfigError, match="precision: None -> 'bf16'"):
        run_condense(_cfg(run, scorer_ckpt, "score.precision=bf16"))
    compiled = ScoreActor(_cfg(run, scorer_ckpt, "score.compile=aot_eager").to_dict(), scorer_ckpt)
    assert all(b._compiled_call_impl is not None for b in compiled.scorer.model.blocks)
    np.testing.assert_allclose(compiled(batch)["score_t"], fp32["score_t"], rtol=1e-5)
    with pytest.raises(ConfigError, match="compile: None -> 'aot_eager'"):
        run_condense(_cfg(run, scorer_ckpt, "score.compile=aot_eager"))


def test_fp16_overflow_in_the_scorer_is_refused_naming_the_fix(scorer_ckpt, tmp_path):
    """Outputs beyond fp16's range (65504) give inf under fp16 autocast: refused, not written as NaN scores."""
    from app.condense import ScoreActor
    from d2c.data.fashion_mnist import list_fashion_mnist

    model, meta = load_model(scorer_ckpt)
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(1e6)  # fp32 outputs ~1e5, squared losses ~1e10: finite
    big = str(save_checkpoint(tmp_path / "checkpoints", 0, model, model, {"step": 0}, meta))
    batch = _decoded_batch(list_fashion_mnist(None, "train", 1)[:4], rejects=["", "", "", "bad"])
    fp32 = ScoreActor(_cfg(tmp_path / "a", big).to_dict(), big)(batch)
    assert np.isfinite(fp32["score_t"][:3]).all() and np.isnan(fp32["score_t"][3]).all()  # the reject stays NaN
    with pytest.raises(ConfigError, match=r"non-finite losses for 3 image\(s\).*score.precision=fp16; fp16 overflowed.*bf16"):
        ScoreActor(_cfg(tmp_path / "b", big, "score.precision=fp16").to_dict(), big)(batch)


def test_deterministic_across_actors_batches_and_a_killed_run(condensed_run, scorer_ckpt, tmp_path):
    run, _ = condensed_run
    ref = pd.read_parquet(RunDir(run).scores).sort_values("image_id").reset_index(drop=True)
    other = tmp_path / "other"
    cfg = _cfg(other, scorer_ckpt, "score.batch_size=7", "score.min_actors=2", "score.max_actors=2")
    assert run_condense(cfg) == 0
    got = pd.read_parquet(RunDir(other).scores).sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["image_id", "label"]], ref[["image_id", "label"]])
    np.testing.assert_array_equal(got.score, ref.score)  # bitwise: every forward pass has 32 rows
    # a run killed mid-scoring: drop one shard file, rerun, get identical files back
    victim = RunDir(other).score_shard(1)
    original = victim.read_bytes()
    victim.unlink()
    (RunDir(other).scores / "_SUCCESS").unlink()
    assert run_condense(cfg) == 0
    assert victim.read_bytes() == original
    sel_a = pd.read_parquet(RunDir(run).selection / "selection.parquet")
    sel_b = pd.read_parquet(RunDir(other).selection / "selection.parquet")
    assert sel_a.image_id.tolist() == sel_b.image_id.tolist()


def _imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / f"n0000000{c}"
        d.mkdir(parents=True)
        if c == 2:
            continue  # a planted empty class
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    (root / "n00000000" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def test_corrupt_image_and_empty_class(ray_session, tmp_path):
    data = tmp_path / "data"
    _imagefolder(data)
    model = dict(TINY_MODEL, in_channels=3, num_classes=3)
    torch.manual_seed(0)
    net = build_model(model)
    ckpt = save_checkpoint(tmp_path / "scorer", 0, net, net, {"step": 0},
                           checkpoint_meta("dit", model, {"arch": "dit", "num_timesteps": 1000}, {}))
    overrides = [f"run_dir={tmp_path / 'run'}", f"score.scorer={ckpt}", "data.source=imagefolder", f"data.path={data}",
                 "data.channels=3", "data.preprocess=center_crop", "select.budget=6", "select.k=2", "score.num_timesteps=2",
                 "model.patch_size=8", "attach.vision.batch_size=8", "attach.text.encoder=none", "model.use_text=false",
                 "score.gate_rows=0"]  # an untrained scorer on noise images: this test is about rejects, not ranking
    cfg = load_config(ROOT / "configs" / "embedded.yaml", overrides)
    assert run_condense(cfg) == 0
    r = RunDir(tmp_path / "run")
    rejects = pd.read_parquet(r.rejects)
    assert rejects.image_id.tolist() == ["n00000000/corrupt.jpg"] and "corrupt" in rejects.reason[0]
    manifest = json.loads(r.manifest.read_text())
    assert manifest["rows"]["rejected"] == 1 and manifest["rows"]["scored"] == 12
    assert manifest["per_class"][2]["note"] == "empty class"
    assert any("empty" in n for n in manifest["notes"])
    assert len(pd.read_parquet(r.selection / "selection.parquet")) == 4
    with pytest.raises(ConfigError, match="empty"):
        run_condense(load_config(ROOT / "configs" / "embedded.yaml", overrides + ["select.shortfall=error", f"run_dir={tmp_path / 'r2'}"]))


def test_bad_budget_fails_before_work(ray_session, scorer_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="select.budget=35 does not split evenly"):
        run_condense(_cfg(tmp_path, scorer_ckpt, "select.budget=35"))
    assert not (tmp_path / "scores").exists()


def test_reuse_scores_for_a_baseline(condensed_run, tmp_path, capsys, scorer_ckpt):
    run, _ = condensed_run
    cfg = _cfg(tmp_path / "random", "null", f"score.reuse_from={run}", "select.method=random",
               "attach.vision.encoder=none", "attach.text.encoder=none", "model.use_text=false", "model.use_visual=false")
    assert run_condense(cfg) == 0
    assert "reusing" in capsys.readouterr().out
    r = RunDir(tmp_path / "random")
    assert not r.scores.exists()
    sel = pd.read_parquet(r.selection / "selection.parquet")
    assert len(sel) == 30 and set(sel.method) == {"random"}
    data = read_condensed(r.condensed)
    assert set(data) == {"image_id", "label", "latent", "latent_flip"}
    manifest = json.loads(r.manifest.read_text())
    assert manifest["scores_dir"] == str(RunDir(run).scores) and manifest["scorer"] == scorer_ckpt
    with pytest.raises(ConfigError, match="scored another listing"):
        run_condense(_cfg(tmp_path / "x", scorer_ckpt, f"score.reuse_from={run}", "data.max_per_class=11"))
