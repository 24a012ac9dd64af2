"""d2c.eval.bootstrap: exact fast FID routes, stratified draws, paired differences, against a naive reference."""

import numpy as np
import pytest

from d2c.eval.bootstrap import (
    BootstrapReference,
    FidInterval,
    _strata,
    fid_difference_interval,
    fid_interval,
    fid_value,
    stratified_draw,
)
from d2c.eval.fid import FeatureStats, frechet_distance

CLASSES = 4


def _feats(n, dim, seed, shift=0.0, rank=None):
    """Features ``[n, dim]`` on a ``rank``-dim subspace (low-rank, like Inception features) plus a shift."""
    rng = np.random.default_rng(seed)
    rank = rank or dim
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0] if rank < dim else np.eye(dim)
    return (rng.normal(size=(n, rank)) / np.sqrt(np.arange(1, rank + 1))) @ basis.T + shift


def _exact(gen, ref_feats=None, ref_stats=None):
    """ADM's FID (eigh route) of two feature sets, or of features against statistics."""
    ref_stats = ref_stats or FeatureStats.from_features(ref_feats)
    return frechet_distance(FeatureStats.from_features(gen), ref_stats, method="eigh")


@pytest.mark.parametrize("n,m,dim", [(30, 40, 64), (90, 120, 16)])  # N below D (the N x N routes) and above D (D x D)
def test_every_route_is_the_fid(n, m, dim):
    gen, ref = _feats(n, dim, 0, shift=0.3, rank=min(dim, 12)), _feats(m, dim, 1)
    with_feats = BootstrapReference.from_features(ref)
    fixed = BootstrapReference(stats=FeatureStats.from_features(ref))
    expected = _exact(gen, ref)
    assert fid_value(gen, with_feats) == pytest.approx(expected, rel=1e-6)
    assert fid_value(gen, fixed) == pytest.approx(expected, rel=1e-6)
    # with duplicated rows, as every bootstrap round has
    dup = gen[np.r_[0:n:2, 0:n:2]]
    assert fid_value(dup, fixed) == pytest.approx(_exact(dup, ref), rel=1e-6)


def test_stratified_draws_keep_every_class_count():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    rng = np.random.default_rng(0)
    strata = _strata(labels, len(labels))
    for _ in range(20):
        idx = stratified_draw(strata, rng)
        assert np.bincount(labels[idx]).tolist() == [5, 3, 7]
    with pytest.raises(ValueError, match="labels must be"):
        _strata(labels[:4], len(labels))


def _naive_rounds(gen, labels, ref, ref_labels, rounds, seed, gen_b=None):
    """The rounds recomputed with ADM's FID and the draw order of d2c.eval.bootstrap."""
    rng = np.random.default_rng(seed)
    strata, ref_strata = _strata(labels, len(gen)), _strata(ref_labels, len(ref))
    out = []
    for _ in range(rounds):
        r = ref[stratified_draw(ref_strata, rng)]
        idx = stratified_draw(strata, rng)
        value = _exact(gen[idx], r)
        out.append(value - _exact(gen_b[idx], r) if gen_b is not None else value)
    return np.array(out)


def test_one_fid_interval_equals_a_naive_bootstrap():
    gen, ref = _feats(24, 32, 2, shift=0.2), _feats(36, 32, 3)
    labels, ref_labels = np.arange(24) % CLASSES, np.arange(36) % CLASSES
    iv = fid_interval(gen, BootstrapReference.from_features(ref, ref_labels), labels, rounds=25, level=0.9, seed=7)
    naive = _naive_rounds(gen, labels, ref, ref_labels, 25, 7)
    point = _exact(gen, ref)
    centred = point + naive - naive.mean()
    assert iv.point == pytest.approx(point, rel=1e-6)
    assert iv.std == pytest.approx(naive.std(ddof=1), rel=1e-7)
    assert iv.shift == pytest.approx(naive.mean() - point, rel=1e-7)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(centred, [0.05, 0.95])), rel=1e-7)
    assert iv.shift > 0  # resampling duplicates rows, which raises FID
    assert iv.resampled == "samples and reference" and (iv.rounds, iv.level, iv.seed) == (25, 0.9, 7)
    # deterministic in the seed, different with another one
    again = fid_interval(gen, BootstrapReference.from_features(ref, ref_labels), labels, rounds=25, level=0.9, seed=7)
    assert again == iv
    assert fid_interval(gen, BootstrapReference.from_features(ref, ref_labels), labels, rounds=25, seed=8).std != iv.std


