"""Does ``score.precision`` (bf16 / fp16 autocast) select the same images as fp32?

Low precision is what makes scoring fast on a GPU (tensor cores: an H100's dense bf16 rate is
about 15x its plain fp32 rate), but the difficulty score is only useful if it ranks the images
of a class as fp32 does. This script scores the same Fashion-MNIST images with the demo's
trained embedded scorer through the product's own scoring actor (``app.condense.ScoreActor``,
called in-process: no Ray) at each precision, and compares with fp32:

* the scores: max and median relative difference;
* the ranking within each class: Spearman correlation (mean and worst class);
* the selection: interval sampling (``d2c.select.interval.select_table``, ``select.method=d2c``)
  at ``--per-class-budget`` per class and k = per-class images // per-class budget, as the
  demo's 0.8 % budget does: the share of selected images that fp32 selects too, and how far
  the low-precision picks sit from the ranks interval sampling aims at, in fp32's ranking
  (mean and max |fp32 rank - target rank|, in ranks of the class).

    python benchmarks/score_precision.py                      # 300 images per class, recorded
    python benchmarks/score_precision.py --per-class 60 --no-record

The scorer is the demo's (``configs/embedded.yaml`` + ``demo.overrides``: 400 steps), taken from
the d2c cache (``D2C_CACHE_DIR``) or trained first (about two minutes on 2 cores, through Ray
Train, then cached for ``d2c demo`` too). CPU seconds are printed for the record only: a CPU
without native bf16/fp16 runs autocast slower than fp32, the opposite of a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.condense import ScoreActor  # noqa: E402
from app.demo import demo_config  # noqa: E402
from app.train import ensure_embedded_scorer  # noqa: E402
from d2c.config import load_config  # noqa: E402
from d2c.data.preprocess import pad_to  # noqa: E402
from d2c.data.source import list_source  # noqa: E402
from d2c.select.interval import select_table  # noqa: E402

#: Precisions compared with fp32.
LOW_PRECISIONS = ("bf16", "fp16")
#: The BENCHMARKS.md section this script appends to.
RECORD_HEADING = "## Scoring precision: bf16 / fp16 autocast against fp32 (selection agreement)"


def score_all(cfg, scorer: str, rows: list[dict], batch: int) -> tuple[np.ndarray, float]:
    """Scores ``[N]`` of ``rows`` through the product's ScoreActor, and the CPU seconds it took."""
    actor = ScoreActor(cfg.to_dict(), scorer)
    out, start = [], time.process_time()
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        n = len(chunk)
        got = actor(dict(pos=np.arange(n), shard=np.zeros(n, np.int64), reject=np.array([""] * n, object),
                         image_id=np.array([r["image_id"] for r in chunk], object),
                         label=np.array([r["label"] for r in chunk]),
                         image=np.stack([pad_to(r["image"], cfg.data.image_size) for r in chunk])))
        out.append(got["score"])
    return np.concatenate(out), time.process_time() - start


def class_ranks(table: pd.DataFrame) -> pd.Series:
    """Rank of each image within its class by (score, image_id), as interval sampling sorts."""
    ordered = table.sort_values(["label", "score", "image_id"], kind="stable")
    return pd.Series(ordered.groupby("label").cumcount().to_numpy(), index=ordered.image_id)


