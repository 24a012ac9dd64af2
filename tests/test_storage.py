"""Storage paths and URIs (d2c/storage.py) and their use by the stages.

* the module on local paths and ``file://`` URIs (plus the fsspec fallback on ``memory://``);
* a real S3 API: a moto server on 127.0.0.1 (skipped when moto is not installed) and a tiny
  ``d2c condense`` + ``d2c train`` + ``d2c evaluate`` whose outputs all live in a bucket, run
  in a subprocess that starts its own local Ray, so the credentials reach the Ray workers the
  way they do for a user: through the environment of the driver that started Ray;
* ``gs://``: no emulator is available here, so only the resolution and the error path
  (missing credentials named in the message) are tested;
* the multi-node refusal: the pure decision with injected node lists and mount tables, and
  its call at the start of each stage.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from conftest import FMNIST, ROOT, tiny_cfg
from d2c.config import ConfigError, load_config
from d2c.storage import (
    ALLOW_LOCAL_KEY,
    JsonlLog,
    Location,
    Mount,
    StorageError,
    is_shared_fstype,
    local_storage_refusal,
    location,
    mount_of,
    parse_mounts,
    read_mounts,
    spans_nodes,
)

#: Where the S3 test's moto server listens (never any other address).
MOTO_HOST = "127.0.0.1"
MOTO_BUCKET = "d2c-test"
MOTO_REGION = "us-east-1"
#: Dummy credentials of the moto server (moto accepts any).
MOTO_KEY = "testing"
#: Bounds (seconds) of the S3 end-to-end test's waits.
MOTO_START_TIMEOUT_S = 30
#: Idle, the S3 run takes about 5 minutes here; the bound allows a machine shared with other jobs.
S3_RUN_TIMEOUT_S = 2400
POLL_S = 0.2


def _locations(tmp_path):
    return {"plain": location(tmp_path / "root"), "file": location(f"file://{tmp_path / 'root'}")}


@pytest.fixture(params=["plain", "file"])
def root(request, tmp_path) -> Location:
    loc = _locations(tmp_path)[request.param]
    loc.mkdir()
    return loc


# ------------------------------------------------------------------------------------
# The module on local paths and file:// URIs
# ------------------------------------------------------------------------------------


def test_names_join_and_round_trip(tmp_path):
    plain, file = location(tmp_path / "root"), location(f"file://{tmp_path}/root")
    assert str(plain / "scores" / "x.parquet") == str(tmp_path / "root" / "scores" / "x.parquet")
    assert str(file / "scores") == f"file://{tmp_path}/root/scores"
    assert (file / "a").name == "a" and (file / "a.npz").suffix == ".npz" and (file / "a").parent == file
    for loc in (plain / "a", file / "a"):
        assert location(str(loc)) == loc and loc.is_local
        assert os.fspath(loc) == str(tmp_path / "root" / "a")
    rel = location("runs/x") / "scores"
    assert str(rel) == "runs/x/scores" and rel.absolute().path == os.path.realpath("runs/x/scores")


def test_same_place_across_spellings(tmp_path):
    plain = location(tmp_path / "root")
    assert plain.same_as(location(f"file://{tmp_path}/root")) and plain.same_as(location(str(tmp_path / "root") + "/"))
    (tmp_path / "link").symlink_to(tmp_path / "root", target_is_directory=True)
    assert plain.same_as(location(tmp_path / "link")) and not plain.same_as(location(tmp_path / "other"))
    a, b = location("s3://bucket/run?region=us-east-1"), location("s3://bucket/run?region=eu-west-1")
    assert a.same_as(b) and a != b and not a.same_as(location("s3://bucket/other?region=us-east-1"))
    assert not a.same_as(plain) and not plain.same_as(a)


def test_read_write_list_delete(root):
    (root / "d").mkdir()
    (root / "d" / "a.json").write_json({"b": [1, 2]})
    (root / "d" / "t.txt").write_text("hi")
    (root / "d" / "e" / "f.bin").parent.mkdir()
    (root / "d" / "e" / "f.bin").write_bytes(b"\x00\x01")
    assert (root / "d" / "a.json").read_json() == {"b": [1, 2]}
    assert (root / "d").is_dir() and (root / "d" / "t.txt").is_file() and not (root / "nope").exists()
    assert [f.name for f in (root / "d").files()] == ["a.json", "t.txt"]
    assert [f.name for f in (root / "d").files(".json")] == ["a.json"]
    assert [c.name for c in (root / "d").iterdir()] == ["a.json", "e", "t.txt"]
    assert [c.name for c in root.glob("d/*.txt")] == ["t.txt"]
    assert (root / "d").walk_files() == ["a.json", "e/f.bin", "t.txt"]
    assert (root / "missing").files() == [] and (root / "missing").iterdir() == []
    with (root / "d" / "t.txt").open_input() as f:
        assert f.read() == b"hi"
    (root / "d" / "t.txt").unlink()
    (root / "d" / "t.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (root / "d" / "t.txt").unlink()
    (root / "d").rmtree()
    (root / "d").rmtree()  # missing: a no-op
    assert not (root / "d").exists()
    with pytest.raises(FileExistsError):
        root.mkdir(exist_ok=False)


def test_atomic_writes_leave_no_temp_files(root):
    target = root / "m.json"
    for i in range(3):
        target.write_json({"i": i})
    assert target.read_json() == {"i": 2}
    with pytest.raises(RuntimeError, match="boom"):
        with (root / "s.npz").local_output() as staged:
            assert staged.suffix == ".npz" and staged.parent == root.local_path
            staged.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not (root / "s.npz").exists()
    with (root / "s.npz").local_output() as staged:
        np.savez(staged, x=np.arange(3))
    with np.load(root.local_path / "s.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in root.local_path.iterdir()) == ["m.json", "s.npz"]


def test_parquet_and_completion_marker(root):
    out = root / "scores"
    out.mkdir()
    (out / "shard-00000.parquet").write_parquet(pa.table({"image_id": ["a", "b"], "score": [0.5, 0.25]}))
    (out / "shard-00001.parquet").write_parquet(pd.DataFrame({"image_id": ["c"], "score": [1.0]}))
    (out / "_settings.json").write_json({"k": 1})
    (out / "_SUCCESS").write_text("")
    df = out.read_pandas().sort_values("image_id")
    assert df.image_id.tolist() == ["a", "b", "c"] and "__index_level_0__" not in df.columns
    assert out.read_table(columns=["score"]).num_rows == 3
    assert (out / "shard-00000.parquet").read_schema().names == ["image_id", "score"]
    path, fs = out.for_ray()
    assert fs is None and path == str(out.local_path)  # a local path reaches Ray Data unchanged


def test_staging_copies_and_jsonl(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    (root / "tree").upload_from(src)
    assert (root / "tree").walk_files() == ["a.txt", "sub/b.txt"]
    with (root / "tree").local_copy() as local:
        assert (local / "sub" / "b.txt").read_text() == "B"
    (root / "tree" / "a.txt").copy_to(root / "copy.txt")
    assert (root / "copy.txt").read_text() == "A"
    with (root / "grids").local_output_dir() as d:
        (d / "g.png").write_bytes(b"png")
    assert (root / "grids" / "g.png").read_bytes() == b"png"
    log = JsonlLog(root / "metrics.jsonl")
    log.append({"step": 1})
    log.append({"step": 2})
    assert [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a run killed after step 4 (its last line torn) resumes from the step-2 checkpoint: steps 3, 4
    # and the torn line go, and the resumed run logs each step once
    log.flush()
    (root / "metrics.jsonl").write_text((root / "metrics.jsonl").read_text() + '{"step": 3}\n{"step": 4}\n{"st')
    resumed = JsonlLog(root / "metrics.jsonl")
    assert resumed.keep_through(2) == 3
    resumed.append({"step": 3})
    resumed.flush()
    assert [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert JsonlLog(root / "none.jsonl").keep_through(2) == 0


def test_fsspec_fallback_for_a_scheme_pyarrow_does_not_know():
    """memory:// is fsspec's in-process file system: reached through pyarrow's FSSpecHandler."""
    loc = location(f"memory://d2c-test-{time.time_ns()}")
    assert isinstance(loc.fs, pafs.PyFileSystem) and not loc.is_local
    (loc / "x").mkdir()
    (loc / "x" / "a.json").write_json({"ok": True})
    assert (loc / "x" / "a.json").read_json() == {"ok": True}
    assert [f.name for f in (loc / "x").files()] == ["a.json"]
    with pytest.raises(StorageError, match="object store"):
        os.fspath(loc / "x")
    (loc / "x").rmtree()
    assert not (loc / "x").exists()


