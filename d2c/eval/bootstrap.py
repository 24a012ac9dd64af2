"""How much an FID moves with the samples drawn: bootstrap intervals for one FID and for a difference.

An FID from N samples is itself a random number: another N noise seeds give another value, and
at the demo's N = 300 that spread is as large as the gap between two methods. This module puts
a number on it from the features already computed, without sampling again.

* **Stratified resampling.** Evaluation draws a fixed number of samples per class (sample i has
  label ``i mod C``), and a split reference is class-balanced too, so each bootstrap round draws,
  *within each class*, as many rows as that class has, with replacement (:func:`stratified_draw`).
  Class balance is part of the design and is kept in every round.
* **One FID** (:func:`fid_interval`): per round, the FID of the resampled samples against the
  resampled reference (or the fixed reference statistics when only those exist, e.g. an ADM
  ``.npz`` without images). Reported: the FID of the full sets, the rounds' standard deviation
  and their percentile interval. Resampling duplicates rows, which shrinks the covariance's
  effective rank and raises every round's FID a little (FID is biased upward at small N), so the
  rounds sit slightly above the point estimate: read the interval's *width* and the std as the
  spread, not its position.
* **A difference** (:func:`fid_difference_interval`): FID(a) - FID(b) per round, with the same
  reference rows for both. When the two evaluations drew the same labels in the same order
  (``d2c evaluate`` with equal ``eval.num_samples`` and class count; with equal ``eval.seed``
  sample i also has the same initial noise in both), the rounds are **paired**: the same sample
  indices for a and b, so the noise they share cancels and the interval is the one for "a
  different set of noise seeds". Otherwise a and b are resampled independently (and it says so).
  The upward bias of the rounds is about equal for both and cancels in the difference.
* **Calibration** (benchmarks/bootstrap_calibration.py, a simulation with known populations at
  N = 300 vs 500, D = 2048; BENCHMARKS.md): the paired difference's bootstrap std was 1.06x the
  std over fresh draws and its 95% interval held the true mean 19 times in 20; one FID's std was
  2.7x too large (conservative). Neither covers training randomness.

FID per round in O(N^2 D) rather than O(D^3): with centred rows ``A`` ``[N, D]`` and
``S = A^T A / (N - 1)``, ``tr sqrt(S_a S_b)`` is the nuclear norm of ``A B^T`` over
``sqrt((N_a - 1)(N_b - 1))`` (two feature sets; from the eigenvalues of its smaller Gram matrix), or ``sum sqrt(eig(A S_r A^T)) / sqrt(N - 1)``
(features against fixed statistics; ``A S_r A^T`` is symmetric PSD with the non-zero spectrum of
``S S_r``). Above D rows the D x D route is used (:mod:`d2c.eval.fid`). Every route equals
:func:`d2c.eval.fid.frechet_distance` to 1e-6 relative, the round-off of square roots of near-zero
eigenvalues (tests/test_bootstrap.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from d2c.config import DEFAULT_BOOTSTRAP_LEVEL as DEFAULT_LEVEL
from d2c.config import DEFAULT_BOOTSTRAP_ROUNDS as DEFAULT_ROUNDS
from d2c.config import MIN_BOOTSTRAP_ROUNDS as MIN_ROUNDS
from d2c.eval.fid import FeatureStats, _trace_sqrt_product_eigh

#: Seed of the rounds' draws (``np.random.default_rng``) unless one is given.
DEFAULT_SEED = 0
#: Label given to every row when labels are unknown (one stratum).
NO_LABEL = -1


@dataclass(frozen=True)
class FidInterval:
    """A point estimate and its bootstrap spread.

    Attributes:
        point: the value on the full sets (FID, or FID(a) - FID(b)).
        std: standard deviation over the rounds.
        low, high: the ``level`` percentile interval of the rounds, moved so that their mean is
            ``point`` (the rounds themselves sit ``shift`` above it).
        shift: the rounds' mean minus ``point`` (resampling's upward bias, for the record).
        rounds, level, seed: the bootstrap's settings.
        resampled: what each round resampled ("samples and reference" / "samples").
        paired: for a difference, whether a and b were resampled with the same indices.
        share_a_better: for a difference, the share of (centred) rounds with FID(a) < FID(b).
    """

    point: float
    std: float
    low: float
    high: float
    shift: float
    rounds: int
    level: float
    seed: int
    resampled: str
    paired: Optional[bool] = None
    share_a_better: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly on one side of 0 (a difference is resolved)."""
        return self.low > 0.0 or self.high < 0.0


@dataclass(frozen=True)
class BootstrapReference:
    """The reference side of the rounds.

    Attributes:
        stats: statistics of the whole reference (the point estimate's reference).
        features: float ``[M, D]`` reference features, resampled per round; None = the fixed
            ``stats`` every round (a statistics-only reference).
        labels: int ``[M]`` classes of ``features`` (strata); None = one stratum.
    """

    stats: FeatureStats
    features: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    @classmethod
    def from_features(cls, features: np.ndarray, labels: Optional[np.ndarray] = None) -> "BootstrapReference":
        feats = np.asarray(features, dtype=np.float64)
        return cls(stats=FeatureStats.from_features(feats), features=feats,
                   labels=None if labels is None else np.asarray(labels))


