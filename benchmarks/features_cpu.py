"""Feature-pass throughput (kcenter / herding): pooled EfficientNet-Lite0 features per input size.

For each ``--sizes`` value a plain single-process loop computes the pooled features
(d2c.select.features.pooled_features) of the same Fashion-MNIST images, reporting images/s
(wall), images per CPU-second (process CPU time: less sensitive to a shared machine) and
how well the features separate the classes (nearest-class-mean accuracy on a held-out half,
cosine similarity): a feature size is worth its cost only if that stays well above chance
(0.1). Then the Ray feature stage (app.condense.feature_stage: decode tasks → one
FeatureActor) runs at ``--ray-size``, with its fixed costs (pipeline and actor start, model
load) included.

    python benchmarks/features_cpu.py --rows 2000 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
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

from app.condense import feature_stage  # noqa: E402
from app.ray_session import init_ray, quiet_data_context  # noqa: E402
from d2c.condense import RunDir  # noqa: E402
from d2c.config import load_config  # noqa: E402
from d2c.data.preprocess import pad_to  # noqa: E402
from d2c.data.source import list_source  # noqa: E402
from d2c.models.encoders import load_vision_encoder  # noqa: E402
from d2c.select.features import pooled_features  # noqa: E402

NUM_CLASSES = 10
#: Seed of the train / held-out split of the separability check.
SPLIT_SEED = 0


def class_mean_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Nearest-class-mean accuracy (cosine) on a random half, class means from the other half."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    idx = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    fit, held = idx[: len(x) // 2], idx[len(x) // 2 :]
    means = np.stack([x[fit][labels[fit] == c].mean(0) for c in range(NUM_CLASSES)])
    return float((np.argmax(x[held] @ means.T, 1) == labels[held]).mean())


def plain_loop(images: np.ndarray, size: int, batch: int) -> tuple[float, float, np.ndarray, int]:
    """(wall seconds, process CPU seconds, features [N, d], token-grid side) of one pass at input side ``size``."""
    enc = load_vision_encoder("efficientnet_lite0", None, size)
    pooled_features(enc, images[:batch], batch)  # warm-up: first-call allocations
    wall, cpu = time.perf_counter(), time.process_time()
    feats = pooled_features(enc, images, batch)
    return time.perf_counter() - wall, time.process_time() - cpu, feats, enc.grid_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="images (multiple of 10)")
    ap.add_argument("--sizes", default="32,64,128", help="encoder input sides to compare, comma-separated")
    ap.add_argument("--ray-size", type=int, default=64, help="input side of the Ray stage run (0 = skip it)")
    ap.add_argument("--batch", type=int, default=64, help="images per forward pass (select.feature_batch_size)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the plain loop (0 = torch's default; 1 = what one Ray actor gets)")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [
        f"data.max_per_class={args.rows // NUM_CLASSES}", "select.method=kcenter",
        f"select.feature_image_size={args.ray_size or 64}", f"select.feature_batch_size={args.batch}"])
    listing = list_source(cfg.data)
    images = np.stack([pad_to(r["image"], cfg.data.image_size) for r in listing.rows])
    images = images[..., None] if images.ndim == 3 else images  # [N, 32, 32, 1]
    labels = np.asarray([r["label"] for r in listing.rows])
    n = len(images)
    lines = [
        f"### Feature-pass throughput, {dt.date.today().isoformat()}",
        "",
        f"`python benchmarks/features_cpu.py --rows {args.rows} --sizes {args.sizes} --ray-size {args.ray_size} "
        f"--batch {args.batch} --threads {args.threads}` — {n} Fashion-MNIST images (32 px), EfficientNet-Lite0, "
        f"mean over patch tokens, batch {args.batch}, fp32, plain loop on {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs ({os.uname().machine}), "
        f"load average at start {os.getloadavg()[0]:.1f}.",
        "",
        "| variant | input px | tokens | seconds | images/s | images per CPU-s | class-mean accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in (int(s) for s in args.sizes.split(",")):
        wall, cpu, feats, grid = plain_loop(images, size, args.batch)
        lines.append(f"| plain | {size} | {grid}×{grid} | {wall:.1f} | {n / wall:.1f} | {n / cpu:.1f} | "
                     f"{class_mean_accuracy(feats, labels):.3f} |")
        print(lines[-1], flush=True)
    if args.ray_size:
        init_ray(cfg, include_dashboard=False)
        quiet_data_context(progress=False)
        run = Path(tempfile.mkdtemp(prefix="d2c-feat-bench-"))
        start = time.perf_counter()
        feature_stage(cfg, listing, RunDir(run))
        wall = time.perf_counter() - start
        got = pd.read_parquet(RunDir(run).features).set_index("image_id").loc[[r["image_id"] for r in listing.rows]]
        feats = np.stack(got["feature"].to_list())
        lines.append(f"| ray, 1 actor | {args.ray_size} | | {wall:.1f} | {n / wall:.1f} | | "
                     f"{class_mean_accuracy(feats, labels):.3f} |")
        print(lines[-1], flush=True)
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
