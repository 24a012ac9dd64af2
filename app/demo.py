"""``d2c demo``: the whole method end to end, offline, on a CPU (the README's first command).

    scorer from scratch ─► condense (D2C: select + attach) ─► condense (random baseline, same
    scores) ─► train both for the same steps ─► evaluate both (FID/KID vs the test split)
    ─► OUT/report.html and a printed table

Every stage goes through the same Ray code as a cluster run (Ray Data pools, Ray Train), and
each one reuses its finished output on a rerun — so a second ``d2c demo`` is fast, and an
interrupted one resumes. The demo applies ``demo.overrides`` (and ``demo.quick`` with
``--quick``) from the config before any user ``key=value`` overrides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from app.ray_session import init_ray, quiet_data_context
from d2c.variants import variant_config
from d2c.config import D2CConfig, apply_overrides, build_config
from d2c.eval.compare import describe
from d2c.storage import write_json_atomic

#: The variants the demo compares (d2c.variants): D2C (select + attach), Random + Attach (the same
#: Attach on a random selection: Select's own effect) and Random (DiT's own recipe on the same budget).
VARIANTS = ("d2c", "random_attach", "random")

#: FID(d2c) - FID(random) with its bootstrap interval (d2c.eval.compare), beside demo.json.
COMPARISON_FILE = "comparison.json"
#: Every pair the demo compares: (a, b) → file; the first is COMPARISON_FILE.
COMPARISONS = {("d2c", "random"): COMPARISON_FILE,
               ("random_attach", "random"): "comparison-random_attach-vs-random.json",
               ("d2c", "random_attach"): "comparison-d2c-vs-random_attach.json"}

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml"


def demo_config(cfg: D2CConfig, quick: bool, user_overrides: list[str]) -> D2CConfig:
    """``cfg`` + ``demo.overrides`` (+ ``demo.quick``) + the user's own overrides (which win)."""
    raw = cfg.to_dict()
    staged = [f"{k}={json.dumps(v)}" for k, v in cfg.demo.overrides.items()]
    if quick:
        staged += [f"{k}={json.dumps(v)}" for k, v in cfg.demo.quick.items()]
    return build_config(apply_overrides(raw, staged + list(user_overrides)))


def demo_variant_config(cfg: D2CConfig, out: Path, variant: str, scorer: str) -> D2CConfig:
    """The config of one variant, with its own run/train/eval directories under ``out / variant``;
    every variant but d2c selects from d2c's scores."""
    return variant_config(cfg, variant, out / variant, None if variant == "d2c" else out / "d2c" / "condense", scorer)


class StageClock:
    """Runs named stages, printing and recording each one's wall time."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"\n[d2c] demo ▶ {name}", flush=True)
        start = time.perf_counter()
        result = fn()
        self.timings[name] = round(time.perf_counter() - start, 2)
        print(f"[d2c] demo ✔ {name} ({self.timings[name]:.1f} s)", flush=True)
        return result


def _metrics_table(out: Path) -> str:
    rows = ["| variant | FID | KID (×1e3) | precision | recall | N | sampler |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        path = out / v / "eval" / "metrics.json"
        if not path.is_file():
            rows.append(f"| {v} | (missing) | | | | | |")
            continue
        m = json.loads(path.read_text())
        kid = m.get("kid_mean")
        rows.append(
            f"| {v} | {m.get('fid', float('nan')):.2f} | {1e3 * kid if kid is not None else float('nan'):.2f} | "
            f"{m.get('precision', float('nan')):.3f} | {m.get('recall', float('nan')):.3f} | {m.get('num_samples', '?')} | "
            f"{m.get('sampler', '?')} {m.get('steps', '')} steps |"
        )
    return "\n".join(rows)


def compare_variants(cfg: D2CConfig, cfgs: dict[str, D2CConfig], out_dir: Path) -> dict[str, dict[str, Any]]:
    """FID(a) - FID(b) with a paired bootstrap interval for every pair of :data:`COMPARISONS` →
    ``OUT/comparison*.json``; returns file name → result (empty when ``eval.bootstrap_rounds`` is 0;
    200 rounds when it is None)."""
    from d2c.eval.compare import compare_evals
    from d2c.config import DEFAULT_BOOTSTRAP_ROUNDS

    rounds = cfg.eval.bootstrap_rounds
    if rounds == 0:
        return {}
    results = {}
    for (a, b), name in COMPARISONS.items():
        result = compare_evals(cfgs[a].eval_dir, cfgs[b].eval_dir, rounds=rounds or DEFAULT_BOOTSTRAP_ROUNDS,
                               level=cfg.eval.bootstrap_level, seed=cfg.eval.seed, names=(a, b))
        write_json_atomic(out_dir / name, result)
        results[name] = result
    return results


def run_demo(
    cfg: D2CConfig,
    quick: bool = False,
    out: Optional[str] = None,
    config_path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
) -> int:
    """Run (or resume) the demo; prints the report path and the metrics table."""
    from app.condense import run_condense
    from app.evaluate import run_evaluate
    from d2c.report import write_report
    from app.train import ensure_embedded_scorer, run_train

    cfg = demo_config(cfg, quick, overrides or [])
    out_dir = Path(out or (cfg.demo.out + ("-quick" if quick else "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[d2c] demo: {'quick' if quick else 'full'} run of the embedded default into {out_dir} "
          f"(data {cfg.data.source}, budget {cfg.select.budget}, k={cfg.select.k}, {cfg.train.steps} training steps)", flush=True)
    init_ray(cfg)
    quiet_data_context(cfg=cfg)
    clock = StageClock()
    scorer = cfg.score.scorer or str(clock.run("scorer (train from scratch, cached)", lambda: ensure_embedded_scorer(cfg)))
    cfgs = {v: demo_variant_config(cfg, out_dir, v, scorer) for v in VARIANTS}
    for v in VARIANTS:
        clock.run(f"condense ({v})", lambda v=v: run_condense(cfgs[v]))
    for v in VARIANTS:
        clock.run(f"train ({v})", lambda v=v: run_train(cfgs[v]))
    for v in VARIANTS:
        clock.run(f"evaluate ({v})", lambda v=v: run_evaluate(cfgs[v]))
    comparisons = clock.run("compare (bootstrap)", lambda: compare_variants(cfg, cfgs, out_dir))
    summary = {
        "quick": quick,
        "config": cfg.to_dict(),
        "config_path": str(config_path or DEFAULT_CONFIG),
        "scorer": scorer,
        "runs": {v: {"condense": c.run_dir, "train": c.train_dir, "eval": c.eval_dir} for v, c in cfgs.items()},
        "timings_s": clock.timings,
        "comparison": COMPARISON_FILE if comparisons else None,
        "comparisons": list(comparisons),
    }
    write_json_atomic(out_dir / "demo.json", summary)
    report = clock.run("report", lambda: write_report([str(out_dir)], str(out_dir / "report.html")))
    table = _metrics_table(out_dir)
    for result in comparisons.values():
        table += "\n\n" + describe(result)
    print(f"\n{table}\n\n[d2c] demo: total {sum(clock.timings.values()):.0f} s; report: {report}", flush=True)
    return 0
