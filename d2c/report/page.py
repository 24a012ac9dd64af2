"""``d2c report PATH…``: one self-contained HTML page that shows what D2C did and why it works.

Each path is recognised by the artifacts it holds (docs/design.md, Artifacts):

=========  ==========================================================================
kind       marker files
=========  ==========================================================================
demo       ``demo.json`` (``d2c demo``: several variants — D2C, random, … — side by side)
condense   ``manifest.json``, ``scores/``, ``selection/``
train      ``metrics.jsonl``, ``checkpoints/``
eval       ``metrics.json``, ``samples.npz``
sweep      ``results.csv`` or ``results.parquet``
=========  ==========================================================================

The page: for a demo, first the verdict — each variant's FID and KID, the paired FID
differences of every ``d2c compare`` file with their intervals, the variants' sample grids side
by side, what one run can and cannot show, and the multi-seed study's summary; then the metrics
table and samples (how every number was produced — sampler, steps, N, reference — folded below
them), the per-class difficulty-score distributions with the selected ranks marked, the easiest /
selected / hardest images of each class, the selection's coverage of the ranked list, the
training curves, timings per stage and the k × budget sweep.
Figures are PNGs embedded as ``data:`` URIs; the page loads nothing else. Whatever is
absent is listed as missing instead of failing the report.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
import sys
import zipfile
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from d2c.eval.artifacts import HOW
from d2c.report import plots

# ---------------------------------------------------------------------------
# What the page shows (display choices, not method settings)
# ---------------------------------------------------------------------------
#: Classes drawn in the per-class figures and tables (evenly spaced labels beyond this).
MAX_CLASSES_SHOWN = 10
#: Images per class in each of the easiest / selected / hardest grids.
GRID_COLS = 8
#: Sample images per class (or per row without labels) in the sample grids.
SAMPLE_COLS = 8
#: Sample rows when the samples carry no labels.
SAMPLE_ROWS_UNLABELLED = 8
#: Logged points whose median is reported as a training run's final value.
TAIL_POINTS = 10
#: Longest rendering of an unknown metrics.json value before it is cut.
MAX_VALUE_CHARS = 160
#: Reject reasons listed per run.
MAX_REJECT_REASONS = 5

#: Array names of ADM's sample ``.npz`` (the values of d2c.eval.fid's constants, which a test checks;
#: not imported from there because that module loads torch, which a report does not need).
NPZ_IMAGES = "arr_0"
NPZ_LABELS = "arr_1"

#: Default output file name, inside the first path.
REPORT_FILE = "report.html"

MARKERS: dict[str, tuple[str, ...]] = {
    "demo": ("demo.json",),
    "condense": ("manifest.json", "scores", "selection"),
    "train": ("metrics.jsonl", "checkpoints"),
    "eval": ("metrics.json", "samples.npz"),
    "sweep": ("results.csv", "results.parquet"),
}

#: metrics.json quality numbers: (display name, accepted keys, how it is computed: d2c evaluate's own
#: description, the one metrics.json carries as ``how``).
METRICS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("FID ↓", ("fid",), HOW["fid"]),
    ("KID ↓", ("kid_mean", "kid"), HOW["kid_mean"]),
    ("precision ↑", ("precision",), HOW["precision"]),
    ("recall ↑", ("recall",), HOW["recall"]),
    ("sFID ↓", ("sfid",), HOW["sfid"]),
    ("IS ↑", ("is_mean", "is", "inception_score"), HOW["is_mean"]),
)
#: Accepted metrics.json keys of the facts every number needs.
SAMPLER_KEYS = ("sampler",)
STEPS_KEYS = ("steps", "num_steps", "sampling_steps")
CFG_KEYS = ("cfg_scale", "cfg", "guidance_scale")
N_KEYS = ("num_samples", "n_gen", "n_samples", "N")
REFERENCE_KEYS = ("reference", "reference_path", "reference_npz", "ref")
REFERENCE_N_KEYS = ("n_ref", "reference_size", "num_reference")
CHECKPOINT_KEYS = ("checkpoint", "ckpt", "checkpoint_path")
#: Provenance of the numbers: (display name, accepted keys, required — flagged when absent).
PROVENANCE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("sampler", SAMPLER_KEYS, True),
    ("sampling steps", STEPS_KEYS, True),
    ("CFG scale", CFG_KEYS, False),
    ("guidance interval", ("guidance_interval",), False),
    ("N samples", N_KEYS, True),
    ("reference", REFERENCE_KEYS, True),
    ("reference N", REFERENCE_N_KEYS, False),
    ("seed", ("seed",), False),
    ("checkpoint", CHECKPOINT_KEYS, False),
    ("feature extractor", ("feature_extractor", "extractor", "inception", "inception_path"), False),
    ("KID subset size", ("kid_subset_size",), False),
)
#: Training-log columns drawn as curves, in panel order.
CURVE_TERMS = ("loss", "loss_diff", "loss_proj", "loss_vlb", "grad_norm")

#: metrics.json fields kept out of the table's extra rows: the producer's descriptions (used for the
#: metric definitions), package versions, file lists, configs, and long lists.
HIDDEN_PREFIXES = ("how.", "versions.", "files.", "config.", "not_computed.", "format", "sampling.timesteps_used")
#: Fields that describe a dict-valued entry (reference, checkpoint, feature extractor) in one cell.
SUMMARY_FIELDS = ("kind", "source", "split", "path", "size", "step", "arch", "weights", "network")

FMNIST_ID_RE = re.compile(r"^fmnist-(train|test)-(\d+)$")
#: A duration field (``*_s``, ``*_seconds``) — but not a rate such as ``samples_per_s``.
TIMING_KEY_RE = re.compile(r"(_s|_sec|_secs|_seconds|seconds)$")
RATE_SUFFIX = "per_s"


class Html(str):
    """A string that is already HTML (not escaped again)."""


def esc(x: Any) -> str:
    return x if isinstance(x, Html) else html.escape(str(x), quote=True)


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------
def fmt_num(x: Any) -> str:
    """A number for people: ints with separators, floats to 4 significant digits, None/NaN as —."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "—"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x.is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.4g}"
    return str(x)


def fmt_value(x: Any) -> str:
    """Any JSON value, compactly (numbers via :func:`fmt_num`, long values cut)."""
    if isinstance(x, (int, float, np.integer, np.floating)) or x is None:
        return fmt_num(x)
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], cls: str = "") -> Html:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def figure(fig, alt: str, caption: str) -> Html:
    """An embedded PNG with its caption (the caption says how the figure was made)."""
    uri = plots.to_data_uri(fig)
    return Html(f'<figure><img src="{uri}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>')


