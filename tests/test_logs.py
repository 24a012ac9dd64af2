"""Quiet logs off a terminal: no per-report lines from Ray Train, no progress bars or colour codes,
d2c's own lines and a plain, rate-limited progress line per stage."""

import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_TRAIN

#: A toy `d2c train` on the condensed test run (a report every step).
TOY_TRAIN = [*TINY_TRAIN, "train.steps=4"]
#: Most bytes the toy run may print (its own lines are about 1 KB).
MAX_OUTPUT_BYTES = 20_000


def test_train_output_off_a_terminal_is_quiet(condensed_run, tmp_path):
    run, _ = condensed_run
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_COLOR_PREFIX")}  # its own local Ray
    env.update(PYTHONPATH=str(ROOT), D2C_CACHE_DIR=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "app.cli", "train", "--config", str(ROOT / "configs" / "embedded.yaml"),
            f"run_dir={run}", f"condensed={run / 'condensed'}", f"train_dir={tmp_path / 'train'}", *TOY_TRAIN]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=600)
    out = proc.stdout
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "[d2c] train: 30 rows, 10 classes" in text and "[d2c] train: reached step 4" in text, text[-4000:]
    assert "Reporting training result" not in text, text[-4000:]
    assert b"\x1b[" not in out and b"\r" not in out, text[-4000:]  # no colour codes, no bar redraws
    worker_lines = [line for line in text.splitlines() if "RayTrainWorker" in line and "[d2c]" in line]
    assert worker_lines and len(set(worker_lines)) == len(worker_lines), text[-4000:]  # each worker line once
    assert len(out) < MAX_OUTPUT_BYTES, f"{len(out)} bytes:\n{text[-4000:]}"


def test_progress_line_is_rate_limited(capsys):
    from app.stages import ProgressLine

    now = [100.0]
    p = ProgressLine("scores", 60000, every_s=30, enabled=True, clock=lambda: now[0])
    now[0] += 10
    assert not p.update(2000)
    now[0] += 90
    assert p.update(12000)
    now[0] += 29
    assert not p.update(15000)
    assert capsys.readouterr().out == "[d2c] scores: 12000/60000 rows (20 %), 120.0 rows/s\n"
    now[0] += 1
    assert p.update(16000, "loss 0.5")
    assert capsys.readouterr().out == "[d2c] scores: 16000/60000 rows (27 %), 123.1 rows/s; loss 0.5\n"
    resumed = ProgressLine("train", 5000, unit="steps", start=1000, every_s=30, enabled=True, clock=lambda: now[0])
    now[0] += 40
    assert resumed.update(1200)  # the rate counts from the resumed step
    assert capsys.readouterr().out == "[d2c] train: 1200/5000 steps (24 %), 5.0 steps/s\n"
    off = ProgressLine("scores", 10, enabled=False, clock=lambda: now[0])
    now[0] += 100
    assert not off.update(5) and capsys.readouterr().out == ""


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(monkeypatch, terminal):
    import ray.data

    from app import ray_session
    from app.stages import ProgressLine

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.enable_operator_progress_bars
    monkeypatch.setattr(ray_session, "on_terminal", lambda: terminal)
    try:
        ray_session.quiet_data_context()
        assert ctx.enable_progress_bars is terminal and ctx.enable_operator_progress_bars is terminal
        assert ProgressLine("scores", 10).enabled is not terminal  # the plain line stands in for the bars
        console = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)]
        assert console and all(h.level >= logging.WARNING for h in console)  # Ray Data's INFO lines stay in its files
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


@pytest.mark.parametrize("terminal", [True, False])
def test_plain_log_env_off_a_terminal(monkeypatch, terminal):
    import ray

    from app import ray_session

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: type("Ctx", (), {"address_info": {"gcs_address": "127.0.0.1:1"}})())
    monkeypatch.setattr(ray_session, "on_terminal", lambda: terminal)
    for key in [*ray_session.PLAIN_LOG_ENV, *ray_session.LOCAL_TRAIN_ENV, "RAY_ADDRESS"]:
        monkeypatch.setenv(key, "")  # records the variable, so that undo removes what init_ray sets
        monkeypatch.delenv(key)
    ray_session.init_ray()
    for key, value in ray_session.PLAIN_LOG_ENV.items():
        assert os.environ.get(key) == (None if terminal else value)


def test_train_worker_drops_the_per_report_line():
    from ray.train.v2._internal.execution import context

    from app.ray_session import quiet_train_worker, train_logging_config

    report_logger = logging.getLogger(context.__file__)  # the logger of "Reporting training result N"
    saved = report_logger.level
    try:
        quiet_train_worker()
        assert not report_logger.isEnabledFor(logging.INFO) and report_logger.isEnabledFor(logging.WARNING)
    finally:
        report_logger.setLevel(saved)
    assert train_logging_config().log_level == "WARNING"
