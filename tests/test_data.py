"""d2c.data: records, decoding every kind of bad input, ADM center crop, and the sources."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from d2c.data.decode import (
    DEFAULT_MAX_PIXELS,
    convert_channels,
    decode_image,
    scale_uint16_to_uint8,
)
from d2c.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    list_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from d2c.data.imagefolder import list_imagefolder, read_class_mapping, read_image_file
from d2c.data.parquet_source import list_parquet
from d2c.data.preprocess import (
    center_crop_arr,
    pad_to,
    prepare_record,
    preprocess_image,
    to_model_tensor,
    to_uint8,
)
from d2c.data.records import (
    CLASS_NAMES_FASHION_MNIST,
    DataSourceError,
    DataSourceNotFoundError,
    ImageDecodeError,
    Reject,
    first_per_class,
)

RNG_SEED = 0
CORRUPT = "truncated or corrupt image"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def encode(image: Image.Image | np.ndarray, fmt: str, **save_kwargs) -> bytes:
    """Encode a PIL image (or a uint8/uint16/int32/float32 array) into ``fmt`` bytes."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def solid(rgb: tuple[int, int, int], h: int = 8, w: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def decode_reason(data: bytes, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, 3, **kwargs)
    return info.value.reason


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR (8-bit grey) + IEND: a header that claims a huge image."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------
def test_records_basics():
    assert len(CLASS_NAMES_FASHION_MNIST) == 10
    assert CLASS_NAMES_FASHION_MNIST[0] == "T-shirt/top"
    assert CLASS_NAMES_FASHION_MNIST[9] == "Ankle boot"
    assert Reject("a/b.jpg", "zero-byte file").to_row() == {
        "image_id": "a/b.jpg",
        "reason": "zero-byte file",
    }
    err = pickle.loads(pickle.dumps(ImageDecodeError("zero-byte file")))
    assert err.reason == "zero-byte file" and str(err) == "zero-byte file"
    assert issubclass(DataSourceNotFoundError, FileNotFoundError)


def test_first_per_class():
    labels = [2, 0, 2, 1, 0, 2, 0]
    assert first_per_class(labels, None).tolist() == list(range(7))
    assert first_per_class(labels, 1).tolist() == [0, 1, 3]
    assert first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4]
    assert first_per_class([], 3).tolist() == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            first_per_class(labels, bad)


