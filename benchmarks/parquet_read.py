"""Reading a small Parquet table back with Ray Data: the v1 reader against Ray 2.60's v2 default.

d2c reads its own tables back between stages (scores, features, condensed sets: a few files
each), so the fixed cost of one ``ray.data.read_parquet`` matters more than its bandwidth. The
v2 reader lists files through a pool of footer-reading actors (32 by default), each one a new
worker process; v1 plans the read from the files' metadata in the reading process.

Every variant runs in its own process with a fresh local Ray (``num_cpus`` logical CPUs, no
dashboard), on the same table, round-robin ``--repeats`` times. Per variant: the first read
(nothing warm), the mean of the following reads, and the Ray worker processes started by the
reads (the ``worker-*.out`` logs of the session). Each read iterates the whole table as numpy
batches, as Ray Train's ingest does.

    python benchmarks/parquet_read.py                      # records to BENCHMARKS.md
    python benchmarks/parquet_read.py --rows 200 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]

#: variant name → (DataContext.use_datasource_v2, RAY_DATA_PARQUET_FOOTER_NUM_ACTORS or None = Ray's default)
VARIANTS = {
    "v1 (d2c's default)": (False, None),
    "v2, Ray's default footer actors": (True, None),
    "v2, 1 footer actor": (True, "1"),
}
#: Seconds to let a fresh Ray settle (prestarted workers) before the first read.
SETTLE_S = 3.0
#: Columns of the synthetic table: the shapes of a condensed set's latent (1 × 32 × 32).
LATENT_DIM = 1024


def write_table(root: Path, rows: int, files: int) -> Path:
    """``files`` Parquet files of ``rows`` rows in all: image_id, label, latent float32 [1024]."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for f, idx in enumerate(np.array_split(np.arange(rows), files)):
        lat = rng.standard_normal((len(idx), LATENT_DIM), dtype=np.float32)
        table = pa.table({
            "image_id": pa.array([f"img{i:06d}" for i in idx]),
            "label": pa.array(idx % 10, pa.int64()),
            "latent": pa.FixedSizeListArray.from_arrays(pa.array(lat.reshape(-1)), LATENT_DIM),
        })
        pq.write_table(table, root / f"part-{f:05d}.parquet")
    return root


def child(variant: str, data: str, reads: int, num_cpus: int) -> None:
    """One variant in this process: prints one JSON line with the read times."""
    use_v2, footer_actors = VARIANTS[variant]
    if footer_actors is not None:
        os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = footer_actors
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.use_datasource_v2 = use_v2
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    time.sleep(SETTLE_S)
    before = len(list(logs.glob("worker-*.out")))
    times, rows = [], 0
    for _ in range(reads):
        t0 = time.perf_counter()
        rows = sum(len(b["label"]) for b in ray.data.read_parquet(data).iter_batches(batch_format="numpy"))
        times.append(time.perf_counter() - t0)
    started = len(list(logs.glob("worker-*.out"))) - before
    ray.shutdown()
    print(json.dumps({"variant": variant, "rows": rows, "times": times, "workers_started": started}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--reads", type=int, default=4, help="reads per variant and repeat (the first is cold)")
    ap.add_argument("--repeats", type=int, default=2, help="round-robin passes over the variants")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of each local Ray (the demo's 4)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.data, args.reads, args.num_cpus)
        return 0
    data = write_table(Path(tempfile.mkdtemp(prefix="d2c-parquet-bench-")) / "table", args.rows, args.files)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--data", str(data), "--reads", str(args.reads),
                                  "--num-cpus", str(args.num_cpus)], capture_output=True, text=True, check=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
            results[variant].append(json.loads(line))
            print(f"{variant}: {results[variant][-1]}", flush=True)

    def mean(xs):
        return sum(xs) / len(xs)

    first = {v: mean([r["times"][0] for r in rs]) for v, rs in results.items()}
    warm = {v: mean([t for r in rs for t in r["times"][1:]]) for v, rs in results.items()}
    base = next(iter(VARIANTS))
    lines = [f"### {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}", "",
             f"`python benchmarks/parquet_read.py --rows {args.rows} --files {args.files} --reads {args.reads} "
             f"--repeats {args.repeats} --num-cpus {args.num_cpus}` — a {args.rows}-row table in {args.files} Parquet files "
             f"(image_id, label, float32 latent [{LATENT_DIM}]: a condensed set's shape), read whole as numpy batches; "
             f"each variant in its own process and local Ray ({args.num_cpus} logical CPUs, {os.cpu_count()} cores), "
             f"round-robin {args.repeats}×; means over the passes.", "",
             "| variant | first read (s) | later reads (s, mean) | later reads vs v1 | worker processes started |",
             "|---|---|---|---|---|"]
    for v, rs in results.items():
        lines.append(f"| {v} | {first[v]:.2f} | {warm[v]:.2f} | {warm[v] / warm[base]:.1f}× | "
                     f"{', '.join(str(r['workers_started']) for r in rs)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        heading = "## Reading a table back (Ray Data Parquet readers)"
        with open(ROOT / "BENCHMARKS.md", "a+") as f:
            f.seek(0)
            new_section = heading not in f.read()
            f.write(("\n" + heading + "\n" if new_section else "") + "\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
