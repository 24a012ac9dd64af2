"""The variants d2c compares, each as overrides of one D2C config (the same budget, model, steps,
sampler and evaluation for all; METHOD's fairness rules).

* ``d2c``: interval selection (Select) + text and visual features (Attach).
* ``select``: the same interval selection, plain DiT class conditioning (no Attach).
* ``random``: a seeded random selection, plain DiT class conditioning (DiT's own recipe).
* ``random_attach``: the same random selection with Attach: Select's contribution is
  ``random_attach`` − ``d2c`` with Attach held fixed, Attach's is ``random`` − ``random_attach``.
* ``kcenter``, ``herding``: the paper's feature-based selection baselines, plain conditioning.

Every variant but ``d2c`` selects from ``d2c``'s scores table (``score.reuse_from``): the images
are scored once. The model's shared modules start identical for one ``train.seed``
(:meth:`d2c.models.dit.DiT.initialize_weights`).
"""

from __future__ import annotations

from pathlib import Path

from d2c.config import D2CConfig, apply_overrides, build_config

#: Overrides that turn Attach off: no text or visual features, DiT's plain class embedding.
PLAIN = ("attach.text.encoder=none", "attach.vision.encoder=none", "model.use_text=false", "model.use_visual=false")

#: Variant name → (select.method, whether Attach is on).
VARIANTS: dict[str, tuple[str, bool]] = {
    "d2c": ("d2c", True),
    "select": ("d2c", False),
    "random": ("random", False),
    "random_attach": ("random", True),
    "kcenter": ("kcenter", False),
    "herding": ("herding", False),
}

#: Human-readable names for tables and plots.
LABELS = {"d2c": "D2C", "select": "Select only", "random": "Random", "random_attach": "Random + Attach",
          "kcenter": "K-Center", "herding": "Herding"}


def variant_overrides(variant: str, scores_from: str | Path | None) -> list[str]:
    """The overrides of ``variant``; ``scores_from`` is the run directory whose scores it reuses
    (None for the run that scores)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    method, attach = VARIANTS[variant]
    over = [f"select.method={method}"]
    if scores_from is not None:
        over.append(f"score.reuse_from={scores_from}")
    return over + ([] if attach else list(PLAIN))


def variant_config(cfg: D2CConfig, variant: str, root: Path, scores_from: str | Path | None,
                   scorer: str, train_name: str = "train", eval_name: str = "eval") -> D2CConfig:
    """``cfg`` as ``variant``, with its directories under ``root``: ``condense/``, ``train_name/``,
    ``eval_name/``."""
    over = [
        f"run_dir={root / 'condense'}",
        f"condensed={root / 'condense' / 'condensed'}",
        f"train_dir={root / train_name}",
        f"eval_dir={root / eval_name}",
        f"checkpoint={root / train_name / 'checkpoints'}",
        f"score.scorer={scorer}",
        *variant_overrides(variant, scores_from),
    ]
    return build_config(apply_overrides(cfg.to_dict(), over))
