"""The seeded fidelity study: does D2C beat Random, Select-only, Random + Attach, K-Center and
Herding at the same budget, and by more than the seed-to-seed spread?

It drives the product's own stages (``run_condense``, ``run_train``, ``run_evaluate`` and
``compare_evals``, the code ``d2c demo`` runs) over ``benchmarks/fidelity.yaml``:

1. condense ``d2c``, which scores every image once, and keep a copy of the scores under
   ``--results/scores`` (committed: a fresh checkout restores them and needs no scorer); every
   variant, D2C too, then selects from those scores;
2. for each variant and seed, train; for the ``curve`` variants the run stops at each curve step,
   is evaluated there, and resumes (``train.steps`` raised: the checkpoint carries the exact state);
3. evaluate the final step; compare each variant with Random of the same seed (paired bootstrap);
4. write ``results.csv`` (variant, seed, steps, fid, kid, …), ``summary.csv`` (mean ± std),
   ``comparisons.csv``, ``fid_vs_steps.png`` and ``README.md`` into ``--results``.

Resumable at two levels: every stage reuses its finished output under ``--out``, and a
(variant, seed, steps) row already in ``results.csv`` for the same regime is not rerun, so a
fresh checkout continues from the committed results. Rows of another regime stay in the file
but are left out of the summary.

    python benchmarks/fidelity.py --out runs/fidelity --results benchmarks/results/fidelity
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.variants import LABELS, variant_config  # noqa: E402
from d2c.config import apply_overrides, build_config, load_config  # noqa: E402

RESULT_COLUMNS = ["variant", "seed", "steps", "fid", "kid", "precision", "recall", "num_samples", "train_s", "eval_s",
                  "regime", "commit"]
#: The variant every other one is compared with.
BASELINE = "random"


#: Rows first keyed by a hash of the base file's text; the same settings have these ids
#: (checked against the config code and files of commit 4c80bf4, where those rows were measured).
LEGACY_REGIMES = {"6e39b43bbed8": "f0ecbf009bd5"}
#: The config sections a measured row depends on (not ``demo``, ``sweep``, paths or names).
REGIME_SECTIONS = ("data", "autoencoder", "diffusion", "score", "select", "attach", "model", "train", "eval")


def regime_id(cfg) -> str:
    """What makes two rows comparable: the values of :data:`REGIME_SECTIONS` once the study's
    overrides are applied (so a comment or a demo setting in the base file changes nothing)."""
    d = cfg.to_dict()
    blob = json.dumps({k: d[k] for k in REGIME_SECTIONS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


class Study:
    """One study: its config, output directories, and the rows measured so far."""

    def __init__(self, study_path: Path, out: Path, results: Path, seeds: list[int] | None, variants: list[str] | None):
        self.spec = yaml.safe_load(study_path.read_text())
        self.out, self.results = out, results
        self.seeds = seeds if seeds is not None else list(self.spec["seeds"])
        self.variants = variants or list(self.spec["variants"])
        base = load_config(ROOT / self.spec["base"], [])
        staged = [f"{k}={json.dumps(v)}" for k, v in self.spec["overrides"].items()]
        self.cfg = build_config(apply_overrides(base.to_dict(), staged))
        self.regime = regime_id(self.cfg)
        self.final = self.cfg.train.steps
        curve = self.spec.get("curve") or {}
        self.curve_variants = set(curve.get("variants", []))
        self.curve_steps = sorted(s for s in curve.get("steps", []) if s < self.final)
        self.curve_seeds = set(curve.get("seeds", self.seeds))
        self.rows_path = results / "results.csv"
        self.rows = read_rows(self.rows_path)
        for r in self.rows:
            r["regime"] = LEGACY_REGIMES.get(r["regime"], r["regime"])
        self.commit = git_commit()

    def done(self, variant: str, seed: int, steps: int) -> bool:
        return any(r["variant"] == variant and int(r["seed"]) == seed and int(r["steps"]) == steps
                   and r["regime"] == self.regime for r in self.rows)

    def steps_of(self, variant: str, seed: int) -> list[int]:
        """The steps at which ``variant`` is evaluated for ``seed``: the curve's, then the final one."""
        curve = variant in self.curve_variants and seed in self.curve_seeds
        return (self.curve_steps if curve else []) + [self.final]

    @property
    def scoring_run(self) -> Path:
        """The run that scores every image once: D2C's own condense run."""
        return self.out / "d2c" / "condense"

    def scores(self) -> str:
        """Score every image once, or restore the scores committed under ``--results``; returns
        the scorer they came from. A fresh checkout thus skips the scorer and the 60K-image pass."""
        from app.condense import run_condense

        here, saved = self.scoring_run / "scores", self.results / "scores"
        if not (here / "_SUCCESS").is_file() and (saved / "_SUCCESS").is_file():
            shutil.copytree(saved, here, dirs_exist_ok=True)
            print(f"[fidelity] scores: restored from {saved}", flush=True)
        if (here / "_SUCCESS").is_file():
            return json.loads((here / "_settings.json").read_text())["scorer"]
        from app.train import ensure_embedded_scorer

        scorer = self.cfg.score.scorer or str(ensure_embedded_scorer(self.cfg))
        run_condense(self.config("d2c", 0, self.final, scorer, scores_from=None))
        shutil.copytree(here, saved, dirs_exist_ok=True)
        return scorer

    def config(self, variant: str, seed: int, steps: int, scorer: str, scores_from: Optional[Path] = None):
        """Every variant, D2C too, selects from the scoring run's scores (``scores_from`` None:
        the scoring run itself, which scores)."""
        root = self.out / variant
        cfg = variant_config(self.cfg, variant, root, scores_from, scorer, train_name=f"train-s{seed}",
                             eval_name=f"eval-s{seed}-{steps}")
        return build_config(apply_overrides(cfg.to_dict(), [f"train.seed={seed}", f"train.steps={steps}"]))

    def record(self, variant: str, seed: int, steps: int, eval_dir: str, train_s: float, eval_s: float) -> None:
        m = json.loads((Path(eval_dir) / "metrics.json").read_text())
        row = dict(variant=variant, seed=seed, steps=steps, fid=round(m["fid"], 3), kid=round(m["kid_mean"], 6),
                   precision=round(m.get("precision", float("nan")), 4), recall=round(m.get("recall", float("nan")), 4),
                   num_samples=m.get("num_samples"), train_s=round(train_s, 1), eval_s=round(eval_s, 1),
                   regime=self.regime, commit=self.commit)
        self.rows.append(row)
        write_rows(self.rows_path, self.rows, RESULT_COLUMNS)
        print(f"[fidelity] {variant} seed {seed} step {steps}: FID {row['fid']} KID {row['kid']}", flush=True)

    def compare(self, variant: str, seed: int) -> None:
        """Paired bootstrap of FID(variant) − FID(random) at the final step, same seed."""
        from d2c.eval.compare import compare_evals

        path = self.results / "comparisons" / f"{variant}-vs-{BASELINE}-s{seed}.json"
        if variant == BASELINE or path.is_file():
            return
        a = self.out / variant / f"eval-s{seed}-{self.final}"
        b = self.out / BASELINE / f"eval-s{seed}-{self.final}"
        if not ((a / "features.npz").is_file() and (b / "features.npz").is_file()):
            return  # one side was measured in an earlier session whose run directory is gone
        result = compare_evals(a, b, rounds=1000, seed=seed, names=(variant, BASELINE))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result | {"regime": self.regime}, indent=2))

    def run(self) -> None:
        from app.condense import run_condense
        from app.evaluate import run_evaluate
        from app.ray_session import init_ray, quiet_data_context
        from app.train import run_train

        init_ray(self.cfg)
        quiet_data_context(cfg=self.cfg)
        todo = [(seed, v, steps) for seed in self.seeds for v in self.variants for steps in self.steps_of(v, seed)
                if not self.done(v, seed, steps)]
        if not todo:
            return
        scorer = self.scores()
        for seed in self.seeds:
            for variant in self.variants:
                steps_list = self.steps_of(variant, seed)
                if all(self.done(variant, seed, s) for s in steps_list):
                    continue
                run_condense(self.config(variant, seed, self.final, scorer, self.scoring_run))
                for steps in steps_list:
                    if self.done(variant, seed, steps):
                        continue
                    cfg = self.config(variant, seed, steps, scorer, self.scoring_run)
                    t0 = time.perf_counter()
                    run_train(cfg)
                    t1 = time.perf_counter()
                    run_evaluate(cfg)
                    self.record(variant, seed, steps, cfg.eval_dir, t1 - t0, time.perf_counter() - t1)
                    self.summarise()
                self.compare(variant, seed)
            for variant in self.variants:
                self.compare(variant, seed)
            self.summarise()

    # -- the tables, the plot, the README -----------------------------------------------------

    def summarise(self) -> None:
        rows = [r for r in self.rows if r["regime"] == self.regime]
        final = [r for r in rows if int(r["steps"]) == self.final]
        summary = []
        for v in self.spec["variants"]:
            fids = np.array([float(r["fid"]) for r in final if r["variant"] == v])
            kids = np.array([float(r["kid"]) for r in final if r["variant"] == v])
            if len(fids):
                summary.append(dict(variant=v, seeds=len(fids), fid_mean=round(fids.mean(), 2),
                                    fid_std=round(fids.std(ddof=1), 2) if len(fids) > 1 else "",
                                    kid_mean=round(kids.mean(), 5), kid_std=round(kids.std(ddof=1), 5) if len(kids) > 1 else ""))
        write_rows(self.results / "summary.csv", summary, ["variant", "seeds", "fid_mean", "fid_std", "kid_mean", "kid_std"])
        comps = []
        for path in sorted((self.results / "comparisons").glob("*.json")) if (self.results / "comparisons").is_dir() else []:
            c = json.loads(path.read_text())
            if LEGACY_REGIMES.get(c.get("regime"), c.get("regime")) != self.regime:
                continue
            d = c["fid_difference"]
            comps.append(dict(comparison=path.stem, delta_fid=round(d["point"], 2), low=round(d["low"], 2),
                              high=round(d["high"], 2), paired=d.get("paired")))
        write_rows(self.results / "comparisons.csv", comps, ["comparison", "delta_fid", "low", "high", "paired"])
        self.plot(rows)
        self.readme(summary, comps, final)

    def plot(self, rows: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for v in sorted(self.curve_variants):
            pts = [(int(r["steps"]), float(r["fid"])) for r in rows if r["variant"] == v and int(r["seed"]) in self.curve_seeds]
            if not pts:
                continue
            steps = sorted({s for s, _ in pts})
            mean = [np.mean([f for s2, f in pts if s2 == s]) for s in steps]
            std = [np.std([f for s2, f in pts if s2 == s]) for s in steps]
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=LABELS.get(v, v))
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"FID-{self.cfg.eval.num_samples} (seeds {sorted(self.curve_seeds)})")
        ax.set_title("FID against training steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.results / "fid_vs_steps.png", dpi=120)
        plt.close(fig)

    def readme(self, summary: list[dict[str, Any]], comps: list[dict[str, Any]], final: list[dict[str, Any]]) -> None:
        c = self.cfg
        pool = "every" if c.data.max_per_class is None else f"{c.data.max_per_class} per class of the"
        lines = ["# The seeded fidelity study", "",
                 f"Every variant of `d2c/variants.py` at a budget of {c.select.budget} images ({pool} Fashion-MNIST "
                 "train images scored), the same model, steps, sampler and evaluation; several training seeds each.", "",
                 "```", "python benchmarks/fidelity.py --out runs/fidelity --results benchmarks/results/fidelity", "```", "",
                 f"Regime `{self.regime}` (`benchmarks/fidelity.yaml`): " +
                 ", ".join(f"{k}={v}" for k, v in self.spec["overrides"].items()), "",
                 f"## FID-{self.cfg.eval.num_samples} at step {self.final} (mean ± std over seeds)", "",
                 "| variant | seeds | FID | KID ×1e3 | per-seed FID |", "|---|---|---|---|---|"]
        for s in summary:
            per = ", ".join(f"{float(r['fid']):.1f}" for r in final if r["variant"] == s["variant"])
            std = f" ± {s['fid_std']}" if s["fid_std"] != "" else ""
            kstd = f" ± {1e3 * s['kid_std']:.1f}" if s["kid_std"] != "" else ""
            lines.append(f"| {LABELS.get(s['variant'], s['variant'])} | {s['seeds']} | {s['fid_mean']}{std} | "
                         f"{1e3 * s['kid_mean']:.1f}{kstd} | {per} |")
        if comps:
            lines += ["", "## Paired differences against Random (same seed; `d2c compare`, 95 % interval)", "",
                      "| comparison | ΔFID | interval |", "|---|---|---|"]
            lines += [f"| {c['comparison']} | {c['delta_fid']:+.2f} | [{c['low']:+.2f}, {c['high']:+.2f}] |" for c in comps]
        lines += ["", "`results.csv` holds every measured row (intermediate steps too); `fid_vs_steps.png` the curve; "
                  "`scores/` the scores of every image that all variants select from (a rerun restores them instead of "
                  "training the scorer and scoring again; `_scorer_gate.json` is the scorer's held-out check).", ""]
        (self.results / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=ROOT / "benchmarks" / "fidelity.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fidelity", help="run directories (large; not committed)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "fidelity")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="override the study's seeds")
    ap.add_argument("--variants", nargs="*", default=None, help="override the study's variants")
    ap.add_argument("--summarise", action="store_true", help="only rebuild the tables, plot and README")
    args = ap.parse_args()
    study = Study(args.study, args.out, args.results, args.seeds, args.variants)
    if args.summarise:
        study.summarise()
        return
    study.run()
    study.summarise()


if __name__ == "__main__":
    main()