def missing_box(items: Sequence[str]) -> Html:
    if not items:
        return Html("")
    return Html('<div class="missing"><b>Missing:</b><ul>' + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul></div>")


def details(summary: str, obj: Any) -> Html:
    return Html(f"<details><summary>{esc(summary)}</summary><pre>{esc(json.dumps(obj, indent=2, default=str))}</pre></details>")


def fold(summary: str, body: Sequence[str]) -> Html:
    """Page content folded away under a one-line summary (closed until clicked)."""
    return Html(f"<details><summary>{esc(summary)}</summary>{''.join(body)}</details>")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: How deep a nested metrics.json key may sit and still match by its last part
#: (``sampling.steps`` does; ``config.train.steps`` — training steps — does not).
MAX_LOOKUP_DEPTH = 1


def lookup(flat: Mapping[str, Any], keys: Sequence[str]) -> tuple[Optional[str], Any]:
    """First of ``keys`` in ``flat``, matched on the full dotted key, then on the last part of a
    key nested at most :data:`MAX_LOOKUP_DEPTH` deep."""
    for k in keys:
        if k in flat:
            return k, flat[k]
    for k in keys:
        for fk, v in flat.items():
            parts = fk.split(".")
            if parts[-1] == k and len(parts) - 1 <= MAX_LOOKUP_DEPTH:
                return fk, v
    return None, None


# ---------------------------------------------------------------------------
# Reading the artifacts
# ---------------------------------------------------------------------------
def read_json(path: Path, missing: list[str]) -> Optional[dict]:
    if not path.is_file():
        missing.append(f"{path}: not found")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        missing.append(f"{path}: unreadable ({err})")
        return None


def read_parquet_files(files: Sequence[Path], columns: Sequence[str], missing: list[str], what: str) -> Optional[pd.DataFrame]:
    """Concatenate the given columns of parquet files; None (with a note) when absent or unreadable."""
    if not files:
        missing.append(f"{what}: no parquet files")
        return None
    tables = []
    for f in files:
        try:
            names = pq.read_schema(f).names
            absent = [c for c in columns if c not in names]
            if absent:
                missing.append(f"{f}: lacks column(s) {', '.join(absent)}")
                return None
            tables.append(pq.read_table(f, columns=list(columns)))
        except (OSError, pa.ArrowException) as err:
            missing.append(f"{f}: unreadable ({err})")
            return None
    return pa.concat_tables(tables).to_pandas()


def scores_dir_of(path: Path, manifest: Optional[dict]) -> Path:
    """RUN/scores, or the run whose scores this one reused (``score.reuse_from``, recorded as the
    manifest's ``scores_dir``); a relative path is taken from the working directory, else from RUN."""
    own = path / "scores"
    recorded = (manifest or {}).get("scores_dir")
    if not recorded or any(own.glob("*.parquet")):
        return own
    p = Path(recorded)
    return p if p.is_absolute() or p.exists() else path / p


@dataclass
class CondenseRun:
    """A ``d2c condense`` run directory, as far as it exists."""

    path: Path
    manifest: Optional[dict] = None
    scores: Optional[pd.DataFrame] = None
    selection: Optional[pd.DataFrame] = None
    rejects: Optional[pd.DataFrame] = None
    scores_dir: Optional[Path] = None
    missing: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict:
        return (self.manifest or {}).get("config") or {}

    def class_names(self) -> list[str]:
        names = (self.manifest or {}).get("class_names")
        if names:
            return [str(n) for n in names]
        labels = [df["label"] for df in (self.scores, self.selection) if df is not None and len(df)]
        top = int(max(int(s.max()) for s in labels)) + 1 if labels else 0
        return [str(i) for i in range(top)]

    def class_sizes(self) -> dict[int, int]:
        if self.scores is not None:
            return {int(k): int(v) for k, v in self.scores.groupby("label").size().items()}
        return {int(r["label"]): int(r.get("size", 0)) for r in (self.manifest or {}).get("per_class", [])}

    def method(self) -> str:
        if self.selection is not None and len(self.selection) and "method" in self.selection:
            return str(self.selection["method"].iloc[0])
        return str(self.config.get("select", {}).get("method", "?"))


def load_condense(path: Path) -> CondenseRun:
    run = CondenseRun(path)
    run.manifest = read_json(path / "manifest.json", run.missing)
    run.scores_dir = scores_dir_of(path, run.manifest)
    score_files = sorted(run.scores_dir.glob("*.parquet"))
    run.scores = read_parquet_files(score_files, ["image_id", "label", "score"], run.missing, str(run.scores_dir))
    if run.scores is not None:
        nan = run.scores["score"].isna()
        if nan.any():
            run.missing.append(f"{run.scores_dir}: {int(nan.sum()):,} rows without a score (left out of the figures)")
            run.scores = run.scores[~nan].reset_index(drop=True)
    sel_file = path / "selection" / "selection.parquet"
    if sel_file.is_file():
        run.selection = read_parquet_files([sel_file], ["image_id", "label", "score", "rank", "method"], run.missing, str(sel_file))
    else:
        run.missing.append(f"{sel_file}: not found (no selection to mark)")
    reject_files = sorted((run.scores_dir.parent / "rejects").glob("*.parquet"))
    if reject_files:
        run.rejects = read_parquet_files(reject_files, ["image_id", "reason"], run.missing, str(path / "rejects"))
    return run


@dataclass
class TrainRun:
    """A ``d2c train`` directory: its log and the config saved with its latest checkpoint."""

    path: Path
    log: Optional[pd.DataFrame] = None
    config: Optional[dict] = None
    checkpoint: Optional[Path] = None
    bad_lines: int = 0
    missing: list[str] = field(default_factory=list)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    return rows, bad


def load_train(path: Path) -> TrainRun:
    run = TrainRun(path)
    log = path / "metrics.jsonl"
    if log.is_file():
        rows, run.bad_lines = read_jsonl(log)
        if run.bad_lines:
            run.missing.append(f"{log}: {run.bad_lines} malformed line(s) skipped")
        df = pd.DataFrame(rows)
        if len(df) and "step" in df:
            df = df.apply(pd.to_numeric, errors="coerce")
            # A resumed run logs some steps twice: keep the last record of each step.
            run.log = df.dropna(subset=["step"]).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
        else:
            run.missing.append(f"{log}: no logged steps")
    else:
        run.missing.append(f"{log}: not found (no training curves)")
    if (path / "checkpoints").is_dir():
        from d2c.train.checkpoint import latest_checkpoint

        latest = latest_checkpoint(path / "checkpoints")
        if latest is not None:
            run.checkpoint = latest
            meta = read_json(latest / "model.json", run.missing) or {}
            run.config = meta.get("config") or None
    return run


@dataclass
class EvalRun:
    """A ``d2c evaluate`` directory: metrics.json and a few of its samples."""

    path: Path
    metrics: Optional[dict] = None
    sample_labels: Optional[np.ndarray] = None
    num_samples_file: Optional[int] = None
    missing: list[str] = field(default_factory=list)

    @cached_property
    def flat(self) -> dict[str, Any]:
        """metrics.json flattened to dotted keys (read once, after loading)."""
        return flatten(self.metrics or {})

    @cached_property
    def visible(self) -> dict[str, Any]:
        """:attr:`flat` without the bookkeeping fields (``how.*``, ``not_computed.*``, …)."""
        return {k: v for k, v in self.flat.items() if not k.startswith(HIDDEN_PREFIXES)}


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npz_rows(path: Path, name: str, indices: Optional[Sequence[int]] = None) -> tuple[np.ndarray, int]:
    """Rows ``indices`` (ascending) of array ``name`` of an ``.npz``, streaming past the rest
    (50K samples at 256 px are 10 GB: never loaded whole).

    Returns:
        (the rows, or the whole array when ``indices`` is None; the array's length).
    """
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        reader = _NPY_HEADER_READERS.get(np.lib.format.read_magic(f))
        if indices is None or reader is None:
            f.seek(0)
            arr = np.lib.format.read_array(f, allow_pickle=False)
            return (arr if indices is None else arr[np.asarray(indices, np.int64)]), len(arr)
        shape, fortran, dtype = reader(f)
        total = int(shape[0]) if shape else 0
        row_shape = tuple(shape[1:])
        if fortran and len(indices):  # rows are not contiguous: read it all
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)[np.asarray(indices, np.int64)], total
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        start = f.tell()
        out = np.empty((len(indices),) + row_shape, dtype)
        for j, i in enumerate(indices):
            f.seek(start + int(i) * row_bytes)
            out[j] = np.frombuffer(f.read(row_bytes), dtype).reshape(row_shape)
        return out, total


