"""The figures of ``d2c report``: matplotlib (Agg canvas, no pyplot state) → PNG data URIs.

Every function takes plain pandas/numpy inputs that :mod:`d2c.report.page` has already read
from the artifacts and returns a ``matplotlib.figure.Figure``; :func:`to_data_uri`
renders one to an embeddable ``data:image/png;base64,…`` string (:func:`png_data_uri` and
:func:`fit_png` do the same for ready-made PNGs, such as an evaluation's sample grid). Nothing here
reads files.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# ---------------------------------------------------------------------------
# Look and size
# ---------------------------------------------------------------------------
#: Resolution of every embedded PNG.
FIG_DPI = 100
#: Width in inches of a full-width figure (1,200 px at FIG_DPI: the page is 1,260 px wide).
FULL_WIDTH_IN = 12.0
#: Height in inches of one small-multiple panel / one coverage row / one bar.
PANEL_HEIGHT_IN = 2.2
COVERAGE_ROW_IN = 0.28
BAR_ROW_IN = 0.32
#: Room left of 0% in the coverage plot, so a tick at rank 0 stays visible.
COVERAGE_PAD = 0.01
#: Small multiples per row (ranked-score panels).
PANELS_PER_ROW = 5
#: Colours: the whole class, the selected images, the easy and hard ends of the ranked list.
GREY = "#b8bec6"
SELECTED = "#d1495b"
EASY = "#2e86ab"
HARD = "#6c4a9e"
#: Colour cycle for variants (D2C, random, …) and budgets.
CYCLE = ("#d1495b", "#2e86ab", "#edae49", "#00798c", "#6c4a9e", "#66a182", "#8d6a9f", "#3d405b")
#: Montage figures: room for the panel titles (two lines) and between panels, in inches.
MONTAGE_TITLE_IN = 0.75
MONTAGE_GAP_IN = 0.25
#: Space between montage panels (fraction of the figure width, constrained layout).
MONTAGE_WSPACE = 0.03
#: Largest drawn width of one montage tile, and the narrowest panel (room for its title).
MAX_TILE_IN = 0.5
MIN_PANEL_IN = 2.8
#: Gap in pixels between the tiles of an image montage, and its fill level (white).
TILE_GAP_PX = 2
GAP_VALUE = 255
#: Horizontal jitter (in class slots) of the selected-score dots over the violins.
JITTER = 0.18
#: Sweep plot: marker per method with an interval, line style per baseline without one.
MARKERS = ("o", "s", "^", "D")
BASELINE_STYLES = ("--", ":", "-.")
#: Rolling-median window (logged points) of the smoothed training curves.
SMOOTH_POINTS = 9


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` with the Agg canvas; returns the PNG file's bytes."""
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def to_data_uri(fig: Figure) -> str:
    """Render ``fig`` with the Agg canvas and return ``data:image/png;base64,…``."""
    return "data:image/png;base64," + base64.b64encode(to_png(fig)).decode("ascii")


def png_data_uri(png: bytes) -> str:
    """PNG file bytes as ``data:image/png;base64,…``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def array_png(image: np.ndarray) -> bytes:
    """A uint8 ``[H, W, 3]`` (or ``[H, W]``) picture as PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def fit_png(png: bytes, max_px: int) -> bytes:
    """PNG bytes whose longer side is at most ``max_px`` (shrunk with Lanczos, else returned as given).

    Raises:
        OSError: the bytes are not an image PIL can read.
    """
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        if im.format == "PNG" and max(im.size) <= max_px:
            return png
        im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
    im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def color(i: int) -> str:
    """The ``i``-th colour of the variant cycle."""
    return CYCLE[i % len(CYCLE)]


