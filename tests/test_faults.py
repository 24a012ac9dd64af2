"""SIGKILL from outside, at test size: the cases of benchmarks/faults.py.

Each case kills a real process of a running job (a scoring actor, a Ray Train worker, or a
``d2c`` driver joined to the test Ray), lets the job finish by Ray's retry or by a rerun of the
same command, and requires outputs identical to an uninterrupted run's.
"""

import json
import sys

import pytest

from conftest import ROOT, TINY_OVERRIDES, TINY_TRAIN

sys.path.insert(0, str(ROOT / "benchmarks"))

from faults import Faults, Sizes, metric_steps, training_differences  # noqa: E402


@pytest.fixture(scope="module")
def faults(ray_session, scorer_ckpt, tmp_path_factory):
    # 300 images in 15 score shards: a killer polling every 5 ms finds the pass between two shards
    sizes = Sizes(
        condense=[f"score.scorer={scorer_ckpt}", *TINY_OVERRIDES, "data.max_per_class=30", "score.shard_rows=20",
                  "score.batch_size=8", "score.num_timesteps=4"],
        train=[*TINY_TRAIN, "train.ckpt_every=5"],
        train_steps=30, kill_step=12,
        sweep=['sweep.grid={"select.k": [1, 3], "select.budget": [10]}', "sweep.fid_samples=10", *TINY_TRAIN,
               "train.steps=4", "eval.steps=2", "eval.reference_size=20"],
        min_shards=2,
    )
    return Faults(tmp_path_factory.mktemp("faults"), sizes)


def _check(outcome):
    assert outcome.killed != "nothing", outcome
    assert outcome.identical, outcome.differences


def test_killed_scoring_actor_is_restarted_and_scores_are_identical(faults):
    o = faults.scoring_actor()
    assert "ScoreActor" in o.killed
    _check(o)


def test_killed_condense_driver_reruns_to_identical_outputs(faults):
    o = faults.condense_driver()
    _check(o)
    log = (faults.out / "condense-driver.log").read_text()
    assert "[d2c] scores: resuming" in log  # the rerun kept the shards written before the kill


def test_killed_train_worker_restores_from_its_checkpoint(faults):
    o = faults.train_worker()
    assert "RayTrainWorker" in o.killed
    _check(o)
    tdir = faults.out / "train-worker"
    events = [json.loads(line) for line in (tdir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "restore"]
    assert events[1]["source"] == "Ray Train checkpoint (worker restart)"
    assert events[1]["step"] % 5 == 0 and 0 < events[1]["step"] < 30  # a checkpoint step before the end
    assert [e["torch_threads"] for e in events] == [1, 1]  # train.cpus_per_worker reaches the restarted worker too


def test_killed_train_driver_reruns_to_identical_weights(faults):
    _check(faults.train_driver())
    assert "resuming at step" in (faults.out / "train-driver.log").read_text()


def test_killed_sweep_driver_restores_to_the_same_results(faults):
    _check(faults.sweep_driver())
    assert "resuming" in (faults.out / "sweep-driver.log").read_text()


def test_training_differences_sees_duplicated_rows_and_other_weights(faults):
    """The comparison itself can fail: a duplicated metrics row and a changed weight are reported."""
    import shutil

    import torch

    from d2c.train.checkpoint import latest_checkpoint

    ref = faults.reference_train()
    copy = faults.out / "tampered"
    shutil.copytree(ref, copy)
    assert training_differences(ref, copy, 30) == []
    with open(copy / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "loss": 0.0}) + "\n")
    ckpt = latest_checkpoint(copy / "checkpoints")
    weights = ckpt / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    diffs = training_differences(ref, copy, 30)
    assert metric_steps(copy).count(30) == 2
    assert any("duplicated [30]" in d for d in diffs) and any("model weights differ" in d for d in diffs), diffs
    assert torch.equal(load_file(weights)[name], tensors[name])