def compare(ref: pd.DataFrame, low: pd.DataFrame, budget: int, k: int) -> dict[str, float]:
    """Agreement of ``low``'s scores (image_id, label, score) with ``ref``'s."""
    rel = np.abs(low.score.to_numpy() - ref.score.to_numpy()) / np.abs(ref.score.to_numpy())
    rank_ref, rank_low = class_ranks(ref), class_ranks(low)
    spearman = []
    for _, g in ref.groupby("label"):
        ids = g.image_id.to_numpy()
        spearman.append(np.corrcoef(rank_ref.loc[ids], rank_low.loc[ids])[0, 1])
    sel_ref, _ = select_table(ref, budget, "d2c", k)
    sel_low, _ = select_table(low, budget, "d2c", k)
    shift = np.abs(rank_ref.loc[sel_low.image_id].to_numpy() - sel_low["rank"].to_numpy())
    return dict(rel_max=float(rel.max()), rel_median=float(np.median(rel)), spearman_mean=float(np.mean(spearman)),
                spearman_min=float(np.min(spearman)),
                overlap=len(set(sel_ref.image_id) & set(sel_low.image_id)) / len(sel_ref),
                shift_mean=float(shift.mean()), shift_max=int(shift.max()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=300, help="Fashion-MNIST train images per class to score")
    ap.add_argument("--per-class-budget", type=int, default=12, help="images selected per class (the demo: 12 = 0.8 %%)")
    ap.add_argument("--batch", type=int, default=256, help="images per ScoreActor call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    if args.per_class < 2 * args.per_class_budget:
        ap.error(f"--per-class {args.per_class} must be at least twice --per-class-budget {args.per_class_budget}")
    base = demo_config(load_config(ROOT / "configs" / "embedded.yaml"), quick=False, user_overrides=[])
    scorer = str(ensure_embedded_scorer(base))
    torch.set_num_threads(args.threads)
    k = args.per_class // args.per_class_budget
    common = [f"data.max_per_class={args.per_class}", f"score.num_cpus={args.threads}", "score.num_gpus=0"]
    cfgs = {p: demo_config(load_config(ROOT / "configs" / "embedded.yaml"), quick=False,
                           user_overrides=[*common, f"score.precision={p}"]) for p in ("fp32", *LOW_PRECISIONS)}
    rows = list_source(cfgs["fp32"].data).rows
    classes = len({r["label"] for r in rows})
    ids = [r["image_id"] for r in rows]
    labels = [r["label"] for r in rows]
    tables, seconds = {}, {}
    for p, cfg in cfgs.items():
        scores, seconds[p] = score_all(cfg, scorer, rows, args.batch)
        tables[p] = pd.DataFrame({"image_id": ids, "label": labels, "score": scores.astype(np.float64)})
        print(f"[bench] {p}: {len(rows)} images in {seconds[p]:.1f} CPU s", flush=True)
    budget = args.per_class_budget * classes
    c = cfgs["fp32"]
    lines = [
        f"### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`python benchmarks/score_precision.py --per-class {args.per_class} --per-class-budget {args.per_class_budget}` — "
        f"{len(rows)} Fashion-MNIST train images ({args.per_class} per class), the demo's trained embedded scorer "
        f"(DiT hidden {c.model.hidden_size}, depth {c.model.depth}, patch {c.model.patch_size}, "
        f"{c.score.scorer_train_steps} steps), T={c.score.num_timesteps}, {c.score.forward_rows} rows per forward pass, "
        f"through app.condense.ScoreActor on the CPU ({platform.machine()}, {args.threads} torch threads); "
        f"selection: d2c interval sampling, {args.per_class_budget} per class, k={k}.",
        "",
        "| precision | score rel. diff max / median | Spearman per class mean / min | selected as fp32 "
        "| pick's fp32 rank − target mean / max | CPU s (fp32 = 1) |",
        "|---|---|---|---|---|---|",
        f"| fp32 | — | — | — | — | {seconds['fp32']:.1f} (1.00) |",
    ]
    for p in LOW_PRECISIONS:
        m = compare(tables["fp32"], tables[p], budget, k)
        lines.append(f"| {p} | {m['rel_max']:.1e} / {m['rel_median']:.1e} | {m['spearman_mean']:.5f} / {m['spearman_min']:.5f} "
                     f"| {100 * m['overlap']:.0f} % | {m['shift_mean']:.2f} / {m['shift_max']} "
                     f"| {seconds[p]:.1f} ({seconds[p] / seconds['fp32']:.2f}) |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        bench = ROOT / "BENCHMARKS.md"
        head = "" if RECORD_HEADING in bench.read_text() else f"\n{RECORD_HEADING}\n"
        with open(bench, "a") as f:
            f.write(head + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
