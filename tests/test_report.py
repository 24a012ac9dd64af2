"""``d2c report``: a synthetic but format-correct RUN / TRAIN / EVAL / DEMO / sweep set → one HTML page.

The artifacts are written here with the schemas of docs/design.md (Artifacts), using real
Fashion-MNIST ids so that the image grids load real pixels.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from d2c.report import page as report
from d2c.report.page import MAX_CLASSES_SHOWN, read_npz_rows, run_report, shown_classes, write_report
from d2c.data.fashion_mnist import fashion_mnist_image_id, load_fashion_mnist
from d2c.data.records import CLASS_NAMES_FASHION_MNIST
from d2c.select.interval import select_class

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")

NUM_IMAGES = 300  # the first 300 training images: every class has >= 20
N_PER_CLASS = 4
K = 4
NUM_TIMESTEPS = 3
NUM_SAMPLES = 40
TRAIN_STEPS = 30
#: A class name that must come out escaped.
NASTY_NAME = "<b>Bag</b> & co"

PNG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"')

#: The demo's variants (d2c demo's order) and their FIDs; "48.125" shows as 48.12.
VARIANT_FIDS = {"d2c": 35.86, "random_attach": 41.5, "random": 48.125}
#: (a, b) → (file, ΔFID, low, high), as d2c demo names its comparisons; the last interval spans 0.
COMPARISONS = {("d2c", "random"): ("comparison.json", -12.27, -15.42, -9.08),
               ("random_attach", "random"): ("comparison-random_attach-vs-random.json", -6.63, -9.71, -3.55),
               ("d2c", "random_attach"): ("comparison-d2c-vs-random_attach.json", -5.64, -8.93, 1.17)}
GRID_PER_CLASS = 4


# ---------------------------------------------------------------------------
# Writing the artifacts
# ---------------------------------------------------------------------------
def class_names() -> list[str]:
    names = list(CLASS_NAMES_FASHION_MNIST)
    names[8] = NASTY_NAME
    return names


def write_condense(run: Path, method: str, seed: int = 0, reuse_from: Path | None = None) -> pd.DataFrame:
    """RUN/{scores,selection,rejects}/ + manifest.json; returns the selection.

    With ``reuse_from`` (``score.reuse_from``, as the demo's random variant does) the scores and
    rejects stay in that run and the manifest names them in ``scores_dir``."""
    _, labels = load_fashion_mnist(None, "train")
    rng = np.random.default_rng(0)  # the same scores for every variant, as with score.reuse_from
    ids = [fashion_mnist_image_id("train", i) for i in range(NUM_IMAGES)]
    score_t = rng.gamma(2.0, 0.05, size=(NUM_IMAGES, NUM_TIMESTEPS))
    scores = pd.DataFrame({"image_id": ids, "label": labels[:NUM_IMAGES].astype(np.int64),
                           "score": score_t.mean(1), "score_t": list(score_t)})
    run.mkdir(parents=True)
    if reuse_from is None:
        (run / "scores").mkdir()
        scores.iloc[:150].to_parquet(run / "scores" / "shard-00000.parquet", index=False)
        scores.iloc[150:].to_parquet(run / "scores" / "shard-00001.parquet", index=False)
        (run / "rejects").mkdir()
        pd.DataFrame({"image_id": ["bad-1", "bad-2"], "reason": ["zero-byte file", "zero-byte file"]}).to_parquet(
            run / "rejects" / "shard-00000.parquet", index=False)
    chooser = (lambda g, n: np.sort(np.random.default_rng([seed, int(g["label"].iloc[0])]).choice(len(g), n, replace=False))) \
        if method == "random" else None
    parts, reports = [], []
    for c, g in scores.groupby("label"):
        sel, rep = select_class(g[["image_id", "label", "score"]], int(c), N_PER_CLASS, method, K, "clamp", chooser)
        parts.append(sel)
        reports.append(rep.to_dict() | {"listed": len(g)})
    selection = pd.concat(parts, ignore_index=True)
    (run / "selection").mkdir()
    selection.to_parquet(run / "selection" / "selection.parquet", index=False)
    per = scores.groupby("label")["score"].agg(["count", "mean", "std", "min", "max"])
    manifest = {
        "config": {"data": {"source": "fashion_mnist", "path": None, "split": "train", "image_size": 32, "channels": 1,
                            "preprocess": "pad", "max_per_class": None},
                   "score": {"scorer": "/tmp/scorer/checkpoints", "num_timesteps": NUM_TIMESTEPS, "seed": 0},
                   "select": {"method": method, "budget": 10 * N_PER_CLASS, "k": K, "shortfall": "clamp", "seed": seed}},
        "versions": {"d2c": "0.1.0", "torch": "2.14.1"},
        "scorer": "/tmp/scorer/checkpoints",
        "class_names": class_names(),
        "notes": [],
        "rows": {"listed": NUM_IMAGES + 2, "rejected": 2, "scored": NUM_IMAGES, "selected": len(selection)},
        "per_class": reports,
        "clamped_classes": [],
        "scores_dir": str((reuse_from or run) / "scores"),
        "score_stats": {"overall": {}, "per_class": {int(i): {k: float(v) for k, v in r.items()} for i, r in per.iterrows()}},
        "shapes": {"num_tokens": 64, "latent": [1, 32, 32]},
        "timings_s": {"scores": 12.5, "attach": 3.25, "total": 20.0},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return selection


def write_train(train: Path, with_proj: bool, bad_line: bool = False) -> None:
    train.mkdir(parents=True)
    rng = np.random.default_rng(1)
    lines = []
    for step in range(1, TRAIN_STEPS + 1):
        diff = 1.0 / np.sqrt(step) + 0.02 * rng.standard_normal()
        proj = -0.9 * (1 - np.exp(-step / 10)) if with_proj else 0.0
        lines.append(json.dumps({"step": float(step), "loss": diff + 0.5 * proj, "loss_diff": diff, "loss_proj": proj,
                                 "grad_norm": 0.5 + 0.1 * rng.random(), "images_per_s": 400.0, "epoch": 0}))
    if bad_line:
        lines.insert(3, "{not json")
    (train / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def write_eval(ev: Path, fid: float, extra: dict | None = None, samples: bool = True, grids: bool = False) -> None:
    """EVAL/metrics.json in the layout ``d2c evaluate`` writes (nested reference/checkpoint, how, timing,
    fid_bootstrap), samples.npz and, with ``grids``, EVAL/grids/ as d2c.eval.grid writes them."""
    ev.mkdir(parents=True)
    metrics = {
        "format": "d2c-eval-v1", "fid": fid, "kid_mean": 0.0123, "kid_std": 0.0011, "kid_subset_size": 40.0,
        "precision": 0.61, "recall": 0.44, "n_gen": float(NUM_SAMPLES), "n_ref": 2000.0,
        "num_samples": NUM_SAMPLES, "num_classes": 10, "sampler": "ddim", "steps": 50, "cfg_scale": 1.0,
        "guidance_interval": None, "seed": 0,
        "sampling": {"steps": 50, "ddim_eta": 0.0, "timesteps_used": list(range(0, 1000, 20))},
        "checkpoint": {"path": str(ev.parent / "train" / "checkpoints" / "step-00000030"), "step": 30, "arch": "dit",
                       "weights": "ema"},
        "reference": {"kind": "dataset_split", "source": "fashion_mnist", "path": None, "split": "test", "size": 2000,
                      "per_class": [200] * 10, "rejected": 0},
        "feature_extractor": {"id": "inception-ts", "network": "Inception-v3, TF 2015-12-05 weights"},
        "metric_settings": {"prc_k": 3},
        "fid_bootstrap": {"point": fid, "std": 1.2, "low": fid - 2.5, "high": fid + 2.25, "shift": 0.3, "rounds": 200,
                          "level": 0.95, "seed": 0, "resampled": "samples and reference"},
        "not_computed": {"is_mean": "no classifier head", "is_std": "no classifier head"},
        "timing": {"reference_s": 1.5, "sampling_and_features_s": 4.5, "samples_per_s": 8.9, "total_s": 7.0},
        "how": {"fid": "Frechet distance as the evaluator computes it"},
        "versions": {"torch": "2.14.1"},
        "weird_extra_field": "kept",
    }
    metrics.update(extra or {})
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(NUM_SAMPLES, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(NUM_SAMPLES) % 10
    if samples:
        np.savez(ev / "samples.npz", images, labels)
    if grids:
        from d2c.eval.grid import write_grids

        written = write_grids(ev / "grids", images, labels, 10, GRID_PER_CLASS)
        metrics["files"] = {"samples": "samples.npz", "grids": [str(p.relative_to(ev)) for p in written]}
    (ev / "metrics.json").write_text(json.dumps(metrics))


def write_comparison(root: Path, a: str, b: str, name: str, point: float, low: float, high: float) -> None:
    """OUT/<name> as ``d2c compare`` writes it (its own verdict sentence)."""
    from d2c.eval.compare import COMPARE_FORMAT, verdict
    from d2c.eval.bootstrap import FidInterval

    iv = FidInterval(point=point, std=1.5, low=low, high=high, shift=0.4, rounds=200, level=0.95, seed=0,
                     resampled="samples and reference", paired=True, share_a_better=0.97)
    result = {"format": COMPARE_FORMAT, "fid_difference": iv.to_dict(), "verdict": verdict(a, b, iv), "how": "paired bootstrap",
              **{k: {"name": v, "eval": str(root / v / "eval"), "fid": VARIANT_FIDS[v], "num_samples": NUM_SAMPLES}
                 for k, v in (("a", a), ("b", b))}}
    (root / name).write_text(json.dumps(result))


def section_html(page: str, id_: str) -> str:
    start = page.index(f'<section id="{id_}">')
    return page[start: page.index("</section>", start)]


def without_details(page: str) -> str:
    """The page with every <details> element (nested ones too) cut out: what shows before any click."""
    prev = None
    while prev != page:
        prev, page = page, re.sub(r"<details>(?:(?!<details>).)*?</details>", "", page, flags=re.S)
    return page


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    runs = {}
    for name, fid in VARIANT_FIDS.items():
        method = "random" if name.startswith("random") else name
        write_condense(root / name / "run", method, reuse_from=None if name == "d2c" else root / "d2c" / "run")
        write_train(root / name / "train", with_proj=name != "random", bad_line=name == "random")
        write_eval(root / name / "eval", fid, grids=True)
        runs[name] = {"condense": f"{name}/run", "train": str(root / name / "train"), "eval": str(root / name / "eval")}
    for (a, b), (file, point, low, high) in COMPARISONS.items():
        write_comparison(root, a, b, file, point, low, high)
    demo = {"runs": runs, "timings_s": {"scorer": 60.0, "condense": 30.0, "train": 120.0, "evaluate": 45.0},
            "config": {"select": {"budget": 40, "k": K}}, "quick": True,
            "comparison": "comparison.json", "comparisons": [f for f, *_ in COMPARISONS.values()]}
    (root / "demo.json").write_text(json.dumps(demo))
    return root


@pytest.fixture(scope="module")
def demo_page(demo_dir, tmp_path_factory) -> str:
    """The demo's report, written once (matplotlib layout is the slow part), with no multi-seed study."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "STUDY_DIR", tmp_path_factory.mktemp("no-study"))
        out = write_report([str(demo_dir)], tmp_path_factory.mktemp("report") / "r.html")
    assert out.is_file()
    return out.read_text()


def eval_only_demo(demo_dir: Path, root: Path, variants, **data) -> Path:
    """A demo.json whose runs name only the fixture's evaluations (quick to render), plus ``data``."""
    root.mkdir()
    for (_, _), (file, *_) in COMPARISONS.items():
        shutil.copy(demo_dir / file, root / file)
    runs = {v: {"eval": str(demo_dir / v / "eval")} for v in variants}
    (root / "demo.json").write_text(json.dumps({"runs": runs, "quick": True, **data}))
    return root


def figures(page: str) -> dict[str, Image.Image]:
    out = {}
    for data, alt in PNG_RE.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        out[alt] = img
    return out


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
def test_demo_report_is_complete_and_self_contained(demo_page):
    page = demo_page
    # Self-contained: every image is a data URI, no scripts, stylesheets or remote sources.
    assert not re.search(r'(src|href)="https?://', page)
    assert "<script" not in page and "<link" not in page
    assert page.count('<img src="data:image/png;base64,') == len(re.findall(r"<img ", page))
    figs = figures(page)
    grids = {f"sample grid — {v}" for v in VARIANT_FIDS}
    expected = {"selection coverage", "training curves", "samples", "timings"} | grids | {
        f"{kind} — {v}" for v in VARIANT_FIDS for kind in ("score distribution", "ranked scores", "image grids")}
    assert set(figs) == expected
    assert page.count('<img src="data:image/png;base64,') == len(expected)
    for alt, img in figs.items():
        assert img.format == "PNG", alt
        if alt not in grids:
            assert 300 <= img.width <= 1400 and 100 <= img.height <= 4000, (alt, img.size)
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 8, f"{alt} looks blank"


def test_metrics_table_says_how_each_number_was_produced(demo_page):
    page = demo_page
    metrics = page[page.index('<table class="metrics">'):]
    metrics = metrics[: metrics.index("</table>")]
    for text in ("35.86", "41.5", "48.12", "0.0123 ± 0.0011", "0.61", "0.44"):  # the numbers
        assert text in metrics, text
    assert "IS ↑" not in metrics  # not computed: no row (the not_computed reason is said below the table)
    prov = page[page.index('<table class="metrics provenance">'):]
    prov = prov[: prov.index("</table>")]
    for text in ("ddim", "50", "40",                                          # sampler, steps, N
                 "kind dataset_split, source fashion_mnist, split test, size 2,000", "2,000",  # reference, reference N
                 "step 30", "weights ema",                                    # checkpoint
                 "weird_extra_field", "kept", "metric_settings.prc_k",       # unknown keys are listed, not dropped
                 "fid_bootstrap.low", "sampling.ddim_eta"):
        assert text in prov, text
    for hidden in ("how.fid", "versions.torch", "timesteps_used", "timing.total_s", "files.grids"):
        assert hidden not in metrics + prov, hidden
    assert "not recorded" not in metrics + prov
    assert "sampler ddim in 50 steps" in page and "compared against reference kind dataset_split" in page
    assert "FID ↓: Frechet distance as the evaluator computes it." in page  # the producer's own definition wins
    assert "not computed: is_mean, is_std — no classifier head" in page
    # Timings per stage from demo.json, the manifests and metrics.json (durations, not rates).
    assert "condense/scores" in page and "evaluate/timing.sampling_and_features_s" in page and "2.0 min" in page
    timings = page[page.index('<section id="timings">'):]
    assert "samples_per_s" not in timings[: timings.index("</section>")]
    # The malformed training-log line is reported, and quick mode is said.
    assert "1 malformed line(s) skipped" in page and "Quick mode" in page
    # The random variant reused the D2C run's scores (score.reuse_from): read from there, and said so.
    assert "(reused: score.reuse_from)" in page and "2 rejected inputs" in page


def test_demo_report_opens_with_the_verdict(demo_page, demo_dir):
    page = demo_page
    verdict = section_html(page, "verdict")
    # The verdict comes before the metrics, every provenance row and every other section.
    start = page.index('<section id="verdict">')
    assert start < page.index('<section id="results">') < page.index('<table class="metrics provenance">')
    assert start < page.index("fid_bootstrap") and start < page.index('class="idea"')
    assert page.index('<section id="results">') == min(page.index(f'<section id="{s}">') for s in ("results", "select", "train", "timings", "inputs"))
    # Each variant's FID and KID as the metrics table formats them, and the FID's own interval.
    for label, fid in (("D2C", "35.86"), ("Random + Attach", "41.5"), ("Random", "48.12")):
        assert label in verdict and fid in verdict, (label, fid)
    assert verdict.count("0.0123 ± 0.0011") == 3
    assert verdict.index("35.86") < verdict.index("48.12") < verdict.index("41.5")  # D2C first, then as d2c/variants.py lists
    assert "[33.36, 38.11] (95 %)" in verdict
    # Every comparison file: ΔFID, its interval and d2c compare's verdict sentence.
    for (a, b), (_, point, low, high) in COMPARISONS.items():
        assert f"{point:+.2f}" in verdict and f"[{low:+.2f}, {high:+.2f}]" in verdict, (a, b)
    assert "d2c has the lower FID: ΔFID -12.27, 95% interval [-15.42, -9.08] lies below 0" in verdict
    assert "not resolved at these N: ΔFID -5.64, 95% interval [-8.93, +1.17] spans 0" in verdict
    # The three sample grids, side by side, embedded from EVAL/grids/overview.png as written.
    grids = {alt: data for data, alt in PNG_RE.findall(verdict)}
    assert set(grids) == {f"sample grid — {v}" for v in VARIANT_FIDS}
    for v in VARIANT_FIDS:
        assert base64.b64decode(grids[f"sample grid — {v}"]) == (demo_dir / v / "eval" / "grids" / "overview.png").read_bytes()
    assert '<div class="grids">' in verdict
    # What one run can and cannot show, and where the multi-seed study is (not run here).
    assert "one training seed per variant" in verdict and "not training randomness" in verdict
    assert "The multi-seed study: benchmarks/results/fidelity/README.md in the d2c repository" in verdict
    assert "has not been run" in verdict


def test_provenance_rows_are_folded_away(demo_page):
    shown = without_details(demo_page)
    for text in ("fid_bootstrap", "sampling.ddim_eta", "metric_settings.prc_k", "weird_extra_field"):
        # a row (its first cell); the metric definitions in view may name a setting in prose
        assert f">{text}" in demo_page and f">{text}" not in shown, text
    assert '<table class="metrics">' in shown and "35.86" in shown  # the numbers themselves stay in view


def test_verdict_shows_the_study_summary(demo_dir, tmp_path, monkeypatch):
    study = tmp_path / "study"
    study.mkdir()
    (study / "README.md").write_text("# The seeded fidelity study\n")
    pd.DataFrame([{"variant": "d2c", "seeds": 3, "fid_mean": 31.42, "fid_std": 1.37, "kid_mean": 0.01234, "kid_std": 0.0021},
                  {"variant": "random", "seeds": 1, "fid_mean": 44.1, "fid_std": None, "kid_mean": 0.025, "kid_std": None}]
                 ).to_csv(study / "summary.csv", index=False)
    monkeypatch.setattr(report, "STUDY_DIR", study)
    root = eval_only_demo(demo_dir, tmp_path / "demo", VARIANT_FIDS, comparisons=[f for f, *_ in COMPARISONS.values()])
    verdict = report.verdict_section(report.collect([root])).html()
    assert "31.42 ± 1.37" in verdict and "0.01234 ± 0.0021" in verdict and ">44.1<" in verdict and ">3<" in verdict
    assert "has not been run" not in verdict and str(study / "summary.csv") in verdict
    (study / "README.md").unlink()  # no README: the study counts as not run
    assert "has not been run" in report.verdict_section(report.collect([root])).html()


def test_old_demo_json_with_one_comparison_still_renders(demo_dir, tmp_path):
    """A two-variant demo.json from before "comparisons": its single "comparison" file is shown."""
    root = eval_only_demo(demo_dir, tmp_path / "old", ("d2c", "random"), comparison="comparison.json")
    page = write_report([str(root)], tmp_path / "r.html").read_text()
    verdict = section_html(page, "verdict")
    assert "-12.27" in verdict and "[-15.42, -9.08]" in verdict and "35.86" in verdict and "48.12" in verdict
    assert "-6.63" not in verdict and "-5.64" not in verdict
    assert len(PNG_RE.findall(verdict)) == 2
    # No comparison at all (eval.bootstrap_rounds=0): said, not fatal.
    none = eval_only_demo(demo_dir, tmp_path / "none", ("d2c", "random"), comparison=None)
    assert "No comparison files" in section_html(report.render(report.collect([none])), "verdict")


def test_verdict_draws_grids_from_samples_when_the_evaluation_has_none(demo_dir, tmp_path):
    ev = tmp_path / "ev"
    write_eval(ev, 20.0)  # samples.npz, no grids/
    root = tmp_path / "demo"
    root.mkdir()
    (root / "demo.json").write_text(json.dumps({"runs": {"d2c": {"eval": str(ev)}}}))
    verdict = report.verdict_section(report.collect([root])).html()
    assert [alt for _, alt in PNG_RE.findall(verdict)] == ["sample grid — d2c"] and "no grids/overview.png" in verdict


def test_large_grids_are_shrunk_to_fit_the_page():
    from d2c.report import plots as report_plots

    big = report_plots.array_png(np.zeros((3000, 1500, 3), np.uint8))
    with Image.open(io.BytesIO(report_plots.fit_png(big, report.MAX_GRID_PX))) as im:
        assert im.format == "PNG" and im.size == (report.MAX_GRID_PX // 2, report.MAX_GRID_PX)
    small = report_plots.array_png(np.zeros((40, 30), np.uint8))
    assert report_plots.fit_png(small, report.MAX_GRID_PX) == small  # embedded as written


def test_html_is_escaped(demo_page):
    page = demo_page
    assert NASTY_NAME not in page
    assert "&lt;b&gt;Bag&lt;/b&gt; &amp; co" in page


def test_missing_parts_are_reported_not_fatal(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": {"select": {"method": "d2c", "k": K}}, "class_names": ["a", "b"]}))
    train = tmp_path / "train"
    (train / "checkpoints").mkdir(parents=True)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"fid": 12.5, "precision": 0.5}))
    page = write_report([str(run), str(train), str(ev)], tmp_path / "r.html").read_text()
    assert "12.5" in page
    assert page.count("not recorded") >= 4  # sampler, steps, N, reference
    for text in ("scores: no parquet files", "selection.parquet: not found", "metrics.jsonl: not found",
                 "samples.npz: not found"):
        assert text in page, text
    assert "<img" not in page  # nothing to draw, and nothing crashed


