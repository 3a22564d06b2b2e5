"""Running nodes as processes: :func:`serve` runs one node in this process (``distribkv
serve``), :class:`Launcher` runs every node of a cluster file as a child process
(``distribkv launch``)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from distribkv.config import Config, ConfigError, NodeConfig
from distribkv.http.api import Listen
from distribkv.httpclient import HttpClient
from distribkv.node import Node
from distribkv.plugins import PluginRegistry

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0


def serve(node: Node, registry: PluginRegistry, *, announce=print) -> int:
    """Open the node, serve until SIGTERM or SIGINT, then drain and close the backend."""
    from distribkv.http.app import create_app
    from distribkv.http.kv import inline_requests

    config = node.config
    spec = registry.http_server(config.cluster.server)
    node.open()
    app = create_app(node)
    server = config.server
    try:
        handle = spec.create(
            app,
            Listen(
                host=node.address.host,
                port=node.address.port,
                threads=server.threads,
                connection_limit=server.connection_limit,
                channel_timeout=server.channel_timeout,
                # The largest body a node accepts: a batch, or one value plus room for headers.
                max_request_body_size=max(server.max_batch_bytes, config.storage.max_value_size),
                settings={"drain_timeout": server.drain_timeout},
                inline=inline_requests(node, deferred_writes=spec.deferred),
                direct=app.direct,
                body_check=app.kv.limits.body_check,
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

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    hooks = registry.manager.hook
    started = False
    try:
        node.start_replication()
        hooks.distribkv_node_started.call_historic(kwargs={"node": node})
        started = True
        announce(
            f"node {node.name} ({node.role}, {node.backend_name}) serving on"
            f" http://{node.address} with {spec.name}",
        )
        handle.run()
    finally:
        try:
            if started:  # the plugins were told it started: tell them it stops
                hooks.distribkv_node_stopping(node=node)
        finally:
            node.stop_replication(timeout=server.drain_timeout)
            app.close()
            node.close()
            for sig, old in previous.items():
                signal.signal(sig, old)
    log.info("node %s stopped", node.name)
    return 0


def healthy(address: str, timeout: float = 1.0) -> bool:
    """True if the node at ``address`` answers ``/healthz`` within ``timeout`` seconds."""
    client = HttpClient(timeout, per_address=1)
    try:
        return client.request(address, "GET", "/healthz").status == 200
    except OSError:
        return False
    finally:
        client.close()


class Launcher:
    """Every node of a cluster file as a child process, each with its own log file."""

    def __init__(
        self, config: Config, *, log_dir: Path | None = None, python: str = sys.executable
    ):
        self.config = config
        self.log_dir = log_dir or config.storage.data_dir / "logs"
        self.python = python
        self.children: list[tuple[NodeConfig, subprocess.Popen, Path]] = []

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for node in self.config.nodes():
            log_path = self.log_dir / f"{node.shard.name}-{node.node_name}.log"
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
            with open(log_path, "ab") as out:
                # A session of its own: a terminal's Ctrl-C reaches only the launcher, which
                # then stops every node in order.
                child = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.children.append((node, child, log_path))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.children)
        while pending:
            for entry in list(pending):
                node, child, log_path = entry
                if child.poll() is not None:
                    raise RuntimeError(
                        f"node {node.shard.name}/{node.node_name} exited with status"
                        f" {child.returncode}; its log {log_path} ends with:\n{_tail(log_path)}"
                    )
                if healthy(str(node.address)):
                    pending.remove(entry)
            if pending and time.monotonic() > deadline:
                names = ", ".join(f"{n.shard.name}/{n.node_name}" for n, _, _ in pending)
                raise RuntimeError(f"nodes not answering /healthz after {timeout:.0f}s: {names}")
            if pending:
                time.sleep(0.05)

    def table(self) -> list[list[str]]:
        rows = [["SHARD", "ROLE", "ADDRESS", "BACKEND", "PID", "LOG"]]
        for node, child, log_path in self.children:
            rows.append(
                [
                    node.shard.name,
                    node.node_name,
                    str(node.address),
                    self.config.storage.backend,
                    str(child.pid),
                    str(log_path),
                ]
            )
        return rows

    def first_exit(self) -> tuple[NodeConfig, int, Path] | None:
        for node, child, log_path in self.children:
            if child.poll() is not None:
                return node, child.returncode, log_path
        return None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM every child by PID, wait for it to drain, SIGKILL what is left."""
        timeout = self.config.server.drain_timeout + 5 if timeout is None else timeout
        for _, child, _ in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node, child, _ in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "node %s/%s did not stop in time; killing pid %d",
                    node.shard.name,
                    node.node_name,
                    child.pid,
                )
                child.kill()
                child.wait(timeout=10)


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
    """Start every node, print ``format_table(rows)`` once all answer, and run until a signal
    (exit status 0) or until a node exits (1)."""
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher.start()
        try:
            launcher.wait_ready()
        except RuntimeError as exc:
            _say(f"distribkv: error: {exc}", file=sys.stderr)
            launcher.stop()
            return 1
        _say(format_table(launcher.table()))
        _say("all nodes are up; Ctrl-C stops them")
        while not stop_requested:
            exited = launcher.first_exit()
            if exited is not None:
                node, code, log_path = exited
                _say(
                    f"distribkv: error: node {node.shard.name}/{node.node_name} exited with"
                    f" status {code}; log: {log_path}\n{_tail(log_path)}",
                    file=sys.stderr,
                )
                launcher.stop()
                return 1
            time.sleep(0.2)
        _say("stopping all nodes ...")
        launcher.stop()
        _say("all nodes stopped")
        return 0
    finally:
        if launcher.children and any(c.poll() is None for _, c, _ in launcher.children):
            launcher.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["Launcher", "healthy", "run_launcher", "serve"]
