"""Interval sampling (docs/method.md, Select) and the per-class selection contract.

Within each class the images are sorted ascending by ``(score, image_id)`` — the id
breaks ties, so the order is total and deterministic — and ranks ``0, k, 2k, …,
(n−1)k`` are taken, ``n`` being the per-class budget.

When ``(n−1)k`` runs past the end of a class the shortfall policy decides:

* ``clamp`` — that class uses ``k_c = ⌊(|D_c|−1)/(n−1)⌋``; a class with fewer than
  ``n`` images gives all of them. Every clamped class is reported.
* ``error`` — raise :class:`SelectionError` naming the class and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

#: Columns of the selection table (docs/design.md, RUN/selection/).
SELECTION_COLUMNS = ["image_id", "label", "score", "rank", "method"]


class SelectionError(ValueError):
    """A per-class selection cannot be made under the configured policy."""


@dataclass(frozen=True)
class ClassSelection:
    """What one class contributed: its size, the interval used, and any shortfall.

    Attributes:
        label: class index.
        size: images in the class (after rejects).
        requested: per-class budget n.
        selected: images actually taken.
        k: interval asked for (None for methods without an interval).
        k_used: interval actually used (differs from k when clamped).
        note: "" or a human reason (clamped, short class, empty class).
    """

    label: int
    size: int
    requested: int
    selected: int
    k: Optional[int]
    k_used: Optional[int]
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def per_class_budget(budget: int, num_classes: int) -> int:
    """n = budget / number of classes; the budget must split evenly and give n ≥ 1."""
    if num_classes < 1:
        raise SelectionError("the dataset has no classes")
    if budget % num_classes or budget < num_classes:
        lo = max(num_classes, budget // num_classes * num_classes)
        raise SelectionError(
            f"select.budget={budget} does not split evenly over {num_classes} classes; "
            f"use a multiple of {num_classes} (e.g. select.budget={lo})"
        )
    return budget // num_classes


def check_feasible(class_sizes: Sequence[int], budget: int, method: str, k: int, shortfall: str) -> int:
    """Refuse, before any scoring, a selection that cannot succeed on classes of ``class_sizes``
    (listed images: rejects can only lower them). Returns n (per class).

    * the budget must split evenly over the classes and not exceed the images listed;
    * with ``shortfall == "error"`` every class must hold (n−1)k+1 images (``d2c``) or n (baselines).
    """
    n = per_class_budget(budget, len(class_sizes))
    total = int(sum(class_sizes))
    if budget > total:
        raise SelectionError(
            f"select.budget={budget} exceeds the {total} images listed (data.*); lower select.budget to at most "
            f"{total // len(class_sizes) * len(class_sizes)}"
        )
    if shortfall == "error":
        need = (n - 1) * k + 1 if method == "d2c" else n
        short = [(c, m) for c, m in enumerate(class_sizes) if m < need]
        if short:
            listed = ", ".join(f"class {c}: {m or 'empty'}" for c, m in short[:5]) + (" …" if len(short) > 5 else "")
            what = f"(n-1)*k+1 = {need} images (n={n}, k={k})" if method == "d2c" else f"n={n} images"
            raise SelectionError(
                f"select.shortfall=error but {len(short)} class(es) hold fewer than {what} ({listed}); lower "
                f"{'select.k or ' if method == 'd2c' else ''}select.budget, or set select.shortfall=clamp"
            )
    return n


def sort_class(scores: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """Indices that sort one class ascending by (score, image_id).

    Args:
        scores: float [m].
        image_ids: str [m].
    Returns:
        int64 [m] permutation.
    """
    # np.lexsort sorts by the last key first; both keys make the order total.
    return np.lexsort((image_ids.astype(str), scores)).astype(np.int64)


def interval_ranks(size: int, n: int, k: int, shortfall: str, label: int = -1) -> tuple[np.ndarray, ClassSelection]:
    """Ranks 0, k, …, (n−1)k within a sorted class of ``size`` images.

    Returns:
        (ranks int64 [≤ n], the class's :class:`ClassSelection`).
    """
    if size == 0:
        if shortfall == "error":
            raise SelectionError(f"class {label} is empty; remove it from the data or use select.shortfall=clamp")
        return np.zeros(0, np.int64), ClassSelection(label, 0, n, 0, k, None, "empty class")
    if (n - 1) * k <= size - 1:
        return np.arange(n, dtype=np.int64) * k, ClassSelection(label, size, n, n, k, k)
    if shortfall == "error":
        raise SelectionError(
            f"class {label} has {size} images but interval sampling needs (n-1)*k+1 = {(n - 1) * k + 1} "
            f"(n={n}, k={k}); lower select.k or select.budget, or set select.shortfall=clamp"
        )
    if size < n:
        return np.arange(size, dtype=np.int64), ClassSelection(
            label, size, n, size, k, 1, f"class has {size} < n={n} images: all taken"
        )
    k_c = (size - 1) // (n - 1) if n > 1 else k
    return np.arange(n, dtype=np.int64) * k_c, ClassSelection(label, size, n, n, k, k_c, f"k clamped {k} -> {k_c}")


def select_class(
    group: pd.DataFrame,
    label: int,
    n: int,
    method: str,
    k: int,
    shortfall: str,
    chooser: Optional[Callable[[pd.DataFrame, int], np.ndarray]] = None,
) -> tuple[pd.DataFrame, ClassSelection]:
    """Select from one class.

    Args:
        group: rows of one class with columns image_id, label, score (any order; may be empty).
        label: the class index (named in reports, also for an empty class).
        n: per-class budget.
        method: "d2c" (interval) or a baseline name; baselines pass ``chooser``,
            a function (sorted group, n) → positions in the sorted group.
    Returns:
        (selection rows with SELECTION_COLUMNS, sorted by rank; the class report).
    """
    order = sort_class(group["score"].to_numpy(np.float64), group["image_id"].to_numpy())
    ordered = group.iloc[order].reset_index(drop=True)
    if method == "d2c" or not len(ordered):  # an empty class has no rows to choose from
        ranks, report = interval_ranks(len(ordered), n, k, shortfall, label)
        if method != "d2c":
            report = ClassSelection(label, 0, n, 0, None, None, report.note)
    else:
        if chooser is None:
            raise SelectionError(f"select.method={method!r} needs a chooser")
        if len(ordered) < n and shortfall == "error":
            raise SelectionError(
                f"class {label} is empty; remove it from the data or use select.shortfall=clamp"
                if not len(ordered)
                else f"class {label} has {len(ordered)} images, fewer than n={n}; lower select.budget or set select.shortfall=clamp"
            )
        ranks = np.sort(np.asarray(chooser(ordered, min(n, len(ordered))), dtype=np.int64))
        note = "" if len(ordered) >= n else (f"class has {len(ordered)} < n={n} images" if len(ordered) else "empty class")
        report = ClassSelection(label, len(ordered), n, len(ranks), None, None, note)
    out = ordered.iloc[ranks][["image_id", "label", "score"]].copy()
    out["rank"] = ranks
    out["method"] = method
    return out.reset_index(drop=True), report


def select_table(
    scores: pd.DataFrame,
    budget: int,
    method: str,
    k: int,
    shortfall: str = "clamp",
    num_classes: Optional[int] = None,
    chooser: Optional[Callable[[pd.DataFrame, int], np.ndarray]] = None,
) -> tuple[pd.DataFrame, list[ClassSelection]]:
    """Select over a whole scores table (the single-process reference of the Ray path).

    Args:
        scores: columns image_id (str), label (int), score (float).
        num_classes: classes in the dataset, including empty ones (default: max label + 1).
    Returns:
        (selection sorted by (label, rank); one report per class, by label).
    """
    num_classes = int(scores["label"].max()) + 1 if num_classes is None else num_classes
    n = per_class_budget(budget, num_classes)
    parts = []
    found = {}
    for lbl, group in scores.groupby("label", sort=True):
        sel, found[int(lbl)] = select_class(group, int(lbl), n, method, k, shortfall, chooser)
        parts.append(sel)
    reports = all_class_reports(found, num_classes, n, method, k, shortfall)
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SELECTION_COLUMNS)
    return table[SELECTION_COLUMNS], reports


def all_class_reports(found: Mapping[int, ClassSelection], num_classes: int, n: int, method: str, k: int,
                      shortfall: str) -> list[ClassSelection]:
    """One report per class 0..C-1: ``found`` ones as given, a class without scored rows as
    :func:`select_class` reports an empty class (a SelectionError with ``shortfall="error"``)."""
    empty = pd.DataFrame({"image_id": np.array([], object), "label": np.array([], np.int64),
                          "score": np.array([], np.float64)})
    return [found[c] if c in found else select_class(empty, c, n, method, k, shortfall)[1] for c in range(num_classes)]
