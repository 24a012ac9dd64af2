"""Faults dealt from outside, as a preempted node or the kernel's OOM killer deals them.

Each case sends SIGKILL to a real process of a running job, lets the job finish (by Ray's own
retry, or by the user rerunning the same command), and compares every output with an
uninterrupted run of the same settings:

1. ``scoring-actor``: a Ray Data scoring actor, mid-pass; Ray restarts it and retries its batches.
2. ``condense-driver``: the ``d2c condense`` driver, mid-scoring; the rerun resumes from the
   finished score shards.
3. ``train-worker``: the Ray Train worker, mid-run; Ray Train restarts it from the last checkpoint.
4. ``train-driver``: the ``d2c train`` driver, mid-run; the rerun resumes from the last checkpoint.
5. ``sweep-driver``: the ``d2c sweep`` driver, mid-trial; the rerun restores the Tune experiment.

"Identical" means: scores, selection and condensed rows equal value for value; a training run at
the same final step, each step's metrics row written once, and model and EMA weights equal bit
for bit; a sweep's results table equal but for wall times and paths.

The drivers of cases 2, 4 and 5 are ``d2c`` processes that join this process's Ray by address,
as ``ray job submit`` drivers join a cluster, so the cluster outlives them. Processes are found
among this process's descendants only, never elsewhere on the machine.

    python benchmarks/faults.py --out runs/faults --results benchmarks/results/faults

``tests/test_faults.py`` runs the same cases at test size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBEDDED = ROOT / "configs" / "embedded.yaml"
#: How often a killer looks for its moment (the tiny test runs finish a score shard in ~50 ms).
POLL_S = 0.005
#: Longest a case waits for its moment to kill, or for a driver to finish.
WAIT_S = 600
#: Columns of the results table.
COLUMNS = ["case", "killed", "at", "recovered_by", "reference_s", "recover_s", "identical", "detail"]
#: Columns of a sweep's results table that differ between runs by nature.
SWEEP_RUN_COLUMNS = {"wall_time_s", "trial_dir", "time_this_iter_s", "time_total_s", "timestamp", "date", "pid", "hostname",
                     "node_ip", "trial_id", "experiment_tag", "logdir", "time_since_restore", "iterations_since_restore"}


@dataclass
class Outcome:
    """One fault case: what was killed, when, how the job recovered, and whether it came out identical."""

    case: str
    killed: str
    at: str
    recovered_by: str
    reference_s: float
    recover_s: float
    identical: bool
    detail: str = ""
    differences: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Finding and killing processes
# ----------------------------------------------------------------------------------------------


def descendants_named(needle: str, root: Optional[int] = None) -> list:
    """This process's (or ``root``'s) live descendants whose command line contains ``needle``
    (Ray names its worker processes ``ray::<actor class>...``)."""
    import psutil

    found = []
    for p in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            if needle in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def describe(cmdline: list[str]) -> str:
    """A process as a reader knows it: Ray's title (``ray::RayTrainWorker``) or ``d2c <command> driver``."""
    words = " ".join(cmdline).split()
    if words and words[0].startswith("ray::"):
        return words[0]
    if "app.cli" in words and words.index("app.cli") + 1 < len(words):
        return f"d2c {words[words.index('app.cli') + 1]} driver"
    return " ".join(words)[:80]


