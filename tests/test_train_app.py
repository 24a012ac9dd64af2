"""`d2c train` on Ray Train: multi-worker, resume, scorer from scratch (killed workers: test_faults.py)."""

import json

import pytest
import torch

from app.cli import main
from app.train import ensure_embedded_scorer, run_train, worker_resources
from conftest import ROOT, TINY_TRAIN
from d2c.config import ConfigError, load_config
from d2c.select.scorer import load_scorer
from d2c.train.checkpoint import latest_checkpoint, load_checkpoint, load_model


def _train_cfg(run, train_dir, *extra):
    return load_config(ROOT / "configs" / "embedded.yaml",
                       [f"run_dir={run}", f"condensed={run / 'condensed'}", f"train_dir={train_dir}", *TINY_TRAIN, *extra])


def _metrics(train_dir):
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_then_resume(condensed_run, tmp_path, capsys):
    run, _ = condensed_run
    tdir = tmp_path / "train"
    assert run_train(_train_cfg(run, tdir, "train.steps=4", "train.num_workers=2")) == 0
    ckpt = latest_checkpoint(tdir / "checkpoints")
    assert ckpt.name == "step-0000004"
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["dit_kwargs"]["text_dim"] == 384 and meta["dit_kwargs"]["proj_dim"] == 1280
    assert [m["step"] for m in _metrics(tdir)] == [1, 2, 3, 4]
    first = _metrics(tdir)
    assert all(-1 <= m["loss_proj"] <= 1 and m["loss_proj"] != 0 and m["loss_diff"] > 0 for m in first)  # -cos term is live
    # rerun with more steps: resumes at step 4 (same optimizer/EMA/RNG state), continues to 6 —
    # here with the sync-free step and compiled blocks (the GPU settings; aot_eager on a CPU)
    assert run_train(_train_cfg(run, tdir, "train.steps=6", "train.num_workers=2", "train.sync_free=true",
                                "train.compile=aot_eager")) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    assert [m["step"] for m in _metrics(tdir)] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(m[k], float) for m in _metrics(tdir)[4:] for k in ("loss", "grad_norm", "skipped"))
    state = load_checkpoint(latest_checkpoint(tdir / "checkpoints"))
    assert state["trainer"]["step"] == 6 and len(state["trainer"]["optimizer"]["state"]) > 0
    # running again at the same target does nothing
    assert run_train(_train_cfg(run, tdir, "train.steps=6")) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_at_the_end_of_an_epoch(condensed_run, tmp_path):
    """A checkpoint taken on an epoch's last batch (30 rows, batch 8: 3 batches an epoch) resumes
    into the next epoch; its resumed epoch has no batch left to train, and that is not a stall."""
    run, _ = condensed_run
    tdir = tmp_path / "train"
    assert run_train(_train_cfg(run, tdir, "train.steps=3", "train.ckpt_every=3")) == 0
    state = load_checkpoint(latest_checkpoint(tdir / "checkpoints"))
    assert state["trainer"]["data"] == {"epoch": 0, "index": 3}
    assert run_train(_train_cfg(run, tdir, "train.steps=5", "train.ckpt_every=3")) == 0
    assert [m["step"] for m in _metrics(tdir)] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m in _metrics(tdir)] == [0, 0, 0, 1, 1]


def test_worker_resources_follow_the_config():
    cfg = load_config(ROOT / "configs" / "embedded.yaml", ["train.cpus_per_worker=3"])
    assert worker_resources(cfg) == {"CPU": 3.0}
    gpu = load_config(ROOT / "configs" / "embedded.yaml", ["train.use_gpu=true"])
    assert worker_resources(gpu) == {"CPU": 1.0, "GPU": 1.0}


def test_shape_mismatch_fails_before_training(condensed_run, tmp_path):
    run, _ = condensed_run
    with pytest.raises(ConfigError, match="does not fit the model"):
        run_train(_train_cfg(run, tmp_path / "t", "train.steps=2", "model.patch_size=4"))
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_embedded_scorer_is_trained_once_and_loads(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(ROOT / "configs" / "embedded.yaml",
                      [f"run_dir={tmp_path}", "data.max_per_class=4", "score.scorer_train_steps=3", "model.patch_size=8",
                       "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1", "train.batch_size=8"])
    path = ensure_embedded_scorer(cfg)
    assert "training the embedded scorer from scratch" in capsys.readouterr().out
    scorer = load_scorer(str(path))
    assert scorer.kind == "d2c-checkpoint" and scorer.num_classes == 10
    assert scorer.model.text_dim is None and scorer.model.proj_dim is None
    model, meta = load_model(latest_checkpoint(path))
    assert meta["step"] == 3 and meta["arch"] == "dit"
    assert ensure_embedded_scorer(cfg) == path
    assert "reusing the cached embedded scorer" in capsys.readouterr().out
    x = torch.zeros(2, 1, 32, 32)
    assert scorer.model(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 1])).shape == (2, 1, 32, 32)


def test_cli_train_requires_condensed(capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "embedded.yaml"), "train.steps=1"]) == 2
    assert "condensed is required" in capsys.readouterr().err