def pick_sample_indices(labels: Optional[np.ndarray], total: int, classes: Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Which samples to show: up to SAMPLE_COLS per shown class (or a plain grid without labels).

    Returns:
        (sorted unique indices to read, per montage row the indices in display order).
    """
    if labels is None:
        n = min(total, SAMPLE_COLS * SAMPLE_ROWS_UNLABELLED)
        rows = [list(range(r, min(n, r + SAMPLE_COLS))) for r in range(0, n, SAMPLE_COLS)]
        return list(range(n)), rows
    rows = [np.flatnonzero(labels == c)[:SAMPLE_COLS].tolist() for c in classes]
    return sorted({i for r in rows for i in r}), rows


def load_eval(path: Path) -> EvalRun:
    run = EvalRun(path)
    run.metrics = read_json(path / "metrics.json", run.missing)
    npz = path / "samples.npz"
    if not npz.is_file():
        run.missing.append(f"{npz}: not found (no sample grid)")
        return run
    try:
        with zipfile.ZipFile(npz) as zf:
            names = {n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")}
        if NPZ_IMAGES not in names:
            run.missing.append(f"{npz}: no '{NPZ_IMAGES}' array")
            return run
        if NPZ_LABELS in names:
            run.sample_labels, _ = read_npz_rows(npz, NPZ_LABELS)
        _, total = read_npz_rows(npz, NPZ_IMAGES, [])
        run.num_samples_file = total
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as err:
        run.missing.append(f"{npz}: unreadable ({err})")
    return run


def load_sample_rows(run: EvalRun, classes: Sequence[int]) -> list[list[np.ndarray]]:
    """The montage rows of one eval run's samples (empty when it has none)."""
    if run.num_samples_file is None:
        return []
    idx, rows = pick_sample_indices(run.sample_labels, run.num_samples_file, classes)
    imgs, _ = read_npz_rows(run.path / "samples.npz", NPZ_IMAGES, idx)
    where = {i: j for j, i in enumerate(idx)}
    return [[imgs[where[i]] for i in row] for row in rows]


@dataclass
class SweepRun:
    path: Path
    results: Optional[pd.DataFrame] = None
    source: Optional[Path] = None
    missing: list[str] = field(default_factory=list)


SWEEP_COLUMNS = ("k", "budget", "method", "fid")


def load_sweep(path: Path) -> SweepRun:
    run = SweepRun(path)
    for name in ("results.parquet", "results.csv"):
        f = path / name
        if not f.is_file():
            continue
        try:
            df = pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_csv(f)
        except (OSError, ValueError, pa.ArrowException) as err:
            run.missing.append(f"{f}: unreadable ({err})")
            continue
        absent = [c for c in SWEEP_COLUMNS if c not in df]
        if absent:
            run.missing.append(f"{f}: lacks column(s) {', '.join(absent)}")
            continue
        for c in ("k", "k_used", "budget", "fid", "kid", "steps", "wall_time_s"):
            if c in df:
                df[c] = pd.to_numeric(df[c], errors="coerce")
        run.results, run.source = df, f
        return run
    if run.results is None and not run.missing:
        run.missing.append(f"{path}: no results.csv or results.parquet")
    return run


@dataclass
class Variant:
    """One trained model and where it came from (a demo entry, or the loose paths given)."""

    name: str
    condense: Optional[CondenseRun] = None
    train: Optional[TrainRun] = None
    eval: Optional[EvalRun] = None


@dataclass
class Demo:
    path: Path
    data: dict
    missing: list[str] = field(default_factory=list)
    #: This demo's variants (also in Inputs.variants), for its verdict.
    variants: list[Variant] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Collecting the inputs
# ---------------------------------------------------------------------------
def detect_kinds(path: Path) -> list[str]:
    """The artifact kinds ``path`` holds (see :data:`MARKERS`)."""
    return [kind for kind, marks in MARKERS.items() if any((path / m).exists() for m in marks)]


@dataclass
class Inputs:
    sources: list[tuple[Path, list[str]]] = field(default_factory=list)
    demos: list[Demo] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    condense: list[tuple[str, CondenseRun]] = field(default_factory=list)
    sweeps: list[SweepRun] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class _Loader:
    """Loads each directory once, however many variants name it."""

    def __init__(self):
        self.cache: dict[tuple[str, Path], Any] = {}

    def get(self, kind: str, path: Path):
        key = (kind, path.resolve())
        if key not in self.cache:
            self.cache[key] = {"condense": load_condense, "train": load_train, "eval": load_eval, "sweep": load_sweep}[kind](path)
        return self.cache[key]


def _resolve_in(base: Path, p: Any) -> Optional[Path]:
    if not p:
        return None
    q = Path(str(p))
    if q.is_absolute() or q.exists():
        return q
    return base / q


def _demo_variants(demo: Demo, loader: _Loader) -> list[Variant]:
    runs = demo.data.get("runs")
    if not isinstance(runs, Mapping) or not runs:
        demo.missing.append(f"{demo.path / 'demo.json'}: no 'runs'")
        return []
    from d2c.variants import VARIANTS

    order = list(VARIANTS)  # D2C first, then its baselines, as the demo ran them; unknown names last
    out = []
    for name, parts in sorted(runs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), str(kv[0]))):
        parts = parts if isinstance(parts, Mapping) else {}
        v = Variant(str(name))
        for kind in ("condense", "train", "eval"):
            p = _resolve_in(demo.path, parts.get(kind))
            if p is None:
                demo.missing.append(f"demo variant {name}: no {kind} path in demo.json")
            elif not p.is_dir():
                demo.missing.append(f"demo variant {name}: {kind} directory {p} does not exist")
            else:
                setattr(v, kind, loader.get(kind, p))
        out.append(v)
    return out


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def collect(paths: Sequence[str | Path]) -> Inputs:
    """Recognise and load every path. Directories given loose (not through a demo) form one
    variant when each kind appears at most once, else one variant per directory."""
    inp, loader = Inputs(), _Loader()
    loose: list[tuple[Path, list[str]]] = []
    for p in map(Path, paths):
        kinds = detect_kinds(p)
        inp.sources.append((p, kinds))
        if not kinds:
            inp.missing.append(f"{p}: no D2C artifacts recognised (looked for {', '.join(m for ms in MARKERS.values() for m in ms)})")
        if "demo" in kinds:
            demo = Demo(p, {})
            demo.data = read_json(p / "demo.json", demo.missing) or {}
            inp.demos.append(demo)
            demo.variants = _demo_variants(demo, loader)
            inp.variants += demo.variants
            inp.missing += demo.missing
        if "sweep" in kinds:
            inp.sweeps.append(loader.get("sweep", p))
        rest = [k for k in kinds if k in ("condense", "train", "eval")]
        if rest and "demo" not in kinds:
            loose.append((p, rest))
    counts = {k: sum(k in ks for _, ks in loose) for k in ("condense", "train", "eval")}
    if loose and max(counts.values()) <= 1:
        v = Variant(loose[0][0].resolve().name if len(loose) == 1 else "run")
        for p, kinds in loose:
            for k in kinds:
                setattr(v, k, loader.get(k, p))
        inp.variants.append(v)
    else:
        for (p, kinds), name in zip(loose, _unique([p.resolve().name or str(p) for p, _ in loose])):
            v = Variant(name)
            for k in kinds:
                setattr(v, k, loader.get(k, p))
            inp.variants.append(v)
    # Each condense run once, named after the variants that use it.
    by_path: dict[Path, tuple[list[str], CondenseRun]] = {}
    for v in inp.variants:
        if v.condense is not None:
            by_path.setdefault(v.condense.path.resolve(), ([], v.condense))[0].append(v.name)
    inp.condense = [(" + ".join(names), run) for names, run in by_path.values()]
    for v in inp.variants:
        for part in (v.condense, v.train, v.eval):
            if part is not None:
                inp.missing += [m for m in part.missing if m not in inp.missing]
    for s in inp.sweeps:
        inp.missing += s.missing
    return inp


# ---------------------------------------------------------------------------
# Images of a condense run
# ---------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _fashion_mnist(root: Optional[str], split: str) -> np.ndarray:
    from d2c.data.fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(root, split)[0]


def load_images(data_cfg: Mapping[str, Any], ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Pixels of the given image ids, read from the run's data source.

    Fashion-MNIST ids (``fmnist-<split>-<index>``) index the idx file directly; any other
    source is listed with :func:`d2c.data.source.list_source` and only the wanted rows are
    decoded with :func:`d2c.data.preprocess.prepare_record` (the run's own preprocessing).

    Returns:
        (image id → uint8 ``[H, W, C]``, notes about images that could not be loaded).
    """
    ids = list(dict.fromkeys(ids))
    if not ids:
        return {}, []
    source = data_cfg.get("source", "fashion_mnist" if all(FMNIST_ID_RE.match(i) for i in ids) else None)
    try:
        if source == "fashion_mnist":
            return _load_fashion_mnist_ids(data_cfg.get("path"), ids)
        if source is None:
            return {}, ["the manifest has no data config, so the images cannot be located"]
        return _load_listed_ids(data_cfg, ids)
    except Exception as err:  # any source error: the report shows the rest of the page
        return {}, [f"images could not be loaded from data.source={source}: {type(err).__name__}: {err}"]


def _load_fashion_mnist_ids(root: Optional[str], ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    out, notes = {}, []
    for i in ids:
        m = FMNIST_ID_RE.match(i)
        if not m:
            notes.append(f"{i}: not a Fashion-MNIST id")
            continue
        images = _fashion_mnist(root, m.group(1))
        idx = int(m.group(2))
        if idx >= len(images):
            notes.append(f"{i}: index past the end of the {m.group(1)} split ({len(images)} images)")
            continue
        out[i] = images[idx][:, :, None]
    return out, notes


def _load_listed_ids(data_cfg: Mapping[str, Any], ids: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Decode the wanted ids with the run's preprocessing. ImageFolder ids are paths relative to
    ``data.path`` (d2c.data.imagefolder's contract), so they are opened directly — listing
    ImageNet's 1.28M files is not needed for a few dozen; other sources are listed first."""
    from d2c.config import DataConfig
    from d2c.data.preprocess import prepare_record
    from d2c.data.records import Reject
    from d2c.data.source import list_source

    cfg = DataConfig(**dict(data_cfg))
    wanted = set(ids)
    if cfg.source == "imagefolder" and cfg.path is not None:
        rows = [{"image_id": i, "label": -1, "class_name": "", "path": str(Path(cfg.path) / i)} for i in ids]
    else:
        rows = [row for row in list_source(cfg).rows if row["image_id"] in wanted]
    out, notes = {}, []
    for row in rows:
        rec = prepare_record(row, channels=cfg.channels, image_size=cfg.image_size, method=cfg.preprocess)
        if isinstance(rec, Reject):
            notes.append(f"{rec.image_id}: {rec.reason}")
        else:
            out[rec["image_id"]] = rec["image"]
    listed = {row["image_id"] for row in rows}
    notes += [f"{i}: not in the listing" for i in ids if i not in listed]
    return out, notes


# ---------------------------------------------------------------------------
# Per-class views of a condense run
# ---------------------------------------------------------------------------
def shown_classes(labels: Iterable[int]) -> list[int]:
    """All labels, or MAX_CLASSES_SHOWN of them evenly spaced."""
    labels = sorted(set(int(x) for x in labels))
    if len(labels) <= MAX_CLASSES_SHOWN:
        return labels
    pick = np.unique(np.linspace(0, len(labels) - 1, MAX_CLASSES_SHOWN).round().astype(int))
    return [labels[i] for i in pick]


def ranked_by_class(scores: pd.DataFrame, labels: Sequence[int]) -> dict[int, pd.DataFrame]:
    """label → that class's rows sorted ascending by (score, image_id), as the method ranks them."""
    from d2c.select.interval import sort_class

    out = {}
    for c in labels:
        g = scores[scores["label"] == c]
        order = sort_class(g["score"].to_numpy(np.float64), g["image_id"].to_numpy())
        out[c] = g.iloc[order].reset_index(drop=True)
    return out


def selected_by_class(selection: Optional[pd.DataFrame], labels: Sequence[int]) -> dict[int, pd.DataFrame]:
    if selection is None:
        return {}
    return {c: selection[selection["label"] == c].sort_values("rank", kind="stable").reset_index(drop=True) for c in labels}


def evenly(n_items: int, m: int) -> np.ndarray:
    """Up to ``m`` evenly spaced positions in ``range(n_items)``."""
    if n_items <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n_items - 1, min(m, n_items)).round().astype(np.int64))


