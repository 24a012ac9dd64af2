"""Are a dataset's classes mirror-symmetric? Decides whether horizontal flips belong in training.

For every class c with mean image μ_c (over the train split), an image x "points the class's
way" when it is closer to μ_c than to its mirror flip(μ_c)::

    oriented(x) = ‖x − μ_c‖² < ‖x − flip(μ_c)‖²

A class near 50 % looks the same either way round, and flips only add data; a class near 100 %
has a direction (Fashion-MNIST's shoes all point left), so a model trained with flips learns
mirrored images the test set never holds. The table also gives the test split's fraction, which
is what FID is measured against.

    python benchmarks/flip_asymmetry.py --out benchmarks/results/flip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.data.fashion_mnist import CLASS_NAMES_FASHION_MNIST, load_fashion_mnist  # noqa: E402


def oriented_fraction(images: np.ndarray, labels: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per class: the fraction of ``images`` closer to their class mean than to its mirror."""
    x = images.reshape(len(images), -1).astype(np.float64)
    out = np.zeros(len(means))
    for c, mu in enumerate(means):
        xs = x[labels == c]
        d_same = ((xs - mu.reshape(1, -1)) ** 2).sum(1)
        d_flip = ((xs - mu[:, ::-1].reshape(1, -1)) ** 2).sum(1)
        out[c] = float((d_same < d_flip).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="Fashion-MNIST directory (default: the Debian package's)")
    ap.add_argument("--out", type=Path, default=None, help="write results.csv and README.md here")
    args = ap.parse_args()
    train_x, train_y = load_fashion_mnist(args.data, "train")
    test_x, test_y = load_fashion_mnist(args.data, "test")
    means = np.stack([train_x[train_y == c].astype(np.float64).mean(0) for c in range(len(CLASS_NAMES_FASHION_MNIST))])
    train_f = oriented_fraction(train_x, train_y, means)
    test_f = oriented_fraction(test_x, test_y, means)
    rows = ["class,name,train_oriented,test_oriented"]
    for c, name in enumerate(CLASS_NAMES_FASHION_MNIST):
        rows.append(f"{c},{name},{train_f[c]:.4f},{test_f[c]:.4f}")
    print("\n".join(rows))
    directed = [CLASS_NAMES_FASHION_MNIST[c] for c in range(len(means)) if test_f[c] >= 0.9]
    print(f"classes with a direction (>= 90 % of test images point their class mean's way): {directed}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.csv").write_text("\n".join(rows) + "\n")
        table = "\n".join(f"| {c} {n} | {a:.1%} | {b:.1%} |" for c, (n, a, b) in enumerate(zip(CLASS_NAMES_FASHION_MNIST, train_f, test_f)))
        (args.out / "README.md").write_text(
            "# Are Fashion-MNIST's classes mirror-symmetric?\n\n"
            "`python benchmarks/flip_asymmetry.py --out benchmarks/results/flip`\n\n"
            "Fraction of each class's images closer to the class's mean image than to its mirror\n"
            "(50 %: symmetric; 100 %: every image points the same way). Class means come from the train\n"
            "split; the test column is therefore out of sample.\n\n"
            "| class | train | test |\n|---|---|---|\n" + table + "\n\n"
            f"Classes with a direction (≥ 90 % in the test split): {', '.join(directed) or 'none'}.\n"
            "Decision: the embedded default trains without flips (`train.hflip: false`, `attach.flip: false`);\n"
            "ImageNet (`configs/imagenet256.yaml`) keeps them, as DiT and the paper do.\n")


if __name__ == "__main__":
    main()
