"""Where the package's data lives: target presets, committed tuning databases, the board firmware
sources, bundled models; and the provenance recorded in artifacts and reports.

One setting: QSO3_HOME, a folder holding targets/, schedules/ and firmware/ (a checkout's layout),
takes precedence. Otherwise an installed package uses its own copies (qso3_tvm/_data/, written by the
wheel build, see setup.py) and a checkout (editable install) its top-level folders. Writable state
(firmware builds, caches) goes to QSO3_CACHE (default ~/.cache/qso3_tvm), never into site-packages.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
DATA_FOLDERS = ("targets", "schedules", "firmware")


def data_root() -> Path:
    """The folder that holds targets/, schedules/ and firmware/."""
    if os.environ.get("QSO3_HOME"):
        return Path(os.environ["QSO3_HOME"])
    bundled = PACKAGE_DIR / "_data"
    if (bundled / "targets").is_dir():
        return bundled
    return CHECKOUT_DIR


def in_checkout() -> bool:
    """True when the data folders are a source checkout's (or QSO3_HOME's): safe to write beside them."""
    return data_root() != PACKAGE_DIR / "_data"


def targets_dir() -> Path:
    return data_root() / "targets"


def schedules_dir() -> Path:
    """Committed tuning databases; `qso3-tvm tune` writes here by default only in a checkout."""
    return data_root() / "schedules" if in_checkout() else Path("schedules")


def firmware_dir() -> Path:
    return data_root() / "firmware"


def firmware_build_dir() -> Path:
    """firmware/build in a checkout, else the cache (an installed package's folder is not ours to write)."""
    return firmware_dir() / "build" if in_checkout() else cache_dir() / "firmware"


def cache_dir() -> Path:
    return Path(os.environ.get("QSO3_CACHE", Path.home() / ".cache" / "qso3_tvm"))


def models_dir() -> Path:
    return PACKAGE_DIR / "models"


def git_commit() -> str | None:
    """The checkout's commit (None for an installed package or without git)."""
    if not (CHECKOUT_DIR / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=CHECKOUT_DIR, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