def per_class_notes(run: CondenseRun) -> dict[int, str]:
    """label → ``"n=48, k=96"`` (with the clamped k where it differs)."""
    out = {}
    for r in (run.manifest or {}).get("per_class", []):
        k, ku = r.get("k"), r.get("k_used")
        interval = "" if k is None else (f", k={k}" if ku in (None, k) else f", k={k}→{ku}")
        out[int(r["label"])] = f"{r.get('selected', '?')} of {r.get('size', '?')}{interval}"
    return out


# ---------------------------------------------------------------------------
# Page sections
# ---------------------------------------------------------------------------
@dataclass
class Section:
    id: str
    title: str
    body: Sequence[str]

    def html(self) -> str:
        return f'<section id="{esc(self.id)}"><h2>{esc(self.title)}</h2>' + "".join(self.body) + "</section>"


def section(id_: str, title: str, body: Sequence[str]) -> Section:
    return Section(id_, title, body)


def para(text: str) -> Html:
    return Html(f"<p>{esc(text)}</p>")


IDEA = (
    "D2C trains a diffusion model on a small, well-chosen subset of a dataset. Select: every training image gets a "
    "diffusion difficulty score — the denoising loss of a frozen, pretrained class-conditional model, averaged over a "
    "fixed set of timesteps — and within each class the images are ranked easiest to hardest; interval sampling keeps "
    "ranks 0, k, 2k, …, (n−1)k, so the subset leans towards learnable images but still spans the class. Attach: each "
    "kept image carries a text embedding of its class and visual features from a frozen vision encoder, and the "
    "model is trained with the diffusion loss plus λ × a feature-alignment loss (L = L_diff + λ·L_proj)."
)


def condense_summary(name: str, run: CondenseRun) -> list[str]:
    m, cfg = run.manifest or {}, run.config
    sel, score, data = cfg.get("select", {}), cfg.get("score", {}), cfg.get("data", {})
    rows = m.get("rows", {})
    facts = [
        ("run directory", str(run.path)),
        ("selection method", f"{run.method()} (select.method)"),
        ("budget", f"{fmt_num(sel.get('budget'))} images (select.budget), n per class = budget / classes"),
        ("interval k", f"{fmt_num(sel.get('k'))} (select.k), shortfall policy {sel.get('shortfall', '?')}"),
        ("scorer", str(m.get("scorer", score.get("scorer", "?")))),
        ("scores", str(run.scores_dir) + ("" if run.scores_dir == run.path / "scores" else " (reused: score.reuse_from)")),
        ("score", f"mean over T={fmt_num(score.get('num_timesteps'))} stratified timesteps of ‖ε − ε_θ(x_t, t, c)‖², "
                  f"noise seed {fmt_num(score.get('seed'))}"),
        ("data", f"data.source={data.get('source', '?')}, split={data.get('split', '?')}, {fmt_num(data.get('image_size'))} px, "
                 f"{fmt_num(data.get('channels'))} channel(s), preprocess={data.get('preprocess', '?')}"),
        ("images", " · ".join(f"{k} {fmt_num(rows.get(k))}" for k in ("listed", "rejected", "scored", "selected"))),
        ("clamped classes", ", ".join(map(str, m.get("clamped_classes", []))) or "none"),
    ]
    out = [Html(f"<h3>{esc(name)}</h3>"), table(["", ""], facts, "facts")]
    if run.rejects is not None and len(run.rejects):
        counts = run.rejects["reason"].value_counts().head(MAX_REJECT_REASONS)
        out.append(para(f"{len(run.rejects):,} rejected inputs ({run.scores_dir.parent / 'rejects'}); most common reasons: "
                     + "; ".join(f"{r} ({c:,})" for r, c in counts.items())))
    for note in m.get("notes", []) or []:
        out.append(para(f"note: {note}"))
    return out


def class_table(run: CondenseRun, labels: Sequence[int], ranked: Mapping[int, pd.DataFrame], selected: Mapping[int, pd.DataFrame]) -> Html:
    names = run.class_names()
    per = {int(r["label"]): r for r in (run.manifest or {}).get("per_class", [])}
    rows = []
    for c in labels:
        r, sc, se = per.get(c, {}), ranked.get(c), selected.get(c)
        s = sc["score"] if sc is not None and len(sc) else pd.Series(dtype=float)
        span = "—"
        if se is not None and len(se) and sc is not None and len(sc):
            span = f"{(se['rank'].max() - se['rank'].min() + 1) / len(sc):.0%}"
        k, ku = r.get("k"), r.get("k_used")
        rows.append([
            c, names[c] if c < len(names) else c, fmt_num(len(sc) if sc is not None else r.get("size")),
            f"{fmt_num(len(se) if se is not None else r.get('selected'))} / {fmt_num(r.get('requested'))}",
            "—" if k is None else (fmt_num(k) if ku in (None, k) else f"{fmt_num(k)} → {fmt_num(ku)}"),
            f"{fmt_num(s.mean())} ± {fmt_num(s.std())}" if len(s) else "—",
            f"{fmt_num(s.min())} – {fmt_num(s.max())}" if len(s) else "—",
            span, r.get("note", "") or "",
        ])
    return table(["label", "class", "images scored", "selected / n", "k (→ clamped)", "score mean ± std", "score range",
                  "span of ranked list", "note"], rows)


def condense_section_body(name: str, run: CondenseRun) -> list[str]:
    out = condense_summary(name, run)
    names = run.class_names()
    if run.scores is None and run.selection is None:
        out.append(missing_box([f"{run.path}: neither scores/ nor selection/ — nothing to plot"]))
        return out
    base = run.scores if run.scores is not None else run.selection
    labels = shown_classes(base["label"])
    total = base["label"].nunique()
    shown_note = "" if total <= MAX_CLASSES_SHOWN else f" Showing {len(labels)} of {total} classes (evenly spaced labels)."
    selected = selected_by_class(run.selection, labels)
    ranked = ranked_by_class(run.scores, labels) if run.scores is not None else {}
    score = run.config.get("score", {})
    how = (f"score = mean over T={fmt_num(score.get('num_timesteps'))} timesteps of the scorer's ε-prediction error "
           f"(scorer {(run.manifest or {}).get('scorer', score.get('scorer', '?'))}, noise seed {fmt_num(score.get('seed'))})")
    if ranked:
        n_sel = sum(len(s) for s in selected.values())
        out.append(figure(plots.plot_score_distribution(ranked, selected, names), f"score distribution — {name}",
                          f"Per-class distribution of difficulty scores (grey violins: all {sum(len(r) for r in ranked.values()):,} "
                          f"scored images of the classes shown; {how}). Red dots: the {n_sel:,} images selected by "
                          f"select.method={run.method()}.{shown_note}"))
        out.append(figure(plots.plot_ranked_scores(ranked, selected, names, per_class_notes(run)), f"ranked scores — {name}",
                          "Each class's images sorted ascending by (score, image_id) — the order interval sampling walks — "
                          "with the selected ranks marked in red and their span shaded. For select.method=d2c the marks sit at "
                          "ranks 0, k, 2k, …, (n−1)k (k clamped per class where the class is too short; titles say "
                          f"'selected of class size, k'). Source: {run.scores_dir} and {run.path / 'selection' / 'selection.parquet'}.{shown_note}"))
    else:
        out.append(missing_box([f"{run.scores_dir}: no scores — the score distributions and the easiest/hardest grids are left out"]))
    out.append(image_grids(name, run, labels, ranked, selected))
    out.append(class_table(run, labels, ranked, selected))
    return out