@pytest.mark.parametrize("uri, message", [
    ("foo://bucket/x", "does not know the scheme 'foo'"),
    ("s3://AKIA:secret@bucket/run", "credentials written into a storage URI"),
    ("s3:///run", "names no bucket"),
    ("file://relative/run", "absolute path"),
    ("file:///tmp/x?a=1", "takes no ?options"),
    (f"s3://bucket/run?region={MOTO_REGION}&no_such_option=1", "no_such_option"),
])
def test_bad_uris_are_refused_naming_the_uri_and_the_fix(uri, message):
    with pytest.raises(StorageError, match=message.replace("?", r"\?")):
        location(uri)


def test_a_bad_storage_uri_in_a_config_is_a_clear_cli_error(capsys):
    from app.cli import main

    assert main(["train", "--config", str(ROOT / "configs" / "embedded.yaml"), "condensed=foo://bucket/run/condensed"]) == 2
    assert "foo://bucket/run/condensed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------
# gs:// — resolution and the error path only (no GCS emulator is available)
# ------------------------------------------------------------------------------------


def test_gs_uri_resolves_and_missing_credentials_are_named_no_emulator(monkeypatch, tmp_path):
    """No GCS emulator here: only that gs:// resolves to pyarrow's GcsFileSystem with the URI's options,
    and that an unusable credentials file fails with a message naming the URI and the fix."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    loc = location("gs://d2c-no-such-bucket/run?retry_limit_seconds=1")
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.path == "d2c-no-such-bucket/run"
    assert str(loc / "scores") == "gs://d2c-no-such-bucket/run/scores?retry_limit_seconds=1"
    with pytest.raises(StorageError) as err:
        (loc / "manifest.json").exists()
    text = str(err.value)
    assert "gs://d2c-no-such-bucket/run/manifest.json" in text and "GOOGLE_APPLICATION_CREDENTIALS" in text


# ------------------------------------------------------------------------------------
# Multi-node refusal: the pure decision
# ------------------------------------------------------------------------------------

MOUNTS = parse_mounts(textwrap.dedent("""\
    overlay / overlay rw,relatime 0 0
    /dev/nvme0n1p1 /data ext4 rw 0 0
    fs-1.efs:/ /mnt/efs nfs4 rw,vers=4.1 0 0
    my-d2c-bucket /mnt/d2c fuse.gcsfuse rw,user_id=0 0 0
    s3fs /mnt/s3 fuse.s3fs rw 0 0
    lxcfs /var/lib/lxcfs fuse.lxcfs rw 0 0
    /dev/sdb /mnt/with\\040space xfs rw 0 0
    nfs:/x /data/shared nfs rw 0 0
