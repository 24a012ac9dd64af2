"""`d2c demo --quick`: every stage of the method, end to end, through the same Ray code paths."""

import json

import numpy as np
import pytest

from app.cli import main
from d2c.config import load_config
from conftest import FMNIST

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2C_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| d2c |" in printed and "| random |" in printed and "| random_attach |" in printed and "report:" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["quick"] is True
    num_samples = summary["config"]["eval"]["num_samples"]
    assert num_samples == load_config(summary["config_path"]).demo.quick["eval.num_samples"]  # demo.quick applied
    variants = ["d2c", "random_attach", "random"]
    assert set(summary["runs"]) == set(variants)
    for stage in ["scorer (train from scratch, cached)"] + [f"{s} ({v})" for s in ("condense", "train", "evaluate") for v in variants]:
        assert stage in summary["timings_s"]
    for variant in variants:
        m = json.loads((out / variant / "eval" / "metrics.json").read_text())
        assert np.isfinite(m["fid"]) and m["num_samples"] == num_samples
        samples = np.load(out / variant / "eval" / "samples.npz")["arr_0"]
        assert samples.shape == (num_samples, 32, 32, 3) and samples.dtype == np.uint8
    d2c_sel = json.loads((out / "d2c" / "condense" / "manifest.json").read_text())
    rnd_sel = json.loads((out / "random" / "condense" / "manifest.json").read_text())
    budget = load_config(summary["config_path"]).demo.quick["select.budget"]
    assert summary["config"]["select"]["budget"] == budget
    assert d2c_sel["rows"]["selected"] == rnd_sel["rows"]["selected"] == budget
    assert rnd_sel["scores_dir"].endswith("d2c/condense/scores")  # scored once, reused by the baselines
    att_sel = json.loads((out / "random_attach" / "condense" / "manifest.json").read_text())
    assert att_sel["scores_dir"] == rnd_sel["scores_dir"] and att_sel["rows"]["selected"] == budget
    # Random + Attach holds Random's very selection, with the features attached
    import pandas as pd
    sel = {v: pd.read_parquet(out / v / "condense" / "selection" / "selection.parquet") for v in ("random", "random_attach")}
    assert sel["random"].image_id.tolist() == sel["random_attach"].image_id.tolist()
    assert {"visual"} <= set(pd.read_parquet(out / "random_attach" / "condense" / "condensed").columns)
    assert summary["comparisons"] == ["comparison.json", "comparison-random_attach-vs-random.json",
                                      "comparison-d2c-vs-random_attach.json"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6
    # FID(d2c) - FID(random) with a paired bootstrap interval, printed, in comparison.json and in the report
    cmp = json.loads((out / summary["comparison"]).read_text())
    fids = {v: json.loads((out / v / "eval" / "metrics.json").read_text())["fid"] for v in ("d2c", "random")}
    assert cmp["a"]["fid"] == pytest.approx(fids["d2c"], rel=1e-6) and cmp["b"]["fid"] == pytest.approx(fids["random"], rel=1e-6)
    diff = cmp["fid_difference"]
    assert diff["paired"] is True and diff["point"] == pytest.approx(fids["d2c"] - fids["random"], rel=1e-6, abs=1e-9)
    assert diff["low"] < diff["point"] < diff["high"] and diff["rounds"] == 200  # eval.bootstrap_rounds: None
    assert cmp["verdict"] in printed and "Is the FID gap real?" in html
    # a rerun reuses every finished stage
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "reusing the cached embedded scorer" in again and "nothing to do" in again and "reused" in again
