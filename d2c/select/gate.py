"""The scorer quality gate: a scorer must clearly beat the trivial ε predictor on held-out images.

With H the held-out images and T the scoring timesteps (the losses of Eq. 7 on H)::

    L_H = 1/(|H|·|T|) · Σ_{x∈H} Σ_{t∈T} mean ‖ε_t − ε_θ(√ᾱ_t z + √(1−ᾱ_t) ε_t, t, c)‖²
    L_0 = 1/(|H|·|T|) · Σ_{x∈H} Σ_{t∈T} mean ‖ε_t‖²          (ε̂ = 0: about 1)

The scores are used only when ``L_H ≤ max_ratio · L_0``. An untrained adaLN-Zero scorer outputs
about zero, so its scores sit at ≈ L_0 for every image and rank them at chance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from d2c.select.score import image_noise


#: The held-out slice never takes more than this share of the rows (the scorer trains on the rest).
MAX_HOLDOUT_SHARE = 0.1


def holdout_positions(num_rows: int, count: int) -> np.ndarray:
    """``count`` listing positions spread evenly over ``[0, num_rows)``, at most
    :data:`MAX_HOLDOUT_SHARE` of the rows (but one, where there are rows).

    A listing sorted by class (image folders) and one in file order (Fashion-MNIST) both give a
    slice that covers every class. The embedded scorer never trains on these rows.
    """
    count = min(count, max(1, int(num_rows * MAX_HOLDOUT_SHARE)))
    if count <= 0 or num_rows <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.floor(np.arange(count) * (num_rows / count)).astype(np.int64))


def trivial_loss(seed: int, image_ids: Sequence[str], num_timesteps: int, shape: Sequence[int]) -> float:
    """``L_0``: the mean of ε_t² over the very noise draws the scores of ``image_ids`` used."""
    if not len(image_ids):
        return float("nan")
    return float(image_noise(seed, list(image_ids), num_timesteps, shape).double().pow(2).mean())


@dataclass(frozen=True)
class GateResult:
    """The gate's numbers: ``heldout_loss`` (L_H), ``trivial_loss`` (L_0), their ``ratio``."""

    rows: int
    heldout_loss: float
    trivial_loss: float
    ratio: float
    max_ratio: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def gate(per_t: np.ndarray, trivial: float, max_ratio: float) -> GateResult:
    """Judge held-out per-timestep losses ``[|H|, T]`` against ``trivial`` (L_0)."""
    per_t = np.asarray(per_t, np.float64)
    if per_t.size == 0:
        raise ValueError("the scorer gate got no held-out image (all were rejected?)")
    heldout = float(per_t.mean())
    ratio = heldout / trivial
    return GateResult(int(per_t.shape[0]), heldout, float(trivial), ratio, float(max_ratio),
                      bool(np.isfinite(ratio) and ratio <= max_ratio))
