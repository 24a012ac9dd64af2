"""REPA target choice: which EfficientNet-Lite0 layer / normalisation carries per-image information.

The REPA loss aligns the transformer's projected hidden tokens with the vision encoder's patch
tokens, L_proj = −1/h Σ_i cos(φ(h_i), y_i). A target that a constant per position already
aligns with well, or that is mostly zeros, teaches the projector little about the image. For a
class-balanced sample of Fashion-MNIST train images (28 px padded to 32, as the data stage does)
this computes candidate targets from EfficientNet-Lite0 at ``--image-size`` (256 → 8×8 tokens)
with forward hooks on the package's modules, and reports per candidate:

- ``zero_frac``, ``pos_frac``, ``neg_frac``: fraction of entries that are exactly 0, > 0, < 0;
- ``const_cos``: mean token cosine between an image's target and the per-position mean of the
  unit-normalised tokens of the *other* half of the images (the best constant predictor);
  ``const_cos_centre``: the same over the central half of the grid (4×4 of 8×8), where the
  garment is: the border tokens of padded Fashion-MNIST see mostly black background;
- ``unexplained``: Σ‖ŷ − m‖² / Σ‖ŷ‖² over unit tokens ŷ and that held-out per-position mean m
  (1 − R² of the constant predictor against the zero predictor): the share of what the cosine
  loss sees that is specific to the image;
- ``ncm_acc`` / ``nn1_acc``: nearest-class-mean / 1-nearest-neighbour class accuracy under the
  loss's own similarity, s(x, y) = mean over positions of cos(x_t, y_t), other half as gallery;
- ``inst_acc@<s>px``: instance retrieval top-1: the target of each image shifted by s pixels
  (32 px scale; ``--shifts``) must find its own unshifted target among all N by s;
- ``pooled_acc@<px>``: nearest-class-mean accuracy (cosine) of the mean over tokens at the
  kcenter/herding feature size ``--feature-size`` (d2c.select.features pools this way).

Halves are class-balanced and every held-out metric is averaged over both directions.

    nice -n 10 .venv/bin/python benchmarks/repa_target.py --per-class 50 --shifts 4 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from d2c.data.preprocess import pad_to  # noqa: E402
from d2c.models.encoders import load_vision_encoder  # noqa: E402

NUM_CLASSES = 10
PADDED_SIZE = 32
#: Seed of the class-balanced sample and of its halves.
SAMPLE_SEED = 0
#: Floor of a token's norm before unit-normalising (an all-zero token stays zero).
NORM_FLOOR = 1e-12
OUT_DIR = ROOT / "benchmarks" / "results" / "repa_target"


def sample_images(root: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random train images of each class, padded: uint8 [N, 1, 32, 32], labels [N]."""
    images, labels = load_fashion_mnist(root, "train")
    rng = np.random.default_rng(SAMPLE_SEED)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(NUM_CLASSES)])
    padded = np.stack([pad_to(images[i][..., None], PADDED_SIZE) for i in idx])  # [N, 32, 32, 1]
    return np.ascontiguousarray(padded.transpose(0, 3, 1, 2)), labels[idx]


def shifted(images: np.ndarray, pixels: int) -> np.ndarray:
    """Images moved ``pixels`` right and down, the vacated border filled with black."""
    out = np.zeros_like(images)
    out[..., pixels:, pixels:] = images[..., : PADDED_SIZE - pixels, : PADDED_SIZE - pixels]
    return out


