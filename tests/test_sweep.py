"""`d2c sweep` on Ray Tune: a 2×2 grid at tiny sizes, end to end, and its resume."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.sweep import prepare_scores, run_sweep
from conftest import tiny_cfg
from d2c.config import ConfigError
from d2c.data.source import list_source
from d2c.sweep import FID_PLOT, RESULTS_CSV, SWEEP_CONTEXT, grid_points, interval_used, trial_name


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


def test_relative_reuse_from_reaches_trials_as_an_absolute_path(condensed_run, scorer_ckpt, tmp_path, monkeypatch):
    run, _ = condensed_run
    monkeypatch.chdir(Path(run).parent)  # trials run in other working directories: they need absolute paths
    cfg = _sweep_cfg(Path(run).name, scorer_ckpt, tmp_path / "s")
    scores = prepare_scores(cfg, list_source(cfg.data))
    assert scores.local_path.is_absolute() and scores.local_path == (Path(run) / "scores").resolve()


def test_two_by_two_sweep_end_to_end(condensed_run, scorer_ckpt, tmp_path, capsys):
    run, _ = condensed_run
    sweep_dir = tmp_path / "sweep"
    cfg = _sweep_cfg(run, scorer_ckpt, sweep_dir)
    assert run_sweep(cfg) == 0
    table = pd.read_csv(sweep_dir / RESULTS_CSV)
    assert len(table) == 4
    assert sorted(zip(table.k, table.budget)) == [(1, 10), (1, 20), (3, 10), (3, 20)]
    assert (table.steps == 2).all() and table.fid.notna().all() and (table.fid > 0).all()
    assert (table.k_used == table.k).all()  # no point of this grid is clamped (the ranks below say so too)
    out = capsys.readouterr().out
    assert "budget 10: best k=" in out and "budget 20: best k=" in out
    assert (sweep_dir / FID_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every trial selected from the ONE scores table: its selection is interval sampling of it
    for _, row in table.iterrows():
        sel = pd.read_parquet(f"{row.trial_dir}/condense/selection/selection.parquet")  # a RUN's layout
        n = row.budget // 10
        assert len(sel) == row.budget
        assert all(r == [i * row.k for i in range(n)] for r in sel.groupby("label")["rank"].apply(list))
    # overlapping subsets were encoded once: the cache holds each selected image once per encoding pass
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["trials"] == 4 and info["errors"] == []
    # the shared context reaches trials outside the search space: Tune's records hold only the swept values
    params_files = sorted((sweep_dir / "tune").glob("*/params.json"))
    assert len(params_files) == 4
    assert all(json.loads(f.read_text()).keys() == {"params"} for f in params_files)
    assert json.loads((sweep_dir / SWEEP_CONTEXT).read_text())["base"]["train"]["steps"] == 2
    # rerun: Tune restores the finished experiment and nothing is trained again
    assert run_sweep(cfg) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "settings differ" not in out
    assert len(pd.read_csv(sweep_dir / RESULTS_CSV)) == 4
    # a rerun with other settings keeps the stored ones, and says so
    assert run_sweep(_sweep_cfg(run, scorer_ckpt, sweep_dir, "train.lr=0.5")) == 0
    assert "settings differ from the interrupted sweep's" in capsys.readouterr().out
    assert json.loads((sweep_dir / SWEEP_CONTEXT).read_text())["base"]["train"]["lr"] == cfg.train.lr


def test_feature_baselines_sweep_encodes_once(condensed_run, scorer_ckpt, tmp_path, capsys):
    from d2c.condense import RunDir
    from d2c.select.baselines import herding, kcenter_greedy

    run, _ = condensed_run
    sweep_dir = tmp_path / "sweep"
    feature_keys = ("select.feature_image_size=32", "select.feature_batch_size=8")
    with pytest.raises(ConfigError, match="different visual features"):
        run_sweep(_sweep_cfg(run, scorer_ckpt, sweep_dir, *feature_keys,
                             'sweep.grid={"select.method": ["kcenter"], "select.feature_image_size": [32, 64]}'))
    cfg = _sweep_cfg(run, scorer_ckpt, sweep_dir, *feature_keys,
                     'sweep.grid={"select.method": ["kcenter", "herding"], "select.budget": [20]}')
    assert run_sweep(cfg) == 0
    out = capsys.readouterr().out
    # the scores run holds no features: they are computed once, into run_dir, for both trials
    features = RunDir(cfg.run_dir).features
    assert out.count("[d2c] features: not reusing") == 1 and out.count("[d2c] features: 120 rows in") == 1
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["features_dir"] == str(features) and info["errors"] == []
    table = pd.read_csv(sweep_dir / RESULTS_CSV)
    assert sorted(table.method) == ["herding", "kcenter"]
    scores = pd.read_parquet(RunDir(run).scores)
    feats = pd.read_parquet(features)
    by_id = dict(zip(feats.image_id, feats.feature))
    for _, row in table.iterrows():
        sel = pd.read_parquet(f"{row.trial_dir}/condense/selection/selection.parquet")  # a RUN's layout
        assert set(sel.method) == {row.method} and len(sel) == 20
        algo = {"kcenter": kcenter_greedy, "herding": herding}[row.method]
        for label, group in scores.groupby("label"):
            ordered = [i for _, i in sorted(zip(group.score, group.image_id))]
            ranks = sorted(int(r) for r in algo(np.stack([by_id[i] for i in ordered]), 2))
            got = sel[sel.label == label].sort_values("rank")
            assert got["rank"].tolist() == ranks and got.image_id.tolist() == [ordered[r] for r in ranks]


def test_interval_used_is_the_applied_k():
    def cls(k, k_used):
        return {"label": 0, "size": 100, "requested": 4, "selected": 4, "k": k, "k_used": k_used, "note": ""}

    assert interval_used([cls(96, 25), cls(96, 25)]) == 25  # clamped in every class
    assert interval_used([cls(96, 96), cls(96, 30)]) == 96  # one small class clamped
    assert interval_used([cls(None, None)]) is None  # random / kcenter / herding


def test_plot_puts_clamped_points_at_the_applied_interval():
    from d2c.report.plots import plot_sweep

    df = pd.DataFrame({"k": [1, 16, 96, 1, 96], "k_used": [1, 16, 96, 1, 25], "budget": [120, 120, 120, 600, 600],
                       "method": ["d2c"] * 5, "fid": [250.0, 240.0, 235.0, 238.0, 234.0]})
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in plot_sweep(df).axes[0].lines}
    assert curves == {"budget 120 · d2c": ([1, 16, 96], [250.0, 240.0, 235.0]),
                      "budget 600 · d2c": ([1, 25], [238.0, 234.0])}
    # a table from before k_used existed plots at the requested k
    old = plot_sweep(df.drop(columns="k_used")).axes[0].lines
    assert list(old[1].get_xdata()) == [1, 96]


def test_resuming_a_sweep_started_by_another_trainable_says_how_to_recover(condensed_run, scorer_ckpt, tmp_path):
    from ray import tune

    run, _ = condensed_run
    sweep_dir = tmp_path / "sweep"
    # an experiment in SWEEP/tune whose trainable is not d2c's (what an older d2c version leaves behind)
    tune.Tuner(lambda config: tune.report({"fid": 1.0}), param_space={"params": {}},
               run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir))).fit()
    with pytest.raises(ConfigError, match=r"another d2c version.*Delete .*tune.*finished trial's condensed set"):
        run_sweep(_sweep_cfg(run, scorer_ckpt, sweep_dir))
