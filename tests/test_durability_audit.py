"""Promise 1 on a real node (T2): with ``durability = "sync"`` no write is acknowledged before it
is on disk. kill -9 cannot show this (the page cache survives a process crash), so the node runs
under strace, and the order of its system calls is the evidence: between receiving a write and
sending its 200, the node must have completed an fsync or fdatasync. With ``"async"`` (the
control) no write is flushed before its answer.

One client writes in sequence on one connection, so each request's receipt, flush and answer
follow each other in the trace. Both servers are audited: each answers a write once the
committer thread has applied its group (waitress from its I/O thread, which the committer
hands the answer to; granian from the committer thread itself)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from distribkv.testing.cluster import NodeProcess, node_addresses, write_config

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

WRITES = 200
SYNCS = ("fsync", "fdatasync", "msync")
# A read's data shows when it returns: on its line, or on its "resumed" line.
RECEIVE = re.compile(r'(\b(read|recvfrom|recv)\(\d+, | resumed>)"PUT /set\?key=audit-')
ANSWER = re.compile(r'\b(write|writev|sendto|sendmsg|send)\(\d+, \[?\{?[^"]*"HTTP/1\.1 200 ', re.I)
SYNCED = re.compile(r"\b(" + "|".join(SYNCS) + r")(\(\d+.*| resumed>.*)\) += 0\s*$")


def stop_traced(node: NodeProcess) -> None:
    """SIGTERM to the node itself, strace's child (strace ends when it does); SIGKILL to both
    if it does not stop."""
    tracer = node.process.pid
    children = [
        int(pid) for pid in Path(f"/proc/{tracer}/task/{tracer}/children").read_text().split()
    ]
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    try:
        code = node.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [*children, tracer]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.process.wait(timeout=10)
        raise AssertionError("the node did not stop within 60 s of SIGTERM") from None
    assert code == 0, node.log_path.read_text()[-2000:]


def audit(trace: str) -> tuple[int, int, int]:
    """(writes received, answers, answers with a completed flush since their write arrived)."""
    received = answers = flushed = 0
    waiting = synced = False
    for line in trace.splitlines():
        if RECEIVE.search(line):
            received += 1
            waiting, synced = True, False
        elif waiting and SYNCED.search(line) and "unfinished" not in line:
            synced = True
        elif waiting and ANSWER.search(line):
            answers += 1
            flushed += synced
            waiting = False
    return received, answers, flushed


@pytest.mark.parametrize("server", ["waitress", "granian"])
@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_sync_write_is_flushed_before_it_is_acknowledged(
    tmp_path, hosts, backend_name, server, durability
):
    if server == "granian":
        pytest.importorskip("distribkv_granian")
    path = write_config(
        tmp_path, hosts=hosts, shards=1, backend=backend_name, server=server, durability=durability
    )
    address = node_addresses(path)["shard-0/leader"]
    trace_path = tmp_path / "strace.txt"
    node = NodeProcess(
        path,
        "shard-0",
        under=[
            "strace",
            "-f",
            "-qq",
            "-s",
            "64",
            "-e",
            "trace=read,recvfrom,recvmsg,write,writev,sendto,sendmsg," + ",".join(SYNCS),
            "-o",
            str(trace_path),
        ],
    ).start(address)
    try:
        host, _, port = address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            reader = sock.makefile("rb")
            for i in range(WRITES):
                body = b"value-%d" % i
                sock.sendall(
                    b"PUT /set?key=audit-%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (i, len(body), body)
                )
                status = reader.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                reader.read(length)
    finally:
        stop_traced(node)
    received, answers, flushed = audit(trace_path.read_text(errors="replace"))
    assert received == answers == WRITES, (received, answers)
    if durability == "sync":
        assert flushed == WRITES, f"{WRITES - flushed} of {WRITES} writes answered before a flush"
    else:
        assert flushed == 0, f"{flushed} async writes were flushed before their answer"
