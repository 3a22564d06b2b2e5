"""Running nodes as processes: :func:`serve` runs one node in this process (``distribkv
serve``), :class:`Launcher` runs every node of a cluster file as a child process
(``distribkv launch``)."""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from distribkv.config import Config, ConfigError, NodeConfig, tls_refused
from distribkv.files import make_private_dir, open_private_append
from distribkv.http.api import Listen, ListenTls
from distribkv.httpclient import HttpClient
from distribkv.node import Node
from distribkv.plugins import PluginRegistry
from distribkv.tls import node_context

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
RESTART_BACKOFF = 0.5  # seconds before the first restart of a node that exited
RESTART_BACKOFF_MAX = 10.0


#: File descriptors a node keeps for itself besides its client connections: storage files,
#: connections to peers, pipes, logs.
OWN_FILES = 1024


def raise_file_limit(connections: int) -> int:
    """Raise the soft limit on open files to what ``connections`` and the node's own files
    need (at most the hard limit), as servers commonly do; a limit still too low is logged.
    Returns the soft limit now in force."""
    needed = connections + OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open files limit (%d) is below connection_limit + %d: connections beyond it"
            " fail; raise it (ulimit -n) or lower [server] connection_limit",
            soft,
            OWN_FILES,
        )
    return soft


def serve(node: Node, registry: PluginRegistry, *, announce=print) -> int:
    """Open the node, serve until SIGTERM or SIGINT, then drain and close the backend."""
    from distribkv.http.app import create_app
    from distribkv.http.kv import inline_requests

    config = node.config
    spec = registry.http_server(config.cluster.server)
    tls = config.tls
    if tls is not None and not spec.tls:
        raise ConfigError(tls_refused(config.path, spec.name))
    server = config.server
    raise_file_limit(server.connection_limit)
    node.open()
    app = create_app(node)
    try:
        handle = spec.create(
            app,
            Listen(
                host=node.address.host,
                port=node.address.port,
                threads=server.threads,
                connection_limit=server.connection_limit,
                channel_timeout=server.channel_timeout,
                header_timeout=server.header_timeout,
                min_body_rate=server.min_body_rate,
                backlog=server.backlog,
                # The largest body a node accepts: a batch, or one value plus room for headers.
                max_request_body_size=max(server.max_batch_bytes, config.storage.max_value_size),
                settings={"drain_timeout": server.drain_timeout},
                inline=inline_requests(node, deferred_writes=spec.deferred),
                direct=app.direct,
                body_check=app.kv.limits.body_check,
                tls=None
                if tls is None
                else ListenTls(
                    str(tls.cert.resolve()),
                    str(tls.key.resolve()),
                    str(tls.ca.resolve()),
                    tls.verify_clients,
                ),
            ),
        )
    except OSError as exc:
        app.close()
        node.close()
        raise ConfigError(
            f"{config.path}: node {node.name} cannot serve on {node.address} with"
            f" {spec.name}: {exc.strerror or exc}"
        ) from None

    def on_signal(signum, frame):
        log.info("node %s: %s received, draining", node.name, signal.Signals(signum).name)
        # Not in the handler: it runs in the serving thread, which may hold the lock that
        # ending the replicas' long-polls takes.
        threading.Thread(target=node.begin_stopping, name="distribkv-stopping", daemon=True).start()
        handle.stop()

    try:
        metrics_listener = _metrics_listener(node, app)
    except OSError as exc:
        app.close()
        node.close()
        port = server.metrics_port
        raise ConfigError(
            f"{config.path}: [server] key 'metrics_port': node {node.name} cannot serve its"
            f" metrics on {node.address.host}:{port}: {exc.strerror or exc}"
        ) from None
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    hooks = registry.manager.hook
    started = False
    try:
        node.start_replication()
        hooks.distribkv_node_started.call_historic(kwargs={"node": node})
        started = True
        announce(
            f"node {node.name} ({node.role}, {node.backend_name}) serving on"
            f" {node.scheme}://{node.address} with {spec.name}",
        )
        # What start-up made (modules, the application, the plugins, prometheus-client's
        # registry) lives as long as the node: out of the collector's sight, a full collection
        # no longer walks it while requests wait.
        gc.collect()
        gc.freeze()
        handle.run()
    finally:
        try:
            if started:  # the plugins were told it started: tell them it stops
                hooks.distribkv_node_stopping(node=node)
        finally:
            node.stop_replication(timeout=server.drain_timeout)
            if metrics_listener is not None:
                metrics_listener.stop()
            app.close()
            node.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
    log.info("node %s stopped", node.name)
    return 0


