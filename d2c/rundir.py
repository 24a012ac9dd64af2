"""The stage-directory protocol every d2c stage follows (docs/design.md, "Artifacts").

A stage writes one directory, on a local path or a storage location:

1. ``_settings.json`` holds what defines the output (settings, inputs' settings). If the
   directory already has one that differs, the stage refuses, listing the differences and the
   fix: outputs made with other settings are never mixed or silently replaced.
2. The stage writes its files (each one atomically), resuming from what a killed run left.
3. ``_SUCCESS`` is written last: a directory without it is incomplete, whatever else it holds.

A complete directory with the same settings is reused as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from d2c.storage import Location, location

SETTINGS_FILE = "_settings.json"
SUCCESS_FILE = "_SUCCESS"
#: Packages whose versions a stage records beside its outputs.
VERSIONED_PACKAGES = ("d2c", "torch", "ray", "numpy", "pyarrow", "pandas", "diffusers", "transformers", "timm",
                      "torch-fidelity")


#: Environment variable of the root of d2c's caches (embedded scorers, FID references), and its default.
CACHE_ENV = "D2C_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "d2c"


def cache_root() -> Path:
    """``$D2C_CACHE_DIR`` or ``~/.cache/d2c``."""
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR))


class StageSettingsError(ValueError):
    """A stage directory holds outputs made with other settings."""


def check_settings(path: str | os.PathLike | Location, settings: dict, what: str, fix: str) -> bool:
    """Compare ``settings`` with the ones saved at ``path``.

    Returns:
        True if the file exists and matches, False if it does not exist.
    Raises:
        StageSettingsError: it exists and differs (the message lists the differences and ``fix``).
    """
    path = location(path)
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    if saved == settings:
        return True
    keys = sorted(set(saved) | set(settings))
    diffs = [f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in keys if saved.get(k) != settings.get(k)]
    raise StageSettingsError(f"{what} in {str(path.parent)!r} was made with other settings ({'; '.join(diffs)}). {fix}")


def non_default(section: Any, *keys: str) -> dict[str, Any]:
    """The ``keys`` of a config section whose values differ from the schema's defaults. Settings
    added to a stage later go in through this, so that directories written before a key existed
    (at its default) still match their saved settings."""
    fields = type(section).model_fields
    return {k: getattr(section, k) for k in keys if getattr(section, k) != fields[k].default}


def versions(packages: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` for a missing one), and Python's."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class StageDir:
    """One stage's output directory and its protocol.

    Args:
        root: the directory (path, URI or Location).
        settings: what defines its output (JSON-serialisable).
        what: the name used in messages (``"RUN/scores"``, ``"EVAL"``).
        fix: what to do when the saved settings differ (appended to the refusal).
    """

    def __init__(self, root: str | os.PathLike | Location, settings: dict, what: str, fix: str = ""):
        self.root = location(root)
        self.settings, self.what, self.fix = settings, what, fix

    @property
    def settings_file(self) -> Location:
        return self.root / SETTINGS_FILE

    @property
    def success_file(self) -> Location:
        return self.root / SUCCESS_FILE

    @property
    def complete(self) -> bool:
        """``_SUCCESS`` is there (the stage finished writing, with whatever settings it saved)."""
        return self.success_file.is_file()

    def saved_settings(self) -> Optional[dict]:
        return self.settings_file.read_json() if self.settings_file.is_file() else None

    def matches(self) -> bool:
        """The saved settings equal ours (False: none saved); raises StageSettingsError when they differ."""
        return check_settings(self.settings_file, self.settings, self.what, self.fix)

    def reusable(self) -> bool:
        """Complete with our settings (raises StageSettingsError when saved with others)."""
        return self.matches() and self.complete

    def begin(self, clear: bool = False) -> None:
        """Refuse other settings, then save ours. With ``clear`` the directory is emptied first, and
        only a complete one is refused (an incomplete one holds nothing worth keeping)."""
        if not clear or self.complete:
            self.matches()
        if clear:
            self.root.rmtree()
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_json(self.settings)

    def commit(self) -> None:
        """Save our settings (unless :meth:`begin` did) and mark the directory complete: a stage's
        last write."""
        if self.saved_settings() != self.settings:
            self.settings_file.write_json(self.settings)
        self.success_file.write_text("")

