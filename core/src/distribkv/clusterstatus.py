"""``distribkv status``: every node of a cluster file in one table, and what is wrong.

Each node is asked for ``/status`` and ``/cluster`` at once (one thread per node, a short
timeout each), so a node that hangs costs the timeout once, not once per node. What counts as
a problem (and makes the command's exit status 1): a node that does not answer, or answers
with an error (401 or 403 too: it cannot be checked); a node whose map is not the file's
(by fingerprint); nodes of one shard that disagree about who leads it, or a shard with no
leader answering; a replica that diverged from its leader.

This module only gathers and judges; :mod:`distribkv.statusview` draws.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from distribkv.config import Config
from distribkv.httpclient import HttpClient, RequestFailed

__all__ = ["ClusterStatus", "NodeStatus", "gather"]


@attrs.frozen
class NodeStatus:
    """One node as the file names it, and what it answered (``status`` and ``cluster`` are its
    ``/status`` and ``/cluster`` documents; None when it did not answer them)."""

    shard: str
    name: str  # leader, replica-N: its place in the file
    address: str
    status: Mapping[str, Any] | None
    cluster: Mapping[str, Any] | None
    error: str | None  # why it is not up (None: it answered both)
    #: It answered HTTP, if with an error (401, 403, 500): running, but it cannot be checked.
    reachable: bool

    @property
    def up(self) -> bool:
        return self.error is None

    @property
    def state(self) -> str:
        """ "up", "down" (no answer) or "error" (an answer that is not the document)."""
        return "up" if self.up else ("error" if self.reachable else "down")

    @property
    def role(self) -> str | None:
        return None if self.status is None else self.status.get("role")

    @property
    def replication(self) -> Mapping[str, Any]:
        return {} if self.status is None else self.status.get("replication") or {}

    @property
    def fingerprint(self) -> str | None:
        return None if self.status is None else self.status.get("fingerprint")

    def as_dict(self, file_fingerprint: str) -> dict[str, Any]:
        status = self.status or {}
        replication = self.replication
        return {
            "shard": self.shard,
            "node": self.name,
            "address": self.address,
            "up": self.up,
            "state": self.state,
            "error": self.error,
            "role": self.role,
            "term": status.get("term"),
            "leader": status.get("leader"),
            "keys": status.get("keys"),
            "disk_bytes": status.get("disk_bytes"),
            "fingerprint": self.fingerprint,
            "map_agrees": None
            if self.fingerprint is None
            else self.fingerprint == file_fingerprint,
            "replication_state": replication.get("state"),
            "lag_entries": replication.get("lag_entries"),
            "lag_seconds": replication.get("lag_seconds"),
            "resync": replication.get("resync"),
            "pid": status.get("pid"),
            "uptime_s": status.get("uptime_s"),
        }


@attrs.frozen
class ClusterStatus:
    """Every node of the file at one moment, and the problems found."""

    config_path: str
    fingerprint: str  # the file's map
    nodes: tuple[NodeStatus, ...]
    problems: tuple[str, ...]
    taken_at: float  # time.time() when it was asked

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_path,
            "fingerprint": self.fingerprint,
            "taken_at": round(self.taken_at, 3),
            "ok": self.ok,
            "problems": list(self.problems),
            "nodes": [node.as_dict(self.fingerprint) for node in self.nodes],
        }


def _ask(http: HttpClient, address: str, path: str, timeout: float) -> tuple[Any, str | None, bool]:
    """(document, None, True), or (None, why not, whether it answered HTTP at all)."""
    try:
        answer = http.request(address, "GET", path, timeout=timeout)
    except RequestFailed as exc:
        return None, "timed out" if exc.timed_out else _short(str(exc)), False
    if answer.status != 200:
        detail = answer.error() or answer.body[:80].decode("utf-8", "replace")
        hint = " (give a token: DISTRIBKV_TOKEN)" if answer.status in (401, 403) else ""
        return None, f"{path} answered {answer.status} {detail}{hint}", True
    try:
        return json.loads(answer.body), None, True
    except ValueError:
        return None, f"{path} answered something that is not JSON", True


def _short(message: str) -> str:
    # "GET /status at 127.0.0.2:8080: [Errno 111] Connection refused" -> "Connection refused"
    reason = message.rsplit(": ", 1)[-1]
    return reason.split("] ", 1)[-1]


def gather(
    config: Config, file_fingerprint: str, http: HttpClient, *, timeout: float
) -> ClusterStatus:
    """Ask every node of ``config`` for ``/status`` and ``/cluster``, all at once."""
    taken_at = time.time()
    places = [
        (node.shard.name, node.node_name, str(node.address), path)
        for node in config.nodes()
        for path in ("/status", "/cluster")
    ]
    with ThreadPoolExecutor(max_workers=min(32, len(places))) as pool:
        answers = list(pool.map(lambda place: _ask(http, place[2], place[3], timeout), places))
    nodes = []
    for i in range(0, len(places), 2):
        shard, name, address, _ = places[i]
        status, status_error, status_reached = answers[i]
        cluster, cluster_error, cluster_reached = answers[i + 1]
        error = status_error or cluster_error
        reached = status_reached or cluster_reached
        nodes.append(NodeStatus(shard, name, address, status, cluster, error, reached))
    return ClusterStatus(
        str(config.path),
        file_fingerprint,
        tuple(nodes),
        tuple(problems(nodes, file_fingerprint, str(config.path))),
        taken_at,
    )


def problems(nodes: list[NodeStatus], file_fingerprint: str, path: str) -> list[str]:
    """What is wrong, one sentence each (empty: all is well)."""
    found = []
    for node in nodes:
        where = f"{node.shard}/{node.name} at {node.address}"
        if not node.up:
            what = "cannot be checked" if node.reachable else "is down"
            found.append(f"{where} {what}: {node.error}")
            continue
        if node.fingerprint != file_fingerprint:
            found.append(
                f"{where} serves map {node.fingerprint}, not the map of {path} ({file_fingerprint})"
            )
        diverged = node.replication.get("diverged")
        if diverged:
            found.append(f"{where} diverged from its leader: {diverged}")
    for shard in dict.fromkeys(node.shard for node in nodes):
        members = [n for n in nodes if n.shard == shard and n.up]
        leading = [n for n in members if n.role == "leader"]
        if len(leading) > 1:
            names = ", ".join(n.name for n in leading)
            found.append(f"{shard} has more than one node that says it leads: {names}")
        elif members and not leading:
            found.append(f"{shard} has no leader answering")
        views = {
            json.dumps((n.cluster or {}).get("leaders", {}).get(shard), sort_keys=True)
            for n in nodes
            if n.up
        }
        if len(views) > 1:
            found.append(f"the nodes disagree about who leads {shard}")
    return found
