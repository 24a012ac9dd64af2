"""`d2c sweep` on Ray Tune: a 2×2 grid at tiny sizes, end to end, and its resume."""

import json

import pandas as pd
import pytest

from app.sweep import RESULTS_CSV, grid_points, run_sweep, trial_name
from conftest import tiny_cfg
from d2c.config import ConfigError


def _sweep_cfg(run, scorer, sweep_dir, *extra):
    return tiny_cfg(
        sweep_dir.parent / "unused", scorer,
        f"score.reuse_from={run}", f"sweep.dir={sweep_dir}", "sweep.fid_samples=10",
        'sweep.grid={"select.k": [1, 3], "select.budget": [10, 20]}',
        "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1", "model.proj_hidden_dim=32",
        "train.steps=2", "train.batch_size=8", "train.ckpt_every=2", "eval.steps=2", "eval.reference_size=20", *extra,
    )


def test_grid_points_are_validated(condensed_run, scorer_ckpt, tmp_path):
    run, _ = condensed_run
    cfg = _sweep_cfg(run, scorer_ckpt, tmp_path / "s")
    points = grid_points(cfg)
    assert points == [{"select.budget": 10, "select.k": 1}, {"select.budget": 10, "select.k": 3},
                      {"select.budget": 20, "select.k": 1}, {"select.budget": 20, "select.k": 3}]
    assert len({trial_name(p) for p in points}) == 4
    with pytest.raises(ConfigError, match="sweep.grid point"):
        grid_points(_sweep_cfg(run, scorer_ckpt, tmp_path / "s", 'sweep.grid={"select.k": [0]}'))


def test_two_by_two_sweep_end_to_end(condensed_run, scorer_ckpt, tmp_path, capsys):
    run, _ = condensed_run
    sweep_dir = tmp_path / "sweep"
    cfg = _sweep_cfg(run, scorer_ckpt, sweep_dir)
    assert run_sweep(cfg) == 0
    table = pd.read_csv(sweep_dir / RESULTS_CSV)
    assert len(table) == 4
    assert sorted(zip(table.k, table.budget)) == [(1, 10), (1, 20), (3, 10), (3, 20)]
    assert (table.steps == 2).all() and table.fid.notna().all() and (table.fid > 0).all()
    out = capsys.readouterr().out
    assert "budget 10: best k=" in out and "budget 20: best k=" in out
    # every trial selected from the ONE scores table: its selection is interval sampling of it
    for _, row in table.iterrows():
        sel = pd.read_parquet(f"{row.trial_dir}/condense/selection.parquet")
        n = row.budget // 10
        assert len(sel) == row.budget
        assert all(r == [i * row.k for i in range(n)] for r in sel.groupby("label")["rank"].apply(list))
    # overlapping subsets were encoded once: the cache holds each selected image once per encoding pass
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["trials"] == 4 and info["errors"] == []
    # rerun: Tune restores the finished experiment and nothing is trained again
    assert run_sweep(cfg) == 0
    assert "resuming" in capsys.readouterr().out
    assert len(pd.read_csv(sweep_dir / RESULTS_CSV)) == 4