# ---------------------------------------------------------------------------
# decode: bad data
# ---------------------------------------------------------------------------
def test_decode_bad_data_gives_reasons():
    rng = np.random.default_rng(RNG_SEED)
    assert decode_reason(b"") == "zero-byte file"
    assert decode_reason(rng.bytes(512)) == f"{CORRUPT}: not a recognised image format"
    jpeg = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    reason = decode_reason(jpeg[: len(jpeg) // 2])
    assert reason.startswith(f"{CORRUPT}: image file is truncated")
    png = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    assert decode_reason(png[: len(png) // 2]).startswith(CORRUPT)


def test_decode_refuses_decompression_bombs():
    png = encode(solid((1, 2, 3), 10, 20), "PNG")
    reason = decode_reason(png, max_pixels=199)
    assert reason == "decompression bomb: 20x10 = 200 pixels exceeds max_pixels=199"
    assert decode_image(png, 3, max_pixels=200).shape == (10, 20, 3)
    big = png_header_only(10_000, 10_000)  # 1e8 pixels: over our default limit, no pixel data
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow warns above its limit
        reason = decode_reason(big)
    assert reason == (
        "decompression bomb: 10000x10000 = 100000000 pixels exceeds "
        f"max_pixels={DEFAULT_MAX_PIXELS}"
    )
    # Pillow's own guard (over twice its limit, raised inside Image.open) reads the same way.
    huge = png_header_only(20_000, 20_000)
    assert decode_reason(huge).startswith("decompression bomb: Image size (400000000 pixels)")
    assert decode_reason(huge, max_pixels=None).startswith("decompression bomb: Image size")
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


def test_decode_rejects_bad_options():
    png = encode(solid((1, 2, 3)), "PNG")
    with pytest.raises(ValueError, match="channels"):
        decode_image(png, 2)
    with pytest.raises(ValueError, match="alpha"):
        decode_image(png, 3, alpha="grey")


# ---------------------------------------------------------------------------
# decode: modes
# ---------------------------------------------------------------------------
def test_decode_rgb_png_exact_and_jpeg_close():
    rng = np.random.default_rng(RNG_SEED)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_image(encode(pixels, "PNG"), 3)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)
    jpeg = decode_image(encode(solid((200, 100, 50), 16, 16), "JPEG", quality=95), 3)
    assert np.abs(jpeg.astype(int) - [200, 100, 50]).max() <= 3


def test_decode_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, 3)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_decode_palette_png_with_and_without_transparency():
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.putdata([0, 1, 2])
    np.testing.assert_array_equal(
        decode_image(encode(im, "PNG"), 3)[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    )
    data = encode(im, "PNG", transparency=1)  # index 1 (green) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(
        decode_image(data, 3)[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]]
    )
    np.testing.assert_array_equal(decode_image(data, 3, alpha="black")[0, 1], [0, 0, 0])


def test_decode_16bit_png_scales_not_clips():
    values = np.array([[0, 32768, 65535, 25700, 257]], np.uint16)
    data = encode(values, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data, 1)
    assert out.shape == (1, 5, 1)
    assert out[0, :, 0].tolist() == [0, 128, 255, 100, 1]
    assert decode_image(data, 3)[0, 1].tolist() == [128, 128, 128]
    assert scale_uint16_to_uint8(np.array([65535, 32767, 128])).tolist() == [255, 127, 0]


def test_decode_32bit_int_and_float_tiff():
    in_16bit_range = encode(np.array([[0, 65535]], np.int32), "TIFF")
    assert Image.open(io.BytesIO(in_16bit_range)).mode == "I"
    assert decode_image(in_16bit_range, 1)[0, :, 0].tolist() == [0, 255]
    wide = encode(np.array([[0, 100_000, 200_000]], np.int32), "TIFF")
    assert decode_image(wide, 1)[0, :, 0].tolist() == [0, 128, 255]  # min-max
    unit = encode(np.array([[0.0, 0.5, 1.0]], np.float32), "TIFF")
    assert Image.open(io.BytesIO(unit)).mode == "F"
    assert decode_image(unit, 1)[0, :, 0].tolist() == [0, 128, 255]
    byte_range = encode(np.array([[0.0, 100.4, 255.0]], np.float32), "TIFF")
    assert decode_image(byte_range, 1)[0, :, 0].tolist() == [0, 100, 255]
    signed = encode(np.array([[-1.0, 1.0, 3.0]], np.float32), "TIFF")
    assert decode_image(signed, 1)[0, :, 0].tolist() == [0, 128, 255]
    nan = encode(np.array([[0.0, np.nan]], np.float32), "TIFF")
    assert decode_reason(nan) == "floating-point image has NaN or infinite pixel values"


def test_decode_grey_and_bilevel_and_luma():
    grey = np.array([[0, 77, 255]], np.uint8)
    data = encode(grey, "PNG")
    np.testing.assert_array_equal(decode_image(data, 1)[..., 0], grey)
    np.testing.assert_array_equal(decode_image(data, 3), np.repeat(grey[..., None], 3, axis=2))
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert decode_image(encode(bilevel, "PNG"), 1)[0, :, 0].tolist() == [0, 255]
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30]]], np.uint8)
    luma = decode_image(encode(rgb, "PNG"), 1)[0, :, 0].astype(float)
    expected = rgb[0].astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(luma - expected).max() <= 1


