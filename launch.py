#!/usr/bin/env python3
"""Start the local cluster described in sharding.toml.

    python3 launch.py                    # the cluster of ./sharding.toml
    python3 launch.py --config my.toml   # another cluster file

Bootstraps its own virtual environment (.venv) on first use, with the core, the three storage
backends and the plugins (granian, queue, and etcd with its local etcd binaries), then runs
`distribkv launch` inside it: every node of the file starts as a child process, and Ctrl-C
stops them all.
"""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0] if "/" in __file__ else ".")

from tools.bootstrap import ensure_venv, exec_in

PACKAGES = [
    "-e",
    "./plugins/queue",
    "-e",
    "./plugins/granian",
    "-e",
    "./plugins/etcd[local]",
    "-e",
    "./core",
    "-e",
    "./backends/leveldb",
    "-e",
    "./backends/lmdb",
    "-e",
    "./backends/rocksdb",
]

if __name__ == "__main__":
    bin_dir = ensure_venv(".venv", PACKAGES)
    args = sys.argv[1:]
    if "--config" not in args:
        args = ["--config", "sharding.toml", *args]
    exec_in(bin_dir, "distribkv", ["launch", *args])
