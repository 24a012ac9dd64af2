"""Render a ``d2c report`` page in headless Chromium and save a PNG screenshot of it.

    python benchmarks/screenshot_report.py runs/demo/report.html --out /tmp/report.png
    python benchmarks/screenshot_report.py runs/demo            # a directory: writes its report first

Used to check the page's layout by eye (the test suite never needs a browser). Chromium
runs with networking-related background features off and a throwaway profile, so the
screenshot also shows that the page needs nothing from outside. Needs ``chromium`` or
``chromium-browser`` on PATH (Debian/Ubuntu: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Executables tried, in order.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Viewport of the screenshot: the page is 1,260 px wide; 4,000 px tall shows its first sections.
DEFAULT_WINDOW = (1400, 4000)
#: How long Chromium may take to render before we give up.
TIMEOUT_S = 120
#: Time Chromium is given to finish layout and image decoding before the capture.
VIRTUAL_TIME_BUDGET_MS = 5000
INSTALL_HINT = "Chromium was not found on PATH; install it with `apt-get install -y chromium` (Debian/Ubuntu)."


def find_browser() -> str | None:
    """The first Chromium-like executable on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_command(browser: str, page: Path, out: Path, profile: Path, window: tuple[int, int]) -> list[str]:
    """The headless Chromium command line that screenshots ``page`` into ``out``."""
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={window[0]},{window[1]}",
        page.resolve().as_uri(),
    ]


def screenshot(page: Path, out: Path, window: tuple[int, int] = DEFAULT_WINDOW) -> Path:
    """Screenshot ``page`` (an HTML file) into ``out`` (PNG).

    Raises:
        FileNotFoundError: no Chromium on PATH (the message says how to install it).
        RuntimeError: Chromium failed or wrote no file (its output is in the message).
    """
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(INSTALL_HINT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="d2c-chromium-") as profile:
        proc = subprocess.run(chromium_command(browser, page, out.resolve(), Path(profile), window),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    if not out.is_file():
        raise RuntimeError(f"{browser} exited {proc.returncode} without writing {out}:\n{proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", help="report.html, or a run/demo directory to write the report of first")
    ap.add_argument("--out", default=None, help="PNG to write (default: beside the page, <page>.png)")
    ap.add_argument("--width", type=int, default=DEFAULT_WINDOW[0])
    ap.add_argument("--height", type=int, default=DEFAULT_WINDOW[1])
    args = ap.parse_args(argv)
    page = Path(args.page)
    if page.is_dir():
        from d2c.report import write_report

        page = write_report([str(page)])
    if not page.is_file():
        print(f"screenshot_report: {page} does not exist", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else page.with_suffix(".png")
    try:
        screenshot(page, out, (args.width, args.height))
    except FileNotFoundError as err:
        print(f"screenshot_report: {err}", file=sys.stderr)
        return 3
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"screenshot_report: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