class Killer(threading.Thread):
    """Waits until ``ready()`` holds, then SIGKILLs the first process ``target()`` names, once.

    ``progress()`` describes the job's state at the kill (recorded in the outcome)."""

    def __init__(self, ready: Callable[[], bool], target: Callable[[], list], progress: Callable[[], str],
                 timeout_s: float = WAIT_S):
        super().__init__(daemon=True)
        self.ready, self.target, self.progress, self.timeout_s = ready, target, progress, timeout_s
        self.killed: Optional[str] = None
        self.at = ""
        self.when: Optional[float] = None
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._halt.is_set() and time.monotonic() < deadline:
            if self.ready():
                procs = self.target()
                if procs:
                    p = procs[0]
                    try:
                        name = describe(p.cmdline())
                        os.kill(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, OSError):
                        continue
                    self.when = time.monotonic()
                    self.killed, self.at = f"{name} (pid {p.pid})", self.progress()
                    return
            time.sleep(POLL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def ray_address() -> str:
    """The GCS address of this process's Ray, for drivers that join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def d2c_command(command: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "app.cli", command, "--config", str(EMBEDDED), *overrides]


def driver_env() -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS=ray_address(), PYTHONPATH=str(ROOT))
    env.pop("RAY_COLOR_PREFIX", None)
    return env


def start_driver(command: str, overrides: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(d2c_command(command, overrides), cwd=ROOT, env=driver_env(), stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT)


def run_driver(command: str, overrides: list[str], log: Path) -> None:
    """Run a ``d2c`` command to the end; raise with its log's tail if it fails."""
    proc = start_driver(command, overrides, log)
    try:
        rc = proc.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"`d2c {command}` did not finish in {WAIT_S} s; log {log}") from None
    if rc != 0:
        raise RuntimeError(f"`d2c {command}` exited {rc}:\n{log.read_text()[-3000:]}")


def kill_driver(command: str, overrides: list[str], log: Path, ready: Callable[[], bool],
                progress: Callable[[], str]) -> Killer:
    """Start a ``d2c`` driver and SIGKILL it once ``ready()``; wait for it to be gone."""
    proc = start_driver(command, overrides, log)
    import psutil

    killer = Killer(ready, lambda: [psutil.Process(proc.pid)] if proc.poll() is None else [], progress)
    killer.start()
    while killer.is_alive() and proc.poll() is None:
        time.sleep(POLL_S)
    killer.join(timeout=WAIT_S)
    proc.wait(timeout=WAIT_S)
    if killer.killed is None:
        raise RuntimeError(f"`d2c {command}` finished (exit {proc.returncode}) before the moment to kill it; "
                           f"make the case larger. Log {log}:\n{log.read_text()[-2000:]}")
    return killer


# ----------------------------------------------------------------------------------------------
# Progress and comparison
# ----------------------------------------------------------------------------------------------


def score_shards(run_dir: Path) -> int:
    d = run_dir / "scores"
    return len(list(d.glob("shard-*.parquet"))) if d.is_dir() else 0


def metric_steps(train_dir: Path) -> list[int]:
    """Steps of ``metrics.jsonl`` in file order (a torn last line is skipped)."""
    path = train_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (json.JSONDecodeError, KeyError):
            continue
    return steps


def table_of(path: Path, key: str):
    """A Parquet file or directory as an Arrow table sorted by ``key``, columns by name."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(path), format="parquet").to_table()
    return t.select(sorted(t.column_names)).sort_by(key)


def condense_differences(ref: Path, got: Path) -> list[str]:
    """Where two condense runs' scores, selection and condensed rows differ (empty: identical)."""
    diffs = []
    for name, key in (("scores", "image_id"), ("selection/selection.parquet", "image_id"), ("condensed", "image_id")):
        a, b = table_of(ref / name, key), table_of(got / name, key)
        if a.num_rows != b.num_rows:
            diffs.append(f"{name}: {b.num_rows} rows, reference {a.num_rows}")
        elif not a.equals(b):
            cols = [c for c in a.column_names if c not in b.column_names or not a.column(c).equals(b.column(c))]
            diffs.append(f"{name}: columns differ: {cols or 'schema'}")
    return diffs


def training_differences(ref: Path, got: Path, steps: int) -> list[str]:
    """Where two training runs differ: final step, metrics rows, model and EMA weights."""
    import torch

    from d2c.train.checkpoint import latest_checkpoint, load_checkpoint

    diffs = []
    logged = metric_steps(got)
    if sorted(logged) != list(range(1, steps + 1)) or len(set(logged)) != len(logged):
        dup = sorted({s for s in logged if logged.count(s) > 1})
        diffs.append(f"metrics.jsonl steps: {len(logged)} rows, duplicated {dup[:5]}, expected 1..{steps} once each")
    a, b = latest_checkpoint(ref / "checkpoints"), latest_checkpoint(got / "checkpoints")
    if b is None or a is None or a.name != b.name:
        return diffs + [f"latest checkpoint {b and b.name}, reference {a and a.name}"]
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    for part in ("model", "ema"):
        unequal = [k for k in sa[part] if not torch.equal(sa[part][k], sb[part][k])]
        if unequal:
            diffs.append(f"{part} weights differ in {len(unequal)} tensors ({unequal[:3]})")
    if sa["trainer"]["step"] != sb["trainer"]["step"]:
        diffs.append(f"trainer step {sb['trainer']['step']}, reference {sa['trainer']['step']}")
    return diffs


