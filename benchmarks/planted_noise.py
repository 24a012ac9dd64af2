"""Does the difficulty score find planted noise? A check of the scorer, end to end.

In an image folder of Fashion-MNIST images, ``--noisy`` of every class are corrupted (heavy
Gaussian noise plus stripes). ``d2c condense`` then trains the embedded scorer from scratch
(``--steps``, at ``train.ema_decay`` ``--ema``) and scores every image. A scorer that learned the
data ranks the corrupted images hardest: the AUROC of "score ranks a noisy image above a clean
one" is near 1; a scorer that learned nothing ranks them at chance (0.5).

    python benchmarks/planted_noise.py --steps 300 --out benchmarks/results/planted_noise
    python benchmarks/planted_noise.py --steps 2000 --out benchmarks/results/planted_noise   # the embedded default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def corrupt(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heavy noise (σ = 80 grey levels) and vertical stripes every 4 px over a uint8 image."""
    x = img.astype(np.float64) + rng.normal(0.0, 80.0, img.shape)
    x[:, ::4] = 255.0
    return np.clip(x, 0, 255).astype(np.uint8)


def write_folder(root: Path, per_class: int, noisy: int, seed: int = 0) -> set[str]:
    """An ImageNet-layout folder of Fashion-MNIST train images; returns the corrupted image ids."""
    from d2c.data.fashion_mnist import CLASS_NAMES_FASHION_MNIST, load_fashion_mnist

    images, labels = load_fashion_mnist(None, "train")
    rng = np.random.default_rng(seed)
    planted = set()
    for c, _ in enumerate(CLASS_NAMES_FASHION_MNIST):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(labels == c)[:per_class]
        bad = set(rng.choice(per_class, noisy, replace=False).tolist())
        for j, i in enumerate(idx):
            img = corrupt(images[i], rng) if j in bad else images[i]
            Image.fromarray(img, mode="L").save(d / f"img{j:04d}.png")
            if j in bad:
                planted.add(f"c{c:02d}/img{j:04d}.png")
    return planted


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann–Whitney U)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def planted_noise_auroc(work: Path, steps: int, ema: float, per_class: int = 40, noisy: int = 4,
                        extra: tuple[str, ...] = ()) -> dict:
    """Run ``d2c condense`` (embedded scorer trained from scratch) over a planted folder; returns
    the AUROC overall and per class, the scorer gate's numbers and the wall time."""
    import pandas as pd

    from app.condense import run_condense
    from d2c.config import load_config

    data = work / "data"
    planted = write_folder(data, per_class, noisy)
    os.environ["D2C_CACHE_DIR"] = str(work / "cache")
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [
        f"run_dir={work / 'run'}", "data.source=imagefolder", f"data.path={data}", "data.channels=1",
        "data.preprocess=pad", "score.scorer=null", f"score.scorer_train_steps={steps}", f"train.ema_decay={ema}",
        f"select.budget={10 * noisy}", "select.k=1", "attach.text.encoder=none", "attach.vision.encoder=none",
        "model.use_text=false", "model.use_visual=false", *extra])
    start = time.perf_counter()
    assert run_condense(cfg) == 0
    seconds = time.perf_counter() - start
    scores = pd.read_parquet(work / "run" / "scores")
    bad = scores.image_id.isin(planted).to_numpy()
    per_class = {int(c): auroc(g.score.to_numpy(), g.image_id.isin(planted).to_numpy()) for c, g in scores.groupby("label")}
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    return {"steps": steps, "ema_decay": ema, "images": len(scores), "noisy": int(bad.sum()),
            "auroc": auroc(scores.score.to_numpy(), bad), "auroc_min_class": min(per_class.values()),
            "gate": manifest["scorer_gate"], "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--noisy", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="append the result to OUT/results.jsonl")
    args = ap.parse_args()
    from app.ray_session import init_ray

    init_ray()
    with tempfile.TemporaryDirectory(prefix="d2c-planted-") as tmp:
        result = planted_noise_auroc(Path(tmp), args.steps, args.ema, args.per_class, args.noisy)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
