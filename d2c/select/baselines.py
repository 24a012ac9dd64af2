"""Baseline selections (docs/method.md): random, min, max, K-Center greedy and Herding.

Every baseline is a *chooser*: ``chooser(sorted_group, n) -> positions`` into one
class's rows already sorted by ``(score, image_id)``, so every method shares the same
per-class plumbing (:func:`d2c.select.interval.select_class`). Choosers are deterministic:
random is seeded by ``(seed, label)``; K-Center starts from the point nearest the class
mean; ties break on the lower position.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd

from d2c.select.methods import FEATURE_METHODS  # noqa: F401  (re-exported: methods needing feature vectors)

Chooser = Callable[[pd.DataFrame, int], np.ndarray]


def choose_random(seed: int) -> Chooser:
    """Uniform without replacement, seeded by (seed, class label)."""

    def chooser(group: pd.DataFrame, n: int) -> np.ndarray:
        if not len(group):
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([seed, int(group["label"].iloc[0])])
        return rng.choice(len(group), size=n, replace=False).astype(np.int64)

    return chooser


def choose_min(group: pd.DataFrame, n: int) -> np.ndarray:
    """The n easiest images (lowest scores)."""
    return np.arange(n, dtype=np.int64)


def choose_max(group: pd.DataFrame, n: int) -> np.ndarray:
    """The n hardest images (highest scores)."""
    return np.arange(len(group) - n, len(group), dtype=np.int64)


def kcenter_greedy(features: np.ndarray, n: int) -> np.ndarray:
    """K-Center greedy: repeatedly add the point farthest from the chosen set.

    Args:
        features: float [m, d].
        n: points to choose (≤ m).
    Returns:
        int64 [n] positions, in the order chosen. The first is the point nearest the mean.
    """
    x = np.asarray(features, np.float64)
    if n == 0:
        return np.zeros(0, np.int64)
    first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    chosen = [first]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))  # argmax returns the lowest position on ties
        chosen.append(nxt)
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(1))
    return np.asarray(chosen, np.int64)


def herding(features: np.ndarray, n: int) -> np.ndarray:
    """Herding (Welling 2009, as in iCaRL): pick points whose running mean tracks the class mean.

    Args:
        features: float [m, d]; L2-normalised inside, as iCaRL does.
        n: points to choose (≤ m), without repetition.
    Returns:
        int64 [n] positions, in the order chosen.
    """
    x = np.asarray(features, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    mu = x.mean(0)
    chosen: list[int] = []
    running = np.zeros_like(mu)
    available = np.ones(len(x), bool)
    for i in range(n):
        # candidate mean after adding each point: (running + x_j) / (i + 1)
        gap = ((mu - (running + x) / (i + 1)) ** 2).sum(1)
        gap[~available] = np.inf
        j = int(np.argmin(gap))
        chosen.append(j)
        available[j] = False
        running += x[j]
    return np.asarray(chosen, np.int64)


def choose_by_features(kind: str, features: Mapping[str, np.ndarray]) -> Chooser:
    """A chooser running K-Center or Herding on ``features[image_id]`` (float [d] each)."""
    algo = {"kcenter": kcenter_greedy, "herding": herding}[kind]

    def chooser(group: pd.DataFrame, n: int) -> np.ndarray:
        if not len(group):
            return np.zeros(0, np.int64)
        missing = [i for i in group["image_id"] if i not in features]
        if missing:
            raise KeyError(f"{kind}: no features for {len(missing)} images, e.g. {missing[:3]}")
        x = np.stack([features[i] for i in group["image_id"]])
        return algo(x.reshape(len(x), -1), n)

    return chooser


def make_chooser(method: str, seed: int = 0, features: Mapping[str, np.ndarray] | None = None) -> Chooser | None:
    """The chooser for ``select.method`` (None for "d2c", which uses the interval)."""
    if method == "d2c":
        return None
    if method == "random":
        return choose_random(seed)
    if method == "min":
        return choose_min
    if method == "max":
        return choose_max
    if method in FEATURE_METHODS:
        if features is None:
            raise ValueError(f"select.method={method!r} needs per-image features")
        return choose_by_features(method, features)
    raise ValueError(f"unknown select.method {method!r}; use d2c, random, min, max, kcenter or herding")
