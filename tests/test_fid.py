"""d2c.eval: Inception features and FID/sFID/KID/precision/recall/IS on Fashion-MNIST.

Inception-v3 runs at ~5-10 images/s on this CPU, so each image set is small (50) and its
features are computed once per module. Every metric is checked against an independent
computation: scipy's sqrtm written out here, torch-fidelity's own functions, and
torch-fidelity's own Inception architecture loaded with the TorchScript's weights.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torch_fidelity.utils import create_feature_extractor

from d2c.eval.fid import (
    DEFAULT_SEED,
    FeatureStats,
    compute_metrics,
    compute_metrics_torch_fidelity,
    frechet_distance,
    inception_score,
    kid,
    load_reference_npz,
    precision_recall,
    save_samples_npz,
    save_stats_npz,
)
from d2c.eval.reference import (
    NPZ_POOL_FEATURES,
    cache_file,
    cached_features,
    cached_stats,
    dataset_reference_key,
    load_cached,
    npz_reference_key,
    read_npz_images,
)
from d2c.eval.inception import (
    EXTRACTOR_NAME,
    FEATURE_POOL,
    FEATURE_SPATIAL,
    LOGITS_DIM,
    POOL_DIM,
    SPATIAL_DIM,
    InceptionFeatures,
    to_nchw_rgb,
    torchscript_path,
)

# The test loads the TorchScript itself too (torch 2.x deprecates, but keeps, torch.jit.load).
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated:FutureWarning")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_IMAGE_HEADER = 16
IDX_LABEL_HEADER = 8
FMNIST_SIDE = 28
PADDED_SIDE = 32
NUM_CLASSES = 10
PER_CLASS = 5
N_SET = PER_CLASS * NUM_CLASSES  # 50 images per set
#: Sneaker: visually far from the 10-class mixture, so a single-class set is clearly off.
SINGLE_CLASS = 7
#: Offset into the single class's images, disjoint from the PER_CLASS taken for set A.
SINGLE_CLASS_OFFSET = 100
N_TORCH_FIDELITY = 25  # images per set re-featurised through torch-fidelity
N_SMALL = 8  # images for the per-image equality checks and the cache
BATCH = 25
FID_REL_TOL = 1e-3
#: The svd/eigh/sqrtm routes compute one trace: they agree to float64 round-off.
SVD_REL_TOL = 1e-6
#: |FID(A, A)|: with N = 50 < D = 2048 the covariances have rank 49, and sqrt of the
#: ~2000 round-off eigenvalues of S.S (each ~1e-13) leaves ~1e-4 in the trace.
SELF_FID_ATOL = 1e-3
SINGLE_CLASS_RATIO = 1.5
#: Same network, different batch composition / implementation: float32 round-off.
FEATURE_ATOL = 1e-4
KID_SUBSETS_TEST = 10
KID_SUBSET_TEST = 20
KID_SEED = 7
KID_ATOL = 1e-6
IS_N = 100
IS_SPLITS_TEST = 10
ADM_SPATIAL_CHANNELS = 7


# ---------------------------------------------------------------------------
# Data: Fashion-MNIST read here with numpy (idx gz), padded to 32, RGB
# ---------------------------------------------------------------------------
def _read_idx(name: str, header: int) -> np.ndarray:
    with gzip.open(os.path.join(FMNIST_DIR, name), "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _load_split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(f"{prefix}-images-idx3-ubyte.gz", IDX_IMAGE_HEADER).reshape(-1, FMNIST_SIDE, FMNIST_SIDE)
    labels = _read_idx(f"{prefix}-labels-idx1-ubyte.gz", IDX_LABEL_HEADER)
    return images, labels


def _rgb32(grey28: np.ndarray) -> np.ndarray:
    pad = (PADDED_SIDE - FMNIST_SIDE) // 2
    grey = np.pad(grey28, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(grey[..., None], 3, axis=-1)


def _balanced(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    idx = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(NUM_CLASSES)])
    return _rgb32(images[idx])


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """A: train, class-balanced; B: test, class-balanced; C: train, one class. uint8 [50, 32, 32, 3]."""
    if not os.path.isdir(FMNIST_DIR):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR}")
    x_train, y_train = _load_split("train")
    x_test, y_test = _load_split("t10k")
    single = np.flatnonzero(y_train == SINGLE_CLASS)[SINGLE_CLASS_OFFSET : SINGLE_CLASS_OFFSET + N_SET]
    return {"A": _balanced(x_train, y_train), "B": _balanced(x_test, y_test), "C": _rgb32(x_train[single])}


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures(device="cpu", batch_size=BATCH, progress=False)


@pytest.fixture(scope="module")
def feats(data, extractor):
    return {k: extractor.extract(v) for k, v in data.items()}


@pytest.fixture(scope="module")
def stats(feats) -> dict[str, FeatureStats]:
    return {k: FeatureStats.from_features(v.pool) for k, v in feats.items()}


@pytest.fixture(scope="module")
def fid_ab(stats) -> float:
    return frechet_distance(stats["A"], stats["B"])


@pytest.fixture(scope="module")
def metrics_ab(feats) -> dict[str, float]:
    """compute_metrics with A as generated, B as reference (eigh route: the sqrtm one is fid_ab)."""
    fa, fb = feats["A"], feats["B"]
    return compute_metrics(
        fa.pool, fb.pool, spatial_gen=fa.spatial, spatial_ref=fb.spatial, kid_subsets=KID_SUBSETS_TEST,
        fid_method="eigh",
    )  # fmt: skip


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("fid_cache"))


class CountingExtractor:
    """Delegates to an InceptionFeatures and counts extract calls (to prove cache hits)."""

    def __init__(self, inner: InceptionFeatures):
        self.inner = inner
        self.extractor_id = inner.extractor_id
        self.calls = 0

    def extract(self, images, spatial=True, logits=True):
        self.calls += 1
        return self.inner.extract(images, spatial=spatial, logits=logits)


@pytest.fixture(scope="module")
def counting(extractor) -> CountingExtractor:
    return CountingExtractor(extractor)


PREPROCESS = {"image_size": PADDED_SIDE, "channels": 3, "preprocess": "pad"}


def _rows(images: np.ndarray, labels=None) -> list[dict]:
    """Listing rows of decoded images, as the reference's dataset split gives them."""
    labels = np.arange(len(images)) % NUM_CLASSES if labels is None else labels
    return [dict(image_id=f"img{i}", label=int(labels[i]), image=images[i]) for i in range(len(images))]


