"""Create and refresh the project's virtual environments with nothing but python3.

Used by launch.py and runtests.py at the repository's root. A stamp file records what was
installed, so a second run starts at once unless a pyproject.toml changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fingerprint(requirements: list[str]) -> str:
    digest = hashlib.sha256("\n".join(requirements).encode())
    for pyproject in sorted(ROOT.glob("**/pyproject.toml")):
        if ".tox" in pyproject.parts or pyproject.parts[-2].startswith(".venv"):
            continue
        digest.update(pyproject.read_bytes())
    return digest.hexdigest()


def ensure_venv(name: str, requirements: list[str]) -> Path:
    """The bin directory of ROOT/name, created and populated with ``requirements`` if needed."""
    home = ROOT / name
    bin_dir = home / "bin"
    stamp = home / ".distribkv-installed"
    wanted = _fingerprint(requirements)
    if stamp.exists() and stamp.read_text() == wanted and (bin_dir / "python").exists():
        return bin_dir
    if not (bin_dir / "python").exists():
        print(f"creating the virtual environment {home} ...", flush=True)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(home)
        except Exception as exc:  # noqa: BLE001 - explain the usual Debian cause
            sys.exit(
                f"could not create a virtual environment in {home}: {exc}\n"
                "on Debian or Ubuntu install the venv module first: apt-get install python3-venv"
            )
    print(f"installing into {home}: {' '.join(requirements)}", flush=True)
    pip = [str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "--quiet", *requirements], check=True, cwd=ROOT)
    stamp.write_text(wanted)
    return bin_dir


def exec_in(bin_dir: Path, program: str, args: list[str]) -> None:
    """Replace this process with ``program`` from ``bin_dir``."""
    path = str(bin_dir / program)
    os.execv(path, [path, *args])
