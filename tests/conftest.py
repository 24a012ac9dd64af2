"""Shared test setup: offline, usage stats off, one Ray session for every Ray test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

#: Logical CPUs of the shared test Ray session (oversubscribes 2 cores on purpose: DESIGN.md).
TEST_RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    from app.ray_session import LOCAL_TRAIN_ENV

    for key, value in LOCAL_TRAIN_ENV.items():  # as init_ray sets them for a local Ray
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(num_cpus=TEST_RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


TINY_MODEL = dict(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                  class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


@pytest.fixture(scope="session")
def scorer_ckpt(tmp_path_factory):
    """A tiny DiT scorer in our checkpoint format (random weights: enough to rank images)."""
    import torch

    from d2c.models.build import build_model
    from d2c.train.checkpoint import checkpoint_meta, save_checkpoint

    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    for p in model.parameters():  # adaLN-Zero starts at a constant output; perturb it
        if p.requires_grad:
            p.data.add_(0.02 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("scorer") / "checkpoints"
    meta = checkpoint_meta("dit", TINY_MODEL, {"arch": "dit", "prediction": "eps", "num_timesteps": 1000}, {})
    return str(save_checkpoint(d, 0, model, model, {"step": 0}, meta))


def tiny_cfg(run_dir, scorer, *extra):
    """The embedded config at test size: 12 images per class, 3 selected per class."""
    from d2c.config import load_config

    return load_config(
        ROOT / "configs" / "embedded.yaml",
        [f"run_dir={run_dir}", f"score.scorer={scorer}", "data.max_per_class=12", "select.budget=30", "select.k=3",
         "score.num_timesteps=2", "score.batch_size=16", "score.forward_rows=32", "score.shard_rows=40", "attach.vision.batch_size=16",
         "model.patch_size=8", *extra],
    )


@pytest.fixture(scope="session")
def condensed_run(ray_session, scorer_ckpt, tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from app.condense import run_condense

    run = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(run, scorer_ckpt)
    assert run_condense(cfg) == 0
    return run, cfg