def sweep_differences(ref: Path, got: Path) -> list[str]:
    import pandas as pd

    from d2c.sweep import RESULTS_CSV

    a, b = pd.read_csv(ref / RESULTS_CSV), pd.read_csv(got / RESULTS_CSV)
    keep = [c for c in a.columns if c not in SWEEP_RUN_COLUMNS and not c.startswith("config/")]
    order = [c for c in ("k", "budget", "steps") if c in keep]
    a, b = a[keep].sort_values(order).reset_index(drop=True), b.reindex(columns=keep).sort_values(order).reset_index(drop=True)
    if len(a) != len(b):
        return [f"{RESULTS_CSV}: {len(b)} rows, reference {len(a)}"]
    return [f"{RESULTS_CSV}: column {c} differs" for c in keep if not a[c].equals(b[c])]


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """The settings every case runs with (the test's are tiny; the benchmark's larger)."""

    condense: list[str]      # overrides of configs/embedded.yaml for a condense run (without run_dir)
    train: list[str]         # extra overrides for a training run (model, steps, batch, checkpoints)
    train_steps: int
    kill_step: int           # a training case kills once metrics.jsonl reaches this step
    sweep: list[str]         # extra overrides for the sweep (grid, steps, evaluation)
    min_shards: int = 1      # a condense case kills once this many score shards are written


