"""``d2c compare EVAL_A EVAL_B``: is A's FID really lower than B's, or is it the samples drawn?

Reads both evaluations' ``metrics.json`` and ``features.npz`` and the reference features they
were scored against, and gives FID(A) - FID(B) with a bootstrap interval
(:func:`d2c.eval.bootstrap.fid_difference_interval`): paired when both drew the same labels in
the same order (equal ``eval.num_samples`` and class count; with equal ``eval.seed`` too, sample
i also starts from the same noise in both, which the pairing then cancels), independent
otherwise. It samples nothing and starts
no Ray: a few seconds on a laptop for N = 300, so it can be rerun with more rounds at will.

    d2c compare runs/demo/d2c/eval runs/demo/random/eval --rounds 1000 --out cmp.json

The interval covers what a different set of noise seeds (and reference images) would do to the
difference; it does not cover training randomness: a rerun of training moves FIDs too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from d2c.config import DEFAULT_BOOTSTRAP_LEVEL, DEFAULT_BOOTSTRAP_ROUNDS, ConfigError

#: Format tag of the comparison JSON.
COMPARE_FORMAT = "d2c-compare-v1"
#: Largest relative gap between metrics.json's FID and the FID recomputed from features.npz.
FID_MATCH_RTOL = 1e-4


def _metrics(eval_dir: Path) -> dict[str, Any]:
    from d2c.eval.artifacts import METRICS_FILE

    path = eval_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{eval_dir} is not an evaluation (no {METRICS_FILE}); pass the EVAL directory that "
                          "d2c evaluate wrote, e.g. runs/demo/d2c/eval")
    return json.loads(path.read_text())


def _reference_id(info: dict[str, Any]) -> Any:
    """What identifies a reference across evaluations: its cache key, else its file."""
    return info.get("key") or info.get("path")


def verdict(name_a: str, name_b: str, iv) -> str:
    """One sentence on what the interval of FID(a) - FID(b) says."""
    pct = f"{round(100 * iv.level)}%"
    span = f"ΔFID {iv.point:+.2f}, {pct} interval [{iv.low:+.2f}, {iv.high:+.2f}]"
    if iv.high < 0:
        return f"{name_a} has the lower FID: {span} lies below 0"
    if iv.low > 0:
        return f"{name_b} has the lower FID: {span} lies above 0"
    return f"not resolved at these N: {span} spans 0"


def compare_evals(eval_a: str | Path, eval_b: str | Path, rounds: int = DEFAULT_BOOTSTRAP_ROUNDS,
                  level: float = DEFAULT_BOOTSTRAP_LEVEL, seed: int = 0,
                  names: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """The comparison of two EVAL directories as a JSON-ready dict (see the module docstring).

    Raises:
        ConfigError: a directory is not a complete evaluation, the two used different
            references, or ``features.npz`` does not match ``metrics.json``.
    """
    from d2c.eval.artifacts import bootstrap_reference, load_features
    from d2c.eval.bootstrap import fid_difference_interval, fid_value

    dirs = (Path(eval_a), Path(eval_b))
    name_a, name_b = names or (str(dirs[0]), str(dirs[1]))
    metrics = [_metrics(d) for d in dirs]
    refs = [m.get("reference") or {} for m in metrics]
    if _reference_id(refs[0]) != _reference_id(refs[1]):
        raise ConfigError(f"{dirs[0]} and {dirs[1]} were scored against different references "
                          f"({_reference_id(refs[0])} vs {_reference_id(refs[1])}): their FIDs are not comparable; "
                          "evaluate both with the same eval.reference and eval.reference_size")
    ref = bootstrap_reference(refs[0])
    feats = [load_features(d) for d in dirs]
    fids = []
    for d, m, (pool, _) in zip(dirs, metrics, feats):
        fid = fid_value(pool, ref)
        if abs(fid - m["fid"]) > FID_MATCH_RTOL * max(1.0, abs(m["fid"])):
            raise ConfigError(f"{d}: the FID from features.npz ({fid:.4f}) is not metrics.json's ({m['fid']:.4f}); "
                              "the directory mixes two evaluations: delete it and run d2c evaluate again")
        fids.append(fid)
    iv = fid_difference_interval(feats[0][0], feats[1][0], ref, feats[0][1], feats[1][1],
                                 rounds=rounds, level=level, seed=seed)
    return {
        "format": COMPARE_FORMAT,
        "a": {"name": name_a, "eval": str(dirs[0]), "fid": fids[0], "num_samples": len(feats[0][0])},
        "b": {"name": name_b, "eval": str(dirs[1]), "fid": fids[1], "num_samples": len(feats[1][0])},
        "fid_difference": iv.to_dict(),
        "verdict": verdict(name_a, name_b, iv),
        "how": ("FID(a) - FID(b) against the same reference; each of `rounds` bootstrap rounds resamples, within each "
                "class and with replacement, the samples (the same indices for a and b when `paired`) and the reference "
                "features; the interval is the rounds' percentiles moved so their mean is the point (d2c.eval.bootstrap). "
                "It covers the noise seeds and reference images drawn, not training randomness."),
    }


def describe(result: dict[str, Any]) -> str:
    """The comparison in two lines, for the console."""
    iv = result["fid_difference"]
    a, b = result["a"], result["b"]
    pairing = "paired" if iv.get("paired") else "unpaired (the two drew different labels)"
    return (f"{a['name']} FID {a['fid']:.2f} (N={a['num_samples']}) vs {b['name']} FID {b['fid']:.2f} "
            f"(N={b['num_samples']}): {result['verdict']}\n"
            f"  {iv['rounds']} {pairing} bootstrap rounds over {iv['resampled']}; std {iv['std']:.2f}; "
            f"{a['name']} lower in {100 * iv['share_a_better']:.0f}% of rounds")


def run_compare(eval_a: str, eval_b: str, rounds: int = DEFAULT_BOOTSTRAP_ROUNDS, level: float = DEFAULT_BOOTSTRAP_LEVEL,
                seed: int = 0, out: Optional[str] = None) -> int:
    """``d2c compare``: print the comparison (and write it to ``out`` as JSON); returns an exit code."""
    from d2c.storage import write_json_atomic

    if not 0.0 < level < 1.0:
        raise ConfigError(f"--level {level} must be in (0, 1), e.g. 0.95")
    from d2c.config import MIN_BOOTSTRAP_ROUNDS

    if rounds < MIN_BOOTSTRAP_ROUNDS:
        raise ConfigError(f"--rounds {rounds} is too few for an interval; use at least {MIN_BOOTSTRAP_ROUNDS}")
    result = compare_evals(eval_a, eval_b, rounds=rounds, level=level, seed=seed)
    print(describe(result), flush=True)
    if out:
        write_json_atomic(Path(out), result)
        print(f"[d2c] compare: written to {out}", flush=True)
    return 0
