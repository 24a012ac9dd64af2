"""cluster/: launcher configs, KubeRay manifests, the job runtime env, the local head script,
the dashboard metrics of app/metrics.py, and one real `ray job submit` of `d2c condense`.

The end-to-end test (marked ``cluster``; part of the default run) starts its own Ray head with
cluster/start_local_head.sh on free ports and a private --temp-dir, in a new session, with
token auth on and a token file of its own; it submits a tiny condense run with
``ray job submit --working-dir .`` and stops exactly that head afterwards (never `ray stop`,
which would also kill the test session's Ray and any other Ray on the machine).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import FMNIST, ROOT, tiny_cfg

CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY_MANIFESTS = {"RayCluster": CLUSTER / "kuberay-raycluster.yaml", "RayJob": CLUSTER / "kuberay-rayjob.yaml"}
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
HEAD_SCRIPT = CLUSTER / "start_local_head.sh"
LOCAL_HOST = "127.0.0.1"
#: The GPU node each launcher config autoscales (8 GPUs per node).
GPU_NODE = {"aws": "p5.48xlarge", "gcp": "a2-highgpu-8g"}
GPUS_PER_NODE = 8
#: Where the image (cluster/Dockerfile) puts the repository.
IMAGE_REPO_DIR = "/home/ray/d2c/"
#: Environment variables of the runtime env that point at the cluster's shared mount.
SHARED_STORAGE_VARS = ("HF_HOME", "D2C_CACHE_DIR")

#: Bounds of the end-to-end test (seconds); every wait below is bounded by one of these.
HEAD_START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 480
CLI_TIMEOUT_S = 60
STOP_GRACE_S = 30
KILL_WAIT_S = 10
POLL_S = 0.5
METRICS_TIMEOUT_S = 60
#: The ports `ray start --head` binds (GCS included); each gets a free port so nothing clashes
#: with another Ray on the machine (the test session's own, or another user's).
RAY_PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                  "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
                  "--node-manager-port", "--object-manager-port")
#: Logical CPUs of the test head (2 cores here; Ray Data needs a few slots for its actors).
HEAD_NUM_CPUS = 4


def _yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# ------------------------------------------------------------------------------------
# Ray cluster launcher configs
# ------------------------------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_validates_against_ray_schema(cloud):
    """The raw file against Ray's ray-schema.json, then the way `ray up` checks it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml(LAUNCHER_CONFIGS[cloud])
    jsonschema.validate(raw, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(raw)))  # fills provider defaults, as `ray up` does