def test_sweep_table_gives_fid_against_k(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [{"k": k, "budget": b, "method": "d2c", "steps": 200, "fid": 40 + (k - 8) ** 2 / 10 - b / 40, "kid": 0.01,
             "wall_time_s": 30.0, "trial_dir": f"/t/{k}-{b}"} for k in (2, 4, 8, 16, 32) for b in (40, 80)]
    rows += [{"k": None, "budget": b, "method": "random", "steps": 200, "fid": 50.0, "kid": 0.02, "wall_time_s": 30.0,
              "trial_dir": f"/t/r-{b}"} for b in (40, 80)]
    rows.append({"k": 64, "budget": 40, "method": "d2c", "steps": 200, "fid": None, "kid": None, "wall_time_s": 1.0,
                 "trial_dir": "/t/failed"})
    pd.DataFrame(rows).to_csv(sweep / "results.csv", index=False)
    out = write_report([str(sweep)])
    assert out == sweep / "report.html"
    page = out.read_text()
    figs = figures(page)
    assert list(figs) == [f"FID against k — {sweep}"]
    assert figs[f"FID against k — {sweep}"].width >= 300
    assert "/t/failed" in page and "200" in page


def test_loose_paths_make_one_model(demo_dir, tmp_path):
    page = write_report([str(demo_dir / "d2c" / p) for p in ("run", "train", "eval")], tmp_path / "r.html").read_text()
    figs = figures(page)
    assert {"score distribution — run", "image grids — run", "training curves", "samples", "selection coverage"} <= set(figs)
    assert "35.86" in page


def test_run_report_cli_paths(demo_dir, tmp_path, capsys):
    assert run_report([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_report([str(empty)]) == 2
    assert "no D2C artifacts" in capsys.readouterr().err
    sweep_less = tmp_path / "ev"
    write_eval(sweep_less, 9.5, samples=False)
    assert run_report([str(sweep_less)]) == 0
    assert capsys.readouterr().out.strip() == str(sweep_less / "report.html")


def test_npz_names_match_the_evaluator():
    from d2c.eval import fid

    assert (report.NPZ_IMAGES, report.NPZ_LABELS) == (fid.NPZ_IMAGES, fid.NPZ_LABELS)


def test_read_npz_rows_reads_only_the_rows_asked_for(tmp_path):
    arr = np.arange(7 * 4 * 3 * 3, dtype=np.uint8).reshape(7, 4, 3, 3)
    for save in (np.savez, np.savez_compressed):
        f = tmp_path / f"{save.__name__}.npz"
        save(f, arr, np.arange(7))
        rows, total = read_npz_rows(f, "arr_0", [1, 4, 6])
        assert total == 7 and np.array_equal(rows, arr[[1, 4, 6]])
        empty, total = read_npz_rows(f, "arr_0", [])
        assert empty.shape == (0, 4, 3, 3) and total == 7


def test_images_of_other_sources_are_loaded_through_the_listing(tmp_path):
    """An ImageFolder run: the grids decode the listed files with the run's own preprocessing."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(3)
    rows = []
    for label, cls in enumerate(("cat", "dog")):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
            rows.append({"image_id": f"{cls}/{i}.png", "label": label, "score": float(rng.random())})
    (folder / "dog" / "5.png").write_bytes(b"")  # unreadable now: drawn blank and named in the caption
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    scores = pd.DataFrame(rows)
    scores.to_parquet(run / "scores" / "shard-00000.parquet", index=False)
    parts = [select_class(g, int(c), 2, "d2c", 2, "clamp")[0] for c, g in scores.groupby("label")]
    (run / "selection").mkdir()
    pd.concat(parts).to_parquet(run / "selection" / "selection.parquet", index=False)
    cfg = {"data": {"source": "imagefolder", "path": str(folder), "image_size": 16, "channels": 3, "preprocess": "center_crop"},
           "select": {"method": "d2c", "k": 2, "budget": 4}}
    (run / "manifest.json").write_text(json.dumps({"config": cfg, "class_names": ["cat", "dog"]}))
    page = write_report([str(run)]).read_text()
    figs = figures(page)
    assert "image grids — run" in figs
    assert "dog/5.png" in page  # the reject is reported, not fatal


def test_many_classes_are_sampled_evenly():
    picked = shown_classes(range(1000))
    assert len(picked) == MAX_CLASSES_SHOWN and picked[0] == 0 and picked[-1] == 999
    assert shown_classes([3, 1, 2]) == [1, 2, 3]


def _screenshot_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_screenshot_script_without_chromium_says_how_to_install(tmp_path, monkeypatch, capsys):
    mod = _screenshot_module()
    cmd = mod.chromium_command("chromium", tmp_path / "r.html", tmp_path / "r.png", tmp_path / "profile", (1400, 4000))
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={tmp_path / 'r.png'}",
                 "--window-size=1400,4000"):
        assert flag in cmd, flag
    assert cmd[-1].startswith("file://")
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser here
    page = tmp_path / "r.html"
    page.write_text("<html></html>")
    assert mod.main([str(page)]) == 3
    assert "apt-get install -y chromium" in capsys.readouterr().err