def short(name: str, width: int = 18) -> str:
    """``name`` cut to ``width`` characters with an ellipsis."""
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------------------
# Select: scores and ranks
# ---------------------------------------------------------------------------
def plot_score_distribution(
    ranked: Mapping[int, pd.DataFrame], selected: Mapping[int, pd.DataFrame], class_names: Sequence[str]
) -> Figure:
    """Violin per class of all difficulty scores, the selected images' scores as dots on top.

    Args:
        ranked: label → the class's rows sorted ascending by (score, image_id) (column ``score``).
        selected: label → the selected rows of that class (column ``score``); may be empty.
        class_names: names indexed by label.
    """
    labels = [c for c in ranked if len(ranked[c])]
    fig = _figure(FULL_WIDTH_IN, 3.6)
    ax = fig.add_subplot()
    if not labels:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        return fig
    data = [ranked[c]["score"].to_numpy(np.float64) for c in labels]
    parts = ax.violinplot(data, positions=range(len(labels)), widths=0.85, showextrema=False)
    for body in parts["bodies"]:
        body.set_facecolor(GREY)
        body.set_edgecolor("#8a929c")
        body.set_alpha(0.8)
    jitter = np.random.default_rng(0)  # fixed: the figure is the same on every run
    labelled = False
    for x, c in enumerate(labels):
        sel = selected.get(c)
        if sel is None or not len(sel):
            continue
        ys = sel["score"].to_numpy(np.float64)
        xs = x + jitter.uniform(-JITTER, JITTER, size=len(ys))
        ax.scatter(xs, ys, s=9, color=SELECTED, zorder=3, linewidths=0, label=None if labelled else "selected")
        labelled = True
    ax.set_xticks(range(len(labels)), [short(class_names[c] if c < len(class_names) else str(c), 14) for c in labels],
                  rotation=30 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center")
    ax.set_ylabel("difficulty score (higher = harder)")
    ax.grid(axis="y", alpha=0.3)
    if labelled:
        ax.legend(loc="upper right", frameon=False)
    return fig


def plot_ranked_scores(
    ranked: Mapping[int, pd.DataFrame],
    selected: Mapping[int, pd.DataFrame],
    class_names: Sequence[str],
    notes: Mapping[int, str],
) -> Figure:
    """Small multiples: each class's scores in rank order, the selected ranks marked.

    Args:
        ranked: label → rows sorted ascending by (score, image_id) (column ``score``).
        selected: label → selected rows (columns ``rank``, ``score``).
        class_names: names indexed by label.
        notes: label → a short panel subtitle (e.g. ``"n=48, k=96"``).
    """
    labels = list(ranked)
    cols = min(PANELS_PER_ROW, max(1, len(labels)))
    rows = max(1, -(-len(labels) // cols))
    fig = _figure(FULL_WIDTH_IN, PANEL_HEIGHT_IN * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(labels):]:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, labels):
        scores = ranked[c]["score"].to_numpy(np.float64)
        ax.plot(np.arange(len(scores)), scores, color="#5b6470", lw=1.2)
        sel = selected.get(c)
        if sel is not None and len(sel):
            r = sel["rank"].to_numpy(np.int64)
            ax.axvspan(r.min(), r.max(), color=SELECTED, alpha=0.08, lw=0)
            ax.scatter(r, sel["score"].to_numpy(np.float64), s=10, color=SELECTED, zorder=3, linewidths=0)
        name = class_names[c] if c < len(class_names) else str(c)
        ax.set_title(f"{short(name, 16)}\n{notes.get(c, '')}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("rank (0 = easiest)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("score", fontsize=8)
    return fig


def plot_coverage(
    runs: Mapping[str, tuple[Mapping[int, np.ndarray], Mapping[int, int]]],
    class_names: Sequence[str],
    labels: Sequence[int],
) -> Figure:
    """Where in each class's ranked list the selection falls, one row per (class, run).

    Args:
        runs: run name → (label → selected ranks, label → class size).
        class_names: names indexed by label.
        labels: the classes to draw, top to bottom.

    The x axis is the rank as a fraction of the class (0 = easiest, 1 = hardest), so that
    classes of different sizes line up.
    """
    names = list(runs)
    n_rows = max(1, len(labels) * len(names))
    fig = _figure(FULL_WIDTH_IN, COVERAGE_ROW_IN * n_rows + 1.0)
    ax = fig.add_subplot()
    y, yticks, ylabels = 0, [], []
    for c in labels:
        label = class_names[c] if c < len(class_names) else str(c)
        yticks.append(y - (len(names) - 1) / 2)
        ylabels.append(short(label, 18))
        for j, name in enumerate(names):
            ranks_by_label, sizes = runs[name]
            size = int(sizes.get(c, 0))
            ranks = np.asarray(ranks_by_label.get(c, np.zeros(0)), np.float64)
            ax.barh(y, 1.0, height=0.7, color="#eef0f3", edgecolor="none", left=0)
            if size > 1 and len(ranks):
                frac = ranks / (size - 1)
                ax.vlines(frac, y - 0.33, y + 0.33, color=color(j), lw=1.2)
                span = (ranks.max() - ranks.min() + 1) / size
                ax.text(1.01, y, f"{len(ranks)} of {size}, spans {span:.0%}", va="center", fontsize=7)
            y -= 1
        y -= 0.5 if len(names) > 1 else 0
    ax.set_yticks(yticks, ylabels, fontsize=8)
    ax.set_xlim(-COVERAGE_PAD, 1.16)
    ax.set_xticks(np.linspace(0, 1, 6), [f"{v:.0%}" for v in np.linspace(0, 1, 6)])
    ax.set_xlabel("position in the class's ranked list (0% = easiest, 100% = hardest)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if len(names) > 1:
        for j, name in enumerate(names):
            ax.plot([], [], color=color(j), lw=2, label=name)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0 + 0.35 / max(1, n_rows)), ncol=len(names), frameon=False)
    return fig


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------
def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]``, ``[N, H, W, 1]`` or ``[N, H, W, 3]`` → ``[N, H, W, 3]``."""
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def montage(rows: Sequence[Sequence[np.ndarray | None]], cols: int) -> np.ndarray:
    """Tile images into one uint8 ``[H, W, 3]`` picture; a ``None`` or missing cell stays blank.

    Args:
        rows: per row, up to ``cols`` uint8 images ``[h, w(, c)]`` (all the same h, w).
        cols: most cells per row (fewer when no row is that long).
    """
    sample = next((im for row in rows for im in row if im is not None), None)
    if sample is None:
        return np.full((1, 1, 3), GAP_VALUE, np.uint8)
    cols = max(1, min(cols, max(len(row) for row in rows)))
    h, w = np.asarray(sample).shape[:2]
    n_rows = max(1, len(rows))
    out = np.full((n_rows * (h + TILE_GAP_PX) - TILE_GAP_PX, cols * (w + TILE_GAP_PX) - TILE_GAP_PX, 3), GAP_VALUE, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(list(row)[:cols]):
            if im is None:
                continue
            top, left = i * (h + TILE_GAP_PX), j * (w + TILE_GAP_PX)
            out[top : top + h, left : left + w] = as_rgb(np.asarray(im)[None])[0][:h, :w]
    return out


def plot_montages(
    panels: Mapping[str, np.ndarray], row_labels: Sequence[str], tile_px: int, titles_color: Sequence[str] = ()
) -> Figure:
    """Montages side by side, one titled panel each, sharing the row labels on the left.

    Args:
        panels: title → uint8 montage ``[H, W, 3]`` (all with ``len(row_labels)`` rows of tiles).
        row_labels: one label per tile row (class names); empty for unlabelled rows.
        tile_px: width of one tile plus its gap in the montages (tiles are drawn at most
            :data:`MAX_TILE_IN` wide, so a few large tiles do not fill a screen).
        titles_color: optional title colour per panel.
    """
    n = max(1, len(panels))
    widths = [m.shape[1] for m in panels.values()] or [1]
    tallest = max((m.shape[0] for m in panels.values()), default=1)
    # Panels get widths in proportion to their montages, so every tile has the same size.
    labels_in = 1.3 if row_labels else 0.2
    tiles_across = sum(widths) / max(1, tile_px)
    room = FULL_WIDTH_IN - labels_in - MONTAGE_GAP_IN * (n - 1)
    image_w = min(room, max(tiles_across * MAX_TILE_IN, n * MIN_PANEL_IN))
    fig = _figure(min(FULL_WIDTH_IN, image_w + labels_in + MONTAGE_GAP_IN * (n - 1) + 0.2),
                  max(1.8, image_w * tallest / sum(widths) + MONTAGE_TITLE_IN))
    axes = fig.subplots(1, n, squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    fig.get_layout_engine().set(wspace=MONTAGE_WSPACE)
    for k, (ax, (title, img)) in enumerate(zip(axes, panels.items())):
        ax.imshow(img, interpolation="nearest", aspect="equal")
        ax.set_title(title, fontsize=10, color=titles_color[k] if k < len(titles_color) else "black")
        ax.set_xticks([])
        if row_labels and k == 0:
            tile = img.shape[0] / len(row_labels)
            ax.set_yticks([tile * (i + 0.5) for i in range(len(row_labels))], [short(s, 14) for s in row_labels], fontsize=8)
        else:
            ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    return fig


# ---------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------
def plot_training_curves(curves: Mapping[str, pd.DataFrame], terms: Sequence[str]) -> Figure:
    """One panel per logged term, one line per model (thin: as logged; thick: rolling median).

    Args:
        curves: model name → rows with a ``step`` column and the ``terms`` columns present.
        terms: column names to draw, one panel each, in order.
    """
    cols = min(len(terms), 4) or 1
    rows = max(1, -(-len(terms) // cols))
    fig = _figure(FULL_WIDTH_IN, 2.8 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(terms):]:
        ax.set_axis_off()
    for ax, term in zip(axes.flat, terms):
        for j, (name, df) in enumerate(curves.items()):
            if term not in df or df[term].isna().all() or (df[term].fillna(0) == 0).all():
                continue  # an all-zero term (e.g. loss_proj without Attach) is not a curve
            d = df[["step", term]].dropna()
            ax.plot(d["step"], d[term], color=color(j), lw=0.7, alpha=0.35)
            smooth = d[term].rolling(SMOOTH_POINTS, center=True, min_periods=1).median()
            ax.plot(d["step"], smooth, color=color(j), lw=1.8, label=name)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    first = axes.flat[0]
    if len(curves) and first.get_legend_handles_labels()[0]:
        first.legend(fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------
# Timings and sweep
# ---------------------------------------------------------------------------
def plot_timings(timings: Sequence[tuple[str, float]]) -> Figure:
    """Horizontal bars of wall-clock seconds per stage, longest first as listed."""
    fig = _figure(FULL_WIDTH_IN * 0.75, BAR_ROW_IN * max(1, len(timings)) + 0.9)
    ax = fig.add_subplot()
    names = [n for n, _ in timings][::-1]
    secs = [s for _, s in timings][::-1]
    ax.barh(range(len(names)), secs, color=EASY)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    top = max(secs, default=0.0)
    for i, s in enumerate(secs):
        ax.text(s + top * 0.01, i, fmt_duration(s), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15 if top > 0 else 1)
    ax.set_xlabel("wall-clock seconds")
    ax.grid(axis="x", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def fmt_duration(s: float) -> str:
    """Seconds for people: ``12.5 s``, ``2.0 min``, ``1.5 h``."""
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def plot_sweep(df: pd.DataFrame, metric: str = "fid") -> Figure:
    """``metric`` against k, one curve per (budget, method) with an interval; baselines without
    a k (random, …) as dashed horizontal lines in their budget's colour.

    Points sit at the interval the selection applied (``k_used``, where the table has it) rather
    than the one asked for, so a budget that clamped k (k=96 → 25) is plotted at 25.

    Args:
        df: rows with columns ``k``, ``budget``, ``method`` and ``metric`` (NaN rows are dropped);
            optional ``k_used``.
    """
    fig = _figure(FULL_WIDTH_IN * 0.75, 4.2)
    ax = fig.add_subplot()
    d = df.dropna(subset=[metric])
    if "k_used" in d:
        d = d.assign(k=d["k_used"].fillna(d["k"]))
    budgets = sorted(d["budget"].dropna().unique())
    methods = sorted(d["method"].astype(str).unique())
    for i, budget in enumerate(budgets):
        for method, g in d[d["budget"] == budget].groupby(d["method"].astype(str)):
            with_k = g[g["k"].notna()]
            if len(with_k):
                curve = with_k.groupby("k", as_index=False)[metric].mean().sort_values("k")
                ax.plot(curve["k"], curve[metric], marker=MARKERS[methods.index(method) % len(MARKERS)], color=color(i),
                        label=f"budget {int(budget):,} · {method}")
            else:
                ax.axhline(g[metric].mean(), color=color(i), ls=BASELINE_STYLES[methods.index(method) % len(BASELINE_STYLES)],
                           lw=1.2, label=f"budget {int(budget):,} · {method} (no k)")
    if d["k"].notna().any():
        ks = sorted(d["k"].dropna().unique())
        if len(ks) > 1 and max(ks) / max(min(ks), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(int(k)) for k in ks])
        ax.minorticks_off()
    ax.set_xlabel("interval k (as applied)")
    ax.set_ylabel(metric.upper() + " (lower is better)")
    ax.grid(alpha=0.3)
    if len(d):
        ax.legend(fontsize=8, frameon=False)
    return fig
