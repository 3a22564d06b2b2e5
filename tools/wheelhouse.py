"""Install requirements with pip, building each local distribution into a wheel only once.

tox runs this as its install command (tox.ini's ``install_command``)::

    python tools/wheelhouse.py WHEELHOUSE [pip install options and requirements]

Every requirement that names a directory of this repository with a pyproject.toml (``core``,
``plugins/queue``, ``backends/lmdb[extra]``, ...) is replaced by a wheel of it from
WHEELHOUSE, built there first if its sources changed since the last build (the wheel's
folder is named after a hash of them). Every environment of a tox run then installs the same
wheels instead of building each distribution again in a build environment of its own. The
rest of the arguments go to ``pip install`` as they are.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: What a build never reads: caches and earlier build output.
SKIPPED_PARTS = {"__pycache__", "build", "dist", ".tox", ".pytest_cache", ".ruff_cache"}
_EXTRAS = re.compile(r"^(?P<path>.+?)(?P<extras>\[[^\]]*\])?$")


def source_hash(directory: Path) -> str:
    """A hash of every file a build of ``directory`` could read."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or SKIPPED_PARTS.intersection(relative.parts):
            continue
        if path.suffix == ".pyc" or any(p.endswith(".egg-info") for p in relative.parts):
            continue
        digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def local_directory(requirement: str) -> tuple[Path, str] | None:
    """(directory, extras) if ``requirement`` is a local distribution's directory."""
    if requirement.startswith("-"):
        return None
    match = _EXTRAS.match(requirement)
    directory = Path(match["path"])
    if not (directory / "pyproject.toml").is_file():
        return None
    return directory.resolve(), match["extras"] or ""


def wheel_for(directory: Path, wheelhouse: Path) -> Path:
    """The wheel of ``directory``'s current sources, built into ``wheelhouse`` if missing.
    Called with the wheelhouse's lock held."""
    home = wheelhouse / f"{directory.name}-{source_hash(directory)}"
    wheels = sorted(home.glob("*.whl")) if home.is_dir() else []
    if wheels:
        return wheels[0]
    print(f"wheelhouse: building {directory}", flush=True)
    with tempfile.TemporaryDirectory(dir=wheelhouse) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                scratch,
                str(directory),
            ],
            check=True,
        )
        (built,) = Path(scratch).glob("*.whl")
        for stale in wheelhouse.glob(f"{directory.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        home.mkdir()
        return Path(shutil.move(str(built), home / built.name))


def main(argv: list[str]) -> None:
    wheelhouse = Path(argv[0]).resolve()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    arguments = []
    with open(wheelhouse / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tox -p: environments that build at once wait
        for argument in argv[1:]:
            local = local_directory(argument)
            if local is None:
                arguments.append(argument)
            else:
                directory, extras = local
                arguments.append(f"{wheel_for(directory, wheelhouse)}{extras}")
    command = [sys.executable, "-I", "-m", "pip", "install", *arguments]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main(sys.argv[1:])