def _metrics_listener(node: Node, app):
    """The listener of ``[server] metrics_port`` on the node's host, started; None without
    one. HTTPS with the node's ``[tls]``, and the ``/status`` role with ``[auth]``, as the
    node's own port."""
    port = node.config.server.metrics_port
    if port is None or app.metrics is None:
        return None
    from distribkv.metrics.exposition import MetricsListener, server_context

    tls = node.config.tls
    listener = MetricsListener(
        node.address.host,
        port,
        app.metrics,
        authorizer=node.authorizer,
        ssl_context=None if tls is None else server_context(tls),
    )
    log.info("node %s serves its metrics on %s:%d too", node.name, node.address.host, port)
    return listener.start()


def healthy(address: str, timeout: float = 1.0, ssl_context: ssl.SSLContext | None = None) -> bool:
    """True if the node at ``address`` answers ``/healthz`` within ``timeout`` seconds (over
    HTTPS with ``ssl_context``)."""
    client = HttpClient(timeout, per_address=1, ssl_context=ssl_context)
    try:
        return client.request(address, "GET", "/healthz").status == 200
    except OSError:
        return False
    finally:
        client.close()


@dataclass
class Child:
    """One node process of the launcher, and what its supervisor remembers of it."""

    node: NodeConfig
    log_path: Path
    process: subprocess.Popen
    exits: deque[float] = field(default_factory=deque)  # monotonic times of recent crashes
    restart_at: float | None = None
    given_up: bool = False

    @property
    def name(self) -> str:
        return f"{self.node.shard.name}/{self.node.node_name}"


