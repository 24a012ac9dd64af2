"""Scoring throughput: the Ray Data pipeline against a plain single-process PyTorch loop.

Both score the same Fashion-MNIST images with the same embedded-size scorer (DiT, hidden
128, depth 4, 4 heads, patch 4 on 1×32×32; random weights — throughput does not depend on
them), the same timesteps and the same padded forward passes, in one run, so the ratio is
meaningful on a shared, noisy machine. The scores of every variant are also checked equal.

    python benchmarks/condense_cpu.py --rows 60000            # the issue's setting
    python benchmarks/condense_cpu.py --rows 2000 --no-record # a quick look

Variants: ``plain`` (one process, torch's default threads), ``ray-1`` (one actor holding
all CPUs), ``ray-2`` (two actors, one CPU each). Ray's times include its fixed costs
(pipeline start, actor start, model load in each actor), so the ratio approaches its
asymptote only at large row counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.condense import score_stage  # noqa: E402
from app.ray_session import init_ray, quiet_data_context  # noqa: E402
from d2c.condense import RunDir  # noqa: E402
from d2c.config import load_config  # noqa: E402
from d2c.data.preprocess import pad_to, to_model_tensor  # noqa: E402
from d2c.data.source import list_source  # noqa: E402
from d2c.diffusion.ddpm import DDPMSchedule  # noqa: E402
from d2c.models.build import build_model, dit_kwargs  # noqa: E402
from d2c.select.score import difficulty_scores, stratified_timesteps  # noqa: E402
from d2c.train.checkpoint import checkpoint_meta, load_model, save_checkpoint  # noqa: E402

NUM_CLASSES = 10


def make_scorer(cfg, out: Path) -> str:
    kwargs = dit_kwargs(cfg.model_copy(update={"model": cfg.model.model_copy(update={"use_text": False, "use_visual": False})}), NUM_CLASSES)
    torch.manual_seed(0)
    model = build_model(kwargs)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.02 * torch.randn_like(p))
    meta = checkpoint_meta("dit", kwargs, {"arch": "dit", "prediction": "eps", "num_timesteps": 1000}, {})
    return str(save_checkpoint(out, 0, model, model, {"step": 0}, meta))


def plain_loop(cfg, listing, scorer: str) -> tuple[float, pd.DataFrame]:
    model, _ = load_model(scorer)
    model.eval()
    ab = DDPMSchedule(cfg.diffusion.num_timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end).alphas_cumprod
    ts = stratified_timesteps(cfg.score.num_timesteps, cfg.diffusion.num_timesteps)
    rows = listing.rows
    start = time.perf_counter()
    out = []
    for i in range(0, len(rows), cfg.score.batch_size):
        chunk = rows[i : i + cfg.score.batch_size]
        x = to_model_tensor(np.stack([pad_to(r["image"], cfg.data.image_size) for r in chunk]))
        s = difficulty_scores(model, x, torch.tensor([r["label"] for r in chunk]), [r["image_id"] for r in chunk], ab, ts,
                              cfg.score.seed, max_forward_batch=cfg.score.forward_rows, pad_rows=True)
        out.append(s.mean(1).numpy())
    seconds = time.perf_counter() - start
    return seconds, pd.DataFrame({"image_id": [r["image_id"] for r in rows], "score": np.concatenate(out).astype(np.float64)})


def ray_variant(cfg, listing, scorer: str, run: Path, actors: int, cpus_per_actor: float) -> tuple[float, pd.DataFrame]:
    c = cfg.model_copy(update={"score": cfg.score.model_copy(update={"min_actors": actors, "max_actors": actors, "num_cpus": cpus_per_actor})})
    start = time.perf_counter()
    score_stage(c, listing, RunDir(run), scorer)
    seconds = time.perf_counter() - start
    return seconds, pd.read_parquet(run / "scores")[["image_id", "score"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=60000, help="images to score (multiple of 10; 60000 = all of the train split)")
    ap.add_argument("--timesteps", type=int, default=8, help="score.num_timesteps (the embedded default: 8; the demo: 4)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    forward_rows = args.batch * args.timesteps
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [
        f"data.max_per_class={args.rows // NUM_CLASSES}", f"score.num_timesteps={args.timesteps}",
        f"score.batch_size={args.batch}", f"score.forward_rows={forward_rows}", "score.shard_rows=4096"])
    listing = list_source(cfg.data)
    n = len(listing.rows)
    tmp = Path(tempfile.mkdtemp(prefix="d2c-bench-"))
    scorer = make_scorer(cfg, tmp / "scorer")
    # One logical CPU more than the cores: the actors take all the cores (their torch threads),
    # and the decode tasks upstream need a CPU slot of their own or the pipeline stalls.
    logical = cpus + int(np.ceil(cfg.data.decode_num_cpus))
    init_ray(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": logical})}), include_dashboard=False)
    quiet_data_context(progress=False)
    results = {}
    results["plain"] = plain_loop(cfg, listing, scorer)
    results["ray-1"] = ray_variant(cfg, listing, scorer, tmp / "ray1", 1, float(cpus))
    if cpus >= 2:
        results["ray-2"] = ray_variant(cfg, listing, scorer, tmp / "ray2", 2, float(cpus // 2))
    ref = results["plain"][1].set_index("image_id")["score"]
    lines = [
        f"### Scoring throughput, {dt.date.today().isoformat()}",
        "",
        f"`python benchmarks/condense_cpu.py --rows {args.rows} --timesteps {args.timesteps} --batch {args.batch}` — "
        f"{n} Fashion-MNIST images, embedded-size DiT scorer (random weights), T={args.timesteps}, "
        f"batch {args.batch}, {forward_rows} rows per forward pass, fp32, {cpus} CPUs ({platform.processor() or platform.machine()}).",
        "",
        "| variant | seconds | images/s | ratio to plain | scores equal to plain |",
        "|---|---|---|---|---|",
    ]
    plain_rate = n / results["plain"][0]
    for name, (seconds, df) in results.items():
        got = df.set_index("image_id")["score"].loc[ref.index]
        equal = "bitwise" if np.array_equal(got.to_numpy(), ref.to_numpy()) else f"max rel diff {np.max(np.abs(got - ref) / np.abs(ref)):.1e}"
        lines.append(f"| {name} | {seconds:.1f} | {n / seconds:.1f} | {n / seconds / plain_rate:.2f} | {equal} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        bench = ROOT / "BENCHMARKS.md"
        head = "" if bench.exists() else "# Benchmarks\n\nEvery figure: date, command, settings, machine. Ratios are measured side by side in one run.\n\n"
        with open(bench, "a") as f:
            f.write(head + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
