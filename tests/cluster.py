"""Real clusters for the integration tests: `distribkv launch` processes on 127.0.0.x."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

START_TIMEOUT = 60.0


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_config(
    directory: Path,
    *,
    shards: int = 2,
    replicas: dict[int, int] | None = None,
    backend: str = "memory",
    routing: str = "redirect",
    hashing: str = "modulo",
    names: list[str] | None = None,
    extra: str = "",
    data_dir: str = "data",
    hosts_from: int = 2,
    file_name: str = "sharding.toml",
) -> Path:
    """A cluster file with leaders on 127.0.0.{hosts_from+i} and replicas on other hosts."""
    lines = [
        "[cluster]",
        f'hashing = "{hashing}"',
        f'routing = "{routing}"',
        "[storage]",
        f'backend = "{backend}"',
        f'data_dir = "{data_dir}"',
        'durability = "async"',
        extra,
    ]
    for idx in range(shards):
        host = f"127.0.0.{hosts_from + idx}"
        name = names[idx] if names else f"shard-{idx}"
        lines += [
            "[[shards]]",
            f'name = "{name}"',
            f"idx = {idx}",
            f'address = "{host}:{free_port(host)}"',
        ]
        count = (replicas or {}).get(idx, 0)
        if count:
            addresses = []
            for r in range(count):
                rhost = f"127.0.{1 + r}.{hosts_from + idx}"
                addresses.append(f'"{rhost}:{free_port(rhost)}"')
            lines.append(f"replicas = [{', '.join(addresses)}]")
    path = directory / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


class Cluster:
    """`distribkv launch` of a cluster file; stopped with SIGINT like a terminal's Ctrl-C."""

    def __init__(self, config: Path):
        self.config = config
        self.process: subprocess.Popen | None = None
        self.nodes: dict[str, dict[str, str]] = {}
        self.output: list[str] = []

    def start(self) -> Cluster:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distribkv", "launch", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.config.parent,
        )
        deadline = time.monotonic() + START_TIMEOUT
        header = None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("launch ended early:\n" + "".join(self.output))
            self.output.append(line)
            if line.startswith("SHARD"):
                header = line.split()
            elif line.startswith("all nodes are up"):
                return self
            elif header:
                row = dict(zip(header, line.split(), strict=False))
                self.nodes[f"{row['SHARD']}/{row['ROLE']}"] = row
        raise RuntimeError("launch did not report readiness:\n" + "".join(self.output))

    def address(self, shard: str, role: str = "leader") -> str:
        return self.nodes[f"{shard}/{role}"]["ADDRESS"]

    @property
    def pids(self) -> list[int]:
        return [int(row["PID"]) for row in self.nodes.values()]

    def stop(self) -> int:
        """Ctrl-C the launcher; returns its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            rest, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
        self.output.append(rest or "")
        return self.process.returncode

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def call(
    address: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    follow: int = 0,
    timeout: float = 10.0,
) -> Response:
    """One HTTP request (following at most ``follow`` 307 redirects)."""
    for _ in range(follow + 1):
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            raw = conn.getresponse()
            response = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, raw.read())
        finally:
            conn.close()
        if response.status != 307 or follow == 0:
            return response
        location = urlsplit(response.headers["location"])
        address = location.netloc
        target = location.path + (f"?{location.query}" if location.query else "")
    return response


def q(data: bytes) -> str:
    """Percent-encode every byte that is not unreserved (``+`` becomes ``%2B``)."""
    return quote_from_bytes(data, safe="")


class NodeProcess:
    """One `distribkv serve` process, started and stopped (or killed) by PID."""

    def __init__(
        self,
        config: Path,
        shard: str,
        replica: int | None = None,
        *,
        under: list[str] | None = None,
    ):
        """``under``: a command the node runs under (strace, say)."""
        self.config, self.shard, self.replica = config, shard, replica
        self.under = under or []
        self.process: subprocess.Popen | None = None
        name = "leader" if replica is None else f"replica-{replica}"
        self.log_path = config.parent / f"{shard}-{name}.log"

    def start(self, address: str) -> NodeProcess:
        cmd = [
            *self.under,
            sys.executable,
            "-m",
            "distribkv",
            "serve",
            "--config",
            str(self.config),
            "--shard",
            self.shard,
        ]
        if self.replica is not None:
            cmd += ["--replica", str(self.replica)]
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_path.read_text()[-3000:]}")
            try:
                if call(address, "GET", "/healthz", timeout=1).status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"node did not answer /healthz: {self.log_path.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "") -> float:
    """Poll ``predicate`` until it is true; returns the seconds it took, fails after timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout}s: {message}")
        time.sleep(interval)