def test_decode_alpha_policies():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [100, 0, 200, 128]]], np.uint8)
    data = encode(rgba, "PNG")
    white = decode_image(data, 3)[0].astype(int)
    a = 128 / 255
    half = np.rint(np.array([100, 0, 200]) * a + 255 * (1 - a))
    np.testing.assert_array_equal(white, [[255, 255, 255], [10, 20, 30], half])
    black = decode_image(data, 3, alpha="black")[0].astype(int)
    np.testing.assert_array_equal(black, [[0, 0, 0], [10, 20, 30], np.rint([100 * a, 0, 200 * a])])
    drop = decode_image(data, 3, alpha="drop")[0]
    np.testing.assert_array_equal(drop, rgba[0, :, :3])
    la = np.array([[[40, 0], [40, 255]]], np.uint8)
    out = decode_image(encode(Image.fromarray(la, mode="LA"), "PNG"), 1)
    assert out[0, :, 0].tolist() == [255, 40]


def test_decode_exif_orientation_is_opt_in():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(solid((9, 9, 9), 4, 8), "JPEG", exif=exif)
    assert decode_image(data, 3).shape == (4, 8, 3)
    assert decode_image(data, 3, exif_transpose=True).shape == (8, 4, 3)


def test_convert_channels():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert convert_channels(grey, 3).shape == (2, 3, 3)
    assert convert_channels(grey[..., None], 1).shape == (2, 3, 1)
    with pytest.raises(ValueError):
        convert_channels(grey.astype(np.float32), 1)


# ---------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------
def expected_gradient_crop(width, height, size, slope_x, slope_y, halvings):
    """Independent model of the ADM crop on v = slope_x·x (channel 0), slope_y·y (channel 1).

    Box halving maps pixel j to the mean of 2j, 2j+1 (centre 2j + 0.5); bicubic resizing
    reproduces linear functions, sampling output pixel o at input (o + 0.5)·in/out − 0.5.
    """
    w, h = width, height
    for _ in range(halvings):
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    xs = (np.arange(size) + left + 0.5) * w / new_w - 0.5
    ys = (np.arange(size) + top + 0.5) * h / new_h - 0.5
    for _ in range(halvings):
        xs, ys = 2 * xs + 0.5, 2 * ys + 0.5
    return slope_x * xs[None, :].repeat(size, 0), slope_y * ys[:, None].repeat(size, 1)


@pytest.mark.parametrize("width,height,halvings", [(512, 384, 0), (1024, 768, 1)])
def test_center_crop_gradient_matches_expected_region(width, height, halvings):
    size = 256
    slope_x, slope_y = 250 / (width - 1), 250 / (height - 1)
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = np.rint(slope_x * np.arange(width))[None, :]
    img[..., 1] = np.rint(slope_y * np.arange(height))[:, None]
    img[..., 2] = 77
    out = center_crop_arr(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    exp_x, exp_y = expected_gradient_crop(width, height, size, slope_x, slope_y, halvings)
    for channel, expected in ((0, exp_x), (1, exp_y)):
        error = out[..., channel] - expected
        assert np.abs(error).max() <= 2
        # A crop one pixel off biases every value by about slope·scale ≈ 0.7; box halving
        # rounds .5 up, a bias of slope/2 ≈ 0.16 at most here.
        assert abs(error.mean()) <= 0.25
    assert (out[..., 2] == 77).all()


def test_center_crop_solid_grey_portrait_and_upscale():
    out = center_crop_arr(solid((12, 200, 99), 300, 120), 64)
    assert out.shape == (64, 64, 3)
    assert (out == np.array([12, 200, 99], np.uint8)).all()
    grey = np.full((20, 10, 1), 140, np.uint8)
    up = center_crop_arr(grey, 32)
    assert up.shape == (32, 32, 1) and (up == 140).all()
    with pytest.raises(ValueError):
        center_crop_arr(np.zeros((4, 4, 2), np.uint8), 2)


def test_pad_to():
    img = np.arange(28 * 28, dtype=np.int64).reshape(28, 28, 1).astype(np.uint8)
    out = pad_to(img, 32)
    assert out.shape == (32, 32, 1)
    np.testing.assert_array_equal(out[2:30, 2:30], img)
    assert out[:2].sum() == 0 and out[30:].sum() == 0 and out[:, :2].sum() == 0
    odd = pad_to(np.full((2, 3, 3), 9, np.uint8), 5, value=1)
    assert (odd[1:3, 1:4] == 9).all() and odd[0, 0, 0] == 1 and odd[3:, :].min() == 1
    with pytest.raises(ValueError, match="larger"):
        pad_to(np.zeros((33, 20, 1), np.uint8), 32)
    np.testing.assert_array_equal(preprocess_image(img, 32, "pad"), out)
    with pytest.raises(ValueError, match="method"):
        preprocess_image(img, 32, "stretch")


def test_model_tensor_range_and_round_trip():
    rng = np.random.default_rng(RNG_SEED)
    batch = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    batch[0, 0, 0] = [0, 255, 128]
    x = to_model_tensor(batch)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 3, 5, 4)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), batch)
    np.testing.assert_array_equal(to_model_tensor(torch.from_numpy(batch)), x)
    assert to_uint8(torch.tensor([[[[-3.0, 2.0]]]])).ravel().tolist() == [0, 255]
    with pytest.raises(ValueError):
        to_model_tensor(batch.astype(np.float32))
    frozen = batch.copy()
    frozen.flags.writeable = False  # as Ray hands batches over: no "not writable" warning per call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(to_model_tensor(frozen), x)


