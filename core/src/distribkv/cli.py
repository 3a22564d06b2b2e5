"""The ``distribkv`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from distribkv import __version__

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "sharding.toml"

KIND_TITLES = {
    "storage": "storage backends",
    "hashing": "hashing schemes",
    "replication": "replication transports",
    "server": "HTTP servers",
}


def _table(rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        indent
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins without loading any native storage library."""
    from distribkv.plugins import KINDS, load_plugins

    registry = load_plugins()
    if args.json:
        out = {
            kind: [
                {
                    "name": p.name,
                    "distribution": p.plugin.distribution,
                    "version": p.plugin.version,
                    "description": p.spec.description,
                    **(
                        {"capabilities": p.spec.capabilities.names()}
                        if hasattr(p.spec, "capabilities")
                        else {}
                    ),
                }
                for p in registry.provided(kind)
            ]
            for kind in KINDS
        }
        out["unavailable"] = [
            {
                "name": i.name,
                "distribution": i.distribution,
                "version": i.version,
                "reason": i.error,
            }
            for i in registry.failed
        ]
        print(json.dumps(out, indent=2))
        return 0
    for kind in KINDS:
        print(f"{KIND_TITLES[kind]}:")
        provided = registry.provided(kind)
        if not provided:
            print("  (none installed)")
            continue
        rows = [["NAME", "DISTRIBUTION", "VERSION", "CAPABILITIES", "DESCRIPTION"]]
        for p in provided:
            caps = getattr(p.spec, "capabilities", None)
            rows.append(
                [
                    p.name,
                    p.plugin.distribution,
                    p.plugin.version,
                    ", ".join(caps.names()) if caps is not None else "-",
                    p.spec.description,
                ]
            )
        print(_table(rows))
    if registry.failed:
        print("unavailable plugins:")
        rows = [["NAME", "DISTRIBUTION", "VERSION", "REASON"]]
        rows += [[i.name, i.distribution, i.version, i.error or ""] for i in registry.failed]
        print(_table(rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a cluster file and show its nodes and the plugins they would use."""
    from distribkv.config import load_config
    from distribkv.plugins import load_plugins

    registry = load_plugins()
    config = load_config(args.config, registry)
    backend = registry.storage_backend(config.storage.backend)
    scheme = registry.hashing_scheme(config.cluster.hashing)
    print(f"cluster {config.path}: {len(config.shards)} shard(s), {len(config.nodes())} node(s)")
    print(
        f"  hashing {scheme.name} ({scheme.description}); routing {config.cluster.routing};"
        f" replication {config.cluster.replication}, min_replicas {config.cluster.min_replicas}"
    )
    print(
        f"  storage {backend.name} ({backend.description}); durability"
        f" {config.storage.durability}; data under {config.storage.data_dir}"
    )
    rows = [["SHARD", "IDX", "ROLE", "ADDRESS", "DATA DIRECTORY"]]
    for node in config.nodes():
        rows.append(
            [
                node.shard.name,
                str(node.shard.idx),
                node.node_name,
                str(node.address),
                str(node.data_dir),
            ]
        )
    print(_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distribkv",
        description=(
            "distribkv: a sharded, replicated key-value database. Storage engines, hashing "
            "schemes, replication transports and HTTP servers are plugins chosen by name in "
            "sharding.toml."
        ),
    )
    parser.add_argument("--version", action="version", version=f"distribkv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    plugins = sub.add_parser(
        "plugins",
        help="list installed plugins by kind",
        description=(
            "List every installed plugin by kind (storage backends, hashing schemes, "
            "replication transports, HTTP servers) with its distribution, version and "
            "capabilities, and the plugins that failed to load with the reason. Native "
            "libraries (plyvel, lmdb, rocksdict) are not imported. Set "
            "DISTRIBKV_DISABLE_PLUGINS=a,b to block plugins by name."
        ),
    )
    plugins.add_argument("--json", action="store_true", help="print JSON instead of tables")
    plugins.set_defaults(func=cmd_plugins)

    check = sub.add_parser(
        "check",
        help="validate a cluster file and show its nodes",
        description=(
            "Read a sharding.toml, validate it (every error names the file, the table and the "
            "key), check that the plugins it names are installed, and print every node with "
            "its role, address and data directory."
        ),
    )
    check.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from distribkv.config import ConfigError
    from distribkv.plugins import DuplicatePluginError, PluginNotFoundError
    from distribkv.storage.errors import StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, PluginNotFoundError, DuplicatePluginError, StorageError) as exc:
        print(f"distribkv: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