def test_ray_schema_rejects_a_broken_config():
    """The check above has teeth: a misspelt key and a fractional GPU count fail."""
    raw = _yaml(LAUNCHER_CONFIGS["aws"])
    bad_key = dict(raw, max_worker=4)
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad_key, _ray_schema())
    bad_resources = copy.deepcopy(raw)
    bad_resources["available_node_types"]["gpu_h100x8"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_resources, _ray_schema())


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_gpu_group_and_cpu_head(cloud):
    raw = _yaml(LAUNCHER_CONFIGS[cloud])
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not run tasks/actors (CPU: 0)"
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["min_workers"] == 0, "GPU nodes autoscale from zero"
    assert 1 <= worker["max_workers"] <= raw["max_workers"]
    node = worker["node_config"]
    assert node.get("InstanceType", node.get("machineType")) == GPU_NODE[cloud]
    if cloud == "gcp":  # GCP does not report machine resources to the autoscaler
        assert worker["resources"]["GPU"] == GPUS_PER_NODE
        assert {"onHostMaintenance": "TERMINATE"} in node["scheduling"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_installs_project_and_mounts_shared_storage(cloud):
    raw = _yaml(LAUNCHER_CONFIGS[cloud])
    assert raw["docker"]["image"] == f"rayproject/ray:{_ray_version()}-py311-gpu", "nodes must run the client's Ray version"
    assert raw["file_mounts"]["~/d2c"] == "."
    assert ".gitignore" in raw["rsync_filter"] and ".venv" in raw["rsync_exclude"]
    setup = " ".join(raw["setup_commands"])
    assert "-c ~/d2c/requirements-lock.txt -e ~/d2c" in setup
    # The autoscaler on the head needs the cloud's SDK (Ray's defaults install it; we keep it).
    assert ("boto3" if cloud == "aws" else "google-api-python-client") in " ".join(raw["head_setup_commands"])
    mount = " ".join(raw["initialization_commands"])
    assert "/mnt/d2c" in mount and ("s3fs" if cloud == "aws" else "gcsfuse") in mount
    assert "--volume /mnt/d2c:/mnt/d2c" in raw["docker"]["run_options"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_safe_defaults(cloud):
    """Dashboard on the head's 127.0.0.1, usage stats off, token auth on every node."""
    text = LAUNCHER_CONFIGS[cloud].read_text()
    raw = yaml.safe_load(text)
    assert "0.0.0.0" not in text
    head_start = " ".join(raw["head_start_ray_commands"])
    assert f"--dashboard-host={LOCAL_HOST}" in head_start
    assert "--disable-usage-stats" in head_start
    assert "--disable-usage-stats" in " ".join(raw["worker_start_ray_commands"])
    run_options = raw["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert "--env RAY_USAGE_STATS_ENABLED=0" in run_options
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node needs the client's token"


# ------------------------------------------------------------------------------------
# KubeRay manifests
# ------------------------------------------------------------------------------------


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


@pytest.mark.parametrize("kind", sorted(KUBERAY_MANIFESTS))
def test_kuberay_manifest_required_fields(kind):
    doc = _yaml(KUBERAY_MANIFESTS[kind])
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _ray_version()
    head = spec["headGroupSpec"]
    groups = [head] + spec["workerGroupSpecs"]
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"rayStartParams.{key} must be a string (KubeRay's map[string]string)"
        containers = _containers(group)
        assert containers and all(c["name"] and c["image"] for c in containers)
        for c in containers:
            for env in c.get("env", []):
                assert isinstance(env["value"], str), f"env {env['name']} must be a string"
    images = {c["image"] for g in groups for c in _containers(g)}
    assert len(images) == 1, f"head and workers must run one image, got {images}"
    for worker in spec["workerGroupSpecs"]:
        assert worker["groupName"]
        assert 0 <= worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]


@pytest.mark.parametrize("kind", sorted(KUBERAY_MANIFESTS))
def test_kuberay_gpu_worker_group(kind):
    spec = _cluster_spec(_yaml(KUBERAY_MANIFESTS[kind]))
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(c["resources"]["limits"].get("nvidia.com/gpu") == GPUS_PER_NODE for c in _containers(g))]
    assert len(gpu_groups) == 1
    (group,) = gpu_groups
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    assert spec["enableInTreeAutoscaling"] is True
    (container,) = _containers(group)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == GPUS_PER_NODE


@pytest.mark.parametrize("kind", sorted(KUBERAY_MANIFESTS))
def test_kuberay_safe_defaults(kind):
    """Token auth, no public Service; the dashboard is on 127.0.0.1 unless KubeRay needs it.

    A RayJob's operator and submitter reach the job API through the head Service, so its
    dashboard listens on the pod address — allowed only with token auth and a ClusterIP
    Service without Ingress.
    """
    spec = _cluster_spec(_yaml(KUBERAY_MANIFESTS[kind]))
    head = spec["headGroupSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert head["serviceType"] == "ClusterIP"
    assert not head.get("enableIngress", False)
    dashboard_host = head["rayStartParams"]["dashboard-host"]
    if kind == "RayCluster":
        assert dashboard_host == LOCAL_HOST
    else:
        assert dashboard_host in (LOCAL_HOST, "0.0.0.0")
    for group in [head] + spec["workerGroupSpecs"]:
        for c in _containers(group):
            assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in c["env"]


def test_kuberay_rayjob_entrypoint_is_a_valid_condense_command():
    """The entrypoint parses with d2c's own CLI and its config + overrides validate."""
    from app.cli import build_parser
    from d2c.config import load_config

    job = _yaml(KUBERAY_MANIFESTS["RayJob"])["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["d2c", "condense"]
    args = build_parser().parse_args(argv[1:])
    assert args.config.startswith(IMAGE_REPO_DIR)
    cfg = load_config(ROOT / args.config[len(IMAGE_REPO_DIR):], args.overrides)
    assert cfg.run_dir.startswith("/mnt/d2c/")
    assert job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == _yaml(RUNTIME_ENV)["env_vars"], "keep runtimeEnvYAML in step with cluster/runtime_env.yaml"


# ------------------------------------------------------------------------------------
# runtime_env.yaml
# ------------------------------------------------------------------------------------


def test_runtime_env_file():
    from ray.runtime_env import RuntimeEnv

    env = _yaml(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    for pattern in (".venv/", ".git/", "runs/"):
        assert pattern in env["excludes"]
    env_vars = env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values())
    assert env_vars["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env_vars["HF_HUB_OFFLINE"] == "1" and env_vars["TRANSFORMERS_OFFLINE"] == "1"
    for var in SHARED_STORAGE_VARS:
        assert env_vars[var].startswith("/mnt/d2c/")


def test_dockerfile_matches_the_repository():
    """Same Ray as the client, and every COPY source exists (a missing one fails the build)."""
    lines = [l.split() for l in (CLUSTER / "Dockerfile").read_text().splitlines() if l and not l.startswith("#")]
    (base,) = [l[1] for l in lines if l[0] == "FROM"]
    assert base == f"rayproject/ray:{_ray_version()}-py311-gpu"
    sources = [src for l in lines if l[0] == "COPY" for src in l[1:-1] if not src.startswith("--")]
    assert sources and all((ROOT / src).exists() for src in sources), sources


# ------------------------------------------------------------------------------------
# cluster/start_local_head.sh (the parts that start no Ray)
# ------------------------------------------------------------------------------------


def test_start_local_head_script_help_and_refusals():
    ok = subprocess.run(["bash", str(HEAD_SCRIPT), "--help"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert ok.returncode == 0 and "127.0.0.1" in ok.stdout and "RAY_AUTH_MODE=token" in ok.stdout
    for bad in (["--", "--dashboard-host", "0.0.0.0"], ["--", "--dashboard-host=0.0.0.0"], ["--public"]):
        r = subprocess.run(["bash", str(HEAD_SCRIPT), *bad], capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                           env=dict(os.environ, RAY="/nonexistent/ray"))
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert "start_local_head.sh:" in r.stderr


# ------------------------------------------------------------------------------------
# app/metrics.py
# ------------------------------------------------------------------------------------


def test_init_ray_local_defaults_and_joining(monkeypatch):
    """A local Ray: dashboard on 127.0.0.1, Ray Train's local settings unless the user set them;
    with an address: join it and leave the environment alone."""
    import ray

    from app import ray_session
    from d2c.config import load_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or type("Ctx", (), {"address_info": {"gcs_address": "127.0.0.1:1"}})())
    for key in [*ray_session.LOCAL_TRAIN_ENV, "RAY_ADDRESS"]:
        monkeypatch.setenv(key, "")  # records the variable, so that undo removes what init_ray sets
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own value wins
    ray_session.init_ray(load_config(None, ["ray.num_cpus=3"]))
    assert calls[-1]["dashboard_host"] == "127.0.0.1" and calls[-1]["num_cpus"] == 3
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:1"

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    ray_session.init_ray(load_config(None, ["ray.address=10.0.0.1:6379"]))
    assert calls[-1] == {"address": "10.0.0.1:6379", "logging_level": logging.WARNING}
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # a cluster keeps Ray's defaults


def test_data_context_parquet_reader_follows_config(ray_session, tmp_path):
    """``data.parquet_reader`` picks Ray Data's reader; both read the same rows back."""
    import pandas as pd

    from app.ray_session import quiet_data_context
    from d2c.config import load_config

    ctx = ray_session.data.DataContext.get_current()
    saved = ctx.use_datasource_v2
    path = tmp_path / "t.parquet"
    pd.DataFrame({"label": [3, 1, 2], "score": [0.5, 0.25, 0.125]}).to_parquet(path)
    try:
        got = {}
        for reader in ("v2", "v1"):
            quiet_data_context(progress=False, cfg=load_config(None, [f"data.parquet_reader={reader}"]))
            assert ray_session.data.DataContext.get_current().use_datasource_v2 is (reader == "v2")
            got[reader] = ray_session.data.read_parquet(str(path)).to_pandas().sort_values("label").reset_index(drop=True)
        pd.testing.assert_frame_equal(got["v1"], got["v2"])
        assert got["v1"]["label"].tolist() == [1, 2, 3]
        quiet_data_context(progress=False)
        assert ctx.use_datasource_v2 is False  # the config default
        with pytest.raises(Exception, match="parquet_reader"):
            load_config(None, ["data.parquet_reader=v3"])
    finally:
        ctx.use_datasource_v2 = saved
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False


def test_metrics_reject_bad_input():
    from app.metrics import record

    with pytest.raises(ValueError, match="unknown d2c metric 'images_per_s'.*images_scored_per_s"):
        record("score", "images_per_s", 1.0)
    with pytest.raises(ValueError, match="stage"):
        record("", "train_loss", 1.0)
    with pytest.raises(ValueError, match="rows_selected"):
        record("select", "rows_selected", -3)
    with pytest.raises(ValueError, match="rows_selected"):
        record("select", "rows_selected", float("nan"))
    with pytest.raises(TypeError, match="real number"):
        record("train", "train_loss", "0.5")
    with pytest.raises(TypeError, match="real number"):
        record("train", "train_loss", None)


def test_metrics_are_a_no_op_outside_ray():
    """In a fresh process without Ray, record() returns False and starts nothing."""
    code = textwrap.dedent(
        """
        import numpy as np
        import ray
        from app.metrics import METRICS, record
        for name in METRICS:
            assert record("score", name, np.float32(3.0)) is False, name
        assert not ray.is_initialized()
        print("no-op ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT)
    assert r.returncode == 0 and "no-op ok" in r.stdout, r.stderr


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=CLI_TIMEOUT_S) as resp:
        return resp.read().decode()


def test_metrics_reach_the_prometheus_endpoint(ray_session):
    """Values recorded in the driver and in a Ray worker are exported with their stage tag."""
    import ray

    from app.metrics import metric_name, record

    run = uuid.uuid4().hex[:8]  # a stage tag no other test uses
    assert record(f"score-{run}", "images_scored_per_s", 123.5) is True
    assert record(f"select-{run}", "rows_selected", 30) is True

    @ray.remote(num_cpus=0)
    class Recorder:  # stands in for a Ray Data / Ray Train actor
        def record(self, stage: str) -> bool:
            from app.metrics import record as record_in_actor

            return record_in_actor(stage, "train_loss", 0.25)

    recorder = Recorder.remote()
    assert ray.get(recorder.record.remote(f"train-{run}")) is True
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = {
        f'ray_{metric_name("images_scored_per_s")}{{': f'stage="score-{run}"',
        f'ray_{metric_name("rows_selected")}_total{{': f'stage="select-{run}"',
        f'ray_{metric_name("train_loss")}{{': f'stage="train-{run}"',
    }
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    missing = dict(wanted)
    try:
        while missing and time.monotonic() < deadline:
            lines = _scrape(url).splitlines()
            missing = {m: tag for m, tag in missing.items() if not any(l.startswith(m) and tag in l for l in lines)}
            if missing:
                time.sleep(POLL_S)
    finally:
        ray.kill(recorder)
    assert not missing, f"not exported within {METRICS_TIMEOUT_S}s: {sorted(missing)}"


# ------------------------------------------------------------------------------------
# End to end: a real head, `ray job submit --working-dir .`, a tiny condense run
# ------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((LOCAL_HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listen_addresses(port: int) -> set[str]:
    """Addresses with a listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                ip_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                    continue
                raw = bytes.fromhex(ip_hex)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.add(socket.inet_ntop(family, raw))
    return found


def _marked_pids(marker: str) -> list[int]:
    """PIDs of our processes whose environment carries ``marker`` (inherited from the head)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def _is_running(pid: int) -> bool:
    """False for a PID that is gone or a zombie (dead, waiting only to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _head_processes(marker: str, sid: int) -> set[int]:
    """Live processes of the test head: its session, plus anything carrying its marker."""
    return {p for p in set(_marked_pids(marker)) | set(_session_pids(sid)) if p != os.getpid() and _is_running(p)}


def _wait_gone(marker: str, sid: int, timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    left = _head_processes(marker, sid)
    while left and time.monotonic() < deadline:
        time.sleep(POLL_S)
        left = _head_processes(marker, sid)
    return left


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _stop_head(head: subprocess.Popen, marker: str) -> list[int]:
    """Stop the head we started and every process it spawned; returns PIDs that survived.

    First what Ctrl-C does: SIGINT to `ray start --block`, which shuts down the Ray processes
    it started (in ~2 s; its SIGTERM path waits ~30 s). Then, like `ray stop` but scoped to
    this head: SIGTERM, and after a grace SIGKILL, to whatever still runs in the head's
    session or carries our marker in its environment (the job's driver runs in a session of
    its own, hence the marker).
    """
    if head.poll() is None:
        head.send_signal(signal.SIGINT)
        try:
            head.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    left = _head_processes(marker, head.pid)
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, KILL_WAIT_S)):
        if not left:
            break
        _signal_all(left, sig)
        left = _wait_gone(marker, head.pid, grace)
    try:
        head.wait(timeout=KILL_WAIT_S)  # reap our child
    except subprocess.TimeoutExpired:
        pass
    return sorted(left)


def _overrides(cfg, base) -> list[str]:
    """`key=value` overrides that turn config ``base`` into ``cfg`` (changed leaves only)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(base.to_dict()), flat(cfg.to_dict())
    return [f"{k}={json.dumps(v)}" for k, v in sorted(new.items()) if old.get(k) != v]


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=CLI_TIMEOUT_S) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _head_diagnostics(tmp: Path, job_id: str, chars: int = 3000) -> str:
    """Tails of the head's own logs, for a failure message."""
    logs = [tmp / "head.log", tmp / "session_latest" / "logs" / "dashboard.log",
            tmp / "session_latest" / "logs" / f"job-driver-{job_id}.log"]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs if p.is_file())


def _http_json(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=CLI_TIMEOUT_S) as resp:
        return json.loads(resp.read().decode())


@pytest.fixture
def local_head():
    """A real head from cluster/start_local_head.sh (token auth on), stopped afterwards."""
    venv_bin = Path(sys.executable).parent
    ray_bin = venv_bin / "ray"
    assert ray_bin.is_file() and (venv_bin / "d2c").is_file(), (
        f"run the tests with the project venv's python ({venv_bin} lacks ray or d2c)")
    # Short path: Ray's unix sockets live under --temp-dir (limit ~107 characters).
    tmp = Path(tempfile.mkdtemp(prefix="d2c-head-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = tmp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    marker = f"d2c-test-head-{uuid.uuid4().hex}"
    ports = dict(zip(RAY_PORT_FLAGS, _free_ports(len(RAY_PORT_FLAGS))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY=str(ray_bin), RAY_AUTH_TOKEN_PATH=str(token_file), D2C_TEST_HEAD=marker,
               PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}")
    argv = ["bash", str(HEAD_SCRIPT), "--block", "--", "--num-cpus", str(HEAD_NUM_CPUS), "--temp-dir", str(tmp)]
    for flag, port in ports.items():
        argv += [flag, str(port)]
    log_path = tmp / "head.log"
    dashboard = f"http://{LOCAL_HOST}:{ports['--dashboard-port']}"
    with open(log_path, "w") as log:
        head = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    info = {"dashboard": dashboard, "dashboard_port": ports["--dashboard-port"], "token": token,
            "client_env": dict(env, RAY_AUTH_MODE="token"), "tmp": tmp}
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            assert head.poll() is None, f"the head exited ({head.returncode}):\n{log_path.read_text()[-4000:]}"
            try:
                status = _http_status(f"{dashboard}/api/jobs/", None)
                break
            except OSError:
                assert time.monotonic() < deadline, f"no dashboard after {HEAD_START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}"
                time.sleep(POLL_S)
        info["unauthenticated_status"] = status
        yield info
    finally:
        survivors = _stop_head(head, marker)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not survivors, f"Ray processes of the test head survived cleanup: {survivors}"


@pytest.mark.cluster
def test_job_submit_condense_on_a_local_head(local_head, scorer_ckpt, tmp_path):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    head = local_head
    # Safe defaults, checked on the live head: token required, dashboard on 127.0.0.1 only.
    assert head["unauthenticated_status"] == 401
    assert _http_status(f"{head['dashboard']}/api/jobs/", head["token"]) == 200
    assert _listen_addresses(head["dashboard_port"]) == {LOCAL_HOST}

    # cluster/runtime_env.yaml as is, except the shared-mount paths a local head lacks.
    runtime_env = _yaml(RUNTIME_ENV)
    for var in SHARED_STORAGE_VARS:
        runtime_env["env_vars"][var] = str(tmp_path / var.lower())
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))

    from d2c.config import load_config

    run_dir = tmp_path / "run"
    cfg = tiny_cfg(run_dir, scorer_ckpt)  # the test suite's tiny condense run, ~100 images
    overrides = _overrides(cfg, load_config(ROOT / "configs" / "embedded.yaml"))
    job_id = f"d2c-test-{uuid.uuid4().hex[:8]}"
    submit = [head["client_env"]["RAY"], "job", "submit", "--address", head["dashboard"], "--submission-id", job_id,
              "--runtime-env", str(env_file), "--working-dir", ".",
              "--", "d2c", "condense", "--config", "configs/embedded.yaml", *overrides]
    try:
        r = subprocess.run(submit, env=head["client_env"], cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"job {job_id} did not finish within {JOB_TIMEOUT_S}s:\n{(err.stdout or b'')[-4000:]!r}")
    try:
        info = _http_json(f"{head['dashboard']}/api/jobs/{job_id}", head["token"])
    except urllib.error.HTTPError as err:  # 404: the submission itself failed
        info = {"status": f"HTTP {err.code}", "message": "the head has no such job"}
    assert info["status"] == "SUCCEEDED", (
        f"job {job_id}: {info.get('status')} {info.get('message')}\n--- submit rc={r.returncode}\n"
        f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}\n{_head_diagnostics(head['tmp'], job_id)}")
    assert r.returncode == 0

    # The run directory the job wrote (docs/design.md, Artifacts).
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["rows"]["listed"] == cfg.data.max_per_class * len(manifest["class_names"])
    assert manifest["rows"]["selected"] == cfg.select.budget
    for done in ("scores/_SUCCESS", "selection/_SUCCESS", "condensed/_SUCCESS", "text_embeddings.safetensors"):
        assert (run_dir / done).is_file(), done
    assert any((run_dir / "condensed").glob("*.parquet"))
