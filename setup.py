"""Wheel build: the checkout's targets/, schedules/ and firmware/ sources become package data
(qso3_tvm/_data/), so that an installed package finds them (qso3_tvm.resources). Metadata: pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_FOLDERS = ("targets", "schedules", "firmware")
SKIP = shutil.ignore_patterns("build", "__pycache__", "*.pyc", ".gitignore")


class BuildPyWithData(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders directly
            return
        for name in DATA_FOLDERS:
            dest = Path(self.build_lib) / "qso3_tvm" / "_data" / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ROOT / name, dest, ignore=SKIP)


setup(cmdclass={"build_py": BuildPyWithData})
