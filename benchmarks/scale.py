"""ImageNet scale without ImageNet: the product's condense stages over the synthetic
ImageNet-shaped table (``benchmarks/synthetic_imagenet.py``: 1,000 classes, 32 px PNGs) at
N = 100K, 400K and 1.28M rows, with time and memory per stage.

The stages are ``run_condense``'s own functions, called in its order on one run directory:

* ``list``: ``d2c.data.source.list_source`` (the driver's listing);
* ``score``: ``app.condense.score_stage``: decode tasks + scoring actors + one Parquet file per
  shard. Scoring's cost is taken out with a scorer whose forward is trivially cheap (an untrained
  DiT of width 16, one block, patch 8 = 16 tokens, at T = 1); decode, shuffling, shards and files
  are the real ones. The quality gate is off (``score.gate_rows=0``): the scorer is untrained;
* ``select``: ``app.condense.select_stage``: the per-class groupby over 1,000 classes, with the
  partition count the product chooses;
* ``attach``: ``app.condense.attach_stage`` for the selection (10 per class), latents only
  (identity autoencoder; text and visual encoders off);
* ``read_back``: ``RUN/scores`` (three columns) and ``RUN/selection`` read as the sweep and the
  report read them.

Per stage: wall time, the driver's peak RSS while it ran (psutil, sampled every 0.2 s), Ray's
object-store peak (plasma usage from ``ray._private.internal_api.memory_summary``), the files it
wrote, rows/s. ``results.csv`` gets one row per (rows, stage); a finished size is not rerun.

    python benchmarks/scale.py --out /tmp/scale --results benchmarks/results/scale --sizes 100000 400000 1281167
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic_imagenet as syn  # noqa: E402
from fidelity import read_rows, write_rows  # noqa: E402  (the study's CSV helpers)

COLUMNS = ["rows", "stage", "wall_s", "driver_rss_mb", "object_store_peak_mb", "files", "rows_per_s"]
STAGES = ["list", "score", "select", "attach", "read_back"]
#: Images selected per class.
PER_CLASS_BUDGET = 10
SAMPLE_S = 0.2
MIB = 2**20


class Peak:
    """The driver's RSS and Ray's plasma usage, sampled in a thread while a stage runs."""

    def __init__(self, every_s: float = SAMPLE_S):
        import psutil

        self.proc, self.every_s = psutil.Process(), every_s
        self.rss = self.store = 0

    @staticmethod
    def plasma_bytes() -> int:
        from ray._private.internal_api import memory_summary

        m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
        return int(m.group(1)) * MIB if m else 0

    def measure(self, fn: Callable[[], Any]) -> Any:
        self.rss, self.store = self.proc.memory_info().rss, 0
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.rss = max(self.rss, self.proc.memory_info().rss)
                try:
                    self.store = max(self.store, self.plasma_bytes())
                except Exception:  # a poll during Ray shutdown or start; the next one counts
                    pass
                done.wait(self.every_s)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            return fn()
        finally:
            done.set()
            t.join()
            self.rss = max(self.rss, self.proc.memory_info().rss)


def files_under(*dirs) -> int:
    return sum(len(d.walk_files()) for d in dirs if d.exists())


def tiny_scorer(out: Path, num_classes: int) -> str:
    """An untrained DiT whose forward costs next to nothing, in d2c's checkpoint format."""
    import torch

    from d2c.models.build import build_model
    from d2c.train.checkpoint import checkpoint_meta, latest_checkpoint, save_checkpoint

    if (found := latest_checkpoint(out)) is not None:
        return str(found)
    kwargs = dict(input_size=32, patch_size=8, in_channels=3, hidden_size=16, depth=1, num_heads=1, mlp_ratio=1.0,
                  class_dropout_prob=0.0, num_classes=num_classes, learn_sigma=False)
    torch.manual_seed(0)
    model = build_model(kwargs)
    meta = checkpoint_meta("dit", kwargs, {"arch": "dit", "prediction": "eps", "num_timesteps": 1000}, {})
    return str(save_checkpoint(out, 0, model, model, {"step": 0}, meta))


def scale_config(source: Path, run_dir: Path, scorer: str, classes: int, extra: list[str]):
    from d2c.config import load_config

    return load_config(ROOT / "configs" / "embedded.yaml", [
        f"run_dir={run_dir}", "data.source=parquet", f"data.path={source}", "data.channels=3", "data.image_size=32",
        "data.preprocess=center_crop", "autoencoder.kind=identity", f"score.scorer={scorer}", "score.num_timesteps=1",
        "score.gate_rows=0", "score.batch_size=1024", "score.forward_rows=1024", "score.min_actors=2", "score.max_actors=2",
        "score.num_cpus=1", "data.decode_num_cpus=0.5", "ray.num_cpus=4", f"select.budget={PER_CLASS_BUDGET * classes}",
        "select.k=64", "attach.text.encoder=none", "attach.vision.encoder=none", "model.use_text=false",
        "model.use_visual=false", "model.patch_size=8", "attach.flip=false", *extra])


