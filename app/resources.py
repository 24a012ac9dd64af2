"""Can a stage's resource plan be placed on the Ray it runs on? Refuse before any work if not.

A Ray actor or Train worker that asks for more than the cluster has waits forever, and so does a
Data task once the actors hold every CPU (``backpressured:tasks(ResourceBudget)``). Each stage
declares what it holds at once: its actor pools at their minimum size or its Train workers, plus
the CPUs of the Data tasks that feed them (decode, or one Parquet read task). On a Ray that d2c
started on this machine nothing can add nodes, so a plan that does not fit is refused with the
keys to change; on a cluster joined by address an autoscaler may add nodes, so it only warns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from d2c.config import ConfigError, D2CConfig

#: CPUs of the Parquet read task that feeds Ray Train (Ray Data's default for a read task).
READ_TASK_CPUS = 1.0


@dataclass(frozen=True)
class Demand:
    """``count`` copies of one actor or worker, each holding ``cpus`` and ``gpus``; ``keys`` names
    the settings of the count, the CPUs and the GPUs (for the message)."""

    what: str
    count: int
    cpus: float
    gpus: float
    keys: tuple[str, str, str]

    def key_text(self, gpu: bool = False) -> str:
        return f"{self.keys[0]} or {self.keys[2] if gpu else self.keys[1]}"


def stage_plan(cfg: D2CConfig, stage: str) -> tuple[list[Demand], float, str]:
    """What ``stage`` holds at once: (actor or worker demands, CPUs of its Data tasks, their keys).

    Stages: ``score``, ``features``, ``attach``, ``encode_full`` (latents for full-data training),
    ``train``, ``evaluate``.
    """
    s, v, e, t = cfg.score, cfg.attach.vision, cfg.eval, cfg.train
    decode = (cfg.data.decode_num_cpus, "data.decode_num_cpus")
    if stage in ("score", "encode_full"):
        return [Demand("scoring actors" if stage == "score" else "encoding actors", s.min_actors, s.num_cpus, s.num_gpus,
                       ("score.min_actors", "score.num_cpus", "score.num_gpus"))], *decode
    if stage in ("features", "attach"):
        return [Demand(f"{stage} actors", v.min_actors, v.num_cpus, v.num_gpus,
                       ("attach.vision.min_actors", "attach.vision.num_cpus", "attach.vision.num_gpus"))], *decode
    if stage == "train":
        return [Demand("Ray Train workers", t.num_workers, t.cpus_per_worker, 1.0 if t.use_gpu else 0.0,
                       ("train.num_workers", "train.cpus_per_worker", "train.use_gpu"))], READ_TASK_CPUS, "its Parquet read task"
    if stage == "evaluate":
        return [Demand("sampling actors", e.min_actors, e.num_cpus, e.num_gpus, ("eval.min_actors", "eval.num_cpus", "eval.num_gpus")),
                Demand("Inception actors", e.inception_min_actors, e.num_cpus, e.inception_num_gpus,
                       ("eval.inception_min_actors", "eval.num_cpus", "eval.inception_num_gpus"))], 0.0, ""
    raise ValueError(f"unknown stage {stage!r}")


def placement_problems(demands: Sequence[Demand], data_cpus: float, data_keys: str,
                       nodes: Iterable[Mapping[str, float]]) -> list[str]:
    """Why ``demands`` plus ``data_cpus`` cannot be placed on ``nodes`` (each node's total
    resources: ``{"CPU": .., "GPU": ..}``); empty when they can.

    Checks: every single actor fits on some node, and the sum over the plan fits the cluster.
    (Bin-packing across nodes is left to Ray: these two bounds already catch the hangs seen.)
    """
    nodes = [dict(n) for n in nodes]
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    problems = []
    for d in demands:
        if d.count and not any(n.get("CPU", 0.0) >= d.cpus and n.get("GPU", 0.0) >= d.gpus for n in nodes):
            problems.append(f"one of the {d.what} needs {d.cpus:g} CPU and {d.gpus:g} GPU, more than any node has "
                            f"({d.keys[1]}, {d.keys[2]})")
    cpu = sum(d.count * d.cpus for d in demands) + data_cpus
    gpu = sum(d.count * d.gpus for d in demands)
    if cpu > total_cpu + 1e-9:
        parts = " + ".join(f"{d.count} {d.what} × {d.cpus:g}" for d in demands if d.count)
        data = f" + {data_cpus:g} for {data_keys}" if data_cpus else ""
        keys = "; ".join(d.key_text() for d in demands if d.count)
        problems.append(f"it holds {cpu:g} CPUs at once ({parts}{data}) but Ray has {total_cpu:g}: "
                        f"lower {keys}, or give Ray more CPUs (ray.num_cpus on this machine)")
    if gpu > total_gpu + 1e-9:
        problems.append(f"it holds {gpu:g} GPUs at once but Ray has {total_gpu:g}: "
                        f"lower {'; '.join(d.key_text(gpu=True) for d in demands if d.gpus)}")
    return problems


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources on the connected Ray."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_placement(cfg: D2CConfig, stage: str, local: Optional[bool] = None) -> None:
    """Refuse (``ConfigError``) a ``stage`` whose plan cannot be placed on this Ray; on a cluster
    joined by address (``local`` False) only warn, since an autoscaler may add nodes."""
    from app.ray_session import started_locally

    demands, data_cpus, data_keys = stage_plan(cfg, stage)
    problems = placement_problems(demands, data_cpus, data_keys, cluster_nodes())
    if not problems:
        return
    local = started_locally() if local is None else local
    text = f"{stage}: this stage cannot be placed on this Ray and would wait forever: " + "; ".join(problems)
    if local:
        raise ConfigError(text)
    print(f"[d2c] warning: {text} (continuing: an autoscaler may add nodes)", flush=True)