def image_grids(name: str, run: CondenseRun, labels: Sequence[int], ranked: Mapping[int, pd.DataFrame], selected: Mapping[int, pd.DataFrame]) -> Html:
    """Easiest / selected / hardest images of each shown class, side by side."""
    picks: dict[str, dict[int, list[str]]] = {}
    if ranked:
        picks[f"easiest {GRID_COLS} (ranks 0–{GRID_COLS - 1})"] = {c: ranked[c]["image_id"].head(GRID_COLS).tolist() for c in labels}
    if selected:
        picks[f"selected ({run.method()}): up to {GRID_COLS}, evenly spaced by rank"] = {
            c: selected[c]["image_id"].iloc[evenly(len(selected[c]), GRID_COLS)].tolist() for c in labels}
    if ranked:
        picks[f"hardest {GRID_COLS} (highest scores)"] = {c: ranked[c]["image_id"].tail(GRID_COLS).tolist() for c in labels}
    if not picks:
        return missing_box([f"{run.path}: no scores or selection — no image grids"])
    data_cfg = run.config.get("data", {})
    ids = [i for by_class in picks.values() for c in labels for i in by_class[c]]
    images, notes = load_images(data_cfg, ids)
    if not images:
        return missing_box([f"{run.path}: image grids left out — " + "; ".join(notes[:3] or ["no images loaded"])])
    panels = {title: plots.montage([[images.get(i) for i in by_class[c]] for c in labels], GRID_COLS) for title, by_class in picks.items()}
    names = run.class_names()
    colors = [plots.EASY if t.startswith("easiest") else plots.HARD if t.startswith("hardest") else plots.SELECTED for t in panels]
    cap = (f"One row per class. Left: the {GRID_COLS} lowest difficulty scores; middle: up to {GRID_COLS} of the selected images, evenly "
           f"spaced by rank; right: the {GRID_COLS} highest scores. Pixels from data.source={data_cfg.get('source', '?')} "
           f"(Fashion-MNIST at its native 28 px; other sources after the run's preprocessing).")
    if notes:
        cap += f" {len(notes)} image(s) could not be loaded and are blank: " + "; ".join(notes[:3])
    tile = next(iter(images.values())).shape[1] + plots.TILE_GAP_PX
    return figure(plots.plot_montages(panels, [names[c] if c < len(names) else str(c) for c in labels], tile, colors),
                  f"image grids — {name}", cap)


def coverage_figure(runs: Sequence[tuple[str, CondenseRun]]) -> Optional[Html]:
    with_sel = [(n, r) for n, r in runs if r.selection is not None]
    if not with_sel:
        return None
    first = with_sel[0][1]
    labels = shown_classes(first.selection["label"])
    data = {}
    for name, run in with_sel:
        ranks = {c: g["rank"].to_numpy() for c, g in run.selection.groupby("label")}
        label = name if name == run.method() else f"{name} ({run.method()})"
        data[label] = (ranks, run.class_sizes())
    methods = ", ".join(f"{n}: {r.method()}" for n, r in with_sel)
    return figure(
        plots.plot_coverage(data, first.class_names(), labels), "selection coverage",
        "Where the selected images sit in each class's ranked list (ticks; x = rank ÷ (class size − 1), 0% = easiest). "
        f"Interval sampling covers the ranked list evenly up to rank (n−1)k; random scatters, min/max cluster at one end. "
        f"Right: images selected of the class and the share of the list between the first and last selected rank. ({methods})")


def select_section(inp: Inputs) -> Optional[Section]:
    if not inp.condense:
        return None
    body: list[str] = [para("Select = score every image, rank each class, take every k-th rank.")]
    cov = coverage_figure(inp.condense)
    if cov:
        body.append(cov)
    for name, run in inp.condense:
        body += condense_section_body(name, run)
    return section("select", "Select: difficulty scores and interval sampling", body)


def _model_text(cfg: Mapping[str, Any]) -> str:
    model, tr = cfg.get("model", {}), cfg.get("train", {})
    if not model:
        return "—"
    repa = "on" if model.get("use_visual") and tr.get("proj_coeff", 0) else "off"
    return (f"{model.get('arch', '?')} {fmt_num(model.get('hidden_size'))}×{fmt_num(model.get('depth'))}, "
            f"text {'on' if model.get('use_text') else 'off'}, REPA {repa}")


def _optimiser_text(tr: Mapping[str, Any]) -> str:
    if not tr:
        return "—"
    return (f"batch {fmt_num(tr.get('batch_size'))}, lr {fmt_num(tr.get('lr'))}, {tr.get('precision', '?')}, "
            f"EMA {fmt_num(tr.get('ema_decay'))}")


def train_facts(v: Variant) -> list[Any]:
    """One row of the training table; the config comes from the latest checkpoint's model.json."""
    t = v.train
    log, cfg = t.log, (t.config or {})
    tr = cfg.get("train", {})
    tail = log.tail(TAIL_POINTS) if log is not None else None

    def last(col: str) -> str:
        return fmt_num(tail[col].median()) if tail is not None and col in tail and tail[col].notna().any() else "—"

    steps = f"{fmt_num(log['step'].min())} – {fmt_num(log['step'].max())} ({len(log):,} logged)" if log is not None and len(log) else "—"
    return [v.name, str(t.path), steps, last("loss"), last("loss_diff"), last("loss_proj"), last("images_per_s"),
            fmt_num(tr.get("proj_coeff")) if tr else "—", _model_text(cfg), _optimiser_text(tr)]


def train_section(inp: Inputs) -> Optional[Section]:
    trained = [v for v in inp.variants if v.train is not None]
    if not trained:
        return None
    body = [table(["model", "TRAIN", "steps", f"loss (median of last {TAIL_POINTS})", "L_diff", "L_proj", "images/s",
                   "λ", "model", "optimiser"], [train_facts(v) for v in trained])]
    curves = {v.name: v.train.log for v in trained if v.train.log is not None and len(v.train.log)}
    terms = [t for t in CURVE_TERMS if any(t in df and df[t].notna().any() and (df[t] != 0).any() for df in curves.values())]
    if curves and terms:
        every = sorted({fmt_num(v.train.config["train"].get("log_every")) for v in trained if v.train.config and "train" in v.train.config})
        body.append(figure(
            plots.plot_training_curves(curves, terms), "training curves",
            "Loss terms of each model against the optimizer step, as logged to TRAIN/metrics.jsonl by rank 0"
            + (f" every {', '.join(every)} steps" if every else "") + " (one mini-batch each). Thin: the logged values; thick: rolling median "
            f"over {plots.SMOOTH_POINTS} logged points. loss = loss_diff + λ·loss_proj (+ the VLB term with a learned σ); loss_proj is "
            "minus the mean cosine similarity to the vision features, so it falls towards −1. A zero loss_proj (no Attach) is not drawn."))
    else:
        body.append(missing_box(["no training log with loss terms — no curves"]))
    return section("train", "Train: loss curves", body)


def eval_value(run: EvalRun, keys: Sequence[str]) -> tuple[Optional[str], Any]:
    """A metrics.json field by any of its names: a top-level entry (a dict too), else a nested one."""
    top = run.metrics or {}
    for k in keys:
        if k in top:
            return k, top[k]
    return lookup(run.visible, keys)


def summarize(val: Any) -> str:
    """A value for a table cell; a dict (reference, checkpoint, …) by its telling fields."""
    if isinstance(val, Mapping):
        parts = [f"{k} {fmt_value(val[k])}" for k in SUMMARY_FIELDS if val.get(k) not in (None, "", [], {})]
        return ", ".join(parts) if parts else fmt_value(val)
    return fmt_value(val)


def _metric_cell(run: EvalRun, keys: Sequence[str]) -> str:
    key, val = eval_value(run, keys)
    if key is None:
        return "—"
    if key.rsplit(".", 1)[-1] in ("kid_mean", "kid"):
        _, std = eval_value(run, ("kid_std",))
        if std is not None:
            return f"{fmt_num(val)} ± {fmt_num(std)}"
    return summarize(val)


def _provenance_cell(run: EvalRun, keys: Sequence[str], required: bool) -> Html:
    key, val = eval_value(run, keys)
    if key is None and keys == N_KEYS and run.num_samples_file is not None:
        return Html(esc(f"{run.num_samples_file:,} (images in samples.npz)"))
    if key is None:
        return Html('<span class="bad">not recorded</span>' if required else "—")
    return Html(esc(summarize(val)))


def consumed_keys(run: EvalRun) -> set[str]:
    """Flattened keys already shown by the metric and provenance rows (a dict's fields included)."""
    used = set()
    for keys in [k for _, k, _ in METRICS] + [k for _, k, _ in PROVENANCE] + [("kid_std",)]:
        key, _ = eval_value(run, keys)
        if key:
            used |= {k for k in run.flat if k == key or k.startswith(key + ".")}
    return used


def is_timing(key: str, value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and bool(TIMING_KEY_RE.search(key)) and not key.endswith(RATE_SUFFIX))


def eval_timings(flat: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in flat.items() if is_timing(k, v)}