# ---------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------
@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(RNG_SEED)
    root = tmp_path / "train"
    for d in ("n01", "n02", "n03_empty", ".cache"):
        (root / d).mkdir(parents=True)
    (root / "n01" / "a.png").write_bytes(encode(solid((1, 2, 3), 12, 16), "PNG"))
    good_jpeg = encode(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "JPEG")
    files = {
        "good.JPEG": good_jpeg,
        "good.png": encode(solid((5, 6, 7), 20, 30), "PNG"),
        "corrupt.jpg": rng.bytes(300),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "empty.jpg": b"",
        "cmyk.jpg": encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
        "grey.png": encode(np.full((10, 10), 60, np.uint8), "PNG"),
        "rgba.png": encode(np.zeros((10, 10, 4), np.uint8), "PNG"),
        "sixteen.png": encode(np.full((10, 10), 65535, np.uint16), "PNG"),
        "notes.txt": b"not an image",
    }
    palette = Image.new("P", (10, 10))
    palette.putpalette([0, 0, 255])
    files["palette.png"] = encode(palette, "PNG")
    for name, data in files.items():
        (root / "n02" / name).write_bytes(data)
    (root / "n02" / "sub").mkdir()
    (root / "n02" / "sub" / "nested.png").write_bytes(encode(solid((9, 9, 9)), "PNG"))
    (root / ".cache" / "x.png").write_bytes(files["good.png"])
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01 tench, Tinca tinca\n\nn02 goldfish, Carassius auratus\nn03_empty great white shark\n"
        "n04 extra entry\n"
    )
    return root


