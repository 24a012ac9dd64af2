"""Settings that cannot work are refused before any compute, by name; nothing waits forever.

Each case here hung or ran on at commit 7cdecc4: two Train workers on a Ray whose CPUs they fill,
a condensed set smaller than one batch, a budget larger than the dataset, an interval that no
class can hold under ``shortfall=error``, and a scorer that has learned nothing.
"""

import contextlib
import json
import signal

import numpy as np
import pytest
import torch

from conftest import TEST_RAY_CPUS, TINY_MODEL, tiny_cfg
from d2c.config import ConfigError


@contextlib.contextmanager
def within(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: this would hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- placement ---------------------------------------------------------------------------------


def test_placement_arithmetic_against_hand_counts():
    from app.resources import Demand, placement_problems

    keys = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu")
    two = [Demand("Ray Train workers", 2, 1.0, 0.0, keys)]
    node2 = [{"CPU": 2.0}]
    problems = placement_problems(two, 1.0, "its Parquet read task", node2)
    assert len(problems) == 1 and "holds 3 CPUs at once" in problems[0] and "Ray has 2" in problems[0]
    assert "train.num_workers" in problems[0] and "ray.num_cpus" in problems[0]
    assert placement_problems(two, 1.0, "x", [{"CPU": 3.0}]) == []
    assert placement_problems(two, 1.0, "x", [{"CPU": 2.0}, {"CPU": 2.0}]) == []  # two nodes
    # one worker larger than every node, although the sum fits
    big = [Demand("Ray Train workers", 1, 4.0, 0.0, keys)]
    assert "more than any node has" in placement_problems(big, 0.0, "", [{"CPU": 3.0}, {"CPU": 3.0}])[0]
    gpu = [Demand("scoring actors", 2, 1.0, 1.0, ("score.min_actors", "score.num_cpus", "score.num_gpus"))]
    out = placement_problems(gpu, 0.25, "decode", [{"CPU": 16.0, "GPU": 1.0}])
    assert any("holds 2 GPUs" in p and "score.num_gpus" in p for p in out)


def test_train_workers_that_fill_the_cpus_are_refused_not_hung(condensed_run, tmp_path):
    """Finding 1: workers holding every CPU starve the Parquet read task forever."""
    from app.train import run_train

    run, cfg = condensed_run
    bad = tiny_cfg(run, cfg.score.scorer, f"condensed={run / 'condensed'}", f"train_dir={tmp_path / 'train'}",
                   f"train.num_workers={TEST_RAY_CPUS // 2}", "train.cpus_per_worker=2", "train.steps=2")
    with within(60), pytest.raises(ConfigError) as err:
        run_train(bad)
    msg = str(err.value)
    assert f"holds {TEST_RAY_CPUS + 1} CPUs at once" in msg and f"Ray has {TEST_RAY_CPUS}" in msg
    assert "train.num_workers" in msg and "train.cpus_per_worker" in msg
    assert not (tmp_path / "train" / "checkpoints").exists()


def test_actor_pool_larger_than_the_cluster_is_refused_before_scoring(ray_session, scorer_ckpt, tmp_path):
    from app.condense import run_condense

    with within(60), pytest.raises(ConfigError, match="score.min_actors"):
        run_condense(tiny_cfg(tmp_path, scorer_ckpt, f"score.min_actors={TEST_RAY_CPUS}", f"score.max_actors={TEST_RAY_CPUS}"))
    assert not (tmp_path / "scores").exists()


# -- a condensed set smaller than a batch ------------------------------------------------------


def test_condensed_set_smaller_than_a_batch_is_refused_by_name(condensed_run, tmp_path):
    """Finding 2: 30 rows at batch 64 gave epochs with no batch, and the loop spun forever."""
    from app.train import run_train

    run, cfg = condensed_run
    small = tiny_cfg(run, cfg.score.scorer, f"condensed={run / 'condensed'}", f"train_dir={tmp_path / 'train'}",
                     "train.batch_size=64", "train.steps=2")
    with within(60), pytest.raises(ConfigError, match=r"has 30 rows, fewer than one batch.*train.batch_size to at most 30"):
        run_train(small)


class _Shard:
    """A stand-in for a Ray Data shard: ``iter_torch_batches`` over fixed rows."""

    def __init__(self, rows: int):
        self.rows = {"key": torch.arange(rows), "label": torch.zeros(rows, dtype=torch.long)}

    def iter_torch_batches(self, batch_size, **kw):
        yield self.rows


def test_an_epoch_without_a_batch_raises_instead_of_spinning():
    from app.train import ShardBatches

    batches = ShardBatches(_Shard(5), per_worker=8, seed=0, rank=0, cache=True)
    with within(10), pytest.raises(RuntimeError, match="5 rows, fewer than one batch of 8"):
        next(iter(batches.epoch(0)))
    full = ShardBatches(_Shard(17), per_worker=8, seed=0, rank=0, cache=True)
    assert [len(b["key"]) for b in full.epoch(0)] == [8, 8]


def test_check_batch_fits():
    from d2c.train.loop import check_batch_fits

    check_batch_fits(64, 64, 1, "x")
    check_batch_fits(64, 64, 2, "x")
    with pytest.raises(ConfigError, match="at most 50"):
        check_batch_fits(50, 64, 1, "x")
    with pytest.raises(ConfigError, match="at most train.num_workers=3"):
        check_batch_fits(3, 8, 4, "x")


# -- selections that cannot succeed -------------------------------------------------------------


def test_check_feasible_against_hand_counts():
    from d2c.select.interval import SelectionError, check_feasible

    assert check_feasible([100, 100], 20, "d2c", 10, "error") == 10  # (10-1)*10+1 = 91 <= 100
    with pytest.raises(SelectionError, match=r"1 class\(es\) hold fewer than \(n-1\)\*k\+1 = 91.*class 1: 90"):
        check_feasible([100, 90], 20, "d2c", 10, "error")
    assert check_feasible([100, 90], 20, "d2c", 10, "clamp") == 10
    assert check_feasible([100, 10], 20, "random", 10, "error") == 10
    with pytest.raises(SelectionError, match="fewer than n=10 images"):
        check_feasible([100, 9], 20, "random", 10, "error")
    with pytest.raises(SelectionError, match="exceeds the 190 images listed.*at most 190"):
        check_feasible([100, 90], 200, "d2c", 1, "clamp")


def test_budget_larger_than_the_data_is_refused_before_any_work(ray_session, tmp_path, monkeypatch):
    """Finding 5: select.budget=100000000 trained a scorer for minutes before anything said no."""
    from app.condense import run_condense

    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_cfg(tmp_path / "run", "null", "select.budget=100000000")
    with within(60), pytest.raises(ConfigError, match=r"select.budget=100000000 exceeds the 120 images listed"):
        run_condense(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "scores").exists()


def test_interval_too_long_for_a_class_under_shortfall_error_is_refused_before_scoring(ray_session, scorer_ckpt, tmp_path):
    from app.condense import run_condense

    with within(60), pytest.raises(ConfigError, match=r"select.shortfall=error but 10 class\(es\).*\(n-1\)\*k\+1 = 13"):
        run_condense(tiny_cfg(tmp_path, scorer_ckpt, "select.k=6", "select.shortfall=error"))
    assert not (tmp_path / "scores").exists()


# -- the scorer quality gate -------------------------------------------------------------------


def test_an_untrained_scorer_is_refused_before_scoring(ray_session, tmp_path):
    """Finding 3: an adaLN-Zero scorer that learned nothing predicts ≈0, so every score is ≈1."""
    from app.condense import run_condense
    from d2c.models.build import build_model
    from d2c.train.checkpoint import checkpoint_meta, save_checkpoint

    torch.manual_seed(0)
    net = build_model(TINY_MODEL)
    ckpt = save_checkpoint(tmp_path / "scorer", 0, net, net, {"step": 0},
                           checkpoint_meta("dit", TINY_MODEL, {"arch": "dit", "num_timesteps": 1000}, {}))
    with within(120), pytest.raises(ConfigError) as err:
        run_condense(tiny_cfg(tmp_path / "run", str(ckpt)))
    msg = str(err.value)
    assert "not clearly better than predicting zero noise" in msg and "score.gate_max_ratio=0.5" in msg
    ratio = float(msg.split("(ratio ")[1].split(" ")[0])
    assert 0.9 < ratio < 1.1  # ≈ the trivial predictor
    assert not list((tmp_path / "run" / "scores").glob("*.parquet"))


def test_a_trained_scorer_passes_and_the_manifest_records_its_heldout_loss(condensed_run):
    run, cfg = condensed_run
    gate = json.loads((run / "manifest.json").read_text())["scorer_gate"]
    assert gate["passed"] and gate["rows"] == 12  # 10 % of the 120 listed images
    assert gate["ratio"] < 0.3 and abs(gate["trivial_loss"] - 1.0) < 0.05
    assert gate["heldout_loss"] == pytest.approx(gate["ratio"] * gate["trivial_loss"])


def test_holdout_positions_spread_over_the_listing():
    from d2c.select.gate import holdout_positions

    pos = holdout_positions(1000, 10)
    assert pos.tolist() == list(range(0, 1000, 100))
    assert holdout_positions(1000, 500).tolist() == list(range(0, 1000, 10))  # at most 10 % of the rows
    assert holdout_positions(5, 10).tolist() == [0]
    assert holdout_positions(5, 0).size == 0 and holdout_positions(0, 10).size == 0
    assert len(np.unique(holdout_positions(60000, 256))) == 256