@pytest.fixture(scope="module")
def cached_ref(data, counting, cache_dir):
    """Two calls of the product's get-or-compute on A[:8]: (first, was cached, second, was cached,
    extract calls after the first, the cache file)."""
    images = data["A"][:N_SMALL]
    key = dataset_reference_key(_rows(images), PREPROCESS, counting.extractor_id)
    path = cache_file(cache_dir, key)

    def compute():
        out = counting.extract(images, spatial=True, logits=False)
        return out.pool, out.spatial, np.arange(len(images)) % NUM_CLASSES

    first, first_before = cached_features(path, key, counting.extractor_id, compute)
    calls_after_first = counting.calls
    second, second_before = cached_features(path, key, counting.extractor_id, compute)
    return first, first_before, second, second_before, calls_after_first, path


# ---------------------------------------------------------------------------
# torch-fidelity's Inception architecture with the TorchScript's weights
# ---------------------------------------------------------------------------
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}  # fmt: skip
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}  # fmt: skip
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
            "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
            "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}  # fmt: skip
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
            "tower_1.conv_3": "branch7x7x3_4"}  # fmt: skip
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}  # fmt: skip
#: TF block names (as in the TorchScript) -> torch-fidelity's (torchvision's) names.
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]  # fmt: skip
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}  # fmt: skip