def test_list_imagefolder(imagefolder: Path):
    listing = list_imagefolder(
        imagefolder, class_names_file=imagefolder.parent / "LOC_synset_mapping.txt"
    )
    assert listing.class_dirs == ("n01", "n02", "n03_empty")
    assert listing.class_names == ("tench", "goldfish", "great white shark")
    assert listing.num_classes == 3
    assert listing.empty_classes == ("n03_empty",)
    assert listing.ignored_files == ("n02/notes.txt",)
    ids = [r["image_id"] for r in listing.rows]
    assert ids == [
        "n01/a.png",
        "n02/cmyk.jpg",
        "n02/corrupt.jpg",
        "n02/empty.jpg",
        "n02/good.JPEG",
        "n02/good.png",
        "n02/grey.png",
        "n02/palette.png",
        "n02/rgba.png",
        "n02/sixteen.png",
        "n02/sub/nested.png",
        "n02/truncated.jpg",
    ]
    first = listing.rows[0]
    assert first == {
        "image_id": "n01/a.png",
        "label": 0,
        "class_name": "tench",
        "path": str(imagefolder / "n01" / "a.png"),
    }
    assert {r["label"] for r in listing.rows[1:]} == {1}
    # Deterministic: listing twice gives the same rows.
    assert list_imagefolder(imagefolder).rows == [
        {**r, "class_name": r["image_id"].split("/")[0]} for r in listing.rows
    ]
    capped = list_imagefolder(imagefolder, max_per_class=2)
    assert [r["image_id"] for r in capped.rows] == ["n01/a.png", "n02/cmyk.jpg", "n02/corrupt.jpg"]
    assert capped.class_names == ("n01", "n02", "n03_empty")


def test_prepare_imagefolder_rows_records_and_rejects(imagefolder: Path):
    listing = list_imagefolder(imagefolder)
    results = {
        r["image_id"]: prepare_record(r, channels=3, image_size=16, method="center_crop")
        for r in listing.rows
    }
    rejects = {k: v.reason for k, v in results.items() if isinstance(v, Reject)}
    assert rejects == {
        "n02/corrupt.jpg": f"{CORRUPT}: not a recognised image format",
        "n02/empty.jpg": "zero-byte file",
        "n02/truncated.jpg": rejects["n02/truncated.jpg"],
    }
    assert rejects["n02/truncated.jpg"].startswith(f"{CORRUPT}: image file is truncated")
    records = {k: v for k, v in results.items() if not isinstance(v, Reject)}
    assert len(records) == 9
    for rec in records.values():
        assert set(rec) == {"image_id", "label", "class_name", "image"}
        assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
    assert (records["n01/a.png"]["image"] == [1, 2, 3]).all()
    assert np.abs(records["n02/cmyk.jpg"]["image"].astype(int) - [255, 0, 0]).max() <= 3
    assert (records["n02/grey.png"]["image"] == 60).all()
    assert (records["n02/palette.png"]["image"] == [0, 0, 255]).all()
    assert (records["n02/rgba.png"]["image"] == 255).all()  # transparent → white
    assert (records["n02/sixteen.png"]["image"] == 255).all()
    grey = prepare_record(listing.rows[0], channels=1, image_size=8, method="center_crop")
    assert grey["image"].shape == (8, 8, 1) and grey["label"] == 0


