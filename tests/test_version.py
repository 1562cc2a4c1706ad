"""The package version is written twice (pyproject.toml for the build, freezekern.version for the code); the
two must agree."""

import re
from pathlib import Path

import freezekern
from freezekern.version import __version__


def test_package_version_matches_pyproject():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    match = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    assert match, "pyproject.toml has no static version line"
    assert match.group(1) == __version__ == freezekern.__version__