def test_paired_difference_equals_a_naive_bootstrap_and_resolves_a_real_gap():
    gen_a = _feats(40, 24, 4)
    gen_b = gen_a * 1.3 + 0.4  # model b: model a's samples, wider and shifted (shared noise)
    ref = _feats(40, 24, 5)
    labels = np.arange(40) % CLASSES
    reference = BootstrapReference.from_features(ref, labels)
    iv = fid_difference_interval(gen_a, gen_b, reference, labels, labels, rounds=30, seed=1)
    naive = _naive_rounds(gen_a, labels, ref, labels, 30, 1, gen_b=gen_b)
    assert iv.paired is True
    assert iv.point == pytest.approx(_exact(gen_a, ref) - _exact(gen_b, ref), rel=1e-6)
    assert iv.std == pytest.approx(naive.std(ddof=1), rel=1e-7)
    assert iv.high < 0 and iv.excludes_zero and iv.share_a_better == 1.0
    # the same model against itself: exactly zero in every round
    zero = fid_difference_interval(gen_a, gen_a, reference, labels, labels, rounds=10)
    assert (zero.point, zero.std, zero.low, zero.high) == (0.0, 0.0, 0.0, 0.0) and not zero.excludes_zero


def test_unpaired_when_the_labels_differ_and_fixed_reference_statistics():
    gen_a, gen_b, ref = _feats(20, 16, 6), _feats(24, 16, 7), _feats(30, 16, 8)
    fixed = BootstrapReference(stats=FeatureStats.from_features(ref))
    iv = fid_difference_interval(gen_a, gen_b, fixed, np.arange(20) % 2, np.arange(24) % 2, rounds=12)
    assert iv.paired is False and iv.resampled == "samples"
    assert iv.point == pytest.approx(_exact(gen_a, ref) - _exact(gen_b, ref), rel=1e-6)
    d = iv.to_dict()
    assert set(d) == {"point", "std", "low", "high", "shift", "rounds", "level", "seed", "resampled", "paired", "share_a_better"}
    assert set(fid_interval(gen_a, fixed, rounds=10).to_dict()) == set(d) - {"paired", "share_a_better"}
    assert isinstance(iv, FidInterval)


def test_bad_inputs_are_refused():
    ref = BootstrapReference.from_features(_feats(10, 8, 9))
    with pytest.raises(ValueError, match="rounds must be >= 10"):
        fid_interval(_feats(10, 8, 1), ref, rounds=3)
    with pytest.raises(ValueError, match="level must be in"):
        fid_interval(_feats(10, 8, 1), ref, level=1.0)
    with pytest.raises(ValueError, match=r"gen must be \[N >= 2, 8\]"):
        fid_interval(_feats(10, 4, 1), ref)


def test_evaluate_computes_the_bootstrap_only_where_it_is_cheap_unless_told(tmp_path):
    """eval.bootstrap_rounds: None = 200 rounds on the fast route, skipped (with the reason) above it; 0 = off."""
    from d2c.eval.artifacts import STATS_FROM_FILE
    from d2c.eval.plan import fid_bootstrap
    from d2c.config import load_config

    ref = _feats(40, 8, 10)
    np.savez(tmp_path / "ref.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))
    info = {"statistics": STATS_FROM_FILE, "path": str(tmp_path / "ref.npz")}
    few = {"pool": _feats(6, 8, 11).astype(np.float32), "label": np.arange(6) % 2}  # N=6 <= D=8: fast route
    many = {"pool": _feats(20, 8, 12).astype(np.float32), "label": np.arange(20) % 2}  # N=20 > D: D x D per round

    def run(samples, *overrides):
        return fid_bootstrap(load_config(None, list(overrides)), samples, info)

    boot, note = run(few)
    assert note is None and boot["rounds"] == 200 and boot["resampled"] == "samples"
    assert boot["point"] == pytest.approx(_exact(few["pool"], ref), rel=1e-6)
    boot, note = run(many)
    assert boot is None and "skipped by default at N=20" in note and "eval.bootstrap_rounds=R" in note
    boot, note = run(many, "eval.bootstrap_rounds=12")
    assert note is None and boot["rounds"] == 12 and boot["point"] == pytest.approx(_exact(many["pool"], ref), rel=1e-6)
    assert run(few, "eval.bootstrap_rounds=0") == (None, "eval.bootstrap_rounds=0")