def test_imagefolder_errors(tmp_path: Path, imagefolder: Path):
    with pytest.raises(DataSourceNotFoundError, match="data.path"):
        list_imagefolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataSourceError, match="no class sub-directories"):
        list_imagefolder(tmp_path / "flat")
    (tmp_path / "short_map.txt").write_text("n01 tench\n")
    with pytest.raises(DataSourceError, match="n02, n03_empty"):
        list_imagefolder(imagefolder, class_names_file=tmp_path / "short_map.txt")
    (tmp_path / "bad_map.txt").write_text("n01 tench\nn02\n")
    with pytest.raises(DataSourceError, match="bad_map.txt:2"):
        read_class_mapping(tmp_path / "bad_map.txt")
    with pytest.raises(ImageDecodeError, match="cannot read file: No such file"):
        read_image_file(tmp_path / "missing.png", 3)
    with pytest.raises(ImageDecodeError, match="cannot read file: Is a directory"):
        read_image_file(imagefolder / "n01", 3)
    row = {"image_id": "x", "label": 0, "class_name": "c", "path": str(tmp_path / "gone.jpg")}
    reject = prepare_record(row, channels=3, image_size=8, method="center_crop")
    assert reject == Reject("x", "cannot read file: No such file or directory")


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------
def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = False) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.fixture
def tiny_fmnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    images = np.arange(4 * 28 * 28, dtype=np.int64).reshape(4, 28, 28).astype(np.uint8)
    labels = np.array([3, 1, 3, 3], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC, images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", IDX_LABELS_MAGIC, labels)
    return tmp_path, images, labels


def test_fashion_mnist_handwritten_idx(tiny_fmnist):
    root, images, labels = tiny_fmnist
    got_images, got_labels = load_fashion_mnist(root, "train")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [3, 1, 3, 3]
    rows = list_fashion_mnist(root, "train", max_per_class=2)
    assert [r["image_id"] for r in rows] == [
        "fmnist-train-00000",
        "fmnist-train-00001",
        "fmnist-train-00002",
    ]
    assert [r["class_name"] for r in rows] == ["Dress", "Trouser", "Dress"]
    assert rows[2]["image"].shape == (28, 28, 1)
    np.testing.assert_array_equal(rows[2]["image"][..., 0], images[2])
    rec = prepare_record(rows[1], channels=1, image_size=32, method="pad")
    assert rec["image"].shape == (32, 32, 1)
    np.testing.assert_array_equal(rec["image"][2:30, 2:30, 0], images[1])


def test_fashion_mnist_bad_files(tiny_fmnist, tmp_path: Path):
    root, images, labels = tiny_fmnist
    write_idx(root / "train-labels-idx1-ubyte", IDX_IMAGES_MAGIC, labels)  # wrong magic
    with pytest.raises(DataSourceError, match="labels-idx1-ubyte: bad magic number 0x00000803"):
        load_fashion_mnist(root, "train")
    write_idx(root / "train-labels-idx1-ubyte", IDX_LABELS_MAGIC, labels[:3])
    with pytest.raises(DataSourceError, match="holds 3 labels but .* holds 4 images"):
        load_fashion_mnist(root, "train")
    write_idx(root / "train-labels-idx1-ubyte", IDX_LABELS_MAGIC, np.array([0, 1, 2, 10]))
    with pytest.raises(DataSourceError, match="label 10 is out of range"):
        load_fashion_mnist(root, "train")
    raw = (root / "train-labels-idx1-ubyte").read_bytes()
    (root / "train-labels-idx1-ubyte").write_bytes(raw[:-1])
    with pytest.raises(DataSourceError, match="truncated or corrupt"):
        read_idx(root / "train-labels-idx1-ubyte", IDX_LABELS_MAGIC)
    gz = (root / "train-images-idx3-ubyte.gz").read_bytes()
    (root / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataSourceError, match="corrupt or truncated gzip"):
        load_fashion_mnist(root, "train")
    with pytest.raises(DataSourceNotFoundError, match="apt-get install dataset-fash") as info:
        load_fashion_mnist(root, "test")
    assert "t10k-images-idx3-ubyte" in str(info.value) and "data.path" in str(info.value)
    with pytest.raises(DataSourceNotFoundError, match="data.path"):
        load_fashion_mnist(tmp_path / "absent", "train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(root, "validation")


@pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.is_dir(),
    reason=f"no {DEFAULT_FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    images, labels = load_fashion_mnist(None, "train")
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    assert labels[:12].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]
    assert np.bincount(labels).tolist() == [6000] * 10
    rows = list_fashion_mnist(None, "train", max_per_class=2)
    assert len(rows) == 20
    assert rows[0]["image_id"] == "fmnist-train-00000"
    assert rows[0]["label"] == 9 and rows[0]["class_name"] == "Ankle boot"
    assert [r["image_id"] for r in rows if r["label"] == 0] == [
        "fmnist-train-00001",
        "fmnist-train-00002",
    ]
    np.testing.assert_array_equal(rows[1]["image"][..., 0], images[1])
    _, test_labels = load_fashion_mnist(None, "test")
    assert test_labels.shape == (10_000,) and test_labels[:5].tolist() == [9, 2, 1, 1, 6]


# ---------------------------------------------------------------------------
# parquet
# ---------------------------------------------------------------------------
def test_parquet_bytes_column(tmp_path: Path):
    pngs = [encode(solid((v, v, v), 6, 6), "PNG") for v in (10, 20, 30, 40)]
    table = pa.table({"image": pa.array(pngs, pa.binary()), "label": [1, 0, 1, 1]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    rows = list_parquet(tmp_path / "part-0.parquet")
    assert [r["image_id"] for r in rows] == ["part-0-0", "part-0-1", "part-0-2", "part-0-3"]
    assert [r["class_name"] for r in rows] == ["1", "0", "1", "1"]
    assert rows[3]["image_bytes"] == pngs[3]
    rec = prepare_record(rows[3], channels=3, image_size=4, method="center_crop")
    assert (rec["image"] == 40).all() and rec["label"] == 1
    capped = list_parquet(tmp_path, max_per_class=2, class_names=["zero", "one"])
    assert [(r["image_id"], r["class_name"]) for r in capped] == [
        ("part-0-0", "one"),
        ("part-0-1", "zero"),
        ("part-0-2", "one"),
    ]


def test_parquet_hf_struct_with_metadata(tmp_path: Path):
    pngs = [encode(solid((v, 0, 0), 5, 5), "PNG") for v in (50, 60)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array(
        [
            {"bytes": pngs[0], "path": "a.png"},
            {"bytes": pngs[1], "path": None},
            {"bytes": None, "path": str(tmp_path / "elsewhere.png")},
            None,
        ],
        image_type,
    )
    hf = {"info": {"features": {"image": {"_type": "Image"},
                                "label": {"_type": "ClassLabel", "names": ["cat", "dog"]}}}}
    schema = pa.schema([("image", image_type), ("label", pa.int64()), ("image_id", pa.string())])
    schema = schema.with_metadata({"huggingface": json.dumps(hf)})
    table = pa.table(
        {"image": images, "label": [1, 0, 1, 0], "image_id": ["i0", "i1", "i2", "i3"]},
        schema=schema,
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    rows = list_parquet(tmp_path / "data")
    assert [(r["image_id"], r["label"], r["class_name"]) for r in rows] == [
        ("i0", 1, "dog"), ("i1", 0, "cat"), ("i2", 1, "dog"), ("i3", 0, "cat"),
    ]
    assert rows[0]["image_bytes"] == pngs[0]
    assert rows[2] == {"image_id": "i2", "label": 1, "class_name": "dog",
                       "path": str(tmp_path / "elsewhere.png")}
    assert rows[3]["image_bytes"] is None
    out = [prepare_record(r, channels=3, image_size=5, method="center_crop") for r in rows]
    assert (out[1]["image"] == [60, 0, 0]).all()
    assert out[2] == Reject("i2", "cannot read file: No such file or directory")
    assert out[3] == Reject("i3", "missing image data (null)")


def test_parquet_errors(tmp_path: Path):
    with pytest.raises(DataSourceNotFoundError, match="data.path"):
        list_parquet(tmp_path / "nothing.parquet")
    with pytest.raises(DataSourceError, match="no .parquet files"):
        list_parquet(tmp_path)
    pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary())}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataSourceError, match="nolabel.parquet: missing column 'label'"):
        list_parquet(tmp_path / "nolabel.parquet")
    string_labels = pa.table({"image": pa.array([b"x"]), "label": ["dog"]})
    pq.write_table(string_labels, tmp_path / "strlabel.parquet")
    with pytest.raises(DataSourceError, match="type string, expected int"):
        list_parquet(tmp_path / "strlabel.parquet")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        same_stem = pa.table({"image": pa.array([b"x"]), "label": [0]})
        pq.write_table(same_stem, tmp_path / d / "p.parquet")
    with pytest.raises(DataSourceError, match="duplicate image ids .*: p-0"):
        list_parquet([tmp_path / "a", tmp_path / "b"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataSourceError, match="cannot read parquet file .*junk.parquet"):
        list_parquet(tmp_path / "junk.parquet")
