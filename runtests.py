#!/usr/bin/env python3
"""Run the whole test matrix: tox over every storage backend, plus lint.

    python3 runtests.py                 # every environment
    python3 runtests.py -e py311-lmdb   # one environment (any tox arguments work)

Bootstraps its own virtual environment (.venv-tools) with tox on first use.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0] if "/" in __file__ else ".")

from tools.bootstrap import ROOT, ensure_venv, exec_in

if __name__ == "__main__":
    bin_dir = ensure_venv(".venv-tools", ["tox>=4.20"])
    exec_in(bin_dir, "tox", ["-c", str(ROOT / "tox.ini"), *sys.argv[1:]])