class Faults:
    """Runs the cases under ``out`` with ``sizes``; the reference runs are made once and shared."""

    def __init__(self, out: Path, sizes: Sizes):
        self.out, self.sizes = out, sizes
        self._times: dict[str, float] = {}

    # -- reference runs --------------------------------------------------------------------------
    def condense_overrides(self, run: Path) -> list[str]:
        return [*self.sizes.condense, f"run_dir={run}"]

    def train_overrides(self, train_dir: Path) -> list[str]:
        run = self.reference_condense()
        return [*self.sizes.condense, f"run_dir={run}", f"condensed={run / 'condensed'}", f"train_dir={train_dir}",
                *self.sizes.train, f"train.steps={self.sizes.train_steps}"]

    def sweep_overrides(self, sweep_dir: Path) -> list[str]:
        run = self.reference_condense()
        return [*self.sizes.condense, f"run_dir={sweep_dir.parent / 'unused'}", f"score.reuse_from={run}",
                f"sweep.dir={sweep_dir}", *self.sizes.sweep]

    def _cfg(self, overrides: list[str]):
        from d2c.config import load_config

        return load_config(EMBEDDED, overrides)

    def _timed(self, name: str, fn: Callable[[], Any], path: Path) -> Path:
        if name not in self._times:
            t0 = time.perf_counter()
            fn()
            self._times[name] = time.perf_counter() - t0
        return path

    def reference_condense(self) -> Path:
        from app.condense import run_condense

        run = self.out / "reference" / "condense"
        return self._timed("condense", lambda: run_condense(self._cfg(self.condense_overrides(run))), run)

    def reference_train(self) -> Path:
        from app.train import run_train

        tdir = self.out / "reference" / "train"
        return self._timed("train", lambda: run_train(self._cfg(self.train_overrides(tdir))), tdir)

    def reference_sweep(self) -> Path:
        from app.sweep import run_sweep

        sdir = self.out / "reference" / "sweep"
        return self._timed("sweep", lambda: run_sweep(self._cfg(self.sweep_overrides(sdir))), sdir)

    # -- 1 and 2: condense -------------------------------------------------------------------------
    def scoring_actor(self) -> Outcome:
        from app.condense import run_condense

        ref = self.reference_condense()
        run = self.out / "scoring-actor"
        total = self._num_shards()
        killer = Killer(lambda: self.sizes.min_shards <= score_shards(run) < total,
                        lambda: descendants_named("ScoreActor"), lambda: f"{score_shards(run)}/{total} score shards")
        killer.start()
        run_condense(self._cfg(self.condense_overrides(run)))
        done = time.monotonic()
        killer.stop()
        return self._outcome("scoring-actor", killer, "Ray (actor restart, batches retried)", "condense", done,
                             condense_differences(ref, run), "scores, selection, condensed")

    def condense_driver(self) -> Outcome:
        ref = self.reference_condense()
        run = self.out / "condense-driver"
        total = self._num_shards()
        overrides = self.condense_overrides(run)
        killer = kill_driver("condense", overrides, run.parent / "condense-driver.log",
                             lambda: self.sizes.min_shards <= score_shards(run) < total,
                             lambda: f"{score_shards(run)}/{total} score shards")
        run_driver("condense", overrides, run.parent / "condense-driver.log")
        return self._outcome("condense-driver", killer, "rerun (finished shards reused)", "condense", time.monotonic(),
                             condense_differences(ref, run), "scores, selection, condensed")

    def _num_shards(self) -> int:
        from d2c.data.source import list_source

        cfg = self._cfg(self.condense_overrides(self.out / "reference" / "condense"))
        return -(-len(list_source(cfg.data).rows) // cfg.score.shard_rows)

    # -- 3 and 4: train ----------------------------------------------------------------------------
    def _train_ready(self, tdir: Path) -> Callable[[], bool]:
        return lambda: any(s >= self.sizes.kill_step for s in metric_steps(tdir))

    def _train_at(self, tdir: Path) -> Callable[[], str]:
        return lambda: f"step {max(metric_steps(tdir), default=0)}/{self.sizes.train_steps}"

    def train_worker(self) -> Outcome:
        from app.train import run_train

        ref = self.reference_train()
        tdir = self.out / "train-worker"
        killer = Killer(self._train_ready(tdir), lambda: descendants_named("RayTrainWorker"), self._train_at(tdir))
        killer.start()
        run_train(self._cfg(self.train_overrides(tdir) + ["train.max_failures=1"]))
        done = time.monotonic()
        killer.stop()
        return self._outcome("train-worker", killer, "Ray Train (worker restart from the last checkpoint)", "train", done,
                             training_differences(ref, tdir, self.sizes.train_steps), "final step, metrics rows, weights")

    def train_driver(self) -> Outcome:
        ref = self.reference_train()
        tdir = self.out / "train-driver"
        overrides = self.train_overrides(tdir)
        killer = kill_driver("train", overrides, tdir.parent / "train-driver.log", self._train_ready(tdir),
                             self._train_at(tdir))
        run_driver("train", overrides, tdir.parent / "train-driver.log")
        return self._outcome("train-driver", killer, "rerun (resumed from the last checkpoint)", "train", time.monotonic(),
                             training_differences(ref, tdir, self.sizes.train_steps), "final step, metrics rows, weights")

    # -- 5: sweep ----------------------------------------------------------------------------------
    def sweep_driver(self) -> Outcome:
        ref = self.reference_sweep()
        sdir = self.out / "sweep-driver"
        overrides = self.sweep_overrides(sdir)

        def checkpoints() -> int:
            return len(list((sdir / "trials").glob("*/train/checkpoints/step-*")))

        killer = kill_driver("sweep", overrides, sdir.parent / "sweep-driver.log", lambda: checkpoints() >= 1,
                             lambda: f"{checkpoints()} trial checkpoints, "
                                     f"{len(list((sdir / 'trials').glob('*/eval-*/metrics.json')))} trials evaluated")
        run_driver("sweep", overrides, sdir.parent / "sweep-driver.log")
        return self._outcome("sweep-driver", killer, "rerun (Tune experiment restored)", "sweep", time.monotonic(),
                             sweep_differences(ref, sdir), "results table (all but wall times and paths)")

    def _outcome(self, case: str, killer: Killer, how: str, reference: str, done: float, diffs: list[str],
                 compared: str) -> Outcome:
        if killer.killed is None:
            diffs = [f"the job finished before the moment to kill ({killer.progress()}): make the case larger"] + diffs
        recover = round(done - killer.when, 1) if killer.when is not None else float("nan")
        return Outcome(case, killer.killed or "nothing", killer.at, how, round(self._times.get(reference, float("nan")), 1),
                       recover, not diffs and killer.killed is not None, f"compared {compared}", diffs)

    CASES = ("scoring_actor", "condense_driver", "train_worker", "train_driver", "sweep_driver")

    def run(self, cases: Optional[list[str]] = None) -> list[Outcome]:
        return [getattr(self, name)() for name in (cases or self.CASES)]


# ----------------------------------------------------------------------------------------------
# The benchmark's sizes and table
# ----------------------------------------------------------------------------------------------

#: A DiT small enough that training and sweeping stay in minutes, big enough to take real steps.
SMALL_MODEL = ["model.patch_size=8", "model.hidden_size=64", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1",
               "model.proj_hidden_dim=64"]

BENCHMARK_SIZES = Sizes(
    condense=["ray.num_cpus=4", "score.min_actors=2", "score.max_actors=2", "data.max_per_class=100", "select.budget=100",
              "select.k=8", "score.num_timesteps=4", "score.shard_rows=100", "score.scorer_train_steps=300",
              "train.ema_decay=0.99", "train.lr=0.001", *SMALL_MODEL],
    train=["train.batch_size=32", "train.log_every=1", "train.ckpt_every=20"],
    train_steps=120, kill_step=50,
    sweep=['sweep.grid={"select.k": [4, 8], "select.budget": [100]}', "sweep.fid_samples=50", "train.steps=40",
           "train.batch_size=16", "train.ckpt_every=20", "eval.steps=10", "eval.reference_size=100"],
    min_shards=3,
)


def write_results(outcomes: list[Outcome], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for o in outcomes:
            w.writerow(asdict(o) | {"detail": "; ".join(o.differences) or o.detail})
    lines = ["# Fault cases", "", "SIGKILL from outside to a real process of a running job; the job then finishes by "
             "Ray's retry or by rerunning the same command, and its outputs are compared with an uninterrupted run's.", "",
             "```", "python benchmarks/faults.py --out runs/faults --results benchmarks/results/faults", "```", "",
             "| case | killed | at | recovered by | uninterrupted run (s) | kill to finished outputs (s) | identical |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {o.case} | `{o.killed}` | {o.at} | {o.recovered_by} | {o.reference_s} | {o.recover_s} | "
              f"{'yes' if o.identical else 'NO: ' + '; '.join(o.differences)} |" for o in outcomes]
    lines += ["", "Recovery includes the rerun's start-up (imports, joining Ray, restoring). Times depend on what else "
              "the machine runs; compare them within one table only.", "", "Sizes: " + json.dumps(asdict(BENCHMARK_SIZES)), ""]
    (results / "README.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "faults", help="run directories (emptied first)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "faults")
    ap.add_argument("--cases", nargs="*", default=None, choices=Faults.CASES)
    args = ap.parse_args()
    import shutil

    from app.ray_session import init_ray, quiet_data_context
    from d2c.config import load_config

    shutil.rmtree(args.out, ignore_errors=True)
    cfg = load_config(EMBEDDED, BENCHMARK_SIZES.condense)
    init_ray(cfg)
    quiet_data_context(cfg=cfg)
    outcomes = Faults(args.out, BENCHMARK_SIZES).run(args.cases)
    for o in outcomes:
        print(f"[faults] {o.case}: killed {o.killed} at {o.at}; {o.recovered_by}; recovered in {o.recover_s} s; "
              f"identical: {o.identical} {o.differences or ''}", flush=True)
    write_results(outcomes, args.results)


if __name__ == "__main__":
    main()
