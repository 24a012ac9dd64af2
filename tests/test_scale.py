"""benchmarks/scale.py at toy size: the same stages and measurements as the ImageNet-scale run."""

import sys

import pandas as pd

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402


def test_scale_runs_every_stage_and_records_each_measure(ray_session, tmp_path):
    results = tmp_path / "results"
    argv = ["--out", str(tmp_path / "work"), "--results", str(results), "--sizes", "120", "--classes", "6",
            "score.shard_rows=40", "ray.num_cpus=null"]
    assert scale.main(argv) == 0
    table = pd.read_csv(results / "results.csv")
    assert list(table.columns) == scale.COLUMNS and list(table.stage) == scale.STAGES
    assert (table.rows == 120).all() and (table.wall_s > 0).all() and (table.driver_rss_mb > 0).all()
    files = dict(zip(table.stage, table.files))
    # 3 score shards of 40 rows (+ their reject shards), the settings and the marker
    assert files["score"] == 3 + 3 + 2 and files["select"] == 4 and files["attach"] >= 3
    assert (results / "scale.png").read_bytes()[:4] == b"\x89PNG" and "driver RSS" in (results / "README.md").read_text()
    # a size already measured is not run again
    assert scale.main(argv) == 0 and len(pd.read_csv(results / "results.csv")) == len(scale.STAGES)
