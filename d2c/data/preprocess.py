"""Pixel preprocessing: the ADM/DiT center crop, padding, and the model's [-1, 1] tensors.

Also :func:`prepare_record`, the per-row map function of the pipeline: listing row in,
decoded and preprocessed record (or a :class:`~d2c.data.records.Reject`) out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from d2c.data.decode import DEFAULT_MAX_PIXELS, convert_channels, decode_image
from d2c.data.imagefolder import read_image_file
from d2c.data.records import (
    CLASS_NAME,
    IMAGE,
    IMAGE_BYTES,
    IMAGE_ID,
    LABEL,
    PATH,
    ImageDecodeError,
    Reject,
)

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data's decode tasks never need it
    import torch

_UINT8_MAX = 255
_HALF_UINT8 = _UINT8_MAX / 2.0  # 127.5: uint8 [0, 255] ↔ [-1, 1]
#: While the shorter side is at least this multiple of the target, halve with a box filter.
BOX_DOWNSAMPLE_FACTOR = 2

#: ``method`` values of :func:`preprocess_image`.
PREPROCESS_METHODS = ("center_crop", "pad")


def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(
            "expected a uint8 array [H, W, C], got "
            f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        )
    if img.shape[2] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {img.shape}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image size must be an int >= 1, got {size!r}")


def center_crop_arr(img: np.ndarray, image_size: int) -> np.ndarray:
    """The ADM/DiT center crop: box-halve, bicubic-resize the short side, crop the centre.

    1. While the shorter side is >= 2 · ``image_size``, halve both sides (floor) with a
       BOX filter (an exact 2×2 mean), which avoids aliasing in the bicubic step.
    2. Resize with BICUBIC so the shorter side is ``image_size`` (the longer side is
       scaled by the same factor and rounded to the nearest integer).
    3. Crop ``image_size × image_size`` from the centre (offset ``(len - size) // 2``).

    Images smaller than ``image_size`` are upscaled by step 2.

    Args:
        img: uint8 ``[H, W, C]``, C in {1, 3}.
        image_size: output side length.

    Returns:
        uint8 ``[image_size, image_size, C]``.
    """
    _check_image(img)
    _check_size(image_size)
    channels = img.shape[2]
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if channels == 1 else img))
    while min(pil.size) >= BOX_DOWNSAMPLE_FACTOR * image_size:
        half = tuple(side // BOX_DOWNSAMPLE_FACTOR for side in pil.size)
        pil = pil.resize(half, resample=Image.Resampling.BOX)
    scale = image_size / min(pil.size)
    resized = tuple(max(image_size, round(side * scale)) for side in pil.size)
    pil = pil.resize(resized, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    out = arr[top : top + image_size, left : left + image_size]
    if channels == 1:
        out = out[:, :, None]
    return np.ascontiguousarray(out)


def pad_to(img: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Pad symmetrically to ``size × size`` (Fashion-MNIST 28 → 32 with its black background).

    When the padding is odd, the extra row/column goes to the bottom/right.

    Args:
        img: uint8 ``[H, W, C]`` with H, W <= ``size``.
        size: output side length.
        value: fill level (0 is Fashion-MNIST's background).

    Returns:
        uint8 ``[size, size, C]``.

    Raises:
        ValueError: the image is larger than ``size`` on either side.
    """
    _check_image(img)
    _check_size(size)
    if not 0 <= value <= _UINT8_MAX:
        raise ValueError(f"pad value must be in [0, {_UINT8_MAX}], got {value}")
    h, w = img.shape[:2]
    if h > size or w > size:
        raise ValueError(f"cannot pad a {h}x{w} image to {size}x{size}: it is larger")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((top, size - h - top), (left, size - w - left), (0, 0))
    return np.pad(img, pad, mode="constant", constant_values=value)


def preprocess_image(img: np.ndarray, image_size: int, method: str) -> np.ndarray:
    """Bring uint8 ``[H, W, C]`` to ``[image_size, image_size, C]`` by ``method``.

    ``"center_crop"``: :func:`center_crop_arr` (ImageNet); ``"pad"``: :func:`pad_to` with 0
    (Fashion-MNIST 28 → 32).
    """
    if method == "center_crop":
        return center_crop_arr(img, image_size)
    if method == "pad":
        return pad_to(img, image_size)
    raise ValueError(f"preprocess method must be one of {PREPROCESS_METHODS}, got {method!r}")


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A C-contiguous array as a CPU tensor without a copy where it can be shared; Ray hands over
    read-only arrays, which torch would share with a warning, so those are copied."""
    import torch

    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_model_tensor(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` → float32 ``[N, C, H, W]`` in [-1, 1] (``x / 127.5 - 1``)."""
    import torch

    t = host_tensor(batch) if isinstance(batch, np.ndarray) else batch
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, C], got {t.dtype} {tuple(t.shape)}")
    return (t.permute(0, 3, 1, 2).to(torch.float32) / _HALF_UINT8 - 1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Float ``[N, C, H, W]`` in [-1, 1] → uint8 ``[N, H, W, C]`` (rounded, clamped).

    The exact inverse of :func:`to_model_tensor`; values outside [-1, 1] saturate.
    """
    import torch

    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected float [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    y = ((x.detach().to(torch.float32) + 1.0) * _HALF_UINT8).round().clamp(0, _UINT8_MAX)
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def prepare_record(
    row: Mapping[str, Any],
    *,
    channels: int,
    image_size: int,
    method: str,
    alpha: str = "white",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> dict[str, Any] | Reject:
    """Decode and preprocess one listing row (see :mod:`d2c.data.records`).

    The row's pixels come from ``image`` (uint8 ``[H, W]`` or ``[H, W, C]``),
    ``image_bytes`` (encoded; ``None`` is a reject) or ``path`` (read from disk), in that
    order of preference.

    Returns:
        ``{"image_id": str, "label": int, "class_name": str,
        "image": uint8 [image_size, image_size, channels]}``, or a :class:`Reject` when the
        pixels cannot be read or decoded. Preprocessing errors (e.g. an image larger than
        the ``"pad"`` target) are rejects too, since they are a property of the data.
    """
    if method not in PREPROCESS_METHODS:
        raise ValueError(f"preprocess method must be one of {PREPROCESS_METHODS}, got {method!r}")
    _check_size(image_size)
    image_id = str(row[IMAGE_ID])
    decode_kwargs = dict(alpha=alpha, max_pixels=max_pixels, exif_transpose=exif_transpose)
    try:
        if row.get(IMAGE) is not None:
            pixels = np.asarray(row[IMAGE])
            if pixels.dtype != np.uint8:
                raise ImageDecodeError(f"pixel array has dtype {pixels.dtype}, expected uint8")
            try:
                pixels = convert_channels(pixels, channels)
            except ValueError as e:
                raise ImageDecodeError(str(e)) from None
        elif IMAGE_BYTES in row:
            if row[IMAGE_BYTES] is None:
                raise ImageDecodeError("missing image data (null)")
            pixels = decode_image(row[IMAGE_BYTES], channels, **decode_kwargs)
        elif row.get(PATH) is not None:
            pixels = read_image_file(row[PATH], channels, **decode_kwargs)
        else:
            raise ImageDecodeError("row has no image, image_bytes or path")
        try:
            pixels = preprocess_image(pixels, image_size, method)
        except ValueError as e:  # options were checked above: this is about the pixels
            raise ImageDecodeError(f"cannot preprocess: {e}") from None
    except ImageDecodeError as e:
        return Reject(image_id=image_id, reason=e.reason)
    return {
        IMAGE_ID: image_id,
        LABEL: int(row[LABEL]),
        CLASS_NAME: str(row[CLASS_NAME]),
        IMAGE: pixels,
    }
