"""Sample-quality metrics on Inception features: FID, sFID, KID, precision/recall, IS.

Definitions follow ADM's evaluator (FID/sFID, reference ``.npz`` format) and torch-fidelity
0.4 (KID, precision/recall, IS), so numbers are comparable with published ones:

- **FID** (:func:`frechet_distance`): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b))``
  with ``scipy.linalg.sqrtm`` (``"sqrtm"``; ``"eigh"`` and ``"svd"`` compute the same trace
  faster, the latter from the features); if the square root is not finite, ``eps * I`` is added to
  both covariances; a complex result is accepted only if its diagonal's imaginary part is
  within 1e-3 of 0, and its real part is used (ADM / pytorch-fid). Statistics are float64,
  ``sigma`` is ``np.cov(..., rowvar=False)`` (unbiased, N - 1).
- **sFID**: the same distance on ADM's ``mixed_6/conv`` features ``[N, 2023]``.
- **KID** (:func:`kid`): unbiased MMD^2 with the polynomial kernel
  ``(x.y / d + 1)^3`` averaged over ``subsets`` random subsets of ``subset_size`` drawn
  without replacement from each set with ``np.random.RandomState(seed)``, in
  torch-fidelity's order (so equal seeds give equal numbers).
- **Precision / recall** (:func:`precision_recall`, Kynkäänniemi et al. 2019): each set's
  manifold is the union of balls reaching each point's k-th nearest neighbour (k = 3,
  self excluded); precision = share of generated points inside the reference manifold,
  recall = share of reference points inside the generated manifold.
- **IS** (:func:`inception_score`): torch-fidelity's, on unbiased logits, 10 splits.

ADM reference files are read by :func:`load_reference_npz` and written by :func:`save_stats_npz`
(the reference cache, :mod:`d2c.eval.reference`, writes its files in that format).
:func:`compute_metrics_torch_fidelity` computes the same
metrics through ``torch_fidelity.calculate_metrics`` with the registered extractor.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import torch
from torch.utils.data import Dataset

from d2c.eval.inception import (
    EXTRACTOR_NAME,
    FIDELITY_EXTRACTOR_NAME,
    default_device,
    image_layout,
    to_nchw_rgb,
    to_nhwc_rgb,
)

# ---------------------------------------------------------------------------
# Defaults (ADM evaluator / torch-fidelity 0.4 defaults)
# ---------------------------------------------------------------------------
#: Diagonal offset when sqrtm of the covariance product is not finite (ADM, pytorch-fid).
FID_SINGULAR_EPS = 1e-6
#: Largest |imag| on the diagonal of sqrtm accepted as numerical noise (ADM, pytorch-fid).
FID_IMAG_ATOL = 1e-3
#: KID polynomial kernel ``(gamma x.y + coef0) ** degree`` with gamma = 1 / d by default.
KID_DEGREE = 3
KID_COEF0 = 1.0
#: KID subsets and their size (torch-fidelity defaults).
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
#: k of the k-NN balls in precision/recall.
PRC_NEIGHBORHOOD = 3
#: Rows of the distance matrix computed at once in precision/recall (memory bound).
PRC_ROW_BLOCK = 1024
#: Inception Score splits.
IS_SPLITS = 10
#: Seed of every random choice (torch-fidelity's ``rng_seed`` default).
DEFAULT_SEED = 2020
#: Minimum samples for a covariance.
MIN_SAMPLES_FOR_COV = 2
#: Tolerance of "these statistics are of these features" (means compared; float32 features).
STATS_MATCH_RTOL = 1e-5
STATS_MATCH_ATOL = 1e-6

#: Array names of ADM's reference/sample ``.npz`` files.
NPZ_IMAGES = "arr_0"
NPZ_LABELS = "arr_1"
NPZ_MU = "mu"
NPZ_SIGMA = "sigma"
NPZ_MU_SPATIAL = "mu_s"
NPZ_SIGMA_SPATIAL = "sigma_s"
#: Extra arrays written by this module (ignored by ADM's evaluator).
NPZ_N = "n"
NPZ_N_SPATIAL = "n_s"
NPZ_KEY = "key"
NPZ_EXTRACTOR_ID = "extractor_id"
#: Cache file name prefix and permissions.
CACHE_PREFIX = "ref-"
CACHE_FILE_MODE = 0o644

#: torch-fidelity result keys -> this module's keys.
_FIDELITY_KEYS = {
    "frechet_inception_distance": "fid",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
    "inception_score_mean": "is_mean",
    "inception_score_std": "is_std",
}

FidMethod = Literal["sqrtm", "eigh", "svd"]


# ---------------------------------------------------------------------------
# Statistics and the Fréchet distance
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of features.

    Attributes:
        mu: float64 ``[D]`` mean.
        sigma: float64 ``[D, D]`` covariance (``np.cov``, N - 1 normalisation).
        n: number of samples, or None when unknown (ADM's reference files do not store it).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self):
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(f"mu must be [D] and sigma [D, D]; got {self.mu.shape} and {self.sigma.shape}")

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of features ``[N, D]`` (N >= 2), computed in float64."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < MIN_SAMPLES_FOR_COV:
            raise ValueError(f"features must be [N, D] with N >= {MIN_SAMPLES_FOR_COV}; got {x.shape}")
        return cls(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=int(x.shape[0]))


def _trace_sqrt_product_eigh(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """``tr sqrtm(A B)`` for symmetric PSD A, B as ``sum sqrt(eig(A^1/2 B A^1/2))``.

    Same value as the sqrtm route (A B is similar to the PSD ``A^1/2 B A^1/2``), several
    times faster at D = 2048 and without complex round-off; negative round-off
    eigenvalues are clipped to 0.
    """
    w, v = np.linalg.eigh(sigma_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root_a @ sigma_b @ root_a
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def _trace_sqrt_product_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """``tr sqrtm(S_a S_b)`` of the covariances of ``[N_a, D]`` and ``[N_b, D]`` features, from the features.

    With centred features ``A``, ``B`` and ``S = X^T X / (N - 1)``, the non-zero eigenvalues of
    ``S_a S_b = A^T A B^T B / c`` (``c = (N_a - 1)(N_b - 1)``) are those of ``M M^T / c`` with
    ``M = A B^T`` ``[N_a, N_b]``, i.e. its squared singular values over c; so the trace of the
    square root is the nuclear norm of M over ``sqrt(c)``: exact, and a small SVD instead of a
    D x D matrix function when N is below D.
    """
    a = feats_a.astype(np.float64) - feats_a.mean(axis=0, dtype=np.float64)
    b = feats_b.astype(np.float64) - feats_b.mean(axis=0, dtype=np.float64)
    singular = np.linalg.svd(a @ b.T, compute_uv=False)
    return float(singular.sum() / np.sqrt((len(a) - 1) * (len(b) - 1)))


def _features_route_is_cheaper(n_a: int, n_b: int, dim: int) -> bool:
    """True when the ``[N_a, N_b]`` SVD costs less than the ``D x D`` eigendecompositions."""
    return n_a * n_b * min(n_a, n_b) <= dim**3


def frechet_distance(
    stats_a: FeatureStats,
    stats_b: FeatureStats,
    eps: float = FID_SINGULAR_EPS,
    method: FidMethod = "sqrtm",
    features: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """Fréchet distance between two Gaussians (FID on pool stats, sFID on spatial stats).

    Args:
        stats_a, stats_b: statistics of equal dimension D.
        eps: diagonal offset used when ``sqrtm(S_a S_b)`` is not finite (``"sqrtm"`` only).
        method: ``"sqrtm"`` (ADM's computation: ``scipy.linalg.sqrtm`` of the D x D product,
            about 12 s at D = 2048 on 2 cores), ``"eigh"`` (the same trace through symmetric
            eigendecompositions, about 2 s) or ``"svd"`` (the same trace from ``features``
            through :func:`_trace_sqrt_product_features` when that is cheaper, about 0.03 s
            for 300 vs 500 samples; else eigh). All three agree to float64 round-off
            (tests/test_fid.py).
        features: ``(features_a [N_a, D], features_b [N_b, D])`` the two statistics were
            computed from (``"svd"`` only).

    Raises:
        ValueError: dimensions differ, features do not match the statistics' shapes, or sqrtm
            leaves an imaginary diagonal above 1e-3.
    """
    if stats_a.dim != stats_b.dim:
        raise ValueError(f"statistics have different dimensions: {stats_a.dim} vs {stats_b.dim}")
    mu1, mu2 = stats_a.mu.astype(np.float64), stats_b.mu.astype(np.float64)
    s1, s2 = stats_a.sigma.astype(np.float64), stats_b.sigma.astype(np.float64)
    diff = mu1 - mu2
    if features is not None:
        for name, f, st in (("a", features[0], stats_a), ("b", features[1], stats_b)):
            if f.ndim != 2 or f.shape[1] != st.dim or (st.n is not None and st.n != len(f)):
                raise ValueError(f"features_{name} {f.shape} do not match statistics of D={st.dim}, N={st.n}")
    if method == "svd" and features is not None and _features_route_is_cheaper(len(features[0]), len(features[1]), stats_a.dim):
        tr_covmean = _trace_sqrt_product_features(*features)
    elif method in ("eigh", "svd"):
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals", RuntimeWarning)
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_IMAG_ATOL):
                raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"unknown FID method {method!r}: expected 'sqrtm', 'eigh' or 'svd'")
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------
def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int = KID_DEGREE, gamma: float | None = None, coef0: float = KID_COEF0
) -> np.ndarray:
    """``(gamma x y^T + coef0) ** degree`` for x ``[M, D]``, y ``[K, D]`` -> ``[M, K]``; gamma 1/D by default."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from ``[m, m]`` kernel matrices (diagonals of k_xx, k_yy excluded)."""
    m = k_xx.shape[0]
    if k_xx.shape != (m, m) or k_xy.shape != (m, m) or k_yy.shape != (m, m):
        raise ValueError("kernel matrices must all be [m, m]")
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(
    feats_gen: np.ndarray,
    feats_ref: np.ndarray,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    degree: int = KID_DEGREE,
    gamma: float | None = None,
    coef0: float = KID_COEF0,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) of features ``[N1, D]`` vs ``[N2, D]``.

    Raises:
        ValueError: ``subset_size`` exceeds either set, or is below 2.
    """
    x = np.asarray(feats_gen, dtype=np.float64)
    y = np.asarray(feats_ref, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D; got {x.shape} and {y.shape}")
    if not MIN_SAMPLES_FOR_COV <= subset_size <= min(len(x), len(y)):
        raise ValueError(f"KID subset size {subset_size} must be in [2, min(N_gen={len(x)}, N_ref={len(y)})]")
    rng = np.random.RandomState(seed)
    kernel = dict(degree=degree, gamma=gamma, coef0=coef0)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), subset_size, replace=False)]
        ys = y[rng.choice(len(y), subset_size, replace=False)]
        k_xx = polynomial_kernel(xs, xs, **kernel)
        k_xy = polynomial_kernel(xs, ys, **kernel)
        k_yy = polynomial_kernel(ys, ys, **kernel)
        mmds[i] = mmd2_unbiased(k_xx, k_xy, k_yy)
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------
# Precision / recall
# ---------------------------------------------------------------------------
def _knn_radii(x: torch.Tensor, k: int, row_block: int) -> torch.Tensor:
    """Distance of each row of x ``[N, D]`` to its k-th nearest other row -> ``[N]``."""
    blocks = [torch.cdist(x[s : s + row_block], x).kthvalue(k + 1, dim=1).values for s in range(0, len(x), row_block)]
    return torch.cat(blocks)


def _inside_share(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor, row_block: int) -> float:
    """Share of queries ``[M, D]`` within ``radii[j]`` of some ``points[j]`` (``[N, D]``, ``[N]``)."""
    inside = [
        (torch.cdist(queries[s : s + row_block], points) <= radii[None]).any(dim=1)
        for s in range(0, len(queries), row_block)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    feats_gen: np.ndarray, feats_ref: np.ndarray, k: int = PRC_NEIGHBORHOOD, row_block: int = PRC_ROW_BLOCK
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) of features ``[N1, D]`` vs ``[N2, D]``.

    Returns:
        (precision, recall): share of generated samples inside the reference k-NN manifold,
        and share of reference samples inside the generated one.
    """
    x = torch.as_tensor(np.asarray(feats_gen, dtype=np.float64))
    y = torch.as_tensor(np.asarray(feats_ref, dtype=np.float64))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D; got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(len(x), len(y)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    radii_gen = _knn_radii(x, k, row_block)
    radii_ref = _knn_radii(y, k, row_block)
    precision = _inside_share(x, y, radii_ref, row_block)
    recall = _inside_share(y, x, radii_gen, row_block)
    return precision, recall


# ---------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------
def inception_score(
    logits: np.ndarray, splits: int = IS_SPLITS, seed: int = DEFAULT_SEED, shuffle: bool = True
) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of unbiased logits ``[N, 1008]`` (torch-fidelity's)."""
    p_logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    n = p_logits.shape[0]
    if n < splits:
        raise ValueError(f"IS needs at least {splits} samples (one per split), got {n}")
    if shuffle:
        p_logits = p_logits[np.random.RandomState(seed).permutation(n)]
    p = p_logits.softmax(dim=1)
    log_p = p_logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------
# All metrics
# ---------------------------------------------------------------------------
def _features_of(feats_gen: np.ndarray, feats_ref: np.ndarray | None,
                 stats_ref: FeatureStats) -> tuple[np.ndarray, np.ndarray] | None:
    """``(feats_gen, feats_ref)`` when ``stats_ref`` are the statistics of ``feats_ref``, else None.

    A user's reference file may carry statistics of other features than the ones computed
    here (ADM's mu/sigma next to its images): only features whose count and mean match the
    statistics may stand in for them.
    """
    if feats_ref is None or feats_ref.ndim != 2 or feats_ref.shape[1] != stats_ref.dim:
        return None
    if stats_ref.n is not None and stats_ref.n != len(feats_ref):
        return None
    if not np.allclose(feats_ref.mean(axis=0, dtype=np.float64), stats_ref.mu, rtol=STATS_MATCH_RTOL, atol=STATS_MATCH_ATOL):
        return None
    return feats_gen, feats_ref


def compute_metrics(
    feats_gen: np.ndarray,
    feats_ref: np.ndarray | None,
    *,
    stats_ref: FeatureStats | None = None,
    spatial_gen: np.ndarray | None = None,
    spatial_ref: np.ndarray | FeatureStats | None = None,
    spatial_ref_features: np.ndarray | None = None,
    logits_gen: np.ndarray | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    prc_k: int = PRC_NEIGHBORHOOD,
    is_splits: int = IS_SPLITS,
    seed: int = DEFAULT_SEED,
    fid_method: FidMethod = "sqrtm",
) -> dict[str, float | int]:
    """FID, KID, precision, recall (and sFID, IS when their inputs are given).

    Args:
        feats_gen: generated pool features ``[N_gen, 2048]``.
        feats_ref: reference pool features ``[N_ref, 2048]``; may be None when
            ``stats_ref`` is given (then only FID/sFID/IS: KID and precision/recall need
            reference features, and their keys are absent).
        stats_ref: precomputed reference pool statistics (e.g. ADM's ``mu``/``sigma``);
            used for FID instead of statistics of ``feats_ref``.
        spatial_gen: generated sFID features ``[N_gen, 2023]``.
        spatial_ref: reference sFID features ``[N_ref, 2023]`` or their statistics.
        spatial_ref_features: with statistics as ``spatial_ref``, the features they came
            from, if at hand (the ``"svd"`` route uses them).
        logits_gen: generated unbiased logits ``[N_gen, 1008]`` (IS).
        kid_subset_size: clipped to the smaller set; the size used is reported.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "kid_subset_size", "precision", "recall",
        "n_gen", "n_ref"}`` plus ``"sfid"`` and ``"is_mean"``/``"is_std"`` when computable.
    """
    if feats_ref is None and stats_ref is None:
        raise ValueError("give reference features or reference statistics")
    stats_gen = FeatureStats.from_features(feats_gen)
    if stats_ref is None:
        stats_ref = FeatureStats.from_features(feats_ref)
    out: dict[str, float | int] = {
        "fid": frechet_distance(stats_gen, stats_ref, method=fid_method,
                                features=_features_of(feats_gen, feats_ref, stats_ref)),
        "n_gen": len(feats_gen),
        "n_ref": len(feats_ref) if feats_ref is not None else (stats_ref.n or 0),
    }
    if feats_ref is not None:
        size = min(kid_subset_size, len(feats_gen), len(feats_ref))
        out["kid_mean"], out["kid_std"] = kid(feats_gen, feats_ref, kid_subsets, size, seed=seed)
        out["kid_subset_size"] = size
        out["precision"], out["recall"] = precision_recall(feats_gen, feats_ref, k=prc_k)
    if spatial_gen is not None and spatial_ref is not None:
        if isinstance(spatial_ref, FeatureStats):
            s_ref, s_feats = spatial_ref, spatial_ref_features
        else:
            s_ref, s_feats = FeatureStats.from_features(spatial_ref), spatial_ref
        out["sfid"] = frechet_distance(FeatureStats.from_features(spatial_gen), s_ref, method=fid_method,
                                       features=_features_of(spatial_gen, s_feats, s_ref))
    if logits_gen is not None:
        out["is_mean"], out["is_std"] = inception_score(logits_gen, splits=is_splits, seed=seed)
    return out


# ---------------------------------------------------------------------------
# Reference statistics: cache and ADM .npz
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceStats:
    """Statistics read from an ADM reference ``.npz``.

    Attributes:
        pool: FID statistics (D = 2048).
        spatial: sFID statistics (D = 2023), or None.
        path: the file they were read from.
    """

    pool: FeatureStats
    spatial: FeatureStats | None
    path: str


def atomic_savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, CACHE_FILE_MODE)  # mkstemp makes 0600; cached stats are shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _stats_arrays(pool: FeatureStats, spatial: FeatureStats | None) -> dict[str, np.ndarray]:
    arrays = {NPZ_MU: pool.mu, NPZ_SIGMA: pool.sigma}
    if pool.n is not None:
        arrays[NPZ_N] = np.int64(pool.n)
    if spatial is not None:
        arrays[NPZ_MU_SPATIAL] = spatial.mu
        arrays[NPZ_SIGMA_SPATIAL] = spatial.sigma
        if spatial.n is not None:
            arrays[NPZ_N_SPATIAL] = np.int64(spatial.n)
    return arrays


def save_stats_npz(path: str, pool: FeatureStats, spatial: FeatureStats | None = None, **extra: np.ndarray) -> None:
    """Write statistics in ADM's reference format: ``mu``, ``sigma`` (+ ``mu_s``, ``sigma_s``)."""
    atomic_savez(path, {**_stats_arrays(pool, spatial), **extra})


def _bad_npz(path: str, found) -> ValueError:
    return ValueError(
        f"{path}: not an ADM reference/sample .npz: expected arrays '{NPZ_MU}' and '{NPZ_SIGMA}' "
        f"(precomputed statistics, optionally '{NPZ_MU_SPATIAL}'/'{NPZ_SIGMA_SPATIAL}') or '{NPZ_IMAGES}' "
        f"(uint8 images N x H x W x 3); found {found}"
    )


def _stats_from_npz(z, path: str) -> ReferenceStats:
    def stats(mu_name, sigma_name, n_name):
        mu = np.asarray(z[mu_name], dtype=np.float64)
        sigma = np.asarray(z[sigma_name], dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"{path}: '{mu_name}' must be [D] and '{sigma_name}' [D, D]; got {mu.shape}, {sigma.shape}"
            )
        return FeatureStats(mu, sigma, int(z[n_name]) if n_name in z.files else None)

    pool = stats(NPZ_MU, NPZ_SIGMA, NPZ_N)
    spatial = None
    if NPZ_MU_SPATIAL in z.files and NPZ_SIGMA_SPATIAL in z.files:
        spatial = stats(NPZ_MU_SPATIAL, NPZ_SIGMA_SPATIAL, NPZ_N_SPATIAL)
    return ReferenceStats(pool, spatial, path)


def load_reference_npz(path: str) -> ReferenceStats:
    """Reference statistics of an ADM ``.npz``: ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``).

    A file of images only (``arr_0``) has no statistics to read: its features come from the
    reference cache (:mod:`d2c.eval.reference`), which ``d2c evaluate`` fills.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.npz``, no statistics (naming what it holds), or wrong shapes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference .npz not found: {path}")
    if not zipfile.is_zipfile(path):
        raise _bad_npz(path, "a file that is not an .npz (zip) archive")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot be read as an .npz ({e})") from e
    with z:
        files = list(z.files)
        if NPZ_MU in files and NPZ_SIGMA in files:
            return _stats_from_npz(z, path)
    if NPZ_IMAGES in files:
        raise ValueError(f"{path}: holds images ('{NPZ_IMAGES}') but no statistics; their features come from the "
                         "reference cache (d2c.eval.reference, filled by d2c evaluate)")
    raise _bad_npz(path, files)


def save_samples_npz(path: str, images: np.ndarray | torch.Tensor, labels: np.ndarray | None = None) -> None:
    """Write samples in ADM's layout: ``arr_0`` uint8 ``[N, H, W, 3]`` (+ ``arr_1`` int64 labels ``[N]``).

    Grey or NCHW uint8 inputs are converted; the write is atomic.
    """
    arrays = {NPZ_IMAGES: to_nhwc_rgb(images)}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (arrays[NPZ_IMAGES].shape[0],):
            raise ValueError(f"labels must be [N={arrays[NPZ_IMAGES].shape[0]}], got {labels.shape}")
        arrays[NPZ_LABELS] = labels
    atomic_savez(path, arrays)


# ---------------------------------------------------------------------------
# Through torch-fidelity
# ---------------------------------------------------------------------------
class UInt8ImageDataset(Dataset):
    """uint8 images (any accepted layout) as a Dataset of uint8 tensors ``[3, H, W]`` (torch-fidelity input)."""

    def __init__(self, images: np.ndarray | torch.Tensor):
        image_layout(tuple(images.shape))
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_nchw_rgb(self.images[i : i + 1])[0]


def compute_metrics_torch_fidelity(
    images_gen: np.ndarray | torch.Tensor,
    images_ref: np.ndarray | torch.Tensor,
    *,
    fid: bool = True,
    kid: bool = True,
    prc: bool = True,
    isc: bool = False,
    feature_extractor: str = EXTRACTOR_NAME,
    weights_path: str | None = None,
    batch_size: int = 32,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    prc_k: int = PRC_NEIGHBORHOOD,
    seed: int = DEFAULT_SEED,
    device: str | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """The metrics through ``torch_fidelity.calculate_metrics`` (input1 = generated, input2 = reference).

    Args:
        feature_extractor: ``"d2c-inception-ts"`` (registered on import of
            ``d2c.eval.inception``; offline) or ``"inception-v3-compat"`` (needs
            ``weights_path`` offline; the only one with ``isc``).
        weights_path: passed as ``feature_extractor_weights_path``.
        kid_subset_size: clipped to the smaller set (torch-fidelity would refuse).

    Returns:
        This module's keys: ``fid``, ``kid_mean``, ``kid_std``, ``precision``, ``recall``,
        ``f_score``, ``is_mean``, ``is_std`` (those requested).
    """
    import torch_fidelity

    if isc and feature_extractor != FIDELITY_EXTRACTOR_NAME:
        raise ValueError(
            f"isc needs a classifier head: use feature_extractor={FIDELITY_EXTRACTOR_NAME!r} with weights_path"
        )
    if feature_extractor == FIDELITY_EXTRACTOR_NAME and weights_path is None:
        raise ValueError(f"{FIDELITY_EXTRACTOR_NAME!r} offline needs weights_path (it would download otherwise)")
    device = device or default_device()
    kwargs = dict(
        input1=UInt8ImageDataset(images_gen),
        input2=UInt8ImageDataset(images_ref),
        fid=fid,
        kid=kid,
        prc=prc,
        isc=isc,
        feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights_path,
        batch_size=batch_size,
        cuda=str(device).startswith("cuda"),
        kid_subsets=kid_subsets,
        kid_subset_size=min(kid_subset_size, len(images_gen), len(images_ref)),
        prc_neighborhood=prc_k,
        rng_seed=seed,
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=verbose,
    )
    raw = torch_fidelity.calculate_metrics(**kwargs)
    return {_FIDELITY_KEYS[k]: float(v) for k, v in raw.items() if k in _FIDELITY_KEYS}
