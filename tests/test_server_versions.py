"""The server plugins build on their servers' internals (waitress's channel, parser and tasks;
granian's worker), so each is pinned to the release series it was tested with. These tests
fail, saying what to do, when another release is installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pin(pyproject: Path, package: str) -> str:
    """The requirement on ``package`` in a distribution's pyproject.toml."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = [d for d in dependencies if re.match(rf"{package}\b", d)]
    assert len(found) == 1, f"{pyproject}: one requirement on {package} expected, got {found}"
    return found[0]


def _check(package: str, tested: str, where: str, pyproject: Path) -> None:
    installed = metadata.version(package)
    assert installed.split(".")[:2] == tested.split("."), (
        f"{package} {installed} is installed, but {where} builds on {package}'s internals and"
        f" was tested only with {package} {tested}.x. Run the test matrix with this release,"
        f" then update the tested series there and the pin in {pyproject.relative_to(ROOT)};"
        f" until then install {package} {tested}.x"
    )
    major, minor = (int(part) for part in tested.split("."))
    assert _pin(pyproject, package).endswith(f",<{major}.{minor + 1}"), (
        f"{pyproject.relative_to(ROOT)} must pin {package} below {major}.{minor + 1}, the"
        f" series after the tested {tested}"
    )


def test_waitress_is_the_release_series_the_node_was_tested_with():
    from distribkv.servers.waitress import TESTED_WAITRESS

    _check(
        "waitress",
        TESTED_WAITRESS,
        "distribkv.servers.waitress",
        ROOT / "core" / "pyproject.toml",
    )


def test_granian_is_the_release_series_the_plugin_was_tested_with():
    granian_plugin = pytest.importorskip("distribkv_granian")
    _check(
        "granian",
        granian_plugin.TESTED_GRANIAN,
        "distribkv_granian",
        ROOT / "plugins" / "granian" / "pyproject.toml",
    )


def test_a_release_outside_the_tested_series_fails_with_what_to_do(monkeypatch):
    monkeypatch.setattr(metadata, "version", lambda package: "3.1.0")
    with pytest.raises(AssertionError, match=r"waitress 3\.1\.0 is installed.*tested only with"):
        _check("waitress", "3.0", "distribkv.servers.waitress", ROOT / "core" / "pyproject.toml")