"""))
TWO_NODES = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 8.0}},
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0}}]


def test_mount_table_parsing_and_lookup():
    assert Mount("/mnt/with space", "xfs") in MOUNTS
    assert mount_of("/data/run", MOUNTS).fstype == "ext4"
    assert mount_of("/data/shared/run", MOUNTS).fstype == "nfs"  # the longest mount point wins
    assert mount_of("/database", MOUNTS).fstype == "overlay"  # a prefix of the name is not a parent
    assert mount_of("/mnt/d2c", MOUNTS).fstype == "fuse.gcsfuse"
    stacked = parse_mounts("a /x ext4 rw 0 0\nb /x nfs4 rw 0 0\n")
    assert mount_of("/x/y", stacked).fstype == "nfs4"  # a later mount hides an earlier one
    assert all(is_shared_fstype(t) for t in ("nfs", "nfs4", "cifs", "lustre", "gpfs", "cephfs", "beegfs",
                                             "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3"))
    assert not any(is_shared_fstype(t) for t in ("ext4", "xfs", "overlay", "tmpfs", "btrfs", "fuse.lxcfs", "fuseblk"))
    assert read_mounts(os.devnull) == [] and read_mounts("/no/such/mounts") is None


def test_spans_nodes():
    assert spans_nodes(TWO_NODES, "a") == (True, "the Ray cluster has 2 alive nodes")
    dead = [TWO_NODES[0], dict(TWO_NODES[1], Alive=False)]
    assert spans_nodes(dead, "a") == (False, "")
    head_without_cpus = [{"NodeID": "h", "Alive": True, "Resources": {"memory": 1.0}}]
    multi, reason = spans_nodes(head_without_cpus, "h")
    assert multi and "no CPUs" in reason


def test_local_storage_refusal_decision():
    def refusal(value, multi=True, mounts=MOUNTS, allow=False):
        return local_storage_refusal("run_dir", value, multi, "the Ray cluster has 2 alive nodes", mounts, allow)

    msg = refusal("/data/run")
    assert msg is not None
    for part in ("run_dir='/data/run'", "'ext4' mounted at /data", "2 alive nodes", "its own", "run_dir=s3://",
                 "gs://", f"{ALLOW_LOCAL_KEY}=true"):
        assert part in msg, part
    assert refusal("file:///data/run") is not None
    assert refusal("/data/run", multi=False) is None
    assert refusal("/data/run", allow=True) is None
    assert refusal(None) is None
    for shared in ("/data/shared/run", "/mnt/efs/run", "/mnt/d2c/runs/x", "file:///mnt/s3/run",
                   f"s3://b/run?region={MOTO_REGION}", "gs://b/run"):
        assert refusal(shared) is None, shared
    assert refusal("/var/lib/lxcfs/run") is not None  # a local FUSE file system
    unknown = refusal("/data/run", mounts=None)
    assert unknown is not None and "cannot identify" in unknown


# ------------------------------------------------------------------------------------
# Multi-node refusal: called at the start of each stage
# ------------------------------------------------------------------------------------


@pytest.fixture
def two_alive_nodes(ray_session, monkeypatch, tmp_path):
    """Ray reports two alive nodes (the node list is Ray's, not ours); skips where tmp_path is shared storage."""
    mount = mount_of(os.path.realpath(tmp_path), read_mounts() or [])
    if mount is not None and is_shared_fstype(mount.fstype):
        pytest.skip(f"{tmp_path} is on a shared file system ({mount.fstype}): nothing to refuse")
    driver = ray_session.get_runtime_context().get_node_id()
    nodes = [{"NodeID": driver, "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": "another-node", "Alive": True, "Resources": {"CPU": 4.0}}]
    monkeypatch.setattr(ray_session, "nodes", lambda: nodes)


def test_stages_refuse_node_local_storage_on_a_multi_node_cluster(two_alive_nodes, scorer_ckpt, tmp_path):
    from app.condense import run_condense
    from app.sweep import run_sweep
    from app.train import run_train

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"run_dir='{run}'.*{ALLOW_LOCAL_KEY}=true"):
        run_condense(tiny_cfg(run, scorer_ckpt))
    assert not run.exists()
    (tmp_path / "condensed").mkdir()
    train_cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"run_dir={run}", f"condensed={tmp_path / 'condensed'}",
                                                                  f"train_dir={tmp_path / 'train'}"])
    with pytest.raises(ConfigError, match="train_dir="):
        run_train(train_cfg)
    assert not (tmp_path / "train").exists()
    with pytest.raises(ConfigError, match="sweep.dir="):
        run_sweep(tiny_cfg(run, scorer_ckpt, f"sweep.dir={tmp_path / 'sweep'}"))
    assert not (tmp_path / "sweep").exists()
    # the documented override lets a user who knows the path is shared go on (validated up to the data)
    allowed = load_config(ROOT / "configs" / "embedded.yaml", [f"run_dir={run}", f"condensed={tmp_path / 'condensed'}",
                                                                f"train_dir={tmp_path / 'train'}", f"{ALLOW_LOCAL_KEY}=true"])
    with pytest.raises(ConfigError, match="holds no parquet shards"):
        run_train(allowed)