def how_produced(v: Variant) -> str:
    """One sentence per model: what was sampled, how, and against what."""

    def get(keys: Sequence[str]) -> Any:
        return eval_value(v.eval, keys)[1]

    n = get(N_KEYS) or v.eval.num_samples_file
    ckpt = get(CHECKPOINT_KEYS)
    source = f" from {summarize(ckpt)}" if ckpt else ""
    ref = get(REFERENCE_KEYS)
    return (f"{v.name}: {fmt_num(n)} samples{source}; sampler {get(SAMPLER_KEYS) or '(not recorded)'} in "
            f"{fmt_num(get(STEPS_KEYS))} steps, CFG scale {fmt_num(get(CFG_KEYS))}, seed {fmt_num(get(('seed',)))}; compared against "
            f"reference {summarize(ref) if ref is not None else '(not recorded)'} ({fmt_num(get(REFERENCE_N_KEYS))} images). "
            f"Source: {v.eval.path / 'metrics.json'}.")


def metric_definitions(runs: Sequence[EvalRun]) -> str:
    """How each shown metric is computed: the producer's own words (metrics.json ``how``) where given."""
    out = []
    for name, keys, default in METRICS:
        found = [(r, eval_value(r, keys)[0]) for r in runs]
        found = [(r, k) for r, k in found if k]
        if not found:
            continue
        hows = [((r.metrics or {}).get("how") or {}).get(k) for r, k in found]
        out.append(f"{name}: {next((h for h in hows if h), default)}.")
    return " ".join(out)


def not_computed_notes(evals: Sequence[Variant]) -> list[str]:
    reasons: dict[str, list[str]] = {}
    for v in evals:
        for field_name, why in ((v.eval.metrics or {}).get("not_computed") or {}).items():
            reasons.setdefault(str(why), [])
            if field_name not in reasons[str(why)]:
                reasons[str(why)].append(field_name)
    return [f"not computed: {', '.join(fields)} — {why}" for why, fields in reasons.items()]


def metrics_table(runs: Sequence[Variant]) -> Html:
    """Metrics (rows) × models (columns); how they were produced is :func:`provenance_table`."""
    header = ["", *[v.name for v in runs]]
    rows: list[list[Any]] = []
    for name, keys, _ in METRICS:
        cells = [_metric_cell(v.eval, keys) for v in runs]
        if any(c != "—" for c in cells):
            rows.append([Html(f"<b>{esc(name)}</b>"), *cells])
    return table(header, rows, "metrics")


def provenance_table(runs: Sequence[Variant]) -> Html:
    """The provenance rows (sampler, steps, N, reference, …) × models, then every further
    metrics.json field (fid_bootstrap.*, sampling.*, metric_settings.*, …) as recorded."""
    header = ["", *[v.name for v in runs]]
    rows: list[list[Any]] = []
    for name, keys, required in PROVENANCE:
        cells = [_provenance_cell(v.eval, keys, required) for v in runs]
        if required or any(c != "—" for c in cells):
            rows.append([name, *cells])
    shown = set().union(*(consumed_keys(v.eval) for v in runs))
    other = sorted({k for v in runs for k, val in v.eval.visible.items() if k not in shown and not is_timing(k, val)})
    for k in other:
        rows.append([Html(f"<code>{esc(k)}</code>"), *[fmt_value(v.eval.flat[k]) if k in v.eval.flat else "—" for v in runs]])
    return table(header, rows, "metrics provenance")


def results_section(inp: Inputs) -> Optional[Section]:
    """The metrics, the samples, and — folded away — how every number was produced."""
    evals = [v for v in inp.variants if v.eval is not None]
    if not evals:
        return None
    body: list[str] = []
    with_metrics = [v for v in evals if v.eval.metrics]
    if with_metrics:
        body.append(metrics_table(with_metrics))
        body.append(para(metric_definitions([v.eval for v in with_metrics]) + " ↓ lower is better, ↑ higher is better."))
        body += [para(n) for n in not_computed_notes(with_metrics)]
    body.append(samples_figure(evals))
    if with_metrics:
        # The provenance rows (dozens with fid_bootstrap.*, sampling.*, metric_settings.*) are folded so the numbers and pictures lead.
        prov = [Html("<ul class=\"how\">" + "".join(f"<li>{esc(how_produced(v))}</li>" for v in with_metrics) + "</ul>"),
                provenance_table(with_metrics),
                para("Rows in code font are further fields of metrics.json, shown as recorded.")]
        for v in with_metrics:
            if isinstance(v.eval.metrics.get("config"), Mapping):
                prov.append(details(f"evaluation config of {v.name} ({v.eval.path / 'metrics.json'})", v.eval.metrics["config"]))
        body.append(fold("How the numbers were produced: sampler, steps, N, reference, checkpoint and every further "
                         "metrics.json field", prov))
    return section("results", "Results: metrics and samples", body)


def samples_figure(evals: Sequence[Variant]) -> Html:
    names_src = next((v.condense.class_names() for v in evals if v.condense is not None), None)
    labels_all = sorted({int(x) for v in evals if v.eval.sample_labels is not None for x in np.unique(v.eval.sample_labels)})
    classes = shown_classes(labels_all) if labels_all else []
    panels, colors, missing, tile = {}, [], [], 0
    for j, v in enumerate(evals):
        rows = load_sample_rows(v.eval, classes) if v.eval.num_samples_file else []
        if not rows or not any(rows):
            missing.append(f"{v.name}: no samples.npz")
            continue
        sampler = eval_value(v.eval, SAMPLER_KEYS)[1]
        steps = eval_value(v.eval, STEPS_KEYS)[1]
        title = f"{v.name}\n{sampler or 'sampler not recorded'}, {fmt_num(steps)} steps, N={v.eval.num_samples_file:,}"
        panels[title] = plots.montage(rows, SAMPLE_COLS)
        tile = max(tile, next(im for row in rows for im in row).shape[1] + plots.TILE_GAP_PX)
        colors.append(plots.color(j))
    if not panels:
        return missing_box(missing or ["no samples"])
    names = names_src or [str(c) for c in range(max(classes, default=-1) + 1)]
    row_labels = [names[c] if c < len(names) else str(c) for c in classes] if classes and all(v.eval.sample_labels is not None for v in evals) else []
    cap = (f"Samples of each model side by side: the first (up to) {SAMPLE_COLS} of each class in EVAL/samples.npz, by its arr_1 labels"
           if row_labels else
           f"The first (up to) {SAMPLE_COLS * SAMPLE_ROWS_UNLABELLED} samples of each model in EVAL/samples.npz (no labels stored)")
    cap += ". Sampler, steps and N (images in samples.npz) in each title; the metrics table says what they were compared against."
    return Html(figure(plots.plot_montages(panels, row_labels, tile, colors), "samples", cap) + missing_box(missing))


# ---------------------------------------------------------------------------
# The verdict: what a demo run shows, first on the page
# ---------------------------------------------------------------------------
#: The multi-seed fidelity study (benchmarks/fidelity.py) in the repository this file belongs to;
#: a module constant so that a test can point it elsewhere.
STUDY_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fidelity"
STUDY_README = "README.md"
STUDY_SUMMARY = "summary.csv"
STUDY_COLUMNS = ("variant", "seeds", "fid_mean", "fid_std", "kid_mean", "kid_std")
#: Where the report points readers (its own path relative to the repository is not known).
STUDY_TEXT = "The multi-seed study: benchmarks/results/fidelity/README.md in the d2c repository"
#: The overview sample grid d2c evaluate writes (d2c.eval.grid), relative to EVAL.
GRID_OVERVIEW = "grids/overview.png"
#: Longest side, in pixels, of an embedded sample grid (larger ones — many classes, big images — are shrunk).
MAX_GRID_PX = 1024
#: What one demo run can and cannot show.
LIMITS = ("One demo run is one training seed per variant. Its bootstrap intervals cover the noise of sampling (which "
          "noise seeds and labels were drawn) and of the reference images, not training randomness: retraining with "
          "another seed moves every FID too. Whether D2C's lead holds across training seeds is what the multi-seed study "
          "measures.")


def display_name(name: str) -> str:
    """A variant's human-readable name (d2c.variants.LABELS), else its own."""
    from d2c.variants import LABELS  # imported here: it loads the config models, which the rest of the page does not need

    return LABELS.get(name, name)


def comparison_files(demo: Demo, missing: list[str]) -> list[str]:
    """demo.json's comparison files: ``comparisons`` (every pair), else the older single ``comparison``."""
    data = demo.data
    if "comparisons" in data:
        names = data.get("comparisons") or []
        if not isinstance(names, list):
            missing.append(f"{demo.path / 'demo.json'}: 'comparisons' is not a list of file names")
            return []
        return [str(n) for n in names if n]
    return [str(data["comparison"])] if data.get("comparison") else []


