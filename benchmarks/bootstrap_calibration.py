"""Does the bootstrap spread of an FID match the spread of FIDs over fresh draws? A simulation.

``d2c evaluate`` reports ``fid_bootstrap`` and ``d2c compare`` a paired interval on FID(a) -
FID(b) (:mod:`d2c.eval.bootstrap`). Both come from resampling one evaluation's features; this
script checks them against the truth it can compute in a simulation: draw the samples and the
reference afresh ``--trials`` times from known populations, take the standard deviation of the
FIDs (the "true" sampling spread at these N), then on ``--checks`` further single draws compute
the bootstrap's std and interval and count how often the interval holds the true mean.

Populations: Gaussian features of dimension ``--dim`` (2048, Inception pool_3's) on a
``--rank``-dimensional subspace with a 1/i spectrum (real pool_3 features are far from
isotropic). Model b shares each sample's latent with model a and adds its own noise, as two
d2c models sampled from the same initial noise are correlated; the reference is independent.
Class strata are 10 equal classes (labels ``i mod 10``), as d2c draws them.

    python benchmarks/bootstrap_calibration.py                       # the BENCHMARKS.md run
    python benchmarks/bootstrap_calibration.py --trials 20 --checks 4 --rounds 20   # quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from d2c.eval.bootstrap import BootstrapReference, fid_difference_interval, fid_interval, fid_value

#: Classes of the simulated samples (labels i mod CLASSES, like d2c's class-balanced sampling).
CLASSES = 10


class Populations:
    """Model a, model b (correlated with a through a shared latent) and the reference."""

    def __init__(self, dim: int, rank: int, shift: float, scale_b: float, noise_b: float, seed: int):
        self.rng = np.random.default_rng(seed)
        self.basis = np.linalg.qr(self.rng.normal(size=(dim, rank)))[0]  # [D, rank]
        self.scales = 1.0 / np.sqrt(np.arange(1, rank + 1))  # std per direction (1/i variance spectrum)
        self.shift, self.scale_b, self.noise_b = shift, scale_b, noise_b

    def _embed(self, z: np.ndarray) -> np.ndarray:
        return (z * self.scales) @ self.basis.T

    def draw(self, n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(a [n, D], b [n, D], reference [m, D])``; row i of a and b share a latent."""
        z = self.rng.normal(size=(n, len(self.scales)))
        own = self.rng.normal(size=z.shape)
        a = self._embed(z) + self.shift
        b = self._embed(self.scale_b * (z + self.noise_b * own))
        return a, b, self._embed(self.rng.normal(size=(m, len(self.scales))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300, help="samples per model (the demo's eval.num_samples)")
    ap.add_argument("--reference", type=int, default=500, help="reference images (the demo's eval.reference_size)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--trials", type=int, default=100, help="fresh draws giving the true spread")
    ap.add_argument("--checks", type=int, default=20, help="single draws whose bootstrap is checked")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    pops = Populations(args.dim, args.rank, shift=0.02, scale_b=1.1, noise_b=0.3, seed=args.seed)
    labels = np.arange(args.samples) % CLASSES
    ref_labels = np.arange(args.reference) % CLASSES
    t0 = time.perf_counter()
    true_a, true_d = [], []
    for _ in range(args.trials):
        a, b, r = pops.draw(args.samples, args.reference)
        ref = BootstrapReference.from_features(r)
        fa = fid_value(a, ref)
        true_a.append(fa)
        true_d.append(fa - fid_value(b, ref))
    mean_a, mean_d = float(np.mean(true_a)), float(np.mean(true_d))
    std_a, std_d = float(np.std(true_a, ddof=1)), float(np.std(true_d, ddof=1))

    est_a, est_d, cover_a, cover_d, shift_a = [], [], 0, 0, []
    for c in range(args.checks):
        a, b, r = pops.draw(args.samples, args.reference)
        ref = BootstrapReference.from_features(r, ref_labels)
        one = fid_interval(a, ref, labels, rounds=args.rounds, level=args.level, seed=c)
        diff = fid_difference_interval(a, b, ref, labels, labels, rounds=args.rounds, level=args.level, seed=c)
        est_a.append(one.std)
        est_d.append(diff.std)
        shift_a.append(one.shift)
        cover_a += one.low <= mean_a <= one.high
        cover_d += diff.low <= mean_d <= diff.high
    seconds = time.perf_counter() - t0

    print(f"N={args.samples} samples, M={args.reference} reference, D={args.dim}, rank {args.rank}; "
          f"{args.trials} fresh draws, {args.checks} checked draws x {args.rounds} rounds, level {args.level}; "
          f"{seconds:.0f} s\n")
    print("| quantity | true mean | true std (fresh draws) | bootstrap std (mean of checks) | ratio | "
          "interval holds the true mean | rounds' shift above the point |")
    print("|---|---|---|---|---|---|---|")
    print(f"| FID(a) | {mean_a:.4f} | {std_a:.4f} | {np.mean(est_a):.4f} | {np.mean(est_a) / std_a:.2f} | "
          f"{cover_a}/{args.checks} | {np.mean(shift_a):+.4f} |")
    print(f"| FID(a) - FID(b), paired | {mean_d:.4f} | {std_d:.4f} | {np.mean(est_d):.4f} | "
          f"{np.mean(est_d) / std_d:.2f} | {cover_d}/{args.checks} | — |")


if __name__ == "__main__":
    main()
