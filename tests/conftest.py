"""Shared test setup: offline, usage stats off, one Ray session for every Ray test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

#: Logical CPUs of the shared test Ray session (oversubscribes 2 cores on purpose: docs/design.md).
TEST_RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    from app.ray_session import LOCAL_TRAIN_ENV, TRAIN_PRINT_ENV

    for key, value in {**LOCAL_TRAIN_ENV, **TRAIN_PRINT_ENV}.items():  # as init_ray sets them for a local Ray
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


#: The test scorer: hidden 64 ≥ the 64 values of an 8×8 patch, so it can represent ε̂ ≈ x_t.
SCORER_MODEL = dict(TINY_MODEL, hidden_size=64)
#: Steps the test scorer trains: enough to pass the scorer quality gate with a wide margin.
TEST_SCORER_STEPS = 150


def train_tiny_scorer(ckpt_dir, steps: int = TEST_SCORER_STEPS, rows: int = 2000):
    """A tiny DiT ε-scorer trained with the product's Trainer on Fashion-MNIST (padded to 32 px),
    saved in our checkpoint format; returns the checkpoint path."""
    import numpy as np
    import torch

    from d2c.config import TrainConfig
    from d2c.data.fashion_mnist import load_fashion_mnist
    from d2c.data.preprocess import pad_to, to_model_tensor
    from d2c.diffusion.ddpm import DDPMSchedule
    from d2c.models.build import build_model
    from d2c.train.checkpoint import checkpoint_meta, save_checkpoint
    from d2c.train.objective import D2CObjective
    from d2c.train.trainer import Trainer

    torch.manual_seed(0)
    images, labels = load_fashion_mnist(FMNIST, "train")
    x = to_model_tensor(np.stack([pad_to(im[..., None], 32) for im in images[-rows:]]))
    y = torch.as_tensor(labels[-rows:])
    model = build_model(SCORER_MODEL)
    train = TrainConfig(lr=2e-3, ema_decay=0.99, clip_norm=1.0, seed=0)
    trainer = Trainer(model, D2CObjective("dit", DDPMSchedule(), proj_coeff=0.0, learn_sigma=False), train)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, rows, (64,), generator=gen)
        trainer.train_step({"latent": x[idx], "label": y[idx]})
    meta = checkpoint_meta("dit", SCORER_MODEL, {"arch": "dit", "prediction": "eps", "num_timesteps": 1000}, {})
    return str(save_checkpoint(ckpt_dir, steps, trainer.module, trainer.ema.model, trainer.state_dict(), meta))


@pytest.fixture(scope="session")
def scorer_ckpt(tmp_path_factory):
    """A tiny trained DiT scorer in our checkpoint format (the last 2,000 training images, which
    the tiny test runs never list, so the gate's held-out slice is unseen)."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return train_tiny_scorer(tmp_path_factory.mktemp("scorer") / "checkpoints")


#: The embedded config at test size: 12 images per class, 3 selected per class (flips: ImageNet's setting).
TINY_OVERRIDES = ["data.max_per_class=12", "select.budget=30", "select.k=3", "score.num_timesteps=2", "score.batch_size=16",
                  "score.forward_rows=32", "score.shard_rows=40", "attach.vision.batch_size=16", "model.patch_size=8",
                  "attach.flip=true", "train.hflip=true"]
#: A training run at test size on a tiny condensed set.
TINY_TRAIN = ["model.patch_size=8", "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1",
              "model.proj_hidden_dim=32", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2"]


def tiny_cfg(run_dir, scorer, *extra):
    """The embedded config at test size (:data:`TINY_OVERRIDES`)."""
    from d2c.config import load_config

    return load_config(ROOT / "configs" / "embedded.yaml",
                       [f"run_dir={run_dir}", f"score.scorer={scorer}", *TINY_OVERRIDES, *extra])


@pytest.fixture(scope="session")
def condensed_run(ray_session, scorer_ckpt, tmp_path_factory):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from app.condense import run_condense

    run = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(run, scorer_ckpt)
    assert run_condense(cfg) == 0
    return run, cfg