def _signed(x: Any) -> str:
    """A difference to two decimals with its sign, as d2c compare's verdict writes it."""
    try:
        return f"{float(x):+.2f}"
    except (TypeError, ValueError):
        return "—"


def _level(iv: Mapping[str, Any]) -> str:
    level = iv.get("level")
    return f"{round(100 * float(level))} %" if isinstance(level, (int, float)) else "?"


def comparison_row(path: Path, result: Any, missing: list[str]) -> Optional[list[Any]]:
    """One row of the comparisons table from a ``d2c compare`` result (None, noted, when malformed)."""
    iv = result.get("fid_difference") if isinstance(result, Mapping) else None
    if not isinstance(iv, Mapping) or any(k not in iv for k in ("point", "low", "high")):
        missing.append(f"{path}: no fid_difference with point, low and high")
        return None
    a, b = result.get("a") or {}, result.get("b") or {}
    name_a, name_b = display_name(str(a.get("name", "a"))), display_name(str(b.get("name", "b")))
    share = iv.get("share_a_better")
    pairing = "paired" if iv.get("paired") else "unpaired"
    return [f"{name_a} − {name_b}", _signed(iv["point"]),
            f"[{_signed(iv['low'])}, {_signed(iv['high'])}]",
            f"{round(100 * share)} %" if isinstance(share, (int, float)) else "—",
            str(result.get("verdict", "—")),
            f"{fmt_num(iv.get('rounds'))} {pairing} rounds over {iv.get('resampled', '?')}, std {fmt_num(iv.get('std'))}; {path.name}"]


def comparisons_table(demo: Demo, missing: list[str]) -> list[Html]:
    """The paired FID differences of every comparison file of the demo, one row each."""
    files = comparison_files(demo, missing)
    if not files:
        return [para("No comparison files in demo.json (eval.bootstrap_rounds=0, or a demo from before d2c compare): "
                     "the FID gaps above have no interval.")]
    rows, levels, how = [], set(), ""
    for name in files:
        result = read_json(demo.path / name, missing)
        row = comparison_row(demo.path / name, result, missing) if result is not None else None
        if row is not None:
            rows.append(row)
            levels.add(_level(result["fid_difference"]))
            how = how or str(result.get("how", ""))
    if not rows:
        return []
    level = levels.pop() if len(levels) == 1 else "level in each row's file"
    out = [table(["a − b", "ΔFID = FID(a) − FID(b)", f"{level} interval of ΔFID", "a lower in … of rounds", "verdict",
                  "bootstrap (d2c compare)"], rows, "verdict")]
    out.append(para("Is the FID gap real? ΔFID < 0: a has the lower (better) FID. An interval wholly below or above 0 "
                    "resolves the gap at this N; one that spans 0 does not. " + how))
    return out


def fid_interval_text(run: EvalRun) -> str:
    """The evaluation's own FID bootstrap interval (metrics.json fid_bootstrap), or — when absent."""
    boot = (run.metrics or {}).get("fid_bootstrap")
    if not isinstance(boot, Mapping) or "low" not in boot or "high" not in boot:
        return "—"
    return f"[{fmt_num(boot['low'])}, {fmt_num(boot['high'])}] ({_level(boot)})"


def variant_scores_table(variants: Sequence[Variant]) -> Html:
    """FID (with its interval), KID and N of each variant, formatted as in the metrics table."""
    rows = []
    for v in variants:
        ev = v.eval
        if ev is None or not ev.metrics:
            rows.append([display_name(v.name), "—", "—", "—", "no metrics.json"])
            continue
        n = eval_value(ev, N_KEYS)[1] or ev.num_samples_file
        rows.append([display_name(v.name), _metric_cell(ev, METRICS[0][1]), fid_interval_text(ev), _metric_cell(ev, METRICS[1][1]),
                     fmt_num(n)])
    return table(["variant", METRICS[0][0], "FID interval (samples and reference resampled)", f"{METRICS[1][0]} (mean ± std)",
                  "N samples"], rows, "verdict")


def grid_png(run: EvalRun) -> tuple[Optional[bytes], str]:
    """An evaluation's overview sample grid as PNG bytes, and where it came from.

    EVAL/grids/overview.png as d2c evaluate wrote it (metrics.json files.grids names it); for an
    evaluation without one, a grid drawn from samples.npz; ``(None, why)`` when neither exists.
    """
    recorded = [g for g in ((run.metrics or {}).get("files") or {}).get("grids") or [] if str(g).endswith("overview.png")]
    path = run.path / (recorded[0] if recorded else GRID_OVERVIEW)
    if path.is_file():
        try:
            return plots.fit_png(path.read_bytes(), MAX_GRID_PX), str(path)
        except OSError as err:
            return None, f"{path}: unreadable ({err})"
    if run.num_samples_file:
        labels = run.sample_labels
        rows = load_sample_rows(run, shown_classes(np.unique(labels)) if labels is not None else [])
        if any(rows):
            return (plots.fit_png(plots.array_png(plots.montage(rows, SAMPLE_COLS)), MAX_GRID_PX),
                    f"{run.path / 'samples.npz'} (no {GRID_OVERVIEW}: drawn from the samples)")
    return None, f"{path}: not found, and no samples.npz to draw from"


def sample_grids(variants: Sequence[Variant]) -> Html:
    """The variants' sample grids side by side."""
    cells, missing = [], []
    for v in variants:
        if v.eval is None:
            missing.append(f"{v.name}: no evaluation")
            continue
        png, src = grid_png(v.eval)
        if png is None:
            missing.append(f"{v.name}: {src}")
            continue
        alt = f"sample grid — {v.name}"
        cells.append(f'<figure><img src="{plots.png_data_uri(png)}" alt="{esc(alt)}"><figcaption><b>{esc(display_name(v.name))}</b>'
                     f" · FID {esc(_metric_cell(v.eval, METRICS[0][1]) if v.eval.metrics else '—')}<br>{esc(src)}</figcaption></figure>")
    if not cells:
        return missing_box(missing or ["no sample grids"])
    # Equal eval.seed and N draw the same labels and noise in the same order (d2c.eval.compare's pairing), so cell i matches across grids.
    drawn = {(eval_value(v.eval, ("seed",))[1], eval_value(v.eval, N_KEYS)[1]) for v in variants if v.eval is not None and v.eval.metrics}
    same = (" The variants share eval.seed and N, so the same cell of each grid started from the same noise and class label: "
            "the differences are the models'." if len(drawn) == 1 and None not in next(iter(drawn)) else "")
    cap = ("Samples of each variant side by side: EVAL/grids/overview.png as d2c evaluate wrote it, one row per class "
           "(the first eval.grid_per_class samples of each class)." + same)
    return Html(f'<div class="grids">{"".join(cells)}</div>' + para(cap) + missing_box(missing))


def study_summary() -> list[Html]:
    """Where the multi-seed study is, and its summary table when this repository holds one."""
    out = [para(STUDY_TEXT + ".")]
    summary = STUDY_DIR / STUDY_SUMMARY
    if not (STUDY_DIR / STUDY_README).is_file() or not summary.is_file():
        out.append(para(f"The study has not been run in this copy of the repository (no {STUDY_README} and {STUDY_SUMMARY} in "
                        f"{STUDY_DIR}); benchmarks/fidelity.py runs it."))
        return out
    try:
        df = pd.read_csv(summary)
    except (OSError, ValueError) as err:
        return out + [missing_box([f"{summary}: unreadable ({err})"])]
    absent = [c for c in STUDY_COLUMNS if c not in df]
    if absent:
        return out + [missing_box([f"{summary}: lacks column(s) {', '.join(absent)}"])]

    def pm(mean: Any, std: Any) -> str:
        return fmt_num(mean) + ("" if pd.isna(std) else f" ± {fmt_num(std)}")

    rows = [[display_name(str(r["variant"])), fmt_num(r["seeds"]), pm(r["fid_mean"], r["fid_std"]), pm(r["kid_mean"], r["kid_std"])]
            for _, r in df.iterrows()]
    out.append(table(["variant", "training seeds", "FID (mean ± std over seeds)", "KID (mean ± std over seeds)"], rows, "verdict"))
    out.append(para(f"From {summary}. The study runs its own regime (budget, training steps, N: its README says which): "
                    "compare its rows with each other, not number for number with this run's."))
    return out


def verdict_section(inp: Inputs) -> Optional[Section]:
    """A demo's opening: each variant's FID and KID, the paired FID differences, the sample grids
    side by side, what one run can and cannot show, and the multi-seed study."""
    if not inp.demos:
        return None
    body: list[str] = []
    for d in inp.demos:
        if len(inp.demos) > 1:
            body.append(Html(f"<h3>{esc(d.path)}</h3>"))
        if d.variants:
            body.append(variant_scores_table(d.variants))
        body += comparisons_table(d, inp.missing)
        body.append(sample_grids(d.variants))
    body.append(Html(f'<div class="idea"><b>What one run can show.</b> {esc(LIMITS)}</div>'))
    body += study_summary()
    return section("verdict", "Verdict: D2C against the baselines", body)


