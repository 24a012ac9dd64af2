"""The scorer finds planted noise: a 300-step embedded scorer at train.ema_decay=0.999 (the case
that ranked at chance without the EMA warm-up) must rank corrupted images hardest."""

import sys

import numpy as np
import pytest

from conftest import FMNIST, ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def test_auroc_against_hand_counts():
    from planted_noise import auroc

    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.0, 1.0, 2.0, 3.0]), np.array([True, True, False, False])) == 0.0
    assert auroc(np.array([1.0, 0.0, 1.0, 0.0]), np.array([True, True, False, False])) == 0.5  # ties count one half


@pytest.mark.slow
def test_a_300_step_scorer_ranks_planted_noise_hardest(ray_session, tmp_path):
    from planted_noise import planted_noise_auroc

    result = planted_noise_auroc(tmp_path, steps=300, ema=0.999, per_class=30, noisy=3)
    assert result["images"] == 300 and result["noisy"] == 30
    assert result["gate"]["passed"] and result["gate"]["ratio"] < 0.5
    assert result["auroc"] >= 0.95, result
