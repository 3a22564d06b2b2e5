"""The ``distribkv`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from distribkv import __version__

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "sharding.toml"

#: What ``distribkv get`` writes, as its help says it.
GET_OUTPUT = (
    "On a terminal the value is followed by a newline, as redis-cli prints it. To a pipe or a "
    "file it is written exactly as stored, with nothing added, so 'distribkv get KEY > FILE' "
    "saves the value byte for byte. With --hex the value is printed in hexadecimal and a "
    "newline, wherever it goes."
)

KIND_TITLES = {
    "storage": "storage backends",
    "hashing": "hashing schemes",
    "replication": "replication transports",
    "server": "HTTP servers",
    "coordination": "coordinations",
}


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


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


def _refuse_exposed_nodes(config) -> None:
    """What each node checks when it starts, for every node of the file at once: the exposure
    policy, and that every [auth] token can be read."""
    from distribkv.config import load_cluster_token, load_tokens, refuse_exposed

    token = load_cluster_token(os.environ)
    for node in config.nodes():
        refuse_exposed(config, node, token)
    if config.auth is not None:
        load_tokens(config.auth, os.environ, config.path)


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a cluster file and show its nodes and the plugins they would use."""
    from distribkv.config import load_config
    from distribkv.plugins import load_plugins

    registry = load_plugins()
    config = load_config(args.config, registry)
    backend = registry.storage_backend(config.storage.backend)
    scheme = registry.hashing_scheme(config.cluster.hashing)
    # What every node checks when it starts, so that a file that passes here also serves.
    registry.replication_transport(config.cluster.replication)
    registry.http_server(config.cluster.server)
    _refuse_exposed_nodes(config)
    print(f"cluster {config.path}: {len(config.shards)} shard(s), {len(config.nodes())} node(s)")
    print(
        f"  hashing {scheme.name} ({scheme.description}); routing {config.cluster.routing};"
        f" replication {config.cluster.replication}, min_replicas {config.cluster.min_replicas}"
    )
    print(
        f"  storage {backend.name} ({backend.description}); durability"
        f" {config.storage.durability}; data under {config.storage.data_dir}"
    )
    tls, auth = config.tls, config.auth
    if tls is None:
        secure = "no TLS (plain HTTP)"
    else:
        secure = f"TLS (CA {tls.ca})"
        if tls.verify_clients:
            secure += ", clients must present a certificate"
    if auth is None:
        secure += "; no client tokens"
    else:
        secure += f"; {len(auth.tokens)} client token(s), /status needs {auth.status_role!r}"
    print(f"  security: {secure}")
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one node in the foreground."""
    from distribkv.config import load_config
    from distribkv.files import private_umask

    private_umask()  # the storage engines' files: 0600, their directories 0700
    from distribkv.launcher import serve
    from distribkv.logformat import configure
    from distribkv.node import Node
    from distribkv.plugins import load_plugins

    registry = load_plugins()
    config = load_config(args.config, registry)
    me = config.node(args.shard, args.replica)
    # Before the node opens, so that each of its lines is in the chosen format.
    configure(
        config.server.log_format,
        {"node": f"{me.shard.name}/{me.node_name}", "shard": me.shard.name},
    )
    node = Node(
        config,
        args.shard,
        args.replica,
        registry=registry,
        backend=args.backend,
        data_dir=args.data_dir,
    )
    if config.server.log_format == "json":
        # The line that says where the node serves is a log line too: every line is JSON.
        return serve(node, registry, announce=logging.getLogger("distribkv.launcher").info)
    return serve(node, registry, announce=lambda text: print(text, flush=True))


def cmd_launch(args: argparse.Namespace) -> int:
    """Run every node of the cluster file as a child process."""
    from distribkv.config import load_config
    from distribkv.files import private_umask

    private_umask()  # logs, and the nodes' data (they inherit it)
    from distribkv.launcher import Launcher, run_launcher
    from distribkv.plugins import load_plugins

    registry = load_plugins()
    config = load_config(args.config, registry)
    _refuse_exposed_nodes(config)
    log_dir = Path(args.log_dir) if args.log_dir else None
    launcher = Launcher(
        config,
        log_dir=log_dir,
        max_restarts=args.max_restarts,
        restart_window=args.restart_window,
        registry=registry,
    )
    return run_launcher(launcher, lambda rows: _table(rows, indent=""))


def cmd_promote(args: argparse.Namespace) -> int:
    """A planned switchover: the shard's leader hands its lead to another of its nodes."""
    import time

    from distribkv.config import ConfigError, load_cluster_token, load_config
    from distribkv.httpclient import HttpClient, RequestFailed
    from distribkv.plugins import load_plugins
    from distribkv.protocol import TOKEN_HEADER
    from distribkv.tls import node_context

    registry = load_plugins()
    config = load_config(args.config, registry)
    shard = config.shard(args.shard)
    nodes = {n.node_name: str(n.address) for n in config.nodes() if n.shard.name == shard.name}
    if args.to not in nodes:
        raise ConfigError(
            f"{config.path}: shard {shard.name!r} has no node {args.to!r} (nodes:"
            f" {', '.join(nodes)})"
        )
    token = load_cluster_token(os.environ)
    headers = {TOKEN_HEADER: token} if token else {}
    http = HttpClient(args.timeout + 10, per_address=1, ssl_context=node_context(config.tls))
    try:

        def status(address: str) -> dict | None:
            try:
                answer = http.request(address, "GET", "/status", None, headers, timeout=5.0)
            except RequestFailed:
                return None
            return json.loads(answer.body) if answer.status == 200 else None

        found = {name: status(address) for name, address in nodes.items()}
        leading = [name for name, s in found.items() if s and s["role"] == "leader"]
        if not leading:
            print(f"distribkv: error: no node of shard {shard.name} leads now", file=sys.stderr)
            return 1
        old = leading[0]
        if old == args.to:
            print(f"{args.to} already leads shard {shard.name}")
            return 0
        print(f"shard {shard.name}: {old} fences its writes; {args.to} catches up ...", flush=True)
        answer = http.request(
            nodes[old],
            "POST",
            f"/coordination/handover?to={args.to}&timeout={args.timeout:g}",
            b"",
            headers,
        )
        document = answer.document()
        if answer.status != 200:
            detail = document.get("detail") if isinstance(document, dict) else document
            print(f"distribkv: error: the switchover failed: {detail}", file=sys.stderr)
            return 1
        if config.cluster.coordination == "static":
            # Nothing shared holds the leaders: every node is told, the new leader first.
            record = json.dumps({**document, "node": args.to, "fork": document["seq"]}).encode()
            missed = []
            skip = (nodes[old], nodes[args.to])  # the old leader recorded it itself
            others = [str(n.address) for n in config.nodes() if str(n.address) not in skip]
            for address in [nodes[args.to], *others]:
                try:
                    told = http.request(
                        address,
                        "POST",
                        "/coordination/leader",
                        record,
                        {**headers, "Content-Type": "application/json"},
                    )
                    if told.status != 200:
                        missed.append(f"{address} (HTTP {told.status})")
                except RequestFailed as exc:
                    missed.append(f"{address} ({exc})")
            if missed:
                print(
                    "distribkv: warning: these nodes were not told; they redirect through the"
                    f" old leader until they are: {', '.join(missed)}",
                    file=sys.stderr,
                )
        deadline = time.monotonic() + args.timeout
        while True:
            now = status(nodes[args.to])
            if now and now["role"] == "leader":
                break
            if time.monotonic() > deadline:
                print(f"distribkv: error: {args.to} did not take the lead", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(
            f"shard {shard.name}: {args.to} ({nodes[args.to]}) leads from term"
            f" {document['term']}, at seq {document['seq']}; {old} follows it"
        )
        if config.cluster.coordination == "static":
            print(
                f"distribkv: warning: {config.path} still names {nodes[old]} as the leader of"
                f" {shard.name}; the nodes keep the switchover in their data, but update the"
                " file (swap the addresses) before starting a node with an empty data directory",
                file=sys.stderr,
            )
        return 0
    finally:
        http.close()


def _kv_config(args: argparse.Namespace):
    """The cluster file of a key-value command: needed without --node (to find a node), and
    read when it exists (its [tls] says how to reach the nodes)."""
    from distribkv.config import load_config

    if args.node and not Path(args.config).exists():
        return None
    return load_config(args.config)


def _client_tls(args: argparse.Namespace, config):
    """HTTPS for a command that calls nodes: --ca (with --cert/--key for mutual TLS), else
    the cluster file's [tls]; None for plain HTTP."""
    from distribkv.tls import client_context, node_context

    if args.ca:
        return client_context(args.ca, args.cert, args.key)
    if args.cert:
        raise ValueError("--cert needs --ca")
    return node_context(None if config is None else config.tls)


def _argument_bytes(text: str, name: str, hexadecimal: bool) -> bytes:
    if not hexadecimal:
        return os.fsencode(text)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not hexadecimal (--hex): pairs of 0-9a-f") from None


def cmd_kv(args: argparse.Namespace) -> int:
    """get / set / delete one key through the client (it routes to the owning shard)."""
    from distribkv.client import Client, ClientError

    # os.fsencode gives back the exact bytes of the command line, UTF-8 or not.
    try:
        key = _argument_bytes(args.key, "KEY", args.hex)
        if args.command == "set" and args.value != "-":
            given = _argument_bytes(args.value, "VALUE", args.hex)
    except ValueError as exc:
        print(f"distribkv: error: {exc}", file=sys.stderr)
        return 2
    from distribkv.config import load_client_token

    config = _kv_config(args)
    try:
        tls = _client_tls(args, config)
    except (ValueError, OSError) as exc:
        print(f"distribkv: error: --ca/--cert/--key: {exc}", file=sys.stderr)
        return 2
    node = args.node or str(config.shards[0].address)
    token = load_client_token(os.environ)
    try:
        with Client([node], timeout=args.timeout, token=token, ssl_context=tls) as client:
            if args.command == "get":
                value = client.get(key)
                if value is None:
                    print(f"distribkv: {args.key!r} is not set", file=sys.stderr)
                    return 1
                out = sys.stdout.buffer
                if args.hex:
                    out.write(value.hex().encode() + b"\n")
                else:
                    out.write(value)
                    # As redis-cli does, a terminal gets a newline after the value, so the
                    # prompt starts on a line of its own; a pipe or a file gets exactly the
                    # stored bytes (GET_OUTPUT says so in ``get --help``).
                    if sys.stdout.isatty():
                        out.write(b"\n")
                out.flush()
            elif args.command == "set":
                client.set(key, sys.stdin.buffer.read() if args.value == "-" else given)
            else:
                client.delete(key)
    except ClientError as exc:
        print(f"distribkv: {args.command} failed: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Every node of the cluster file in one table; exit status 1 if anything is wrong."""
    import time

    from distribkv.clusterstatus import gather
    from distribkv.config import load_client_token, load_config
    from distribkv.hashing.shardmap import ShardMap
    from distribkv.httpclient import HttpClient
    from distribkv.plugins import load_plugins
    from distribkv.statusview import plain

    registry = load_plugins()
    config = load_config(args.config, registry)
    fingerprint = ShardMap.from_config(
        config, registry.hashing_scheme(config.cluster.hashing)
    ).fingerprint
    try:
        tls = _client_tls(args, config)
    except (ValueError, OSError) as exc:
        print(f"distribkv: error: --ca/--cert/--key: {exc}", file=sys.stderr)
        return 2
    token = load_client_token(os.environ)
    http = HttpClient(
        args.timeout,
        per_address=2,
        ssl_context=tls,
        headers={"Authorization": f"Bearer {token}"} if token else None,
    )
    fancy = sys.stdout.isatty() and not args.json

    def look():
        return gather(config, fingerprint, http, timeout=args.timeout)

    def text(view) -> str:
        return (
            json.dumps(view.as_dict(), indent=None if args.watch else 2)
            if args.json
            else plain(view)
        )

    view = None
    try:
        if not args.watch:
            view = look()
            if fancy:
                from rich.console import Console

                from distribkv.statusview import rich_view

                Console().print(rich_view(view))
            else:
                print(text(view), flush=True)
            return view.exit_status
        if fancy:
            from rich.live import Live

            from distribkv.statusview import rich_view

            with Live(auto_refresh=False, transient=False) as live:
                while True:
                    view = look()
                    live.update(rich_view(view, interval=args.interval), refresh=True)
                    time.sleep(max(0.0, args.interval - (time.time() - view.taken_at)))
        while True:
            view = look()
            print(text(view) + ("" if args.json else "\n"), flush=True)
            time.sleep(max(0.0, args.interval - (time.time() - view.taken_at)))
    except KeyboardInterrupt:
        # Ctrl-C ends a watch: the exit status is the last look's.
        return 1 if view is None else view.exit_status
    finally:
        http.close()


def cmd_reshard(args: argparse.Namespace) -> int:
    """Move keys from the layout of one cluster file to another's, online."""
    from distribkv.config import load_cluster_token, load_config
    from distribkv.plugins import load_plugins
    from distribkv.reshard import Reshard, ReshardError

    registry = load_plugins()
    source = load_config(args.source, registry)
    target = load_config(args.target, registry)
    try:
        job = Reshard(
            source,
            target,
            registry=registry,
            token=load_cluster_token(os.environ),
            timeout=args.timeout,
            max_rate=args.max_rate,
        )
        try:
            if args.abort:
                job.abort()
                return 0
            result = job.run(dry_run=args.dry_run)
        finally:
            job.close()
    except ReshardError as exc:
        print(f"distribkv: reshard failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from distribkv.config import address_argument

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
            "its role, address and data directory. It checks what serve checks: [tls] files "
            "(cert, key, ca: readable, matching, the key private) with a server that has TLS, "
            "every [auth] token (readable by its owner only, 16 characters or more), and that "
            "a node beyond loopback has a cluster token, [auth] and [tls]."
        ),
    )
    check.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    check.set_defaults(func=cmd_check)

    serve = sub.add_parser(
        "serve",
        help="run one node (a shard's leader, or a replica with --replica)",
        description=(
            "Run one node of the cluster in the foreground: open its storage under "
            "data_dir/<shard>/<node> (directories 0700, files 0600), listen on the address the "
            "cluster file gives it, and serve until SIGTERM or Ctrl-C, which stops "
            "accepting, finishes in-flight requests and closes the storage. Its log goes to "
            "standard error: one access-log line per request and one line per state change, "
            'as text or, with [server] log_format = "json", one JSON object per line (node, '
            "shard, level; method, route, status, duration_ms and bytes of each request; never "
            "a value, a key only with -v). The address is never a wildcard (0.0.0.0 and "
            ":: are refused: it is also where clients and the other nodes reach the node). A "
            "non-loopback address needs all of: a cluster token (DISTRIBKV_CLUSTER_TOKEN or "
            "DISTRIBKV_CLUSTER_TOKEN_FILE), [auth] client tokens with roles (read, write, "
            "admin) and [tls] certificates (cert, key, ca; verify_clients = true for mutual "
            'TLS), which needs server = "granian"; see SECURITY.md.'
        ),
    )
    serve.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    serve.add_argument("--shard", required=True, help="name of the shard this node serves")
    serve.add_argument(
        "--replica",
        type=int,
        default=None,
        metavar="N",
        help="serve the shard's replica N (0-based, in the order of 'replicas'); read-only",
    )
    serve.add_argument("--backend", help="storage backend, overriding [storage] backend")
    serve.add_argument("--data-dir", help="data directory root, overriding [storage] data_dir")
    serve.set_defaults(func=cmd_serve)

    launch = sub.add_parser(
        "launch",
        help="run every node of the cluster file",
        description=(
            "Start every node of the cluster file (leaders and replicas) as child processes, "
            "wait until each answers /healthz, and print where each listens with its PID and "
            "log file. A node that exits on its own is restarted after a backoff (0.5 s, "
            "doubling up to 10 s) while the others serve on; one that exits more than "
            "--max-restarts times within --restart-window seconds is left down with a "
            "message. Ctrl-C or SIGTERM stops them all (each drains its in-flight requests) "
            "and exits 0; the exit status is 1 if a node fails to start or every node is down."
        ),
    )
    launch.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    launch.add_argument("--log-dir", help="where node logs go (default: <data_dir>/logs)")
    launch.add_argument(
        "--max-restarts",
        type=_non_negative_int,
        default=5,
        help="restarts of one node within --restart-window before it is left down"
        " (default: %(default)s; 0 never restarts)",
    )
    launch.add_argument(
        "--restart-window",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="the window over which a node's exits are counted (default: %(default)s)",
    )
    launch.set_defaults(func=cmd_launch)

    promote = sub.add_parser(
        "promote",
        help="hand a shard's lead to another of its nodes (a planned switchover)",
        description=(
            "A switchover that loses no acknowledged write: the shard's leader fences its "
            "writes (clients get 503 'not the leader' and retry), waits until the new node has "
            "applied its last seq, and the coordination makes that node the leader in a new "
            "term; the old leader follows it. With 'static', every node records the new "
            "leader in its data (a restart keeps it) and sharding.toml should be updated; "
            "with 'etcd', etcd holds it."
        ),
    )
    promote.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    promote.add_argument("--shard", required=True, help="the shard, by name")
    promote.add_argument(
        "--to", required=True, metavar="NODE", help="the node to lead it: leader, replica-N"
    )
    promote.add_argument(
        "--timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long the new leader may take to catch up (default: %(default)s)",
    )
    promote.set_defaults(func=cmd_promote)

    status = sub.add_parser(
        "status",
        help="every node of the cluster in one table (exit status 1 if one is down)",
        description=(
            "Ask every node of the cluster file for /status and /cluster, all at once (each "
            "within --timeout), and show one row per node: its shard and place in the file, "
            "the role it has now, its address, whether it is up, its keys and disk use, a "
            "replica's lag (entries behind its leader, and seconds) or the progress of its "
            "resync, its term, and whether it serves the file's map (by fingerprint). Below "
            "the table, what is wrong, one line each. Exit status 0 when every node is up and "
            "all agree; 1 when a node is down or cannot be checked (an error answer, a 401 or "
            "403), a node serves another map, a shard has no leader or two, the nodes "
            "disagree about who leads, or a replica diverged; 2 for a bad file or option. On a "
            "terminal the table is drawn with colours (rich); to a pipe or a file it is plain "
            "aligned text. A cluster with [auth] needs a token that may read /status "
            "([auth] status_role, admin by default): DISTRIBKV_TOKEN or DISTRIBKV_TOKEN_FILE, "
            "else the cluster token (DISTRIBKV_CLUSTER_TOKEN); [tls] of the file gives the CA."
        ),
    )
    status.add_argument(
        "--config", default=DEFAULT_CONFIG, help="cluster file (default: %(default)s)"
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh every --interval seconds (in place on a terminal) until Ctrl-C; the exit"
        " status is the last refresh's",
    )
    status.add_argument(
        "--interval",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between two refreshes with --watch (default: %(default)s)",
    )
    status.add_argument(
        "--timeout",
        type=_positive_float,
        default=2.0,
        metavar="SECONDS",
        help="how long each node may take to answer before it counts as down"
        " (default: %(default)s)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the nodes and problems as JSON (one document per refresh with --watch)",
    )
    status.add_argument(
        "--ca",
        metavar="FILE",
        help="HTTPS: the CA that signed the nodes' certificates (default: [tls] ca of --config)",
    )
    status.add_argument(
        "--cert", metavar="FILE", help="a client certificate, for nodes that verify clients"
    )
    status.add_argument("--key", metavar="FILE", help="the client certificate's private key")
    status.set_defaults(func=cmd_status)

    from distribkv.bench import add_parser as add_bench_parser

    add_bench_parser(sub)

    reshard = sub.add_parser(
        "reshard",
        help="move keys to a new layout (more shards, other hashing), online",
        description=(
            "Change the cluster from the layout of --from to the layout of --to (one more "
            "shard, or modulo -> ring) while it serves: plan (how many keys move from which "
            "shard to which), copy the moving keys with the writes that arrive meanwhile, "
            "fence them (writes get 503 for a moment and clients retry), verify a digest of "
            "every moved range, switch every node to the new map, purge. Start the new "
            "shards' nodes first (distribkv serve --config NEW --shard NAME). Safe to rerun "
            "after a crash at any step: the nodes keep the state of the move. On a terminal the "
            "copy shows a progress bar (keys, keys/s, elapsed, time left); elsewhere a line "
            "every 5 seconds. Exit status 1 "
            "if the move could not finish (the message says what to do). When the cluster "
            "has a token, give it the same way as to the nodes: DISTRIBKV_CLUSTER_TOKEN or "
            "DISTRIBKV_CLUSTER_TOKEN_FILE (the reshard endpoints need it)."
        ),
    )
    reshard.add_argument(
        "--from", dest="source", required=True, metavar="OLD.toml", help="the current layout"
    )
    reshard.add_argument(
        "--to", dest="target", required=True, metavar="NEW.toml", help="the new layout"
    )
    reshard.add_argument(
        "--dry-run", action="store_true", help="print the plan (keys per move) and stop"
    )
    reshard.add_argument(
        "--abort",
        action="store_true",
        help="lift the fence and forget an unfinished move (only before any node switched)",
    )
    reshard.add_argument(
        "--max-rate",
        type=float,
        metavar="KEYS_PER_S",
        help="copy at most this many keys per second, to spare a busy cluster (no limit)",
    )
    reshard.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    reshard.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per request to a node (60)"
    )
    reshard.set_defaults(func=cmd_reshard)

    for name, summary, more in (
        ("get", "print the value of KEY (exit status 1 if absent)", " " + GET_OUTPUT),
        ("set", "store VALUE under KEY ('-' reads the value from standard input)", ""),
        ("delete", "delete KEY", ""),
    ):
        kv = sub.add_parser(
            name,
            help=summary,
            description=(
                f"{summary[0].upper()}{summary[1:]}. Any node answers for any key: a wrong-shard "
                f"node redirects (followed here) or forwards the request.{more} A cluster with "
                "[auth] needs a token: DISTRIBKV_TOKEN, or DISTRIBKV_TOKEN_FILE naming a file "
                "only its owner can read (else DISTRIBKV_CLUSTER_TOKEN, an admin one, is used)."
            ),
        )
        kv.add_argument("key", metavar="KEY")
        if name == "set":
            kv.add_argument("value", metavar="VALUE")
        kv.add_argument(
            "--node",
            metavar="HOST:PORT",
            type=address_argument,
            help="any node of the cluster (default: the first shard's leader of --config)",
        )
        kv.add_argument("--config", default=DEFAULT_CONFIG, help="cluster file, to find a node")
        kv.add_argument(
            "--hex",
            action="store_true",
            help="KEY and VALUE are given in hexadecimal, and get prints the value in hexadecimal",
        )
        kv.add_argument(
            "--timeout",
            type=_positive_float,
            default=5.0,
            help="seconds to fetch the cluster map, then seconds for the call, tries included (5)",
        )
        kv.add_argument(
            "--ca",
            metavar="FILE",
            help="HTTPS: the CA that signed the nodes' certificates (default: [tls] ca of"
            " --config, when it exists)",
        )
        kv.add_argument(
            "--cert", metavar="FILE", help="a client certificate, for nodes that verify clients"
        )
        kv.add_argument("--key", metavar="FILE", help="the client certificate's private key")
        kv.set_defaults(func=cmd_kv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from distribkv.config import ConfigError
    from distribkv.logformat import TEXT_FORMAT
    from distribkv.plugins import DuplicatePluginError, PluginNotFoundError
    from distribkv.storage.errors import StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # A serving node logs one access line per request (INFO); other commands stay quiet.
        level=logging.DEBUG
        if args.verbose
        else (logging.INFO if args.command == "serve" else logging.WARNING),
        format=TEXT_FORMAT,
    )
    try:
        return args.func(args)
    except (ConfigError, PluginNotFoundError, DuplicatePluginError, StorageError) as exc:
        print(f"distribkv: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