def collect_timings(inp: Inputs) -> list[tuple[str, str, float]]:
    """(source file, stage, seconds) from demo.json, manifests and metrics.json."""
    out = []
    for d in inp.demos:
        for k, s in flatten(d.data.get("timings_s") or {}).items():
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                out.append((str(d.path / "demo.json"), f"demo: {k}", float(s)))
    for name, run in inp.condense:
        for k, s in flatten((run.manifest or {}).get("timings_s") or {}).items():
            if isinstance(s, (int, float)) and not isinstance(s, bool):
                out.append((str(run.path / "manifest.json"), f"{name}: condense/{k}", float(s)))
    for v in inp.variants:
        if v.eval is not None:
            for k, s in eval_timings(v.eval.flat).items():
                out.append((str(v.eval.path / "metrics.json"), f"{v.name}: evaluate/{k}", s))
    return out


def timings_section(inp: Inputs) -> Optional[Section]:
    rows = collect_timings(inp)
    if not rows:
        if inp.demos or inp.condense:
            return section("timings", "Timings per stage", [missing_box(["no timings_s in demo.json or manifest.json"])])
        return None
    body = [table(["stage", "wall-clock", "seconds", "recorded in"], [[s, plots.fmt_duration(t), fmt_num(round(t, 2)), src] for src, s, t in rows])]
    bars = [(s, t) for _, s, t in rows if s.rsplit("/", 1)[-1].rsplit(".", 1)[-1] != "total"]
    if bars:
        body.append(figure(plots.plot_timings(bars), "timings",
                           "Wall-clock seconds per stage as recorded by the stages themselves (timings_s of demo.json and "
                           "RUN/manifest.json, *_s fields of metrics.json); totals are in the table only. A stage that reused "
                           "complete output from an earlier run records little or no time."))
    return section("timings", "Timings per stage", body)


def sweep_section(inp: Inputs) -> Optional[Section]:
    if not inp.sweeps:
        return None
    body: list[str] = []
    for s in inp.sweeps:
        if s.results is None:
            body.append(missing_box(s.missing))
            continue
        df = s.results.sort_values(["budget", "method", "k"], kind="stable", na_position="first")
        steps = sorted(df["steps"].dropna().unique()) if "steps" in df else []
        extra = [c for c in ("fid_samples", "num_samples", "sampler", "reference") if c in df]
        prov = "; ".join(f"{c}: {', '.join(map(fmt_value, sorted(df[c].dropna().unique())))}" for c in extra)
        if df["fid"].notna().any():
            body.append(figure(
                plots.plot_sweep(df), f"FID against k — {s.path}",
                f"FID of each trial against the interval k, one curve per data budget (mean over repeated trials), from {s.source}. "
                + (f"Each model trained {', '.join(fmt_num(x) for x in steps)} steps. " if steps else "")
                + (prov + ". " if prov else "")
                + "Methods without an interval (random, min, max) are dashed lines. The paper finds FID against k U-shaped: small k "
                  "keeps only easy images, large k trades learnability for diversity."))
        else:
            body.append(missing_box([f"{s.source}: no finished trial has a FID yet"]))
        cols = [c for c in df.columns if c != "trial_dir"] + (["trial_dir"] if "trial_dir" in df else [])
        body.append(table(cols, [[fmt_value(r[c]) for c in cols] for _, r in df.iterrows()]))
    return section("sweep", "Sweep: k against data budget", body)


def inputs_section(inp: Inputs) -> Section:
    body = [table(["path", "recognised as"], [[str(p), ", ".join(k) or "nothing"] for p, k in inp.sources])]
    if inp.variants:
        body.append(table(["model", "condense (RUN)", "train (TRAIN)", "evaluate (EVAL)"],
                          [[v.name, *[str(x.path) if x is not None else "—" for x in (v.condense, v.train, v.eval)]] for v in inp.variants]))
    for d in inp.demos:
        if d.data.get("config") is not None:
            body.append(details(f"demo config ({d.path / 'demo.json'})", d.data["config"]))
    for name, run in inp.condense:
        if run.manifest:
            body.append(details(f"condense config of {name} ({run.path / 'manifest.json'})", run.config))
            if run.manifest.get("versions"):
                body.append(details(f"package versions of {name}", run.manifest["versions"]))
    return section("inputs", "Inputs and provenance", body)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f7f9}
main{max-width:1260px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{margin:0 0 4px;font-size:26px} h2{margin:36px 0 10px;padding-top:12px;border-top:2px solid #e5e7eb;font-size:20px}
h3{margin:24px 0 8px;font-size:16px} .sub{color:#57606a;margin:0 0 12px}
.idea{background:#f3f6fb;border-left:4px solid #2e86ab;padding:10px 14px;margin:12px 0}
.banner{background:#fff8e6;border-left:4px solid #edae49;padding:8px 14px;margin:12px 0}
figure{margin:14px 0 22px} figure img{max-width:100%;height:auto;display:block;border:1px solid #eceef1}
figcaption{color:#57606a;font-size:12.5px;margin-top:6px;max-width:1100px}
table{border-collapse:collapse;margin:10px 0 16px;font-size:13px} th,td{border:1px solid #e1e4e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} table.facts thead{display:none} table.facts td:first-child{color:#57606a;white-space:nowrap}
table.metrics td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b42318;font-weight:600} .missing{background:#fdf2f2;border-left:4px solid #d1495b;padding:6px 14px;margin:10px 0;font-size:13px}
.missing ul{margin:4px 0;padding-left:18px} ul.how{font-size:13px;color:#333} code{font-size:12px}
details{margin:6px 0} pre{background:#f6f8fa;padding:8px;max-height:420px;overflow:auto;font-size:12px}
nav a{margin-right:14px;color:#2e86ab;text-decoration:none}
table.verdict td:not(:first-child){font-variant-numeric:tabular-nums}
.grids{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} .grids figure{flex:1 1 260px;max-width:400px;margin:8px 0}
.grids img{width:100%;image-rendering:pixelated} details>summary{cursor:pointer;color:#2e86ab}
"""


def render(inp: Inputs) -> str:
    """The whole page for the collected inputs."""
    verdict = verdict_section(inp)
    sections = [s for s in (results_section(inp), select_section(inp), train_section(inp), timings_section(inp), sweep_section(inp)) if s]
    sections.append(inputs_section(inp))
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title.split(":")[0])}</a>' for s in ([verdict] if verdict else []) + sections)
    head = [f"<h1>D2C report</h1><p class=\"sub\">Written {esc(_dt.datetime.now().isoformat(timespec='seconds'))} by "
            f"<code>d2c report</code> from {esc(', '.join(str(p) for p, _ in inp.sources))}</p>",
            f'<nav>{nav}</nav>']
    for d in inp.demos:
        names = ", ".join(v.name for v in inp.variants)
        quick = (" Quick mode: fewer steps and samples than the full demo, the same stages — numbers are for shape, not for citing."
                 if d.data.get("quick") else "")
        head.append(f'<div class="banner">d2c demo ({esc(d.path)}): the variants {esc(names)} were trained and evaluated '
                    f"the same way and differ only in how the training subset was chosen and attached.{esc(quick)}</div>")
    # A demo's page opens with its verdict; the method's idea and the list of missing parts follow it.
    if verdict:
        head.append(verdict.html())
    head.append(f'<div class="idea">{esc(IDEA)}</div>')
    head.append(missing_box(inp.missing))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>D2C report</title>"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><style>{CSS}</style></head>"
            f"<body><main>{''.join(head)}{''.join(s.html() for s in sections)}</main></body></html>")


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------
class ReportError(ValueError):
    """The paths given cannot make a report (they do not exist or hold no D2C artifacts)."""


def write_report(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the HTML report for ``paths`` to ``out`` (default ``<first path>/report.html``).

    Raises:
        ReportError: no paths, a path that does not exist, or no recognised artifacts at all.
    """
    if not paths:
        raise ReportError("give at least one run directory")
    absent = [str(p) for p in paths if not Path(p).is_dir()]
    if absent:
        raise ReportError(f"not a directory: {', '.join(absent)}")
    inp = collect(paths)
    if not any(kinds for _, kinds in inp.sources):
        raise ReportError(f"no D2C artifacts in {', '.join(map(str, paths))}: expected one of "
                          + ", ".join(sorted({m for ms in MARKERS.values() for m in ms})))
    out = Path(out) if out is not None else Path(paths[0]) / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(inp), encoding="utf-8")
    tmp.replace(out)
    return out


def run_report(paths: Sequence[str], out: str | None = None) -> int:
    """``d2c report PATH… [--out FILE]``: write the page, print its path; returns an exit code."""
    try:
        path = write_report(list(paths), out)
    except ReportError as err:
        print(f"d2c report: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
