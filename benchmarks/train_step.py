"""Training step time: a plain PyTorch loop against the same step inside Ray Train (1 and 2 workers).

All variants train the same model (the embedded DiT + DC-embedding + REPA projector) on the
same synthetic condensed set (random latents, visual tokens and text embeddings of the
embedded shapes) with the same global batch, in one run, so the ratios are meaningful on a
shared, noisy machine. Ray's steady-state rate comes from its own ``metrics.jsonl``
(``images_per_s`` between log points), its wall time includes the TorchTrainer's fixed cost.

    python benchmarks/train_step.py --steps 60            # records to BENCHMARKS.md
    python benchmarks/train_step.py --steps 20 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ray_session import init_ray, quiet_data_context  # noqa: E402
from app.train import fit  # noqa: E402
from d2c.attach.text import save_text_embeddings  # noqa: E402
from d2c.config import load_config  # noqa: E402
from d2c.data.condensed import to_arrow  # noqa: E402
from d2c.models.build import build_model, dit_kwargs  # noqa: E402
from d2c.train.loop import RowBatches, assemble_batch, batch_stream, row_shapes  # noqa: E402
from d2c.train.objective import D2CObjective  # noqa: E402
from d2c.train.trainer import Trainer  # noqa: E402

NUM_CLASSES = 10
TEXT_LEN, TEXT_DIM, VIS_DIM = 16, 384, 1280


def synthetic_set(root: Path, rows: int, cfg) -> Path:
    """A condensed set of the embedded shapes with random contents, plus text embeddings."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    batch = {
        "image_id": np.asarray([f"img{i:06d}" for i in range(rows)], dtype=object),
        "label": np.arange(rows) % NUM_CLASSES,
        "latent": rng.standard_normal((rows, *shape), dtype=np.float32),
        "latent_flip": rng.standard_normal((rows, *shape), dtype=np.float32),
        "visual": rng.standard_normal((rows, cfg.num_tokens, VIS_DIM), dtype=np.float32),
        "visual_flip": rng.standard_normal((rows, cfg.num_tokens, VIS_DIM), dtype=np.float32),
    }
    cond = root / "condensed"
    cond.mkdir(parents=True)
    pq.write_table(to_arrow(batch), cond / "part-00000.parquet")
    emb = torch.randn(NUM_CLASSES, TEXT_LEN, TEXT_DIM)
    save_text_embeddings(root / "text_embeddings.safetensors", emb, torch.ones(NUM_CLASSES, TEXT_LEN),
                         [str(i) for i in range(NUM_CLASSES)], cfg.attach.text)
    return cond


def plain(cfg, cond: Path, steps: int) -> float:
    from d2c.attach.text import load_text_embeddings
    from d2c.data.condensed import read_condensed

    data = read_condensed(cond)
    emb, mask, _, _ = load_text_embeddings(cond.parent / "text_embeddings.safetensors")
    model = build_model(dit_kwargs(cfg, NUM_CLASSES, text_dim=TEXT_DIM, proj_dim=VIS_DIM))
    trainer = Trainer(model, D2CObjective.from_config(cfg), cfg.train)
    rows = RowBatches(data, cfg.train.batch_size, cfg.train.seed)
    batches = batch_stream(rows, functools.partial(assemble_batch, shapes=row_shapes(rows.rows), text=(emb, mask),
                                                   use_visual=True, hflip=True, generator=trainer.generator))
    trainer.train_step(next(batches))  # warm-up, not timed
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return steps / (time.perf_counter() - start)


def ray_variant(cfg, cond: Path, steps: int, workers: int, out: Path) -> tuple[float, float]:
    """``workers`` Ray Train workers sharing the machine's cores (torch threads = CPUs per worker)."""
    cpus = max(1, (os.cpu_count() or 1) // workers)
    c = cfg.model_copy(update={
        "condensed": str(cond),
        "train": cfg.train.model_copy(update={"steps": steps, "num_workers": workers, "log_every": 5, "cpus_per_worker": float(cpus)}),
    })
    start = time.perf_counter()
    fit(c, out, full=False)
    wall = steps / (time.perf_counter() - start)
    rates = [json.loads(line)["images_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    steady = float(np.median(rates)) / cfg.train.batch_size if rates else float("nan")
    return steady, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"train.batch_size={args.batch}", "train.ckpt_every=100000"])
    tmp = Path(tempfile.mkdtemp(prefix="d2c-train-bench-"))
    cond = synthetic_set(tmp / "set", 512, cfg)
    # One logical CPU more than the cores, so the dataset read tasks find a slot beside
    # workers that hold every core.
    cores = os.cpu_count() or 1
    init_ray(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"num_cpus": cores + 1})}), include_dashboard=False)
    quiet_data_context(progress=False)
    rows = [("plain loop (torch threads: %d)" % torch.get_num_threads(), plain(cfg, cond, args.steps), float("nan"))]
    for w in (1, 2):
        steady, wall = ray_variant(cfg, cond, args.steps, w, tmp / f"ray{w}")
        rows.append((f"Ray Train, {w} worker(s) × {max(1, cores // w)} threads", steady, wall))
    base = rows[0][1]
    lines = [f"### Training step, {dt.date.today().isoformat()}", "",
             f"`python benchmarks/train_step.py --steps {args.steps} --batch {args.batch}` — embedded DiT (hidden 128, depth 4, "
             f"patch 4) + DC-embedding + REPA projector, global batch {args.batch}, fp32, {os.cpu_count()} CPUs.", "",
             "| variant | steps/s (steady) | ratio to plain | steps/s incl. fixed cost |", "|---|---|---|---|"]
    for name, steady, wall in rows:
        lines.append(f"| {name} | {steady:.2f} | {steady / base:.2f} | {'' if np.isnan(wall) else f'{wall:.2f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