# ------------------------------------------------------------------------------------
# file:// through the stages (the shared test Ray)
# ------------------------------------------------------------------------------------


def test_condense_and_train_on_file_uris(condensed_run, scorer_ckpt, tmp_path, capsys):
    from app.condense import run_condense
    from d2c.condense import RunDir
    from app.train import run_train
    from d2c.train.checkpoint import latest_checkpoint

    run, _ = condensed_run
    uri = f"file://{tmp_path}/run"
    cfg = tiny_cfg(uri, scorer_ckpt, f"score.reuse_from=file://{run}")
    assert run_condense(cfg) == 0
    assert "reusing" in capsys.readouterr().out
    here = RunDir(tmp_path / "run")
    for done in (here.selection / "_SUCCESS", here.condensed / "_SUCCESS", here.condensed / "_settings.json", here.manifest):
        assert done.is_file(), done
    got = pd.read_parquet(here.selection / "selection.parquet")
    want = pd.read_parquet(RunDir(run).selection / "selection.parquet")
    assert got.image_id.tolist() == want.image_id.tolist()
    assert json.loads(here.manifest.read_text())["scores_dir"] == f"file://{run}/scores"
    # an interrupted attach (no _SUCCESS) is cleared and redone, never reused
    (here.condensed / "_SUCCESS").unlink()
    assert run_condense(cfg) == 0
    assert "clearing it and redoing it" in capsys.readouterr().out and (here.condensed / "_SUCCESS").is_file()
    train = load_config(ROOT / "configs" / "embedded.yaml", [
        f"run_dir={uri}", f"condensed={uri}/condensed", f"train_dir=file://{tmp_path}/train", "model.patch_size=8",
        "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1", "model.proj_hidden_dim=32",
        "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.steps=2"])
    assert run_train(train) == 0
    assert latest_checkpoint(tmp_path / "train" / "checkpoints").name == "step-0000002"
    assert [json.loads(x)["step"] for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_train_refuses_an_interrupted_condensed_set(tmp_path):
    from app.train import condensed_inputs

    part = tmp_path / "run" / "condensed"
    part.mkdir(parents=True)
    (part / "_settings.json").write_text("{}")
    cfg = load_config(ROOT / "configs" / "embedded.yaml", [f"condensed={part}"])
    with pytest.raises(ConfigError, match="incomplete"):
        condensed_inputs(cfg)


# ------------------------------------------------------------------------------------
# s3:// against a real S3 API (moto's server on 127.0.0.1)
# ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((MOTO_HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1:<free port> with one bucket; yields (endpoint, pyarrow S3FileSystem).

    The dummy credentials go into this process's environment too, so that the test's own checks
    are signed requests like every stage's (moto refuses anonymous reads of copied objects).
    """
    server_mod = pytest.importorskip(
        "moto.server", reason="moto is not installed (pip install 'moto[s3]' flask flask-cors: the test extras)")
    for var, value in (("AWS_ACCESS_KEY_ID", MOTO_KEY), ("AWS_SECRET_ACCESS_KEY", MOTO_KEY),
                       ("AWS_DEFAULT_REGION", MOTO_REGION), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(var, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address=MOTO_HOST, port=port, verbose=False)
    server.start()
    try:
        endpoint = f"{MOTO_HOST}:{port}"
        fs = pafs.S3FileSystem(access_key=MOTO_KEY, secret_key=MOTO_KEY, region=MOTO_REGION, scheme="http",
                               endpoint_override=endpoint, allow_bucket_creation=True)
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        while True:
            try:
                fs.create_dir(MOTO_BUCKET)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_S)
        yield endpoint, fs
    finally:
        server.stop()


#: The driver of the S3 run: condense twice (the second a no-op), a kcenter condense from those
#: scores (its visual-features pass and selection read and write the bucket), train 2 then 3 steps
#: (a resume), evaluate, and a one-trial sweep twice (the second restores the finished experiment); every output
#: in the bucket. It runs in a fresh process that starts its own Ray.
S3_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import ROOT, tiny_cfg
from app.condense import run_condense
from app.evaluate import run_evaluate
from app.train import run_train
from d2c.config import load_config
from d2c.storage import location

run, run_kc, train, scorer = {run!r}, {run_kc!r}, {train!r}, {scorer!r}
cfg = tiny_cfg(run, scorer, "ray.num_cpus=4")
assert run_condense(cfg) == 0
print("=== second condense", flush=True)
assert run_condense(cfg) == 0
print("=== kcenter condense", flush=True)
assert run_condense(tiny_cfg(run_kc, "null", "ray.num_cpus=4", f"score.reuse_from={{run}}", "select.method=kcenter",
                             "select.feature_image_size=32", "select.feature_batch_size=8", "attach.text.encoder=none",
                             "model.use_text=false")) == 0
print("=== train", flush=True)
condensed = str(location(run) / "condensed")
common = [f"run_dir={{run}}", f"condensed={{condensed}}", f"train_dir={{train}}", "ray.num_cpus=4", "model.patch_size=8",
          "model.hidden_size=32", "model.num_heads=2", "model.depth=2", "model.encoder_depth=1",
          "model.proj_hidden_dim=32", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2"]
yaml = ROOT / "configs" / "embedded.yaml"
assert run_train(load_config(yaml, common + ["train.steps=2"])) == 0
print("=== second train", flush=True)
assert run_train(load_config(yaml, common + ["train.steps=3"])) == 0
assert run_evaluate(load_config(yaml, common + [
    f"checkpoint={{train}}", f"eval_dir={{location(run) / 'eval'}}", "eval.num_samples=10", "eval.reference_size=10",
    "eval.steps=2", "eval.batch_size=5", "eval.inception_batch_size=10", "eval.fid_method=eigh", "eval.grid_per_class=1"])) == 0
print("=== sweep", flush=True)
from app.sweep import run_sweep
sweep = tiny_cfg(run, scorer, "ray.num_cpus=4", f"score.reuse_from={{run}}", f"sweep.dir={{location(run) / 'sweep'}}",
                 'sweep.grid={{"select.k": [3], "select.budget": [10]}}', "sweep.fid_samples=10", *common[4:],
                 "train.steps=1", "train.ckpt_every=1", "eval.steps=2", "eval.reference_size=10", "eval.batch_size=5",
                 "eval.inception_batch_size=10", "eval.fid_method=eigh")
assert run_sweep(sweep) == 0
print("=== second sweep", flush=True)
assert run_sweep(sweep) == 0
print("=== s3 driver done", flush=True)
"""


@pytest.mark.slow
def test_condense_train_evaluate_sweep_in_an_s3_bucket(moto_s3, condensed_run, scorer_ckpt, tmp_path):
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from d2c.condense import RunDir
    from d2c.attach.text import load_text_embeddings
    from d2c.data.condensed import read_condensed
    from d2c.train.checkpoint import CHECKPOINT_FILES

    endpoint, fs = moto_s3
    options = f"endpoint_override={endpoint}&scheme=http&region={MOTO_REGION}"
    run_uri, train_uri = f"s3://{MOTO_BUCKET}/run?{options}", f"s3://{MOTO_BUCKET}/train?{options}"
    run_kc_uri = f"s3://{MOTO_BUCKET}/run_kc?{options}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # holds the moto credentials (the fixture)
    env.update(PYTHONPATH=str(ROOT), D2C_CACHE_DIR=str(tmp_path / "cache"))
    script = S3_DRIVER.format(tests=str(ROOT / "tests"), run=run_uri, run_kc=run_kc_uri, train=train_uri,
                              scorer=scorer_ckpt)
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=S3_RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        tail = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"the S3 run did not finish within {S3_RUN_TIMEOUT_S} s; its output ends with:\n{tail[-4000:]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    second = out.split("=== second condense")[1].split("=== kcenter condense")[0]
    assert "reused, nothing to score" in second and "selection: complete" in second and "attach: complete" in second
    assert "resuming at step 2" in out.split("=== second train")[1]

    # every artifact is in the bucket, none on the local disk
    def s3(key: str) -> Location:
        return location(f"s3://{MOTO_BUCKET}/{key}?{options}")

    assert not any(p.name in ("scores", "condensed", "checkpoints") for p in tmp_path.rglob("*"))
    run = RunDir(s3("run"))
    for key in ("scores/_SUCCESS", "scores/_settings.json", "scores/shard-00000.parquet", "scores/shard-00002.parquet",
                "rejects/shard-00000.parquet", "selection/selection.parquet", "selection/_SUCCESS",
                "condensed/_SUCCESS", "condensed/_settings.json", "text_embeddings.safetensors", "manifest.json",
                "eval/metrics.json", "eval/samples.npz", "eval/grids/overview.png"):
        assert (run.root / key).is_file(), key
    local = RunDir(condensed_run[0])
    got = (run.selection / "selection.parquet").read_pandas()
    want = pd.read_parquet(local.selection / "selection.parquet")
    pd.testing.assert_frame_equal(got, want)
    scores = run.scores.read_pandas().sort_values("image_id").reset_index(drop=True)
    np.testing.assert_array_equal(scores.score, pd.read_parquet(local.scores).sort_values("image_id").score)
    data = read_condensed(run.condensed)
    assert sorted(data["image_id"]) == sorted(want.image_id) and data["visual"].shape == (30, 16, 1280)
    with run.text.local_copy() as text:
        assert load_text_embeddings(text)[0].shape == (10, 16, 384)
    manifest = run.manifest.read_json()
    assert manifest["rows"]["selected"] == 30 and manifest["scores_dir"] == str(run.scores)
    metrics = (run.root / "eval" / "metrics.json").read_json()
    assert metrics["num_samples"] == 10 and np.isfinite(metrics["fid"])
    assert metrics["checkpoint"]["path"] == str(s3("train/checkpoints/step-0000003")) and metrics["checkpoint"]["step"] == 3

    # kcenter from the bucket's scores: the features pass wrote its shards and markers to the bucket
    kc = RunDir(s3("run_kc"))
    kc_out = out.split("=== kcenter condense")[1].split("=== train")[0]
    assert f"features: not reusing {run.features}" in kc_out and "features: 120 rows in" in kc_out
    for key in ("features/_SUCCESS", "features/_settings.json", "features/shard-00000.parquet",
                "features/shard-00002.parquet", "selection/_SUCCESS", "condensed/_SUCCESS", "manifest.json"):
        assert (kc.root / key).is_file(), key
    assert not kc.scores.exists()  # the scores were reused from the bucket, not recomputed
    feats = pa.concat_tables([f.read_table(columns=["image_id", "feature"]) for f in kc.features.glob("shard-*.parquet")])
    assert set(feats["image_id"].to_pylist()) == set(scores.image_id)
    assert {len(v) for v in feats["feature"].to_pylist()} == {1280}
    kc_sel = (kc.selection / "selection.parquet").read_pandas()
    assert set(kc_sel.method) == {"kcenter"} and len(kc_sel) == 30
    kc_manifest = kc.manifest.read_json()
    assert kc_manifest["features"]["dir"] == str(kc.features) and kc_manifest["scores_dir"] == str(run.scores)

    train = s3("train")
    steps = sorted(p.name for p in (train / "checkpoints").iterdir())
    assert steps == ["step-0000002", "step-0000003"]
    assert sorted(f.name for f in (train / "checkpoints" / "step-0000003").files()) == sorted(CHECKPOINT_FILES)
    assert [json.loads(x)["step"] for x in (train / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    events = [json.loads(x) for x in (train / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("restore", 2)]
    # Ray Train V2 hands the rerun its own latest checkpoint (in the bucket's ray_storage) when it has one
    assert events[1]["source"] in ("Ray Train checkpoint (worker restart)", str(train / "checkpoints" / "step-0000002"))
    assert (train / "ray_storage").is_dir()  # Ray Train's own storage went to the bucket too

    # the sweep: Tune's experiment, the trial's condensed set and training, the results table
    assert "resuming" in out.split("=== second sweep")[1]
    sweep = run.root / "sweep"
    results = pd.read_csv(io.StringIO((sweep / "results.csv").read_text()))
    assert len(results) == 1 and (results.k.tolist(), results.budget.tolist(), results.steps.tolist()) == ([3], [10], [1])
    assert np.isfinite(results.fid[0]) and results.trial_dir[0].startswith(f"s3://{MOTO_BUCKET}/run/sweep/trials/")
    trial = location(results.trial_dir[0])
    sel = (trial / "condense" / "selection" / "selection.parquet").read_pandas()  # a RUN's layout
    assert len(sel) == 10 and sel["rank"].tolist() == [0] * 10
    assert (trial / "condense" / "text_embeddings.safetensors").is_file()
    assert len(read_condensed(trial / "condense" / "condensed")["image_id"]) == 10
    assert [c.name for c in (trial / "train" / "checkpoints").iterdir()] == ["step-0000001"]
    assert (trial / "eval-0000001" / "metrics.json").is_file() and (sweep / "tune").is_dir()
    assert len(sweep.glob("attach_cache/part-*/condensed/_SUCCESS")) == 1
    assert (sweep / "sweep.json").read_json()["errors"] == []