def _strata(labels: Optional[np.ndarray], n: int) -> list[np.ndarray]:
    """Row positions of each class, in class order (one stratum when ``labels`` is None)."""
    if labels is None:
        return [np.arange(n)]
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}] (one per feature row), got {labels.shape}")
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def stratified_draw(strata: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw: within each stratum, as many positions as it holds, with replacement → ``[N]``."""
    return np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])


def _nuclear_norm(mat: np.ndarray) -> float:
    """Sum of the singular values of ``mat`` ``[P, Q]``: ``sum sqrt(eig(M M^T))`` on the smaller Gram
    matrix (about 3x faster than an SVD at 300 x 500; the same to 1e-12 relative)."""
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum())


def cheap_route(n: int, m: Optional[int], dim: int) -> bool:
    """True when a round of ``n`` samples against ``m`` reference rows (None = fixed statistics) takes
    the ``O(N^2 M)`` route rather than ``D x D`` eigendecompositions (about 2 s each at D = 2048)."""
    return n <= dim if m is None else n * m * min(n, m) <= dim**3


class _Rounds:
    """FIDs of resampled rows of one feature set ``[N, D]`` against the reference, by the cheapest exact route.

    On the cheap route the products with the reference are formed once, uncentred: the ``[N, M]``
    cross Gram ``G R^T`` (or ``G S_r G^T`` ``[N, N]`` for fixed statistics) and the row norms; a
    round then centres its gathered block with rank-one corrections (``O(N M + (N + M) D)``) and
    takes the eigenvalues of an ``N x N`` matrix, instead of an ``[N, D] x [D, M]`` product.
    """

    def __init__(self, gen: np.ndarray, ref: BootstrapReference):
        self.gen, self.ref = gen, ref
        self.n, self.dim = gen.shape
        self.sq_gen = np.einsum("ij,ij->i", gen, gen)
        self.ref_mu = ref.stats.mu.astype(np.float64)
        self.ref_sigma = ref.stats.sigma.astype(np.float64)
        self.m = None if ref.features is None else len(ref.features)
        self.cheap = cheap_route(self.n, self.m, self.dim)
        if ref.features is not None:
            self.sq_ref = np.einsum("ij,ij->i", ref.features, ref.features)
            self.cross = gen @ ref.features.T if self.cheap else None  # [N, M]
        elif self.cheap:
            self.gen_sigma = gen @ self.ref_sigma  # [N, D]
            self.inner = self.gen_sigma @ gen.T  # [N, N]
        self._root_ref: Optional[np.ndarray] = None

    def _root(self) -> np.ndarray:
        if self._root_ref is None:
            w, v = np.linalg.eigh(self.ref_sigma)
            self._root_ref = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        return self._root_ref

    def fid(self, idx: np.ndarray, ridx: Optional[np.ndarray]) -> float:
        """FID of rows ``idx`` ``[N]`` against reference rows ``ridx`` ``[M]`` (None = the fixed statistics)."""
        g = self.gen[idx]
        n = len(idx)
        mu_g = g.mean(axis=0)
        tr_g = (self.sq_gen[idx].sum() - n * (mu_g @ mu_g)) / (n - 1)
        if self.ref.features is not None:
            r = self.ref.features[ridx]
            m = len(ridx)
            mu_r = r.mean(axis=0)
            tr_r = (self.sq_ref[ridx].sum() - m * (mu_r @ mu_r)) / (m - 1)
            if self.cheap:
                centred = self.cross[np.ix_(idx, ridx)] - (g @ mu_r)[:, None] - (r @ mu_g)[None, :] + mu_g @ mu_r
                cross = _nuclear_norm(centred) / np.sqrt((n - 1) * (m - 1))
            else:
                a, b = g - mu_g, r - mu_r
                cross = _trace_sqrt_product_eigh(a.T @ a / (n - 1), b.T @ b / (m - 1))
        else:
            mu_r, tr_r = self.ref_mu, float(np.trace(self.ref_sigma))
            if self.cheap:
                # (G - 1 mu^T) S (G - 1 mu^T)^T on the gathered rows, from G S G^T and G S
                v = self.gen_sigma[idx] @ mu_g
                inner = self.inner[np.ix_(idx, idx)] - v[:, None] - v[None, :] + mu_g @ self.ref_sigma @ mu_g
                lam = np.linalg.eigvalsh((inner + inner.T) / 2)
                cross = float(np.sqrt(np.clip(lam, 0.0, None)).sum() / np.sqrt(n - 1))
            else:
                a = g - mu_g
                root = self._root()
                inner = root @ (a.T @ a / (n - 1)) @ root
                cross = float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
        diff = mu_g - mu_r
        return float(diff @ diff + tr_g + tr_r - 2.0 * cross)

    def point(self) -> float:
        """The FID of all rows against the whole reference."""
        return self.fid(np.arange(self.n), None if self.m is None else np.arange(self.m))


def fid_value(gen: np.ndarray, ref: BootstrapReference) -> float:
    """The FID of features ``[N, D]`` against the whole reference (the point estimate of the rounds)."""
    return _Rounds(_features(gen, "gen", ref.stats.dim), ref).point()


def _check(rounds: int, level: float) -> None:
    if rounds < MIN_ROUNDS:
        raise ValueError(f"bootstrap rounds must be >= {MIN_ROUNDS}, got {rounds}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap level must be in (0, 1), got {level}")


def _features(x: np.ndarray, name: str, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim or len(x) < 2:
        raise ValueError(f"{name} must be [N >= 2, {dim}] features, got {x.shape}")
    return x


def _summary(point: float, values: np.ndarray, rounds: int, level: float, seed: int, ref: BootstrapReference,
             paired: Optional[bool] = None) -> FidInterval:
    """The rounds' spread, centred at the full-set value (see the module docstring: the rounds are shifted up)."""
    centred = point + (values - values.mean())
    low, high = np.quantile(centred, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    resampled = "samples and reference" if ref.features is not None else "samples"
    return FidInterval(point=float(point), std=float(values.std(ddof=1)), low=float(low), high=float(high),
                       shift=float(values.mean() - point), rounds=rounds, level=level, seed=seed, resampled=resampled,
                       paired=paired, share_a_better=None if paired is None else float(np.mean(centred < 0.0)))


def fid_interval(gen: np.ndarray, ref: BootstrapReference, labels: Optional[np.ndarray] = None,
                 rounds: int = DEFAULT_ROUNDS, level: float = DEFAULT_LEVEL, seed: int = DEFAULT_SEED) -> FidInterval:
    """Bootstrap spread of one FID.

    Args:
        gen: float ``[N, D]`` features of the samples (Inception pool_3 for the FID).
        ref: the reference (:class:`BootstrapReference`).
        labels: int ``[N]`` class of each sample (strata); None = one stratum.
        rounds, level, seed: bootstrap rounds, interval level, ``np.random.default_rng`` seed.
    """
    _check(rounds, level)
    gen = _features(gen, "gen", ref.stats.dim)
    fid = _Rounds(gen, ref)
    strata = _strata(labels, len(gen))
    ref_strata = _strata(ref.labels, len(ref.features)) if ref.features is not None else None
    rng = np.random.default_rng(seed)
    values = np.empty(rounds)
    for r in range(rounds):
        ridx = stratified_draw(ref_strata, rng) if ref_strata is not None else None
        values[r] = fid.fid(stratified_draw(strata, rng), ridx)
    return _summary(fid.point(), values, rounds, level, seed, ref)


def fid_difference_interval(gen_a: np.ndarray, gen_b: np.ndarray, ref: BootstrapReference,
                            labels_a: Optional[np.ndarray] = None, labels_b: Optional[np.ndarray] = None,
                            rounds: int = DEFAULT_ROUNDS, level: float = DEFAULT_LEVEL,
                            seed: int = DEFAULT_SEED) -> FidInterval:
    """Bootstrap spread of FID(a) - FID(b) against one reference.

    Paired (the same indices for a and b each round) when both have N rows with equal labels in
    the same order; otherwise independent draws for a and b. The reference rows drawn in a round
    serve both.

    Args:
        gen_a, gen_b: float ``[N_a, D]`` / ``[N_b, D]`` sample features.
        ref: the reference (:class:`BootstrapReference`).
        labels_a, labels_b: int ``[N_a]`` / ``[N_b]`` classes (strata); None = one stratum.
        rounds, level, seed: as :func:`fid_interval`.
    """
    _check(rounds, level)
    gen_a, gen_b = _features(gen_a, "gen_a", ref.stats.dim), _features(gen_b, "gen_b", ref.stats.dim)
    paired = len(gen_a) == len(gen_b) and (
        (labels_a is None and labels_b is None)
        or (labels_a is not None and labels_b is not None and np.array_equal(labels_a, labels_b)))
    fid_a, fid_b = _Rounds(gen_a, ref), _Rounds(gen_b, ref)
    strata_a, strata_b = _strata(labels_a, len(gen_a)), _strata(labels_b, len(gen_b))
    ref_strata = _strata(ref.labels, len(ref.features)) if ref.features is not None else None
    rng = np.random.default_rng(seed)
    values = np.empty(rounds)
    for r in range(rounds):
        ridx = stratified_draw(ref_strata, rng) if ref_strata is not None else None
        idx_a = stratified_draw(strata_a, rng)
        idx_b = idx_a if paired else stratified_draw(strata_b, rng)
        values[r] = fid_a.fid(idx_a, ridx) - fid_b.fid(idx_b, ridx)
    point = fid_a.point() - fid_b.point()
    return _summary(point, values, rounds, level, seed, ref, paired=paired)
