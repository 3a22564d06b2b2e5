"""The cluster as the page shows it, gathered by the node that serves the page.

Every node of the map the gathering node serves (and, during a reshard, of the shards it adds)
is asked for its ``/status`` and its ``/metrics``, all at once, each call with a short timeout
and the whole gathering with a deadline: a node that does not answer in time is shown as down
and never holds up the answer. One gathering runs at a time and its result is reused for
``min_interval`` seconds, so that any number of open pages costs the cluster one gathering per
interval.

Rates come from the difference between a node's scrape and its previous one (see
:mod:`distribkv.ui.metrics`); the cluster's totals of the last ``history_seconds`` are kept in
a bounded ring, so that a page opened now draws the last minutes at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from distribkv.httpclient import HttpClient, RequestFailed, source_host
from distribkv.protocol import TOKEN_HEADER
from distribkv.ui.metrics import Delta, Scrape, parse

log = logging.getLogger(__name__)

__all__ = ["Gatherer", "Member", "members"]

#: Seconds each call to another node may take (connect, send, each read).
CALL_TIMEOUT = 1.0
#: Seconds a whole gathering may take; what has not answered by then is down.
DEADLINE = 1.5
#: A gathering is reused by requests that come within this many seconds of it.
MIN_INTERVAL = 1.0
#: Seconds of cluster totals kept for the chart.
HISTORY_SECONDS = 300.0
#: Two scrapes further apart than this give no rate (nobody watched in between).
MAX_GAP = 15.0
#: Calls under way at once (two per node).
WORKERS = 16


@attrs.frozen
class Member:
    """One node the page shows: its shard, its place in it (``leader``, ``replica-N``, as in
    the cluster file) and whether its shard only joins with the reshard under way."""

    shard: str
    idx: int
    slot: str
    address: str
    joining: bool = False


def members(node) -> list[Member]:
    """The nodes of the map ``node`` serves, then those of shards a reshard adds."""
    found = []
    known = set()
    shard_maps = [(node.shard_map, False)]
    transition = node.maps.transition
    if transition is not None:
        shard_maps.append((transition.target, True))
    for shard_map, joining in shard_maps:
        for shard in shard_map.shards:
            if shard.name in known:
                continue
            known.add(shard.name)
            slots = [("leader", shard.leader)]
            slots += [(f"replica-{i}", address) for i, address in enumerate(shard.replicas)]
            for slot, address in slots:
                found.append(Member(shard.name, shard.idx, slot, address, joining))
    return found


class Gatherer:
    """Gathers the cluster view for ``/ui/data`` (see the module's docstring)."""

    def __init__(
        self,
        node,
        *,
        call_timeout: float = CALL_TIMEOUT,
        deadline: float = DEADLINE,
        min_interval: float = MIN_INTERVAL,
        history_seconds: float = HISTORY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.node = node
        self.deadline = deadline
        self.min_interval = min_interval
        self.history_seconds = history_seconds
        self.clock = clock
        self.wall = wall
        # The nodes call each other with the cluster token (it counts as admin with [auth]).
        self.client = HttpClient(
            call_timeout,
            per_address=2,
            source_host=source_host(node.address.host),
            ssl_context=node.client_tls,
            headers={TOKEN_HEADER: node.token} if node.token else None,
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self._scrapes: dict[str, Scrape] = {}
        # At most one point per min_interval: the ring never outgrows the window.
        self._history: deque[dict[str, Any]] = deque(maxlen=int(history_seconds / min_interval) + 1)

    def view(self) -> dict[str, Any]:
        """The cluster now (at most ``min_interval`` old). A request that comes while a
        gathering is under way waits for it (at most its deadline) and shares its result."""
        if not self._lock.acquire(timeout=self.deadline * 2):
            if self._last is not None:
                return self._last
            raise TimeoutError("the cluster view is being gathered; try again")
        try:
            if self._last is None or self.clock() - self._last_at >= self.min_interval:
                self._last = self._gather()
                self._last_at = self.clock()
            return self._last
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # --- one gathering ----------------------------------------------------------------------

    def _gather(self) -> dict[str, Any]:
        node = self.node
        nodes = members(node)
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=WORKERS, thread_name_prefix="distribkv-ui"
            )
        started = self.clock()
        statuses = {m.address: self._pool.submit(self._status, m.address) for m in nodes}
        scrapes = {m.address: self._pool.submit(self._scrape, m.address) for m in nodes}
        calls: list[concurrent.futures.Future[Any]] = [*statuses.values(), *scrapes.values()]
        concurrent.futures.wait(calls, timeout=self.deadline)
        late = f"no answer within {self.deadline:g}s"
        mine = node.maps.routing.fingerprint
        rows = []
        deltas = []
        for member in nodes:
            status = _outcome(statuses[member.address], late)
            scrape = _outcome(scrapes[member.address], late)
            row = _row(member, status, mine)
            delta = self._delta(member.address, scrape)
            if isinstance(scrape, Scrape):
                row["metrics"] = "ok"
                if delta is not None:
                    row.update(delta.rates())
                    deltas.append(delta)
            else:
                row["metrics"] = str(scrape)
            rows.append(row)
        now = self.wall()
        total = Delta.total(deltas)
        if total is not None:
            self._history.append({"t": round(now, 3), **total.rates()})
        while self._history and self._history[0]["t"] < now - self.history_seconds:
            self._history.popleft()
        return {
            "node": node.name,
            "at": round(now, 3),
            "gathered_in_s": round(self.clock() - started, 3),
            "deadline_s": self.deadline,
            "fingerprint": mine,
            "routing": node.config.cluster.routing,
            "coordination": node.config.cluster.coordination,
            "shards": _shards(rows),
            "nodes": rows,
            "metrics": any(row["metrics"] == "ok" for row in rows),
            "totals": None if total is None else total.rates(),
            "history": list(self._history),
            "history_seconds": self.history_seconds,
        }

    def _status(self, address: str) -> dict[str, Any]:
        response = self.client.request(address, "GET", "/status")
        if response.status != 200:
            raise _Refused(f"/status answered {response.status} {response.error() or ''}")
        doc = response.document()
        if not isinstance(doc, dict):
            raise _Refused("/status is not a JSON object")
        return doc

    def _scrape(self, address: str) -> Scrape | str:
        at = self.clock()
        response = self.client.request(address, "GET", "/metrics")
        if response.status == 404:
            return "none (no /metrics)"
        if response.status != 200:
            return f"/metrics answered {response.status}"
        try:
            return parse(response.body.decode("utf-8", "replace"), at)
        except ValueError as exc:
            return str(exc)

    def _delta(self, address: str, scrape: object) -> Delta | None:
        """The difference from the node's previous scrape, which this one replaces."""
        if not isinstance(scrape, Scrape):
            self._scrapes.pop(address, None)
            return None
        before = self._scrapes.get(address)
        self._scrapes[address] = scrape
        if before is None or scrape.at - before.at > MAX_GAP:
            return None
        return scrape.since(before)


class _Refused(Exception):
    """A node answered, but not what was asked for."""


def _outcome(future: concurrent.futures.Future, late: str) -> Any:
    """A call's result; for a failed call, the exception; for one still under way, ``late``."""
    if not future.done():
        future.cancel()
        return TimeoutError(late)
    exc = future.exception()
    return future.result() if exc is None else exc


def _row(member: Member, status: Any, mine: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "shard": member.shard,
        "idx": member.idx,
        "slot": member.slot,
        "address": member.address,
        "joining": member.joining,
        "name": f"{member.shard}/{member.slot}",
    }
    if isinstance(status, BaseException):
        down = isinstance(status, RequestFailed | TimeoutError)
        row["state"] = "down" if down else "error"
        row["error"] = str(status) or type(status).__name__
        return row
    replication = status.get("replication") or {}
    reshard = status.get("reshard") or {}
    row.update(
        state="up",
        error=None,
        role=status.get("role"),
        keys=status.get("keys"),
        disk_bytes=status.get("disk_bytes"),
        fingerprint=status.get("fingerprint"),
        fingerprint_agrees=status.get("fingerprint") == mine,
        reshard_phase=reshard.get("phase"),
        reshard_joining=reshard.get("joining"),
        replication_state=replication.get("state"),
        seq=replication.get("last_seq", replication.get("applied_seq")),
        lag_entries=replication.get("lag_entries"),
        lag_seconds=replication.get("lag_seconds"),
        term=status.get("term"),
        backend=status.get("backend"),
        server=status.get("server"),
        uptime_s=status.get("uptime_s"),
        pid=status.get("pid"),
        version=status.get("version"),
    )
    return row


def _shards(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shard: its leader now (the node that says it leads), its key count (the leader's),
    and how many of its nodes answer."""
    shards: dict[str, dict[str, Any]] = {}
    for row in rows:
        shard = shards.setdefault(
            row["shard"],
            {
                "name": row["shard"],
                "idx": row["idx"],
                "joining": row["joining"],
                "leader": None,
                "keys": None,
                "nodes": 0,
                "up": 0,
            },
        )
        shard["nodes"] += 1
        if row["state"] == "up":
            shard["up"] += 1
            if row.get("role") == "leader":
                shard["leader"] = row["name"]
                shard["keys"] = row.get("keys")
    for shard in shards.values():
        if shard["leader"] is None:
            shard["health"] = "no leader"
        elif shard["up"] < shard["nodes"]:
            shard["health"] = "degraded"
        else:
            shard["health"] = "ok"
    return list(shards.values())
