"""Custom metrics of the d2c stages on the Ray dashboard (``ray.util.metrics``).

    from app.metrics import record
    record("score", "images_scored_per_s", rows / seconds)
    record("select", "rows_selected", len(selection))
    record("train", "train_loss", loss)

Every metric carries one tag, ``stage`` (``score``, ``features``, ``select``, ``attach``, ``train``,
``evaluate``, ``sweep``). Ray exports them from each process that records them — the
job's driver, a Ray Data actor, a Ray Train worker — to the node's Prometheus endpoint,
where they appear with Ray's ``ray_`` prefix, e.g.::

    ray_d2c_images_scored_per_s{stage="score", ...}
    ray_d2c_rows_selected_total{stage="select", ...}

(Grafana / the dashboard's Metrics view query these names; see docs/cluster.md.)

Outside a Ray driver or worker (``ray.is_initialized()`` is False: a unit test, ``d2c``
library use without Ray) :func:`record` is a no-op that returns False, so the method code
can call it unconditionally.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

#: Prefix of every d2c metric name (Ray adds its own ``ray_`` in the Prometheus export).
METRIC_PREFIX = "d2c_"
#: The one tag every d2c metric has.
STAGE_TAG = "stage"


@dataclass(frozen=True)
class MetricSpec:
    """One custom metric: its Ray type and the description shown by Prometheus/Grafana."""

    kind: Literal["gauge", "counter"]
    description: str


#: The metrics d2c records, by the short name :func:`record` takes.
METRICS: dict[str, MetricSpec] = {
    "images_scored_per_s": MetricSpec(
        "gauge", "Images per second through encode + difficulty scoring (the scoring actor pool)"),
    "images_encoded_per_s": MetricSpec(
        "gauge", "Images per second through the pooled visual features of kcenter/herding (the feature actor pool)"),
    "rows_selected": MetricSpec(
        "counter", "Rows kept by the selection (interval sampling or a baseline), summed over classes"),
    "train_images_per_s": MetricSpec(
        "gauge", "Training images per second over all Ray Train workers"),
    "train_loss": MetricSpec(
        "gauge", "Training loss L = L_diff + lambda * L_proj at the last logged step"),
}

_lock = threading.Lock()
#: Per-process metric objects (a Ray metric is registered once per process and name).
_registered: dict[str, Any] = {}


def metric_name(name: str) -> str:
    """The registered Ray metric name of a d2c metric (``d2c_<name>``)."""
    _spec(name)
    return METRIC_PREFIX + name


def _spec(name: str) -> MetricSpec:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown d2c metric {name!r}; known metrics: {', '.join(sorted(METRICS))}") from None


def _metric(name: str, spec: MetricSpec):
    from ray.util.metrics import Counter, Gauge

    with _lock:
        metric = _registered.get(name)
        if metric is None:
            cls = Gauge if spec.kind == "gauge" else Counter
            metric = cls(METRIC_PREFIX + name, description=spec.description, tag_keys=(STAGE_TAG,))
            _registered[name] = metric
        return metric


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency of app/
        return False
    return ray.is_initialized()


def record(stage: str, name: str, value: Any) -> bool:
    """Record one value of the d2c metric ``name`` for ``stage``.

    A gauge (``*_per_s``, ``train_loss``) takes the value as its new reading; a counter
    (``rows_selected``) is incremented by it.

    Args:
        stage: the stage's name, exported as the ``stage`` tag (non-empty).
        name: one of :data:`METRICS`.
        value: a real number (Python, NumPy or a 1-element tensor). Counters take finite
            values >= 0; an increment of 0 records nothing.

    Returns:
        True if the value went to Ray's metrics, False outside Ray (a no-op).

    Raises:
        ValueError: unknown metric name, empty stage, or a negative / non-finite counter increment.
        TypeError: a value that is not a real number.
    """
    spec = _spec(name)
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"metric {name!r}: stage must be a non-empty string, got {stage!r}")
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"metric {name!r}: value must be a real number, got {type(value).__name__}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r}: value must be a real number, got {type(value).__name__}") from None
    if spec.kind == "counter":
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"counter {name!r} takes finite increments >= 0, got {number!r}")
        if number == 0:
            return _ray_running()
    if not _ray_running():
        return False
    metric = _metric(name, spec)
    tags = {STAGE_TAG: stage}
    if spec.kind == "gauge":
        metric.set(number, tags=tags)
    else:
        metric.inc(number, tags=tags)
    return True
