"""The Python client: routes each key to its shard itself, over pooled keep-alive connections.

    from distribkv.client import Client

    with Client(["127.0.0.2:8080"]) as db:
        db.set(b"key", b"value")
        db.get(b"key")                       # b"value" (None if absent)
        db.set_many({b"a": b"1", b"b": b"2"})  # one /batch per shard, in parallel
        db.get_many([b"a", b"b", b"c"])      # {b"a": b"1", b"b": b"2", b"c": None}

It fetches the shard map from ``/cluster`` of any node and hashes keys with the same hashing
plugin, so with a current map no request needs a redirect. Every request carries the map's
fingerprint; a node with another map answers 409, and the client fetches the map from that
node and retries, so a changed layout is invisible to the caller. Redirects are followed (at
most ``max_redirects``) in case a node still knows better. Reads are retried with backoff on
connection errors; writes are retried only when the request could not have been sent, or when
a reshard answered 503 "moving" (the write was not applied; retried for up to ``move_wait``
seconds). ``read_preference`` says where reads go: "leader" (the default), "leader_preferred"
(a replica while the leader cannot be reached) or "replica" (the leader while the replica
cannot answer, or is still reloading its data). With a coordination that elects leaders, a
request whose leader is gone waits for the next one (``failover_wait``).

A cluster with ``[auth]`` needs a ``token`` (sent as ``Authorization: Bearer``); one with
``[tls]`` an ``ssl_context`` that trusts its CA (``distribkv.tls.client_context(ca)``, with a
client certificate where the nodes verify clients).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote_from_bytes, urlsplit

import attrs
import msgpack

from distribkv.hashing.shardmap import ShardMap
from distribkv.httpclient import NO_RETRY, HttpClient, RequestFailed, Response, Retry
from distribkv.plugins import PluginRegistry, load_plugins
from distribkv.protocol import LAG_ENTRIES_HEADER, MAP_HEADER, MSGPACK

log = logging.getLogger(__name__)

BATCH_OPS = 1000
#: How many times one request may fetch the map again after a 409 (a reshard switches the nodes
#: one by one, so a request can meet an old and a new map in a row).
MAX_MAP_REFRESHES = 4
#: 503 answers that mean "this node leads the shard no more" (or not yet another one).
LEADERLESS = ("not the leader", "outcome unknown")
READ_PREFERENCES = ("leader", "leader_preferred", "replica")


class ClientError(Exception):
    """Base class of the client's errors."""


class RequestError(ClientError):
    """The node refused the request (4xx other than 404); ``status`` and ``body`` tell why."""

    def __init__(self, status: int, body: bytes, what: str):
        self.status, self.body = status, body
        try:
            detail = json.loads(body).get("detail") or json.loads(body).get("error")
        except (ValueError, AttributeError):
            detail = body[:200].decode(errors="replace")
        super().__init__(f"{what}: HTTP {status}: {detail}")


class ServerError(RequestError):
    """The node failed (5xx), e.g. 503 for a write not replicated to min_replicas."""


class Unavailable(ClientError):
    """No node could be reached in time."""


class NotANode(ClientError):
    """An address answered, but not as a distribkv node does (another server listens there)."""


@attrs.frozen
class Read:
    """What :meth:`Client.read` gives: the value (None if absent), whether a replica answered
    (``stale``: the value may be older than the latest write), and that replica's lag."""

    value: bytes | None
    stale: bool = False
    lag_entries: int | None = None


class OutcomeUnknown(ClientError):
    """A write was sent, but no answer says whether it was applied: the node failed or lost
    its leadership meanwhile. It may or may not be in the shard's history; reading the key
    tells."""


