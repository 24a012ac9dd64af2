"""Starting or joining Ray with this project's safe defaults.

* Usage stats are off (``RAY_USAGE_STATS_ENABLED=0``) before Ray is imported anywhere.
* A local Ray binds its dashboard to 127.0.0.1 (Ray has no other access control).
* Inside ``ray job submit`` (``RAY_ADDRESS`` set) we join that cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from d2c.config import D2CConfig  # noqa: E402

#: Where a local Ray serves its dashboard.
LOCAL_DASHBOARD_HOST = "127.0.0.1"

log = logging.getLogger("d2c")


def init_ray(cfg: Optional[D2CConfig] = None, include_dashboard: Optional[bool] = None) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray; a no-op if Ray is up."""
    if ray.is_initialized():
        return
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    num_cpus = cfg.ray.num_cpus if cfg is not None else None
    ctx = ray.init(
        num_cpus=num_cpus,
        dashboard_host=LOCAL_DASHBOARD_HOST,
        include_dashboard=include_dashboard,
        logging_level=logging.WARNING,
    )
    # Ray's own helper processes that auto-connect must find THIS cluster, also when other
    # local Ray instances run on the machine.
    os.environ.setdefault("RAY_ADDRESS", ctx.address_info["gcs_address"])


def quiet_data_context(progress: bool = True) -> None:
    """Ray Data settings for our pipelines: progress bars on, verbose logs off."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    ctx.print_on_execution_start = False
