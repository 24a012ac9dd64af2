"""Every output directory of a condense run is a plain Parquet dataset: pandas and pyarrow.dataset
read it whole (its side files are "_"-prefixed, which Parquet readers skip)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pds

from app.condense import select_stage
from d2c.condense import OLD_REPORTS_FILE, REPORTS_FILE, RunDir


def read_both(path: Path) -> pd.DataFrame:
    """``path`` read with plain pandas.read_parquet and with pyarrow.dataset (the two must agree)."""
    df = pd.read_parquet(path)
    table = pds.dataset(str(path), format="parquet").to_table()
    assert (len(df), list(df.columns)) == (table.num_rows, table.column_names), path
    return df


def test_every_output_directory_reads_with_pandas_and_pyarrow(condensed_run):
    run, _ = condensed_run
    rows = json.loads((run / "manifest.json").read_text())["rows"]
    assert rows["selected"] == 30  # select.budget=30 of 120 listed
    want = {"scores": rows["scored"], "rejects": rows["rejected"], "selection": 30, "condensed": 30}
    got = {name: read_both(run / name) for name in want}
    assert {name: len(df) for name, df in got.items()} == want
    assert sorted(got["condensed"].image_id) == sorted(got["selection"].image_id)
    assert (run / "selection" / REPORTS_FILE).is_file() and not (run / "selection" / OLD_REPORTS_FILE).exists()


def test_a_selection_with_the_old_reports_name_is_reused_and_renamed(condensed_run, tmp_path, capsys):
    run, cfg = condensed_run
    for name in ("scores", "selection"):  # the selection's settings embed the scores' settings
        shutil.copytree(run / name, tmp_path / name)
    sel_dir = tmp_path / "selection"
    want = json.loads((sel_dir / REPORTS_FILE).read_text())
    (sel_dir / REPORTS_FILE).rename(sel_dir / OLD_REPORTS_FILE)  # as an older version wrote it
    r = RunDir(tmp_path)
    sel, reports = select_stage(cfg, r.scores, r.selection, num_classes=10)
    assert "selection: complete" in capsys.readouterr().out
    assert [x.to_dict() for x in reports] == want and len(want) == 10 and len(sel) == 30
    assert not (sel_dir / OLD_REPORTS_FILE).exists()
    assert len(read_both(sel_dir)) == 30
