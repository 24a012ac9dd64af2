"""The synthetic ImageNet-shaped source of the scale runs (benchmarks/synthetic_imagenet.py),
listed and decoded by the product's own parquet listing and decode body."""

import sys

import numpy as np

from conftest import ROOT
from d2c.config import DataConfig
from d2c.data.source import list_source

sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_imagenet as syn  # noqa: E402


def test_the_synthetic_table_lists_and_decodes_as_written(tmp_path):
    from d2c.data.blocks import decode_batch, listing_table

    info = syn.write_source(tmp_path / "src", classes=5, per_class=4, size=32, rows_per_file=8)
    assert info["rows"] == 20 and info["files"] == 3  # 2 whole classes per file
    assert syn.write_source(tmp_path / "src", classes=5, per_class=4, size=32, rows_per_file=8)["seconds"] == 0.0  # reused
    cfg = DataConfig(source="parquet", path=str(tmp_path / "src"), image_size=32, channels=3, preprocess="center_crop")
    listing = list_source(cfg)
    assert listing.num_classes == 5 and listing.class_names == [syn.class_name(c) for c in range(5)]
    assert listing.class_counts() == [4] * 5 and listing.rows[5]["image_id"] == "n00000001_00001"
    out = decode_batch(listing_table(listing.rows, shard_rows=8), cfg.model_dump())
    assert (out["reject"] == "").all() and list(out["label"]) == [c for c in range(5) for _ in range(4)]
    want = np.concatenate([syn.class_images(c, 4, 32, seed=0) for c in range(5)])
    np.testing.assert_array_equal(out["image"], want)
    # Classes differ (their colours), images within a class differ (the noise), and the seed matters.
    means = want.reshape(5, 4, -1).mean(axis=(1, 2))
    assert len(np.unique(means.round())) == 5 and not np.array_equal(want[0], want[1])
    assert not np.array_equal(syn.class_images(0, 4, 32, seed=1), want[:4])