def run_size(rows: int, work: Path, extra: list[str], classes: int = syn.IMAGENET_CLASSES) -> list[dict[str, Any]]:
    """Every stage at ``rows`` rows over ``classes`` classes; returns their result rows."""
    from app.condense import attach_stage, score_stage, select_stage
    from app.ray_session import init_ray, quiet_data_context
    from d2c.condense import RunDir
    from d2c.data.source import list_source

    per_class = max(1, rows // classes)
    source = work / f"source-{classes}x{per_class}"
    info = syn.write_source(source, classes=classes, per_class=per_class)
    print(f"[scale] source: {info['rows']} rows in {info['files']} files ({info['bytes'] / MIB:.0f} MiB), "
          f"{info['seconds']} s to write", flush=True)
    run = RunDir(work / f"run-{classes}x{per_class}")
    run.root.rmtree()
    cfg = scale_config(source, run.root.local_path, tiny_scorer(work / f"scorer-{classes}", classes), classes, extra)
    init_ray(cfg)
    quiet_data_context(cfg=cfg)
    peak, out, state = Peak(), [], {}

    def stage(name: str, fn: Callable[[], Any], written: Callable[[], int], n: Optional[int] = None) -> None:
        t0 = time.perf_counter()
        state[name] = peak.measure(fn)
        wall = time.perf_counter() - t0
        n = n if n is not None else info["rows"]
        out.append(dict(rows=info["rows"], stage=name, wall_s=round(wall, 2), driver_rss_mb=round(peak.rss / MIB, 1),
                        object_store_peak_mb=round(peak.store / MIB, 1), files=written(), rows_per_s=round(n / wall, 1)))
        print(f"[scale] {out[-1]}", flush=True)

    stage("list", lambda: list_source(cfg.data), lambda: 0)
    listing = state["list"]
    stage("score", lambda: score_stage(cfg, listing, run, cfg.score.scorer), lambda: files_under(run.scores, run.rejects))
    stage("select", lambda: select_stage(cfg, run.scores, run.selection, listing.num_classes),
          lambda: files_under(run.selection))
    sel = state["select"][0]
    stage("attach", lambda: attach_stage(cfg, listing, sel, run), lambda: files_under(run.condensed), n=len(sel))
    stage("read_back", lambda: (run.scores.read_pandas(columns=["image_id", "label", "score"]),
                                (run.selection / "selection.parquet").read_pandas()), lambda: 0)
    return out


def growth(rows: list[dict[str, Any]], stage: str, column: str) -> Optional[float]:
    """The exponent b of ``column ≈ a · rows^b`` fitted over the sizes measured (1 = linear, 0 = flat)."""
    import numpy as np

    pts = [(float(r["rows"]), float(r[column])) for r in rows if r["stage"] == stage and float(r[column]) > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def summarise(results: Path, rows: list[dict[str, Any]], command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in STAGES:
        pts = sorted((int(r["rows"]), float(r["wall_s"]), float(r["driver_rss_mb"])) for r in rows if r["stage"] == stage)
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=stage)
            b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=stage)
    for ax, what in ((a, "wall time (s)"), (b, "driver peak RSS (MiB)")):
        ax.set_xlabel("rows")
        ax.set_ylabel(what)
        ax.set_xscale("log")
        ax.legend()
    a.set_yscale("log")
    fig.tight_layout()
    fig.savefig(results / "scale.png", dpi=110)
    plt.close(fig)
    lines = ["# Condense at ImageNet scale (synthetic rows)", "", "```", command, "```", "",
             "| stage | time ∝ rows^b | driver RSS ∝ rows^b |", "|---|---|---|"]
    for stage in STAGES:
        bt, bm = growth(rows, stage, "wall_s"), growth(rows, stage, "driver_rss_mb")
        lines.append(f"| {stage} | {'' if bt is None else f'{bt:.2f}'} | {'' if bm is None else f'{bm:.2f}'} |")
    lines += ["", "`results.csv`: one row per (rows, stage); `scale.png`: time and driver memory against rows.", ""]
    (results / "README.md").write_text("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="work directory (sources, runs; large)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_281_167])
    ap.add_argument("--classes", type=int, default=syn.IMAGENET_CLASSES)
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    a = ap.parse_args(argv)
    results_csv = a.results / "results.csv"
    rows = read_rows(results_csv)
    for n in a.sizes:
        per_class = max(1, n // a.classes)
        if any(int(r["rows"]) == per_class * a.classes for r in rows):
            print(f"[scale] {n} rows: measured already ({results_csv})", flush=True)
            continue
        a.out.mkdir(parents=True, exist_ok=True)
        rows += run_size(n, a.out.resolve(), a.overrides, a.classes)
        write_rows(results_csv, rows, COLUMNS)
    summarise(a.results, rows, "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
