"""Starting or joining Ray with this project's safe defaults.

* Usage stats are off (``RAY_USAGE_STATS_ENABLED=0``) before Ray is imported anywhere.
* A local Ray binds its dashboard to 127.0.0.1 (Ray has no other access control).
* Inside ``ray job submit`` (``RAY_ADDRESS`` set) we join that cluster.
* A local Ray runs Ray Train without its preemption watcher (:data:`LOCAL_TRAIN_ENV`).
* Logs stay plain off a terminal (:func:`on_terminal`): no colour codes or Hugging Face bars
  (:data:`PLAIN_LOG_ENV`), no Ray Data progress bars (:func:`quiet_data_context`; the stages
  print :class:`app.stages.ProgressLine` instead), no per-report line from Ray Train
  (:func:`quiet_train_worker`, :data:`TRAIN_LOG_LEVEL`).
* :func:`check_shared_storage`: on a cluster whose work spans nodes, a node-local storage path
  is refused before any work (the decision itself is :func:`d2c.storage.local_storage_refusal`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from d2c.config import ConfigError, D2CConfig, DataConfig  # noqa: E402
from d2c.storage import local_storage_refusal, read_mounts, spans_nodes  # noqa: E402

#: Where a local Ray serves its dashboard.
LOCAL_DASHBOARD_HOST = "127.0.0.1"
#: Ray Train settings for a Ray that d2c starts on this machine (the controller reads them from
#: the driver's environment; a value the user exported wins). No cloud node of a local Ray can
#: be preempted, so the preemption watcher — one more worker process per run — has nothing to
#: watch; and the controller notices a finished run after at most this poll interval (Ray's
#: default is 2 s) — the quick demo runs Ray Train three times.
LOCAL_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

#: Set off a terminal before Ray starts (a value the user exported wins): the driver prints worker
#: logs without colour codes, and Hugging Face loads models without progress bars (a local Ray's
#: workers inherit both).
PLAIN_LOG_ENV = {"RAY_COLOR_PREFIX": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
#: Set before Ray starts or is joined (a value the user exported wins): Ray Train's controller
#: passes it on to its workers. Ray Train's print patch sends a worker's ``print`` to a logger and,
#: on a worker's wrapped stdout, to the stream too: every d2c line of a worker reached the driver twice.
TRAIN_PRINT_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
#: Level of Ray Train's own ``ray.train`` console lines (``RunConfig(logging_config=...)``):
#: resource requests, worker-group starts and one "Checkpoint successfully created" per checkpoint.
TRAIN_LOG_LEVEL = "WARNING"

log = logging.getLogger("d2c")


def on_terminal() -> bool:
    """True when this process's stderr is a terminal (progress bars and colours are for people)."""
    return sys.stderr.isatty()


def init_ray(cfg: Optional[D2CConfig] = None, include_dashboard: Optional[bool] = None) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` or start a local Ray; a no-op if Ray is up."""
    if ray.is_initialized():
        return
    if not on_terminal():
        for key, value in PLAIN_LOG_ENV.items():
            os.environ.setdefault(key, value)
    for key, value in TRAIN_PRINT_ENV.items():
        os.environ.setdefault(key, value)
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
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


def started_locally() -> bool:
    """True when this process started the Ray it is connected to (``ray.init()`` without an
    address): nothing can add nodes to it. False on a cluster joined by address or in a worker."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(ray.is_initialized() and node is not None and getattr(node, "head", False))


def quiet_data_context(progress: Optional[bool] = None, cfg: Optional[D2CConfig] = None) -> None:
    """Ray Data settings for our pipelines: progress bars only on a terminal (``progress`` None:
    :func:`on_terminal`), verbose logs off, and the Parquet reader ``cfg.data.parquet_reader``
    (the config default when ``cfg`` is None).

    Off a terminal Ray Data would log a status block every 10 s (driver) or stream bar redraws
    with cursor codes (Ray Train's data split); the stages print :class:`app.stages.ProgressLine`
    instead. Ray Data's INFO lines leave this process's console (its log files keep them).

    Every dataset captures the process's context when it is created, so this runs in each
    process that builds datasets (a stage's driver, a Tune trial) before its first read.
    """
    import ray.data  # configures the "ray.data" logger on first import

    if progress is None:
        progress = on_terminal()
    ctx = ray.data.DataContext.get_current()
    reader = cfg.data.parquet_reader if cfg is not None else DataConfig.model_fields["parquet_reader"].default
    ctx.use_datasource_v2 = reader == "v2"
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; the file handlers are not
            handler.setLevel(max(handler.level, logging.WARNING))
    if not progress:  # that choice is made here: drop Ray Data's one "Progress bars disabled" hint
        logging.getLogger("ray.data._internal.progress").addFilter(_no_progress_hint)


def _no_progress_hint(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def quiet_train_worker() -> None:
    """In a Ray Train worker: drop Ray Train's INFO line per ``ray.train.report`` ("Reporting
    training result N: ..."). Its logger is named by its file path, not ``ray.train``, so
    ``RunConfig(logging_config=...)`` does not reach it; warnings and errors still pass."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_logging_config():
    """``RunConfig(logging_config=...)`` for d2c's runs: Ray Train's console lines at :data:`TRAIN_LOG_LEVEL`."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=TRAIN_LOG_LEVEL)


def check_shared_storage(cfg: D2CConfig, paths: Mapping[str, Optional[str]]) -> None:
    """Refuse node-local storage paths when the stage's work spans several Ray nodes.

    Args:
        paths: config key → path or URI the stage writes (or that its workers read), e.g.
            ``{"run_dir": cfg.run_dir}``; None values are skipped.
    Raises:
        ConfigError: one paragraph per refused key (why, and the fix; ``ray.allow_local_storage``).
    """
    multi, reason = spans_nodes(ray.nodes(), ray.get_runtime_context().get_node_id())
    if not multi:
        return
    mounts = read_mounts()
    problems = [p for key, value in paths.items()
                if (p := local_storage_refusal(key, value, multi, reason, mounts, cfg.ray.allow_local_storage))]
    if problems:
        raise ConfigError("\n".join(problems))
