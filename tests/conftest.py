"""Shared test setup: offline, usage stats off, one Ray session for every Ray test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

#: Logical CPUs of the shared test Ray session (oversubscribes 2 cores on purpose: DESIGN.md).
TEST_RAY_CPUS = 4


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=TEST_RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()