@pytest.fixture(scope="module")
def fidelity_weights(tmp_path_factory) -> str:
    """torch-fidelity state dict holding the TorchScript's conv/bn weights (fc zero: no IS)."""
    ts = torch.jit.load(torchscript_path(), map_location="cpu").state_dict()
    names = dict(_STEM)
    for ts_block, tf_block, table in _BLOCKS:
        names.update({f"{ts_block}.{a}": f"{tf_block}.{b}" for a, b in table.items()})
    sd = {}
    for ts_name, tf_name in names.items():
        prefix = f"net.layers.{ts_name}"
        beta = ts[f"{prefix}.beta"]
        sd[f"{tf_name}.conv.weight"] = ts[f"{prefix}.weight"]
        sd[f"{tf_name}.bn.weight"] = torch.ones_like(beta)  # TF: no scale after normalisation
        sd[f"{tf_name}.bn.bias"] = beta
        sd[f"{tf_name}.bn.running_mean"] = ts[f"{prefix}.mean"]
        sd[f"{tf_name}.bn.running_var"] = ts[f"{prefix}.var"]
        sd[f"{tf_name}.bn.num_batches_tracked"] = torch.tensor(0)
    assert len(names) * 4 == len(ts), "every TorchScript tensor is mapped"
    sd["fc.weight"] = torch.zeros(LOGITS_DIM, POOL_DIM)
    sd["fc.bias"] = torch.zeros(LOGITS_DIM)
    path = str(tmp_path_factory.mktemp("weights") / "inception-from-torchscript.pth")
    torch.save(sd, path)
    return path


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------
def test_layouts_give_the_same_rgb_tensor(data):
    rgb = data["A"][:3]
    grey = rgb[..., 0]
    want = _nchw(rgb)
    for variant in (rgb, grey, grey[..., None], _nchw(rgb), _nchw(rgb)[:, :1], torch.from_numpy(grey)):
        assert torch.equal(to_nchw_rgb(variant), want)
    with pytest.raises(TypeError, match="uint8"):
        to_nchw_rgb(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_nchw_rgb(np.zeros((2, 5, 8, 8), np.uint8))


def test_features_equal_the_raw_torchscript_and_the_registered_extractor(data, feats):
    imgs = data["A"][:N_SMALL]
    # The TorchScript by hand: TF1 bilinear resize to 299, (x - 128) / 128, forward.
    raw = torch.jit.load(torchscript_path(), map_location="cpu").eval()
    x = interpolate_bilinear_2d_like_tensorflow1x(_nchw(imgs).float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        want = raw((x - 128) / 128).numpy()
        registered = create_feature_extractor(
            EXTRACTOR_NAME, [FEATURE_POOL, FEATURE_SPATIAL], cuda=False, verbose=False
        )
        pool, spatial = registered(_nchw(imgs))
    assert want.shape == (N_SMALL, POOL_DIM)
    np.testing.assert_allclose(pool.numpy(), want, atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(feats["A"].pool[:N_SMALL], want, atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(spatial.numpy(), feats["A"].spatial[:N_SMALL], atol=FEATURE_ATOL, rtol=0)
    assert feats["A"].pool.dtype == np.float32 and feats["A"].spatial.shape == (N_SET, SPATIAL_DIM)
    assert feats["A"].logits is None  # the TorchScript has no classifier head


def test_torchscript_equals_torch_fidelity_architecture(data, feats, fidelity_weights):
    """torch-fidelity's inception-v3-compat with the same weights gives the same pool and sFID features."""
    imgs = data["A"][:N_SMALL]
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=fidelity_weights)
    mixed6 = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: mixed6.append(out))
    with torch.no_grad():
        (pool,) = net(_nchw(imgs))
    # ADM: spatial = mixed_6/conv:0 (NHWC)[..., :7], reshaped to [N, -1].
    adm_spatial = mixed6[0].permute(0, 2, 3, 1).numpy()[..., :ADM_SPATIAL_CHANNELS].reshape(N_SMALL, -1)
    np.testing.assert_allclose(feats["A"].pool[:N_SMALL], pool.numpy(), atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(feats["A"].spatial[:N_SMALL], adm_spatial, atol=FEATURE_ATOL, rtol=0)

    compat = InceptionFeatures("torch-fidelity", weights_path=fidelity_weights, device="cpu", progress=False)
    out = compat.extract(imgs)
    assert compat.is_available and compat.sfid_available
    assert out.logits.shape == (N_SMALL, LOGITS_DIM)
    np.testing.assert_allclose(out.pool, pool.numpy(), atol=FEATURE_ATOL, rtol=0)
    np.testing.assert_allclose(out.spatial, adm_spatial, atol=FEATURE_ATOL, rtol=0)


# ---------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero(stats, fid_ab):
    # eigh route (same value as sqrtm: test_eigh_route_equals_sqrtm_route), as sqrtm of the
    # rank-deficient S.S costs up to a minute on this shared CPU.
    self_fid = frechet_distance(stats["A"], stats["A"], method="eigh")
    assert abs(self_fid) < SELF_FID_ATOL
    assert fid_ab > 1.0  # the two independent samples are a real distance apart


def test_eigh_route_equals_sqrtm_route(metrics_ab, fid_ab):
    assert metrics_ab["fid"] == pytest.approx(fid_ab, rel=FID_REL_TOL)


def test_svd_route_equals_sqrtm_route(feats, stats, fid_ab, metrics_ab):
    """The features route (nuclear norm of A B^T) gives ADM's sqrtm FID and the eigh sFID."""
    fa, fb = feats["A"], feats["B"]
    via_features = frechet_distance(stats["A"], stats["B"], method="svd", features=(fa.pool, fb.pool))
    assert via_features == pytest.approx(fid_ab, rel=SVD_REL_TOL)
    svd = compute_metrics(fa.pool, fb.pool, spatial_gen=fa.spatial, spatial_ref=fb.spatial,
                          kid_subsets=KID_SUBSETS_TEST, fid_method="svd")
    assert svd["fid"] == pytest.approx(fid_ab, rel=SVD_REL_TOL)
    assert svd["sfid"] == pytest.approx(metrics_ab["sfid"], rel=SVD_REL_TOL)
    # reference statistics + the features they came from: the same numbers
    s_ref = FeatureStats.from_features(fb.spatial)
    cached = compute_metrics(fa.pool, fb.pool, stats_ref=stats["B"], spatial_gen=fa.spatial, spatial_ref=s_ref,
                             spatial_ref_features=fb.spatial, kid_subsets=KID_SUBSETS_TEST, fid_method="svd")
    assert cached["fid"] == pytest.approx(svd["fid"], rel=SVD_REL_TOL)
    assert cached["sfid"] == pytest.approx(svd["sfid"], rel=SVD_REL_TOL)


@pytest.mark.parametrize("n_a,n_b,dim", [(12, 20, 32), (90, 60, 16)])
def test_trace_from_features_equals_the_eigenvalues_of_the_product(n_a, n_b, dim):
    """Below and above D samples: sum sqrt(eig(S_a S_b)), computed directly, is the features route's trace."""
    rng = np.random.default_rng(n_a)
    a = rng.standard_normal((n_a, dim)) @ rng.standard_normal((dim, dim))
    b = rng.standard_normal((n_b, dim)) + 0.5
    lam = np.linalg.eigvals(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    want = np.sqrt(np.clip(lam, 0.0, None)).sum()
    s_a, s_b = FeatureStats.from_features(a), FeatureStats.from_features(b)
    got = frechet_distance(s_a, s_b, method="svd", features=(a, b))
    direct = float(np.sum((s_a.mu - s_b.mu) ** 2) + np.trace(s_a.sigma) + np.trace(s_b.sigma) - 2 * want)
    assert got == pytest.approx(direct, rel=SVD_REL_TOL)


def test_svd_route_ignores_features_the_statistics_are_not_of(feats, stats):
    """Reference statistics of other images (ADM's mu/sigma beside its arr_0) keep the eigh route on them."""
    fa, fb = feats["A"], feats["B"]
    got = compute_metrics(fa.pool, fb.pool, stats_ref=stats["C"], kid_subsets=KID_SUBSETS_TEST, fid_method="svd")
    assert got["fid"] == pytest.approx(frechet_distance(stats["A"], stats["C"], method="eigh"), rel=SVD_REL_TOL)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(stats["A"], stats["B"], method="svd", features=(fa.pool, fb.spatial))


def test_single_class_fid_is_far_above_mixed_fid(stats, fid_ab):
    fid_ac = frechet_distance(stats["A"], stats["C"], method="eigh")
    assert fid_ac > SINGLE_CLASS_RATIO * fid_ab, (fid_ac, fid_ab)


def test_frechet_distance_equals_scipy_sqrtm_written_out(feats, fid_ab):
    fa = feats["A"].pool.astype(np.float64)
    fb = feats["B"].pool.astype(np.float64)
    mu1, mu2 = fa.mean(axis=0), fb.mean(axis=0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid_ab == pytest.approx(want, rel=FID_REL_TOL)


def test_metrics_equal_torch_fidelity_through_the_registered_extractor(data, feats):
    """torch_fidelity.calculate_metrics with feature_extractor="d2c-inception-ts" on half of A and B."""
    n = N_TORCH_FIDELITY
    theirs = compute_metrics_torch_fidelity(
        data["A"][:n], data["B"][:n], device="cpu", batch_size=BATCH, kid_subsets=KID_SUBSETS_TEST
    )
    ours = compute_metrics(
        feats["A"].pool[:n], feats["B"].pool[:n], kid_subsets=KID_SUBSETS_TEST, fid_method="eigh"
    )
    assert theirs["fid"] == pytest.approx(ours["fid"], rel=FID_REL_TOL)
    assert ours["kid_subset_size"] == n
    assert theirs["kid_mean"] == pytest.approx(ours["kid_mean"], rel=FID_REL_TOL, abs=KID_ATOL)
    assert theirs["precision"] == pytest.approx(ours["precision"])
    assert theirs["recall"] == pytest.approx(ours["recall"])


# ---------------------------------------------------------------------------
# KID, precision/recall, IS, sFID
# ---------------------------------------------------------------------------
def _mmd2_unbiased_full(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m = len(x)
    return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_torch_fidelity_and_the_formula(feats):
    fa, fb, fc = (feats[k].pool.astype(np.float64) for k in "ABC")
    mean, std = kid(fa, fb, KID_SUBSETS_TEST, KID_SUBSET_TEST, seed=KID_SEED)
    theirs = kid_features_to_metric(
        torch.from_numpy(fa), torch.from_numpy(fb),
        kid_subsets=KID_SUBSETS_TEST, kid_subset_size=KID_SUBSET_TEST, rng_seed=KID_SEED, verbose=False,
    )  # fmt: skip
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9, abs=1e-12)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9, abs=1e-12)

    # One subset of the whole set: a permutation of it, so exactly the full-set estimator.
    full_ab, full_std = kid(fa, fb, 1, N_SET)
    assert full_ab == pytest.approx(_mmd2_unbiased_full(fa, fb), rel=1e-9)
    assert full_std == 0.0

    # A set against itself: the unbiased estimator gives (2/m)(mean off-diagonal - mean diagonal) of K.
    self_kid, _ = kid(fa, fa, 1, N_SET)
    k = (fa @ fa.T / fa.shape[1] + 1) ** 3
    off = (k.sum() - np.trace(k)) / (N_SET * (N_SET - 1))
    assert self_kid == pytest.approx(2 / N_SET * (off - np.diag(k).mean()), rel=1e-9)
    kid_ac, _ = kid(fa, fc, 1, N_SET)
    assert abs(self_kid) < abs(kid_ac) / 2


def test_precision_recall(feats):
    fa, fb, fc = (feats[k].pool for k in "ABC")
    assert precision_recall(fa, fa) == (1.0, 1.0)
    p, r = precision_recall(fb, fa)
    p_tf, r_tf = calculate_precision_recall_full(torch.from_numpy(fb), torch.from_numpy(fa), 3)
    assert (p, r) == pytest.approx((p_tf, r_tf))
    # A single-class "generator" covers little of the 10-class reference.
    _, r_single = precision_recall(fc, fa)
    assert r_single < r


def test_inception_score_matches_torch_fidelity():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(IS_N, LOGITS_DIM))
    mean, std = inception_score(logits, splits=IS_SPLITS_TEST)
    theirs = isc_features_to_metric(
        torch.from_numpy(logits), splits=IS_SPLITS_TEST, shuffle=True, rng_seed=DEFAULT_SEED
    )
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    assert inception_score(np.zeros((IS_N, LOGITS_DIM)))[0] == pytest.approx(1.0)  # uniform: IS = 1


def test_sfid_and_compute_metrics_keys(feats, metrics_ab):
    assert {"fid", "kid_mean", "kid_std", "precision", "recall", "sfid", "n_gen", "n_ref"} <= metrics_ab.keys()
    spatial = {k: FeatureStats.from_features(feats[k].spatial) for k in "BC"}
    assert spatial["B"].dim == SPATIAL_DIM
    # A single-class set is further (in sFID too) from the mixed reference than a mixed one.
    assert frechet_distance(spatial["C"], spatial["B"], method="eigh") > metrics_ab["sfid"] > 0


def test_compute_metrics_with_reference_statistics_only():
    """Small synthetic D: with stats only, FID is the same and KID/PR (which need features) are absent."""
    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(40, 16)), rng.normal(loc=0.5, size=(30, 16))
    full = compute_metrics(gen, ref, kid_subsets=KID_SUBSETS_TEST)
    only_stats = compute_metrics(gen, None, stats_ref=FeatureStats.from_features(ref))
    assert only_stats["fid"] == pytest.approx(full["fid"], rel=1e-12)
    assert "kid_mean" not in only_stats and "precision" not in only_stats
    assert full["kid_subset_size"] == 30  # clipped to the smaller set
    with pytest.raises(ValueError, match="reference"):
        compute_metrics(gen, None)


# ---------------------------------------------------------------------------
# Reference statistics cache and ADM .npz files
# ---------------------------------------------------------------------------
def test_reference_cache_hits_on_the_second_call(cached_ref, feats, counting):
    first, first_before, second, second_before, calls_after_first, path = cached_ref
    assert not first_before and second_before and path.is_file()
    assert counting.calls == calls_after_first == 1  # the second call computed nothing
    pool, spatial = cached_stats(first)
    pool2, spatial2 = cached_stats(second)
    np.testing.assert_array_equal(pool.sigma, pool2.sigma)
    np.testing.assert_array_equal(spatial.mu, spatial2.mu)
    assert pool.n == N_SMALL and spatial.dim == SPATIAL_DIM
    # The statistics are those of the stored features, which are the extractor's.
    want = FeatureStats.from_features(feats["A"].pool[:N_SMALL])
    np.testing.assert_allclose(pool.mu, want.mu, atol=FEATURE_ATOL)
    np.testing.assert_allclose(first[NPZ_POOL_FEATURES], feats["A"].pool[:N_SMALL], atol=FEATURE_ATOL)
    np.testing.assert_array_equal(first["labels"], np.arange(N_SMALL) % NUM_CLASSES)


def test_reference_keys_cover_content_labels_preprocessing_and_extractor(data, tmp_path, cached_ref):
    ext_id = "inception-x"
    rows = _rows(data["A"][:N_SMALL])
    key = dataset_reference_key(rows, PREPROCESS, ext_id)
    assert dataset_reference_key(_rows(data["A"][:N_SMALL]), PREPROCESS, ext_id) == key  # same content
    assert dataset_reference_key(_rows(data["B"][:N_SMALL]), PREPROCESS, ext_id) != key  # other pixels
    assert dataset_reference_key(rows, PREPROCESS, ext_id + "-other") != key  # other extractor
    assert dataset_reference_key(rows, dict(PREPROCESS, image_size=64), ext_id) != key  # other preprocessing
    assert dataset_reference_key(_rows(data["A"][:N_SMALL], np.zeros(N_SMALL, int)), PREPROCESS, ext_id) != key
    assert dataset_reference_key(rows[:-1], PREPROCESS, ext_id) != key  # one image fewer
    encoded = [dict(image_id=r["image_id"], label=r["label"], image_bytes=r["image"].tobytes()) for r in rows]
    assert dataset_reference_key(encoded, PREPROCESS, ext_id) != key
    # An ADM file's key follows its content.
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_samples_npz(str(a), data["A"][:N_SMALL])
    save_samples_npz(str(b), data["B"][:N_SMALL])
    assert npz_reference_key(a, ext_id) != npz_reference_key(b, ext_id) != npz_reference_key(b, ext_id + "-other")
    # A cache file holding another key is a miss, not a wrong hit.
    *_, path = cached_ref
    assert load_cached(path, "0" * 64) is None and load_cached(tmp_path / "none.npz", "0" * 64) is None


def test_adm_npz_round_trip(tmp_path, data, cached_ref):
    # Samples: arr_0 uint8 N x H x W x 3 (grey input is expanded), arr_1 labels.
    samples = str(tmp_path / "samples.npz")
    labels = np.arange(N_SET) % NUM_CLASSES
    save_samples_npz(samples, data["A"][..., 0], labels=labels)
    with np.load(samples) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (N_SET, PADDED_SIDE, PADDED_SIDE, 3)
        np.testing.assert_array_equal(z["arr_0"], data["A"])
        np.testing.assert_array_equal(z["arr_1"], labels)
    np.testing.assert_array_equal(read_npz_images(samples), data["A"])

    # A reference cache file is an ADM reference file (mu, sigma, mu_s, sigma_s).
    first, *_, path = cached_ref
    pool, spatial = cached_stats(first)
    with np.load(path) as z:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
    loaded = load_reference_npz(str(path))
    np.testing.assert_array_equal(loaded.pool.sigma, pool.sigma)
    np.testing.assert_array_equal(loaded.spatial.sigma, spatial.sigma)

    # A bare ADM file: mu/sigma only (no n, no spatial).
    adm = str(tmp_path / "adm_ref.npz")
    np.savez(adm, mu=pool.mu, sigma=pool.sigma)
    bare = load_reference_npz(adm)
    assert bare.pool.n is None and bare.spatial is None
    np.testing.assert_array_equal(bare.pool.mu, pool.mu)
    save_stats_npz(str(tmp_path / "ours.npz"), pool)
    assert load_reference_npz(str(tmp_path / "ours.npz")).pool.n == N_SMALL
    # An image batch has no statistics to read: it is featurised through the cache (d2c evaluate).
    with pytest.raises(ValueError, match="holds images .* reference cache"):
        load_reference_npz(samples)


def test_bad_npz_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_reference_npz(str(tmp_path / "missing.npz"))
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz"):
        load_reference_npz(str(text))
    npy = tmp_path / "bare.npy"
    np.save(npy, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="not an .npz"):
        load_reference_npz(str(npy))
    cases = {
        "other.npz": dict(foo=np.zeros(3)),
        "mu_only.npz": dict(mu=np.zeros(3)),
    }
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=r"'mu' and 'sigma'.*'arr_0'"):
            load_reference_npz(str(tmp_path / name))
    np.savez(tmp_path / "bad_shapes.npz", mu=np.zeros(3), sigma=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="must be"):
        load_reference_npz(str(tmp_path / "bad_shapes.npz"))
    np.savez(tmp_path / "float_images.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        read_npz_images(str(tmp_path / "float_images.npz"))
    np.savez(tmp_path / "odd_images.npz", arr_0=np.zeros((2, 8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        read_npz_images(str(tmp_path / "odd_images.npz"))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        read_npz_images(str(tmp_path / "other.npz"))
    with pytest.raises(TypeError, match="uint8"):
        save_samples_npz(str(tmp_path / "x.npz"), np.zeros((2, 8, 8, 3), np.float32))


def test_torchscript_extractor_refuses_inception_score(data):
    with pytest.raises(ValueError, match="classifier head"):
        compute_metrics_torch_fidelity(data["A"][:2], data["B"][:2], fid=False, kid=False, prc=False, isc=True)
