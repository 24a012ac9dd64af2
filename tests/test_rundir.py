"""The stage-directory protocol (d2c/rundir.py) every stage uses: settings, refusal, completion."""

import json

import pytest

from d2c.rundir import SETTINGS_FILE, SUCCESS_FILE, StageDir, StageSettingsError, check_settings, versions


def test_check_settings_matches_refuses_with_the_differences_and_the_fix(tmp_path):
    path = tmp_path / SETTINGS_FILE
    assert check_settings(path, {"a": 1}, "RUN/scores", "fix it") is False  # nothing saved yet
    path.write_text(json.dumps({"a": 1, "b": [1, 2]}))
    assert check_settings(path, {"a": 1, "b": [1, 2]}, "RUN/scores", "fix it") is True
    with pytest.raises(StageSettingsError) as err:
        check_settings(path, {"a": 2, "c": "x"}, "RUN/scores", "Use a new run_dir.")
    msg = str(err.value)
    assert f"RUN/scores in {str(tmp_path)!r} was made with other settings" in msg
    assert "a: 1 -> 2" in msg and "b: [1, 2] -> None" in msg and "c: None -> 'x'" in msg
    assert msg.endswith("Use a new run_dir.")


def test_a_stage_is_complete_only_after_commit_and_reused_only_with_its_settings(tmp_path):
    root = tmp_path / "scores"
    stage = StageDir(root, {"k": 1}, "RUN/scores", "delete it")
    assert not stage.complete and not stage.reusable() and stage.saved_settings() is None
    stage.begin()  # saves the settings before any output, so a resumed pass finds them
    assert json.loads((root / SETTINGS_FILE).read_text()) == {"k": 1} and not stage.complete
    (root / "shard-00000.parquet").write_text("x")
    assert not StageDir(root, {"k": 1}, "RUN/scores").reusable()  # settings but no _SUCCESS: incomplete
    with pytest.raises(StageSettingsError, match="k: 1 -> 2"):  # never mixed with other settings
        StageDir(root, {"k": 2}, "RUN/scores").begin()
    stage.commit()
    assert (root / SUCCESS_FILE).is_file() and StageDir(root, {"k": 1}, "RUN/scores").reusable()
    with pytest.raises(StageSettingsError):
        StageDir(root, {"k": 2}, "RUN/scores").reusable()


def test_begin_with_clear_empties_an_incomplete_directory_but_refuses_a_complete_one(tmp_path):
    root = tmp_path / "condensed"
    old = StageDir(root, {"k": 1}, "condensed")
    old.begin()
    (root / "part-0.parquet").write_text("half written")
    new = StageDir(root, {"k": 2}, "condensed")
    new.begin(clear=True)  # the interrupted output of other settings holds nothing worth keeping
    assert sorted(p.name for p in root.iterdir()) == [SETTINGS_FILE]
    new.commit()
    with pytest.raises(StageSettingsError):  # a complete one is never replaced silently
        StageDir(root, {"k": 3}, "condensed").begin(clear=True)
    assert (root / SUCCESS_FILE).is_file()


def test_commit_without_begin_saves_the_settings_then_the_marker(tmp_path):
    stage = StageDir(tmp_path / "eval", {"steps": 50}, "EVAL")
    (tmp_path / "eval").mkdir()
    stage.commit()
    assert StageDir(tmp_path / "eval", {"steps": 50}, "EVAL").reusable()


def test_versions_name_python_and_the_installed_packages():
    v = versions(("torch", "no-such-package-d2c"))
    assert v["python"].count(".") == 2 and v["torch"][0].isdigit() and v["no-such-package-d2c"] == "not installed"
