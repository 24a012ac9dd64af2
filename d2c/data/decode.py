"""Decode encoded image bytes into uint8 pixels, turning every kind of bad data into a reason.

Policy (each choice is a parameter where a user could reasonably want another):

- **Loading.** Pillow opens lazily; the pixels are decoded by ``.load()`` inside the same
  ``try``, so truncated or corrupt data is caught here and never later. Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone: if a caller sets it, truncated files
  decode with grey fill instead of being rejected. Multi-frame files (GIF, TIFF) give
  their first frame.
- **Decompression bombs.** The image size is read from the header before decoding; more
  than ``max_pixels`` pixels is refused. Pillow's own guard (``DecompressionBombError``,
  raised inside ``Image.open`` above twice ``Image.MAX_IMAGE_PIXELS``) is reported the same
  way; between once and twice that limit Pillow also emits a ``DecompressionBombWarning``.
- **Orientation.** EXIF orientation is ignored by default, as in the ADM/DiT pipelines
  whose reference statistics we compare against (``exif_transpose=True`` applies it).
- **Colour.** CMYK, YCbCr, LAB, HSV and RGBX are converted with Pillow's built-in
  conversions (embedded ICC profiles are not applied). Bilevel ``1`` becomes 0/255.
- **High bit depth.** 16-bit integer images (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and
  ``I`` whose values all lie in [0, 65535], which is how Pillow holds 16-bit PNG/TIFF data)
  are scaled by ``round(v * 255 / 65535)`` — 65535 → 255, 32768 → 128 — not clipped.
  Other ``I`` (32-bit) images, and ``F`` images whose values lie outside [0, 255], are
  min-max normalised per image to [0, 255] (there is no canonical range; a constant image
  becomes 0). ``F`` values in [0, 1] are scaled by 255, values in [0, 255] are rounded.
  NaN or infinite pixels are a decode error.
- **Alpha** (LA, RGBA, PA, palette with transparency): ``alpha="white"`` (default) composites
  onto white, which is what an image viewer shows and what product photos with transparent
  backgrounds mean; ``"black"`` composites onto black; ``"drop"`` discards alpha (Pillow's
  ``convert("RGB")``, which is what ADM/DiT do, and which exposes whatever colour the
  transparent pixels happen to hold).
- **Channels.** ``channels=3`` gives RGB (grey is replicated); ``channels=1`` gives luma
  ``L = 0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2, Pillow's ``convert("L")``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from d2c.data.records import ImageDecodeError

#: Pillow's own default for ``Image.MAX_IMAGE_PIXELS`` (about 0.25 GiB of 24-bit RGB).
DEFAULT_MAX_PIXELS = 89_478_485

#: Alpha policies: the background level (0..255) to composite onto, or ``None`` to drop alpha.
ALPHA_BACKGROUNDS: dict[str, int | None] = {"white": 255, "black": 0, "drop": None}

#: Output channel counts supported: 1 (grey, "L") or 3 (RGB).
SUPPORTED_CHANNELS = (1, 3)

_UINT8_MAX = 255
_UINT16_MAX = 65535
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("LA", "RGBA")
# Modes Pillow converts to RGB with a real colour conversion.
_COLOUR_MODES_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def _check_options(channels: int, alpha: str) -> None:
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {channels!r}")
    if alpha not in ALPHA_BACKGROUNDS:
        raise ValueError(f"alpha must be one of {sorted(ALPHA_BACKGROUNDS)}, got {alpha!r}")


# ---------------------------------------------------------------------------
# High bit depth → 8 bit
# ---------------------------------------------------------------------------
def scale_uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map integers in [0, 65535] to [0, 255] by ``round(v * 255 / 65535)`` (half up).

    Args:
        values: any integer array with values in [0, 65535].

    Returns:
        uint8 array of the same shape.
    """
    v = values.astype(np.int64)
    # round(v * 255 / 65535) in exact integer arithmetic: floor((2*v*255 + 65535) / (2*65535)).
    return ((2 * v * _UINT8_MAX + _UINT16_MAX) // (2 * _UINT16_MAX)).astype(np.uint8)


def _minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return np.rint((v - lo) * (_UINT8_MAX / (hi - lo))).astype(np.uint8)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Convert a single-band I;16*, I or F image to an 8-bit "L" image (see module doc)."""
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        out = scale_uint16_to_uint8(arr)
    elif im.mode == "I":
        out = (
            scale_uint16_to_uint8(arr)
            if arr.size and arr.min() >= 0 and arr.max() <= _UINT16_MAX
            else _minmax_to_uint8(arr)
        )
    else:  # "F"
        if not np.all(np.isfinite(arr)):
            raise ImageDecodeError("floating-point image has NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            out = np.rint(arr.astype(np.float64) * _UINT8_MAX).astype(np.uint8)
        elif lo >= 0.0 and hi <= _UINT8_MAX:
            out = np.rint(arr).astype(np.uint8)
        else:
            out = _minmax_to_uint8(arr)
    return Image.fromarray(np.ascontiguousarray(out))


# ---------------------------------------------------------------------------
# Mode normalisation
# ---------------------------------------------------------------------------
def _to_8bit_l_la_rgb_rgba(im: Image.Image) -> Image.Image:
    """Return an equivalent image in mode L, LA, RGB or RGBA."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _high_bit_depth_to_l(im)
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("PA", "RGBa"):
        return im.convert("RGBA")
    if mode == "La":  # premultiplied grey + alpha
        return im.convert("LA")
    if mode in _COLOUR_MODES_TO_RGB:
        return im.convert("RGB")
    raise ImageDecodeError(f"unsupported mode {mode!r}")


def _apply_alpha(arr: np.ndarray, background: int | None) -> np.ndarray:
    """uint8 [H, W, C+1], alpha last → uint8 [H, W, C]: composite onto ``background`` or drop."""
    colour = arr[..., :-1]
    if background is None:
        return np.ascontiguousarray(colour)
    a = arr[..., -1:].astype(np.float32) / _UINT8_MAX
    out = colour.astype(np.float32) * a + float(background) * (1.0 - a)
    return np.rint(out).astype(np.uint8)


def convert_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert uint8 pixels ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` to ``[H, W, channels]``.

    Grey → RGB replicates the band; RGB → grey is Pillow's ITU-R 601-2 luma.

    Returns:
        uint8 ``[H, W, channels]``, C-contiguous.
    """
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels must be one of {SUPPORTED_CHANNELS}, got {channels!r}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in SUPPORTED_CHANNELS:
        raise ValueError(f"expected pixels [H, W], [H, W, 1] or [H, W, 3], got shape {img.shape}")
    have = img.shape[2]
    if have == channels:
        return np.ascontiguousarray(img)
    if channels == 3:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    luma = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))
    return np.ascontiguousarray(luma[:, :, None])


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------
def decode_image(
    data: bytes,
    channels: int,
    *,
    alpha: str = "white",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, BMP, TIFF, GIF, ...) to uint8 pixels.

    Args:
        data: the encoded file contents.
        channels: 3 for RGB or 1 for grey.
        alpha: ``"white"``, ``"black"`` or ``"drop"`` (see the module docstring).
        max_pixels: refuse images with more than this many pixels (width × height) before
            decoding them; ``None`` leaves only Pillow's global guard.
        exif_transpose: apply the EXIF orientation tag.

    Returns:
        uint8 ``[H, W, channels]``, C-contiguous.

    Raises:
        ImageDecodeError: zero-byte, truncated, corrupt, oversized or unsupported data;
            ``.reason`` says which.
        ValueError: invalid ``channels`` or ``alpha`` (a caller bug, not bad data).
    """
    _check_options(channels, alpha)
    if data is None or len(data) == 0:
        raise ImageDecodeError("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb: {width}x{height} = {width * height} pixels "
                    f"exceeds max_pixels={max_pixels}"
                )
            im.load()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            source_mode = im.mode
            try:
                im = _to_8bit_l_la_rgb_rgba(im)
            except ValueError as e:  # Pillow: "conversion from X to Y not supported"
                raise ImageDecodeError(f"unsupported mode {source_mode!r}: {e}") from None
            arr = np.asarray(im)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            "truncated or corrupt image: not a recognised image format"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageDecodeError(f"truncated or corrupt image: {e}") from None

    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] in (2, 4):  # LA or RGBA
        arr = _apply_alpha(arr, ALPHA_BACKGROUNDS[alpha])
    return convert_channels(arr, channels)