@torch.no_grad()
def hooked_maps(enc, images: np.ndarray, batch: int) -> dict[str, torch.Tensor]:
    """The last MBConv block's output and the head conv's output (before BN) as tokens [N, T, c]."""
    model = enc.model
    caught: dict[str, torch.Tensor] = {}
    hooks = [model._blocks[-1].register_forward_hook(lambda m, i, o: caught.__setitem__("block", o)),
             model._conv_head.register_forward_hook(lambda m, i, o: caught.__setitem__("conv", o))]
    out: dict[str, list[torch.Tensor]] = {"block": [], "conv": []}
    try:
        for start in range(0, len(images), batch):
            pixels = enc.preprocess(torch.from_numpy(images[start : start + batch]))
            head = model.extract_features(pixels)
            # the hooks see what extract_features computes: BN + ReLU6 of the conv output = its result
            torch.testing.assert_close(model._swish(model._bn1(caught["conv"])), head)
            for k in out:
                out[k].append(caught[k].flatten(2).transpose(1, 2).float())
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def candidates(enc, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Candidate targets [N, T, d] derived from the two hooked maps."""
    model = enc.model

    def per_channel(fn: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        n, t, c = tokens.shape
        return fn(tokens.reshape(n * t, c, 1, 1)).reshape(n, t, c)

    def ln(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:])

    with torch.no_grad():
        conv = maps["conv"]
        bn = per_channel(model._bn1, conv)
        head = per_channel(model._swish, bn)
        block = maps["block"]
        return {
            "head": head,  # current: extract_features (BN + ReLU6)
            "head_ln": ln(head),
            "head_conv": conv,  # before BN
            "head_conv_ln": ln(conv),
            "head_preact": bn,  # after BN, before ReLU6
            "head_preact_ln": ln(bn),
            "last_block": block,
            "last_block_ln": ln(block),
        }


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)


def loss_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s(a_i, b_j) = mean over positions of cos(a_i,t, b_j,t) for unit tokens a [n, T, d], b [m, T, d] → [n, m]."""
    return a.flatten(1) @ b.flatten(1).T / a.shape[1]


def held_out_metrics(y: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor, held: torch.Tensor) -> dict[str, float]:
    """Metrics of the held half against the fit half (y: unit tokens [N, T, d])."""
    yf, yh = y[fit], y[held]
    lf, lh = labels[fit], labels[held]
    mean = yf.mean(0)  # the constant predictor: per-position mean token [T, d]
    per_position = (yh * unit(mean)).sum(-1)  # [n, T]
    grid = int(round(y.shape[1] ** 0.5))
    inner = torch.zeros(grid, grid, dtype=torch.bool)
    inner[grid // 4 : grid - grid // 4, grid // 4 : grid - grid // 4] = True
    unexplained = ((yh - mean) ** 2).sum() / (yh ** 2).sum()
    class_means = unit(torch.stack([yf[lf == c].mean(0) for c in range(NUM_CLASSES)]))  # [C, T, d]
    ncm = (loss_similarity(yh, class_means).argmax(1) == lh).float().mean()
    nn1 = (lf[loss_similarity(yh, yf).argmax(1)] == lh).float().mean()
    return {"const_cos": per_position.mean().item(), "const_cos_centre": per_position[:, inner.flatten()].mean().item(),
            "unexplained": unexplained.item(), "ncm_acc": ncm.item(),
            "nn1_acc": nn1.item()}


def pooled_accuracy(tokens: torch.Tensor, labels: torch.Tensor, halves: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Nearest-class-mean accuracy (cosine) of the mean-pooled tokens, averaged over both directions."""
    x = unit(tokens.mean(1))
    accs = []
    for fit, held in halves:
        means = torch.stack([x[fit][labels[fit] == c].mean(0) for c in range(NUM_CLASSES)])
        accs.append((torch.argmax(x[held] @ unit(means).T, 1) == labels[held]).float().mean().item())
    return float(np.mean(accs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx directory")
    ap.add_argument("--per-class", type=int, default=50, help="images per class (even: two halves)")
    ap.add_argument("--image-size", type=int, default=256, help="encoder input side (attach.vision.image_size)")
    ap.add_argument("--feature-size", type=int, default=64,
                    help="input side of the pooled kcenter/herding check (select.feature_image_size; 0 = skip)")
    ap.add_argument("--shifts", default="4", help="pixel shifts (32 px scale) of the instance-retrieval queries")
    ap.add_argument("--batch", type=int, default=50, help="images per forward pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", default=str(OUT_DIR), help="folder of results.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    images, labels_np = sample_images(args.data, args.per_class)
    labels = torch.from_numpy(labels_np)
    order = torch.from_numpy(np.random.default_rng(SAMPLE_SEED).permutation(len(labels)))
    a = torch.cat([order[labels[order] == c][: args.per_class // 2] for c in range(NUM_CLASSES)])
    b = torch.cat([order[labels[order] == c][args.per_class // 2 :] for c in range(NUM_CLASSES)])
    halves = [(a, b), (b, a)]

    enc = load_vision_encoder("efficientnet_lite0", None, args.image_size)
    cands = candidates(enc, hooked_maps(enc, images, args.batch))
    shifts = [int(s) for s in args.shifts.split(",") if s]
    cands_shift = {s: candidates(enc, hooked_maps(enc, shifted(images, s), args.batch)) for s in shifts}
    pooled = {}
    if args.feature_size:
        small = load_vision_encoder("efficientnet_lite0", None, args.feature_size)
        pooled = candidates(small, hooked_maps(small, images, args.batch))

    rows = []
    for name, y in cands.items():
        yu = unit(y)
        per_half = [held_out_metrics(yu, labels, fit, held) for fit, held in halves]
        row = {"candidate": name, "tokens": y.shape[1], "dim": y.shape[2],
               "zero_frac": (y == 0).float().mean().item(), "pos_frac": (y > 0).float().mean().item(),
               "neg_frac": (y < 0).float().mean().item()}
        row.update({k: float(np.mean([m[k] for m in per_half])) for k in per_half[0]})
        for s in shifts:
            hits = loss_similarity(unit(cands_shift[s][name]), yu).argmax(1) == torch.arange(len(yu))
            row[f"inst_acc@{s}px"] = hits.float().mean().item()
        if pooled:
            row[f"pooled_acc@{args.feature_size}"] = pooled_accuracy(pooled[name], labels, halves)
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False, float_format="%.4f")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(labels)} images, {args.image_size} px, {time.perf_counter() - start:.0f} s, "
          f"{args.threads} torch threads, {dt.datetime.now().isoformat(timespec='minutes')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
