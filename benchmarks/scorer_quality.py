"""How many scorer steps and timesteps does a stable difficulty ranking need?

One embedded-size scorer (the DiT of configs/embedded.yaml) trains with the product's
:class:`d2c.train.trainer.Trainer` (EMA warm-up included) on the Fashion-MNIST train split,
less a class-balanced evaluation subset. EMA snapshots are kept at ``--snapshots`` steps. Every
snapshot scores the subset with :func:`d2c.select.score.difficulty_scores` at each ``--timesteps``
T. The reference ranking is the last snapshot at the largest T. For each (steps, T) it reports:

* ``rho``: the mean over classes of Spearman's rank correlation with the reference scores;
* ``overlap``: the share of the images an interval selection (``--n`` per class, ``--k``) keeps
  that the reference's selection also keeps;
* ``heldout_ratio``: the scorer gate's L_H / L_0 on the subset.

    python benchmarks/scorer_quality.py --out benchmarks/results/scorer_quality
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.config import load_config  # noqa: E402
from d2c.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from d2c.data.preprocess import pad_to, to_model_tensor  # noqa: E402
from d2c.diffusion.ddpm import DDPMSchedule  # noqa: E402
from d2c.models.build import build_model, dit_kwargs  # noqa: E402
from d2c.select.gate import gate, trivial_loss  # noqa: E402
from d2c.select.interval import interval_ranks, sort_class  # noqa: E402
from d2c.select.score import difficulty_scores, stratified_timesteps  # noqa: E402
from d2c.train.objective import D2CObjective  # noqa: E402
from d2c.train.trainer import Trainer  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (Pearson correlation of the ranks; the scores have no ties in practice)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def selected(scores: np.ndarray, labels: np.ndarray, ids: np.ndarray, n: int, k: int) -> set[str]:
    """Image ids an interval selection keeps (clamped where a class is too small)."""
    keep = set()
    for c in np.unique(labels):
        m = labels == c
        order = sort_class(scores[m], ids[m])
        ranks, _ = interval_ranks(int(m.sum()), n, k, "clamp", int(c))
        keep |= set(ids[m][order][ranks].tolist())
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", default="250,500,1000,2000,4000", help="EMA snapshot steps (the last is the reference)")
    ap.add_argument("--timesteps", default="2,4,8,16", help="T values to score at (the largest is the reference)")
    ap.add_argument("--eval-per-class", type=int, default=300, help="images per class in the scored subset")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: configs/embedded.yaml's train.lr")
    ap.add_argument("--n", type=int, default=3, help="per-class budget of the overlap check")
    ap.add_argument("--k", type=int, default=64, help="interval of the overlap check (clamped to the subset)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    snaps = sorted(int(s) for s in args.snapshots.split(","))
    ts_list = sorted(int(t) for t in args.timesteps.split(","))
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [])
    images, labels = load_fashion_mnist(None, "train")
    x = to_model_tensor(np.stack([pad_to(im[..., None], 32) for im in images]))
    y = torch.as_tensor(labels)
    held = np.concatenate([np.flatnonzero(labels == c)[: args.eval_per_class] for c in range(10)])
    train = np.setdiff1d(np.arange(len(labels)), held)
    kwargs = dit_kwargs(cfg, 10, None, None, None) | {"learn_sigma": False}
    model = build_model(kwargs, seed=0)
    tcfg = cfg.train.model_copy(update={"lr": args.lr or cfg.train.lr})
    trainer = Trainer(model, D2CObjective("dit", DDPMSchedule(), proj_coeff=0.0, learn_sigma=False), tcfg)
    gen = torch.Generator().manual_seed(0)
    ids = np.asarray([str(i) for i in held])
    ab = DDPMSchedule().alphas_cumprod
    scores: dict[tuple[int, int], np.ndarray] = {}
    ratios: dict[tuple[int, int], float] = {}
    start = time.perf_counter()
    for step in range(1, snaps[-1] + 1):
        idx = torch.as_tensor(train[torch.randint(0, len(train), (args.batch,), generator=gen).numpy()])
        trainer.train_step({"latent": x[idx], "label": y[idx]})
        if step in snaps:
            ema = trainer.ema.model.eval()
            for t in ts_list:
                per_t = difficulty_scores(ema, x[held], y[held], list(ids), ab, stratified_timesteps(t), 0,
                                          max_forward_batch=2048).numpy()
                scores[(step, t)] = per_t.mean(1)
                ratios[(step, t)] = gate(per_t, trivial_loss(0, list(ids), t, (1, 32, 32)), 1.0).ratio
            print(f"[scorer_quality] step {step}: {time.perf_counter() - start:.0f} s", flush=True)
    ref = scores[(snaps[-1], ts_list[-1])]
    lab = labels[held]
    ref_sel = selected(ref, lab, ids, args.n, args.k)
    rows = []
    for (step, t), s in sorted(scores.items()):
        rho = np.mean([spearman(s[lab == c], ref[lab == c]) for c in range(10)])
        overlap = len(selected(s, lab, ids, args.n, args.k) & ref_sel) / len(ref_sel)
        rows.append(dict(steps=step, T=t, rho=round(float(rho), 4), overlap=round(overlap, 3),
                         heldout_ratio=round(ratios[(step, t)], 4)))
        print(rows[-1], flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