class Launcher:
    """Every node of a cluster file as a child process, each with its own log file.

    :meth:`supervise` restarts a node that exits on its own, after a backoff that doubles with
    each recent exit (``RESTART_BACKOFF`` up to ``RESTART_BACKOFF_MAX`` seconds); a node that
    exits more than ``max_restarts`` times within ``restart_window`` seconds is left down."""

    def __init__(
        self,
        config: Config,
        *,
        log_dir: Path | None = None,
        python: str = sys.executable,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        registry: PluginRegistry | None = None,
    ):
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be 0 or more, not {max_restarts}")
        if restart_window <= 0:
            raise ValueError(f"restart_window must be positive, not {restart_window}")
        self.config = config
        self.log_dir = log_dir or config.storage.data_dir / "logs"
        self.python = python
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.children: list[Child] = []
        self.registry = registry
        self.ssl_context = node_context(config.tls)
        #: What runs before the nodes (a local coordination service), stopped after them.
        self.services = contextlib.ExitStack()
        self.service_lines: list[str] = []

    def _spawn(self, node: NodeConfig, log_path: Path) -> subprocess.Popen:
        cmd = [
            self.python,
            "-m",
            "distribkv",
            "serve",
            "--config",
            str(self.config.path),
            "--shard",
            node.shard.name,
        ]
        if node.replica is not None:
            cmd += ["--replica", str(node.replica)]
        with open_private_append(log_path) as out:
            # A session of its own: a terminal's Ctrl-C reaches only the launcher, which
            # then stops every node in order.
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        make_private_dir(self.log_dir)
        if self.registry is not None:
            spec = self.registry.coordination(self.config.cluster.coordination)
            if spec.launch is not None:
                line = self.services.enter_context(spec.launch(self.config, self.log_dir))
                if line:
                    self.service_lines.append(line)
        for node in self.config.nodes():
            log_path = self.log_dir / f"{node.shard.name}-{node.node_name}.log"
            self.children.append(Child(node, log_path, self._spawn(node, log_path)))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until every node answers ``/healthz``; a node that exits while starting is an
        error (a bad config or a busy port does not get better by restarting)."""
        deadline = time.monotonic() + timeout
        pending = list(self.children)
        while pending:
            for child in list(pending):
                if child.process.poll() is not None:
                    raise RuntimeError(
                        f"node {child.name} exited with status {child.process.returncode};"
                        f" its log {child.log_path} ends with:\n{_tail(child.log_path)}"
                    )
                if healthy(str(child.node.address), ssl_context=self.ssl_context):
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(child.name for child in pending)
                raise RuntimeError(f"nodes not answering /healthz after {timeout:.0f}s: {names}")
            if pending:
                time.sleep(0.05)

    def table(self) -> list[list[str]]:
        rows = [["SHARD", "ROLE", "ADDRESS", "BACKEND", "PID", "LOG"]]
        for child in self.children:
            rows.append(
                [
                    child.node.shard.name,
                    child.node.node_name,
                    str(child.node.address),
                    self.config.storage.backend,
                    str(child.process.pid),
                    str(child.log_path),
                ]
            )
        return rows

    def supervise(self, now: float | None = None) -> list[str]:
        """One round of supervision: note the nodes that exited, restart those whose backoff
        has passed. Returns what happened, one message per event."""
        now = time.monotonic() if now is None else now
        events = []
        for child in self.children:
            if child.given_up:
                continue
            if child.restart_at is None:
                code = child.process.poll()
                if code is None:
                    continue
                while child.exits and now - child.exits[0] > self.restart_window:
                    child.exits.popleft()
                child.exits.append(now)
                what = f"node {child.name} (pid {child.process.pid}) exited with status {code}"
                if len(child.exits) > self.max_restarts:
                    child.given_up = True
                    events.append(
                        f"{what}; it exited {len(child.exits)} times within"
                        f" {self.restart_window:g}s, so it stays down (the other nodes go on;"
                        f" restart the launcher to try it again); log: {child.log_path}\n"
                        f"{_tail(child.log_path)}"
                    )
                    continue
                delay = min(RESTART_BACKOFF * 2 ** (len(child.exits) - 1), RESTART_BACKOFF_MAX)
                child.restart_at = now + delay
                events.append(
                    f"{what}; restarting it in {delay:g}s (exit {len(child.exits)} of at most"
                    f" {self.max_restarts + 1} within {self.restart_window:g}s); log:"
                    f" {child.log_path}\n{_tail(child.log_path, 5)}"
                )
            elif now >= child.restart_at:
                child.restart_at = None
                child.process = self._spawn(child.node, child.log_path)
                events.append(f"node {child.name} restarted: pid {child.process.pid}")
        return events

    @property
    def all_given_up(self) -> bool:
        return bool(self.children) and all(child.given_up for child in self.children)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every child by PID, wait for it to drain, SIGKILL what is left."""
        timeout = self.config.server.drain_timeout + 5 if timeout is None else timeout
        for child in self.children:
            child.restart_at = None
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "node %s did not stop in time; killing pid %d", child.name, child.process.pid
                )
                child.process.kill()
                child.process.wait(timeout=10)
        self.services.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _say(text: str, *, file=None) -> None:
    """Print ``text`` line by line, each flushed at once: the launcher's output often goes to
    a log file (block-buffered), where the nodes and their PIDs must show while they run."""
    out = file or sys.stdout
    for line in text.splitlines():
        out.write(line + "\n")
        out.flush()


def run_launcher(launcher: Launcher, format_table) -> int:
    """Start every node, print ``format_table(rows)`` once all answer, and supervise them until
    a signal (exit status 0) or until every node is down for good (1). A node that exits is
    restarted (see :meth:`Launcher.supervise`) while the others serve on."""
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            launcher.start()
            launcher.wait_ready()
        except RuntimeError as exc:
            _say(f"distribkv: error: {exc}", file=sys.stderr)
            launcher.stop()
            return 1
        for line in launcher.service_lines:
            _say(line)
        _say(format_table(launcher.table()))
        _say("all nodes are up; Ctrl-C stops them")
        while not stop_requested:
            for event in launcher.supervise():
                _say(f"distribkv: {event}", file=sys.stderr)
            if launcher.all_given_up:
                _say("distribkv: error: every node is down; stopping", file=sys.stderr)
                launcher.stop()
                return 1
            time.sleep(0.1)
        _say("stopping all nodes ...")
        launcher.stop()
        _say("all nodes stopped")
        return 0
    finally:
        if any(child.process.poll() is None for child in launcher.children):
            launcher.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["Child", "Launcher", "healthy", "run_launcher", "serve"]