class Client:
    def __init__(
        self,
        nodes: Sequence[str],
        *,
        timeout: float = 5.0,
        read_from_replicas: bool = False,
        read_preference: str | None = None,
        max_redirects: int = 3,
        retries: int = 3,
        move_wait: float = 30.0,
        registry: PluginRegistry | None = None,
        pool_size: int = 8,
        failover_wait: float = 10.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ):
        if not nodes:
            raise ValueError("give at least one node address (host:port)")
        self.seeds = list(nodes)
        self.timeout = timeout
        preference = read_preference or ("replica" if read_from_replicas else "leader")
        if preference not in READ_PREFERENCES:
            raise ValueError(
                f"read_preference must be one of {', '.join(READ_PREFERENCES)}, not {preference!r}"
            )
        #: "leader": reads go to the shard's leader (the latest acknowledged write);
        #: "leader_preferred": to the leader, or to a replica while the leader cannot be
        #: reached (a stale read, counted in ``stale_reads``); "replica": to a replica (stale
        #: by its lag), or to the leader when the replica cannot answer.
        self.read_preference = preference
        self.read_from_replicas = preference == "replica"
        #: Reads a replica answered because the leader could not (leader_preferred).
        self.stale_reads = 0
        self.max_redirects = max_redirects
        self.retries = retries
        self.move_wait = move_wait
        #: How long a request waits for its shard to have a reachable leader again (a
        #: failover), trying every few hundred milliseconds.
        self.failover_wait = failover_wait
        #: Each shard's current leader, from /cluster (with a coordination that elects, not
        #: always the one the map names).
        self._leaders: dict[str, str] = {}
        #: True when the cluster's coordination elects leaders (a leader that is gone is
        #: worth waiting for); with "static" nothing replaces it.
        self.elects = False
        #: Requests that waited for a leader (it was down, or had just changed).
        self.failovers = 0
        self.registry = registry or load_plugins()
        # ``token``: sent with every request (``[auth]``); ``ssl_context``: HTTPS (``[tls]``,
        # see distribkv.tls.client_context).
        credentials = {"Authorization": f"Bearer {token}"} if token else None
        self.http = HttpClient(
            timeout, per_address=pool_size, ssl_context=ssl_context, headers=credentials
        )
        # Reads are tried again after any connection error; writes only when the connection
        # was refused (nothing was sent), since one that reached the node may have applied.
        self._read_retry = Retry(attempts=retries, after_send=True, first=0.1, most=2.0)
        self._write_retry = Retry(attempts=retries, after_send=False, first=0.1, most=2.0)
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="dkv")
        self._lock = threading.Lock()
        self._map: ShardMap | None = None
        #: Requests answered with a redirect or a map mismatch (0 while the map is current).
        self.redirects = 0
        self.map_refreshes = 0
        #: Reads meant for a replica that went to the leader (the replica was resyncing).
        self.leader_fallbacks = 0
        self.refresh_map()

    # --- the map --------------------------------------------------------------------------

    @property
    def map(self) -> ShardMap:
        """The shard map requests are routed by (fetched when the client is made)."""
        if self._map is None:
            raise ClientError("the client has no shard map yet")
        return self._map

    def refresh_map(self, prefer: str | None = None, avoid: str | None = None) -> ShardMap:
        """Fetch ``/cluster`` from the first node that answers (``prefer`` first, ``avoid``
        last)."""
        errors = []
        candidates = ([prefer] if prefer else []) + list(self.seeds)
        if self._map is not None:
            candidates += sorted(self._map.addresses())
        ordered = [a for a in dict.fromkeys(candidates) if a != avoid]
        if avoid is not None:
            ordered.append(avoid)
        for address in ordered:
            try:
                response = self.http.request(address, "GET", "/cluster")
            except RequestFailed as exc:
                errors.append(str(exc))
                continue
            if response.status in (401, 403):  # another node would say the same
                raise RequestError(response.status, response.body, f"GET /cluster at {address}")
            if response.status != 200:
                errors.append(f"{address}: HTTP {response.status}")
                continue
            try:
                data = json.loads(response.body)
                scheme = self.registry.hashing_scheme(data["hashing"])
                fresh = ShardMap.from_description(data, scheme)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise NotANode(
                    f"{address} answered /cluster, but not with a distribkv shard map"
                    f" ({type(exc).__name__}: {exc}); is it a distribkv node?"
                ) from None
            if fresh.fingerprint != data["fingerprint"]:
                raise ClientError(
                    f"{address} publishes map {data['fingerprint']} but it hashes to"
                    f" {fresh.fingerprint} here: the hashing plugins differ"
                )
            leaders = data.get("leaders") or {}
            with self._lock:
                self._map = fresh
                self.elects = data.get("coordination", "static") != "static"
                self._leaders = {
                    name: lead["address"]
                    for name, lead in leaders.items()
                    if isinstance(lead, dict) and lead.get("address")
                }
                self.map_refreshes += 1
            return fresh
        raise Unavailable("no node answered /cluster: " + "; ".join(errors))

    def leader_of(self, key: bytes) -> str:
        """The address of the current leader of ``key``'s shard, as last fetched."""
        shard = self.map.owner_of(key)
        return self._leaders.get(shard.name, shard.leader)

    def _address(self, key: bytes, *, write: bool) -> str:
        shard = self.map.owner_of(key)
        if not write and self.read_from_replicas and shard.replicas:
            return shard.replicas[hash(threading.get_ident()) % len(shard.replicas)]
        return self._leaders.get(shard.name, shard.leader)

    def _other_node(self, key: bytes, tried: set[str]) -> str | None:
        """A node of ``key``'s shard not yet tried: the leader first, then the replicas (the
        map's, and the map's leader, which may be a replica since a failover)."""
        shard = self.map.owner_of(key)
        nodes = [self._leaders.get(shard.name, shard.leader), shard.leader, *shard.replicas]
        return next((n for n in dict.fromkeys(nodes) if n not in tried), None)

    def _a_replica(self, key: bytes, tried: set[str]) -> str | None:
        shard = self.map.owner_of(key)
        leader = self._leaders.get(shard.name, shard.leader)
        nodes = [*shard.replicas, shard.leader]
        return next((n for n in dict.fromkeys(nodes) if n != leader and n not in tried), None)

    def _await_leader(self, address: str, started: float, *, unreachable: bool = False) -> bool:
        """After a leader could not be reached (``unreachable``) or said it leads no more (a
        failover, a switchover): fetch who leads now and wait a little. False once
        ``failover_wait`` has passed, or at once for an unreachable leader of a cluster whose
        coordination never replaces one."""
        waited = time.monotonic() - started
        if (unreachable and not self.elects) or waited >= self.failover_wait:
            return False
        self.failovers += 1
        time.sleep(min(0.25, 0.05 + waited / 8))
        try:
            self.refresh_map(avoid=address)
        except ClientError:
            pass  # no node answered: try again after the next wait
        return True

    # --- requests -------------------------------------------------------------------------

    def _send(
        self,
        key: bytes,
        method: str,
        target: str,
        body: bytes | None,
        *,
        write: bool,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        refreshes = 0
        attempt = 0
        original_target = target
        address = self._address(key, write=write)
        redirects = 0
        deadline = time.monotonic() + self.move_wait
        retry = self._write_retry if write else self._read_retry
        if self.elects:
            # A leader that cannot be reached may have been replaced: ask who leads (in
            # _await_leader) rather than knock at the same address again.
            retry = NO_RETRY
        failing: float | None = None  # since when the shard has had no leader that answers
        unknown = False  # a write was sent and no answer said what became of it
        tried: set[str] = set()  # reads: the nodes that could not answer
        while True:
            sent_headers = {MAP_HEADER: self.map.fingerprint, **(headers or {})}
            try:
                response = self.http.request(
                    address, method, target, body, sent_headers, retry=retry
                )
            except RequestFailed as exc:
                if not write and self.read_preference != "leader":
                    tried.add(address)
                    other = (
                        self._a_replica(key, tried)
                        if self.read_preference == "leader_preferred"
                        else self._other_node(key, tried)
                    )
                    if other is not None:
                        # leader_preferred: a replica while the leader is out of reach (stale);
                        # replica: another node of the shard while this one is.
                        if self.read_preference == "leader_preferred":
                            self.stale_reads += 1
                        else:
                            self.leader_fallbacks += 1
                        address = other
                        continue
                unknown = unknown or (write and exc.sent)
                failing = time.monotonic() if failing is None else failing
                # set and delete are idempotent, and so are batches of only sets and deletes
                # or only gets (all the client sends): sent again to the shard's leader.
                if self._await_leader(address, failing, unreachable=True):
                    address = self._address(key, write=write)
                    continue
                if unknown:
                    raise OutcomeUnknown(
                        f"{method} {target[:80]}: sent to {address}, no answer: {exc}"
                    ) from exc
                raise Unavailable(str(exc)) from exc
            status = response.status
            leaderless = status == 503 and response.error() in LEADERLESS
            if leaderless and not write and self.read_preference == "leader_preferred":
                tried.add(address)
                other = self._a_replica(key, tried)
                if other is not None:
                    self.stale_reads += 1
                    address = other
                    continue
            if leaderless:
                unknown = unknown or response.error() == "outcome unknown"
                failing = time.monotonic() if failing is None else failing
                if self._await_leader(address, failing):
                    address = self._address(key, write=write)
                    continue
                if unknown:
                    raise OutcomeUnknown(
                        f"{method} {target[:80]}: no leader acknowledged it within"
                        f" {self.failover_wait:g}s ({address} answered {status})"
                    )
            if status == 409 and refreshes < MAX_MAP_REFRESHES:
                # The node has another map: take it from that node (it is the newer one
                # during a reshard), then route again.
                self.redirects += 1
                refreshes += 1
                self.refresh_map(prefer=address)
                address = self._address(key, write=write)
                if refreshes > 1:
                    time.sleep(0.01 * refreshes)
                continue
            error = response.error() if status == 503 else None
            if error == "moving" and time.monotonic() < deadline:
                # A reshard fenced the key for a moment; the request was not applied.
                attempt += 1
                time.sleep(min(0.2, 0.01 * 2**attempt))
                continue
            if error == "replica resyncing" and not write:
                leader = self.leader_of(key)
                if address != leader:
                    # The replica's data is incomplete for now; its leader has it all.
                    self.leader_fallbacks += 1
                    address = leader
                    continue
            if status in (307, 308) and redirects < self.max_redirects:
                self.redirects += 1
                redirects += 1
                location = urlsplit(response.header("location") or "")
                address = location.netloc
                target = location.path + (f"?{location.query}" if location.query else "")
                continue
            if status in (307, 308):
                # Redirected in a circle: the nodes' views of who leads are changing (a
                # switchover, or an election, that some have not seen yet). Ask again shortly,
                # for up to failover_wait.
                failing = time.monotonic() if failing is None else failing
                if self._await_leader(address, failing):
                    redirects = 0
                    address = self._address(key, write=write)
                    target = original_target
                    continue
            return response

    @staticmethod
    def _check(status: int, data: bytes, what: str) -> None:
        if status >= 500:
            raise ServerError(status, data, what)
        if status >= 300 and status != 404:
            # 3xx here: still redirected after max_redirects (nodes with conflicting maps).
            raise RequestError(status, data, what)

    def get(self, key: bytes) -> bytes | None:
        return self.read(key).value

    def read(self, key: bytes) -> Read:
        """A read of ``key`` with where it came from: whether a replica answered (a read that
        may be stale) and how far behind its leader that replica said it was."""
        response = self._send(key, "GET", f"/get?key={_q(key)}", None, write=False)
        lag = response.header(LAG_ENTRIES_HEADER)
        if response.status != 404:
            self._check(response.status, response.body, f"get {key!r}")
        return Read(
            None if response.status == 404 else response.body,
            stale=lag is not None,
            lag_entries=int(lag) if lag is not None and lag.isdigit() else None,
        )

    def set(self, key: bytes, value: bytes) -> None:
        response = self._send(key, "PUT", f"/set?key={_q(key)}", value, write=True)
        self._check(response.status, response.body, f"set {key!r}")

    def delete(self, key: bytes) -> None:
        response = self._send(key, "DELETE", f"/delete?key={_q(key)}", None, write=True)
        self._check(response.status, response.body, f"delete {key!r}")

    # --- batches --------------------------------------------------------------------------

    def _batches(self, ops: list[list], *, write: bool) -> list:
        """Group ops per shard, send each group as /batch calls in parallel, keep order."""
        results: list = [None] * len(ops)
        pending = list(range(len(ops)))
        for round_ in range(3):
            pending = self._batch_round(ops, pending, results, write=write, single=round_ == 2)
            if not pending:
                return results
            # A node answered 421 (its keys span shards under the map it routes by, e.g. in
            # the middle of a reshard): take the map again and regroup, at last key by key.
            self.refresh_map()
        raise ClientError(f"{len(pending)} batch ops could not be placed on one shard each")

    def _batch_round(
        self, ops: list[list], indexes: list[int], results: list, *, write: bool, single: bool
    ) -> list[int]:
        """Send ``indexes`` of ``ops`` as per-shard /batch calls; return those answered 421."""
        groups: dict[int, list[int]] = {}
        for i in indexes:
            groups.setdefault(self.map.placement.shard_for(ops[i][1]), []).append(i)
        size = 1 if single else BATCH_OPS
        chunks = [
            group[start : start + size]
            for group in groups.values()
            for start in range(0, len(group), size)
        ]
        misplaced: list[int] = []

        def run(chunk: list[int]) -> None:
            body = msgpack.packb({"ops": [ops[i] for i in chunk]}, use_bin_type=True)
            response = self._send(
                ops[chunk[0]][1],
                "POST",
                "/batch",
                body,
                write=write,
                headers={"Content-Type": MSGPACK},
            )
            status, data = response.status, response.body
            if status == 421:
                misplaced.extend(chunk)
                return
            self._check(status, data, f"batch of {len(chunk)} ops")
            for i, value in zip(chunk, _batch_results(data, len(chunk)), strict=True):
                results[i] = value

        for future in [self._executor.submit(run, chunk) for chunk in chunks]:
            future.result()
        return sorted(misplaced)

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, bytes | None]:
        keys = list(keys)
        values = self._batches([["get", k] for k in keys], write=False)
        return dict(zip(keys, values, strict=True))

    def set_many(self, pairs: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]) -> None:
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        self._batches([["set", k, v] for k, v in items], write=True)

    def delete_many(self, keys: Iterable[bytes]) -> None:
        self._batches([["delete", k] for k in keys], write=True)

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _batch_results(data: bytes, count: int) -> list:
    """The results of a /batch answer; NotANode for a body no node would answer."""
    try:
        results = Response(200, [("Content-Type", MSGPACK)], data).document()["results"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NotANode(f"a /batch answer that is not a node's ({exc})") from None
    if not isinstance(results, list) or len(results) != count:
        raise NotANode(f"a /batch answer whose results do not match its {count} ops")
    return results


def _q(key: bytes) -> str:
    return quote_from_bytes(key, safe="")


__all__ = [
    "Client",
    "ClientError",
    "NotANode",
    "OutcomeUnknown",
    "Read",
    "RequestError",
    "ServerError",
    "Unavailable",
]
