"""The Python client: routes each key to its shard itself, over pooled keep-alive connections.

    from distribkv.client import Client

    with Client(["127.0.0.2:8080"], timeout=2.0) as db:
        db.set(b"key", b"value")
        db.get(b"key")                       # b"value" (None if absent)
        db.get(b"key", timeout=0.5)          # this call only: 0.5 s at most
        db.set_many({b"a": b"1", b"b": b"2"})  # one /batch per shard, in parallel
        db.get_many([b"a", b"b", b"c"])      # {b"a": b"1", b"b": b"2", b"c": None}

It fetches the shard map from ``/cluster`` of any node and hashes keys with the same hashing
plugin, so with a current map no request needs a redirect. Every request carries the map's
fingerprint; a node with another map answers 409, and the client fetches the map from that
node and retries, so a changed layout is invisible to the caller. Redirects are followed (at
most ``max_redirects``) in case a node still knows better.

**One deadline per call.** A call (``get``, ``read``, ``set``, ``delete``, ``get_many``,
``set_many``, ``delete_many``) ends within ``timeout`` seconds of its start, whatever it meets
on the way: every try, redirect, map fetch and wait shares that time, and a call whose time
runs out raises :class:`TimedOut` (:class:`OutcomeUnknown` for a write that was sent and not
answered). Two waits may take a call past ``timeout``, because the cluster said what it is
waiting for: a shard changing leaders (503 "not the leader", a redirect circle, or with a
coordination that elects, a leader that cannot be reached) is waited out until
``failover_wait`` seconds after the call started, and a key fenced by a reshard (503
"moving") until ``move_wait`` seconds after it started. No single try lasts longer than
``timeout``.

**Nodes that are down.** A node that timed out or refused the connection is marked down for 2
seconds (``down_time``), twice as long after each failure in a row up to 30 (``max_down_time``),
and up again as soon as it answers. Calls do not wait for a node that is down: they go to
another node that can serve them, or fail at once with :class:`NodeDown`, which names the node
and says when it is tried again. When its down time is over, one call tries it again.

**Where reads go.** ``read_preference``: "leader" (the default) reads the leader's latest
state; "leader_preferred" reads from a replica while the leader is down or being replaced (a
stale read, counted in ``stale_reads``); "replica" reads from a replica, and from the leader
while the replica is down or still reloading its data (``leader_fallbacks``). A read that
another node could serve gives the first node only half of the time it has left, so that the
other has time to answer.

Writes are sent again only when they cannot have applied (the connection was refused, or a
reshard answered "moving"), or, when a shard changes leaders, because set and delete are
idempotent (a leader that is gone may have applied the write; :class:`OutcomeUnknown` says so
if no retry is acknowledged in time).

A cluster with ``[auth]`` needs a ``token`` (sent as ``Authorization: Bearer``); one with
``[tls]`` an ``ssl_context`` that trusts its CA (``distribkv.tls.client_context(ca)``, with a
client certificate where the nodes verify clients).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote_from_bytes, urlsplit

import attrs
import msgpack

from distribkv.breaker import Breaker, Down
from distribkv.hashing.shardmap import ShardMap
from distribkv.httpclient import NO_RETRY, HttpClient, RequestFailed, Response
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
#: A map fetch asks the next node too when the first has not answered within this many seconds
#: (a node that hangs then costs this, not the whole timeout).
CLUSTER_HEDGE = 0.25
#: A try that timed out counts against its node only if it had at least this share of the
#: timeout: one cut short by its call's deadline says nothing about the node.
FAIR_TRY = 0.25


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
    """No node that can serve the call could be reached."""


class TimedOut(Unavailable):
    """The call's time (``timeout``, or the longer wait of a failover or a reshard fence) ran
    out before a node answered. ``address`` is the node it was waiting for, if one."""

    def __init__(self, message: str, address: str | None = None):
        super().__init__(message)
        self.address = address


class NodeDown(Unavailable):
    """The node the call needs is marked down (it timed out or refused a connection, in this
    call or an earlier one), and no other node can serve the call: raised at once instead of
    waiting for it. ``address`` is the node, ``retry_in`` the seconds until it is tried
    again."""

    def __init__(self, message: str, down: Down):
        super().__init__(message)
        self.address = down.address
        self.retry_in = down.retry_in


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
    """A write was sent, but no answer says whether it was applied: the node failed, timed out
    or lost its leadership meanwhile. It may or may not be in the shard's history; reading the
    key tells."""


@attrs.frozen
class _Call:
    """One call's clock: it started at ``started`` (``time.monotonic()``) and has ``timeout``
    seconds, shared by all its tries and by every request of a batch."""

    started: float
    timeout: float

    @property
    def end(self) -> float:
        return self.started + self.timeout


class Client:
    """A connection to a cluster, safe to share between threads.

    ``nodes``: addresses (host:port) of any nodes of the cluster, to fetch the map from.
    ``timeout``: the seconds a call may take, all its tries included (see the module's
    docstring for the two waits that may take longer); each call may pass its own.
    Making a client fetches the map within ``timeout`` too: a node that does not answer
    within a quarter of a second does not hold up the next one, which is asked meanwhile.
    ``read_preference`` (or ``read_from_replicas=True`` for "replica"): where reads go.
    ``failover_wait``: until how many seconds after its start a call waits for a shard's new
    leader; ``move_wait``: for a key a reshard fenced. ``down_time`` and ``max_down_time``:
    how long a node that gave no answer is left alone (doubling from one to the other).
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        timeout: float = 5.0,
        read_from_replicas: bool = False,
        read_preference: str | None = None,
        max_redirects: int = 3,
        move_wait: float = 30.0,
        registry: PluginRegistry | None = None,
        pool_size: int = 8,
        failover_wait: float = 10.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        down_time: float = 2.0,
        max_down_time: float = 30.0,
    ):
        if not nodes:
            raise ValueError("give at least one node address (host:port)")
        self.seeds = list(nodes)
        self.timeout = _positive(timeout, "timeout")
        preference = read_preference or ("replica" if read_from_replicas else "leader")
        if preference not in READ_PREFERENCES:
            raise ValueError(
                f"read_preference must be one of {', '.join(READ_PREFERENCES)}, not {preference!r}"
            )
        #: "leader": reads go to the shard's leader (the latest acknowledged write);
        #: "leader_preferred": to the leader, or to a replica while the leader is down or
        #: being replaced (a stale read, counted in ``stale_reads``); "replica": to a replica
        #: (stale by its lag), or to the leader while the replica is down or reloading.
        self.read_preference = preference
        self.read_from_replicas = preference == "replica"
        #: Reads a replica answered because the leader could not (leader_preferred).
        self.stale_reads = 0
        self.max_redirects = max_redirects
        self.move_wait = move_wait
        #: Until how many seconds after its start a call waits for its shard to have a leader
        #: that answers again (a failover, a switchover), trying every few hundred ms.
        self.failover_wait = failover_wait
        #: The nodes that gave no answer lately: calls do not wait for them again.
        self.breaker = Breaker(
            _positive(down_time, "down_time"), _positive(max_down_time, "max_down_time")
        )
        #: Each shard's current leader, from /cluster (with a coordination that elects, not
        #: always the one the map names).
        self._leaders: dict[str, str] = {}
        #: Each shard's leader's term (None during an election).
        self._terms: dict[str, int | None] = {}
        #: True when the cluster's coordination elects leaders (a leader that is gone is
        #: worth waiting for); with "static" nothing replaces it.
        self.elects = False
        #: Requests that waited for a leader (it was down, or had just changed).
        self.failovers = 0
        self.registry = registry or load_plugins()
        # ``token``: sent with every request (``[auth]``); ``ssl_context``: HTTPS (``[tls]``,
        # see distribkv.tls.client_context).
        credentials = {"Authorization": f"Bearer {token}"} if token else None
        # Retries are the client's own (another node, a new map, a new leader), never the
        # same request again on the same node.
        self.http = HttpClient(
            self.timeout,
            per_address=pool_size,
            retry=NO_RETRY,
            ssl_context=ssl_context,
            headers=credentials,
        )
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="dkv")
        self._lock = threading.Lock()
        self._map: ShardMap | None = None
        #: When the map was last fetched (``time.monotonic()``).
        self._fetched_at = float("-inf")
        #: Requests answered with a redirect or a map mismatch (0 while the map is current).
        self.redirects = 0
        self.map_refreshes = 0
        #: Reads meant for a replica that went to the leader (the replica was down or
        #: resyncing).
        self.leader_fallbacks = 0
        self.refresh_map()

    # --- the map --------------------------------------------------------------------------

    @property
    def map(self) -> ShardMap:
        """The shard map requests are routed by (fetched when the client is made)."""
        if self._map is None:
            raise ClientError("the client has no shard map yet")
        return self._map

    def refresh_map(
        self,
        prefer: str | None = None,
        avoid: str | None = None,
        *,
        timeout: float | None = None,
    ) -> ShardMap:
        """Fetch ``/cluster`` from the first node that answers (``prefer`` first, ``avoid``
        last, nodes marked down not at all), within ``timeout`` (the client's by default).
        Nodes are asked one after another, the next one as soon as the last failed or has
        not answered within :data:`CLUSTER_HEDGE` seconds; the first answer wins."""
        limit = self.timeout if timeout is None else _positive(timeout, "timeout")
        return self._refresh_map(time.monotonic() + limit, prefer=prefer, avoid=avoid)

    def _refresh_map(
        self, end: float, *, prefer: str | None = None, avoid: str | None = None
    ) -> ShardMap:
        candidates = ([prefer] if prefer else []) + list(self.seeds)
        if self._map is not None:
            candidates += sorted(self._map.addresses())
        ordered = [a for a in dict.fromkeys(candidates) if a != avoid]
        if avoid is not None:
            ordered.append(avoid)
        address, response = self._first_answer(ordered, end)
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
        leads = [
            (name, lead["address"], lead.get("term"))
            for name, lead in (data.get("leaders") or {}).items()
            if isinstance(lead, dict) and lead.get("address")
        ]
        with self._lock:
            # A leader elected since the last fetch campaigned, so it is up (a node that
            # restarted quickly may win): the breaker forgets it.
            elected = [a for n, a, t in leads if t is not None and self._terms.get(n) != t]
            self._map = fresh
            self._fetched_at = time.monotonic()
            self.elects = data.get("coordination", "static") != "static"
            self._leaders = {name: address for name, address, _ in leads}
            self._terms = {name: term for name, _, term in leads}
            self.map_refreshes += 1
        for address in elected:
            self.breaker.succeeded(address)
        return fresh

    def _first_answer(self, ordered: list[str], end: float) -> tuple[str, Response]:
        """The first 200 answer to ``GET /cluster`` among ``ordered``, asked in turn: the next
        node when the last failed or after :data:`CLUSTER_HEDGE` seconds without an answer.
        Each question runs in a thread of its own, bounded by ``end``; one that loses the race
        ends by itself (and tells the breaker what it found)."""
        answers: queue.Queue[tuple[str, Response | None, str]] = queue.Queue()
        errors: list[str] = []
        skipped: list[Down] = []
        waiting = 0  # questions under way
        next_at = time.monotonic()  # when to ask the next node
        remaining = list(ordered)
        limit = end - next_at  # the whole fetch's time

        def ask(address: str, budget: float) -> None:
            answer: tuple[str, Response | None, str] = (address, None, f"{address}: failed")
            try:
                response = self.http.request(address, "GET", "/cluster", timeout=budget)
            except RequestFailed as exc:
                self._failed(address, exc, budget, limit)
                answer = (address, None, str(exc))
            else:
                self.breaker.succeeded(address)
                answer = (address, response, "")
            finally:
                answers.put(answer)  # whatever happened: the caller waits for it

        while True:
            now = time.monotonic()
            while remaining and next_at <= now < end:
                address = remaining.pop(0)
                down = self.breaker.claim(address, end - now)
                if down is not None:
                    skipped.append(down)
                    continue
                threading.Thread(
                    target=ask, args=(address, end - now), name="dkv-cluster", daemon=True
                ).start()
                waiting += 1
                next_at = now + CLUSTER_HEDGE
            if not waiting and not remaining:
                reasons = errors + [down.describe() for down in skipped]
                raise Unavailable("no node answered /cluster: " + "; ".join(reasons))
            if now >= end:
                raise TimedOut(
                    "no node answered /cluster in time: "
                    + "; ".join(errors or ["every node asked is still silent"])
                )
            wait = end - now if not remaining else min(end, next_at) - now
            try:
                address, response, error = answers.get(timeout=max(wait, 0.0))
            except queue.Empty:
                continue
            waiting -= 1
            if response is None:
                errors.append(error)
                next_at = time.monotonic()  # ask the next node at once
            elif response.status in (401, 403):  # another node would say the same
                raise RequestError(response.status, response.body, f"GET /cluster at {address}")
            elif response.status != 200:
                errors.append(f"{address}: HTTP {response.status}")
                next_at = time.monotonic()
            else:
                return address, response

    def leader_of(self, key: bytes) -> str:
        """The address of the current leader of ``key``'s shard, as last fetched."""
        shard = self.map.owner_of(key)
        return self._leaders.get(shard.name, shard.leader)

    def _candidates(self, key: bytes, *, write: bool) -> list[str]:
        """The nodes that may serve a request for ``key``, best first: the leader for writes
        and "leader" reads; then a replica for "leader_preferred"; for "replica", this
        thread's replica, then the leader, then the other replicas."""
        shard = self.map.owner_of(key)
        leader = self._leaders.get(shard.name, shard.leader)
        if write or self.read_preference == "leader":
            return [leader]
        # Since a failover the map's leader may be a replica, and a replica may lead.
        others = [n for n in dict.fromkeys([*shard.replicas, shard.leader]) if n != leader]
        if self.read_preference == "leader_preferred" or not others:
            return [leader, *others]
        mine = others[hash(threading.get_ident()) % len(others)]
        return [mine, leader, *(n for n in others if n != mine)]

    def _failed(self, address: str, exc: RequestFailed, budget: float, limit: float) -> None:
        """Tell the breaker about a try that got no answer: a timeout counts against the node
        only if the try had a fair share of its call's time (``limit``)."""
        if exc.timed_out and budget < limit * FAIR_TRY:
            self.breaker.released(address)
        else:
            down = self.breaker.failed(address, "timed out" if exc.timed_out else _why(exc))
            log.debug("%s", down.describe())

    # --- requests -------------------------------------------------------------------------

    def _start(self, timeout: float | None) -> _Call:
        limit = self.timeout if timeout is None else _positive(timeout, "timeout")
        return _Call(time.monotonic(), limit)

    def _send(
        self,
        key: bytes,
        method: str,
        target: str,
        body: bytes | None,
        *,
        write: bool,
        call: _Call,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        what = f"{method} {target[:80]}"
        end = call.end  # later while a failover or a reshard fence is waited out
        refreshes = attempt = redirects = 0
        original_target = target
        address: str | None = None  # None: choose again from the candidates
        unknown = False  # a write was sent and no answer said what became of it
        tried: set[str] = set()  # nodes that could not serve this call
        refetched = False  # the map was fetched again because its node was down
        last_error = ""
        while True:
            if address is None:
                address = self._choose(key, write=write, tried=tried, end=end)
            if address is None:
                # No node that can serve the call is left: the map may be out of date, or
                # (with a coordination that elects) a new leader is coming; else give up.
                primary = self._candidates(key, write=write)[0]
                if not refetched and self._map_predates_failure(primary):
                    refetched = True
                    self._refetch(end, avoid=primary)
                    continue
                if self.elects and time.monotonic() < call.started + self.failover_wait:
                    end = max(end, call.started + self.failover_wait)
                    self._wait_for_leader(end, primary)
                    tried.clear()
                    continue
                raise self._give_up(
                    what,
                    self._candidates(key, write=write),
                    call,
                    unknown=unknown,
                    last=last_error,
                )
            left = end - time.monotonic()
            if left <= 0:
                raise self._give_up(what, [address], call, unknown=unknown, last=last_error)
            budget = min(call.timeout, left)
            if not write and self._spare(key, tried=tried | {address}):
                budget = budget / 2  # another node could serve it: leave it time to
            sent_headers = {MAP_HEADER: self.map.fingerprint, **(headers or {})}
            try:
                response = self.http.request(
                    address, method, target, body, sent_headers, timeout=budget
                )
            except RequestFailed as exc:
                self._failed(address, exc, budget, call.timeout)
                # set and delete are idempotent, and so are batches of only sets and deletes
                # or only gets (all the client sends): sent again if another node leads.
                unknown = unknown or (write and exc.sent)
                last_error = str(exc)
                tried.add(address)
                address, target, redirects = None, original_target, 0
                continue
            self.breaker.succeeded(address)
            status = response.status
            error = response.error() if status == 503 else None
            if error in LEADERLESS:
                # This node leads no more (or not yet): another node is, or will be, the
                # leader. leader_preferred reads ask a replica meanwhile.
                unknown = unknown or error == "outcome unknown"
                tried.add(address)
                if not write and self.read_preference == "leader_preferred":
                    other = self._choose(key, write=write, tried=tried, end=end)
                    if other is not None:
                        address = other
                        continue
                end = max(end, call.started + self.failover_wait)
                if time.monotonic() < end:
                    self._wait_for_leader(end, address)
                    tried.clear()
                    address, target, redirects = None, original_target, 0
                    continue
                if unknown:
                    raise OutcomeUnknown(
                        f"{what}: no leader acknowledged it within"
                        f" {max(call.timeout, self.failover_wait):g}s ({address} answered"
                        f" {status})"
                    )
                return response
            if status == 409 and refreshes < MAX_MAP_REFRESHES:
                # The node has another map: take it from that node (it is the newer one
                # during a reshard), then route again.
                self.redirects += 1
                refreshes += 1
                self._refetch(end, prefer=address)
                address, target, redirects = None, original_target, 0
                if refreshes > 1:
                    self._sleep(0.01 * refreshes, end)
                continue
            if error == "moving" and time.monotonic() < call.started + self.move_wait:
                # A reshard fenced the key for a moment; the request was not applied.
                end = max(end, call.started + self.move_wait)
                attempt += 1
                self._sleep(min(0.2, 0.01 * 2**attempt), end)
                continue
            if error == "replica resyncing" and not write and address != self.leader_of(key):
                # The replica's data is incomplete for now; its leader has it all.
                last_error = f"{address}: replica resyncing"
                tried.add(address)
                address = None
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
                # until failover_wait after the call started.
                end = max(end, call.started + self.failover_wait)
                if time.monotonic() < end:
                    self._wait_for_leader(end, address)
                    address, target, redirects = None, original_target, 0
                    continue
            return response

    def _choose(self, key: bytes, *, write: bool, tried: set[str], end: float) -> str | None:
        """The best candidate not yet tried by this call and not marked down (claiming its
        probe if its down time is over); counts a read that falls back to another node."""
        candidates = self._candidates(key, write=write)
        for rank, address in enumerate(candidates):
            if address in tried:
                continue
            if self.breaker.claim(address, max(0.0, end - time.monotonic())) is not None:
                continue
            if rank > 0 and self.read_preference == "leader_preferred":
                self.stale_reads += 1
            elif rank > 0 and self.read_preference == "replica" and address == candidates[1]:
                self.leader_fallbacks += 1
            return address
        return None

    def _spare(self, key: bytes, *, tried: set[str]) -> bool:
        """Whether a node other than those in ``tried`` could serve this read now."""
        if self.read_preference == "leader":
            return False
        return any(
            a not in tried and self.breaker.down(a) is None
            for a in self._candidates(key, write=False)
        )

    def _map_predates_failure(self, address: str) -> bool:
        """Whether the map was fetched before ``address`` was last marked down (so that a
        fresh one may name another node for its role)."""
        down = self.breaker.down(address)
        return down is not None and down.since > self._fetched_at

    def _refetch(self, end: float, *, prefer: str | None = None, avoid: str | None = None) -> None:
        """Fetch the map again for a call, within its time; a failure leaves the old map
        (the call goes on with it, or fails with its own error)."""
        try:
            self._refresh_map(end, prefer=prefer, avoid=avoid)
        except ClientError as exc:
            if isinstance(exc, NotANode):
                raise
            log.debug("map not fetched: %s", exc)

    def _wait_for_leader(self, end: float, gone: str) -> None:
        """A shard's leader is down or leads no more: wait a little, then fetch who leads
        now (from another node than ``gone`` if one answers)."""
        self.failovers += 1
        self._sleep(0.25, end)
        self._refetch(end, avoid=gone)
        log.debug("waiting for a leader instead of %s: the map names %s", gone, self._leaders)

    @staticmethod
    def _sleep(seconds: float, end: float) -> None:
        time.sleep(max(0.0, min(seconds, end - time.monotonic())))

    def _give_up(
        self, what: str, nodes: list[str], call: _Call, *, unknown: bool, last: str
    ) -> ClientError:
        """The error of a call that can go on no more: its write may have applied, its time
        ran out, or the nodes that could serve it (``nodes``, the first named) are down."""
        spent = time.monotonic() - call.started
        address = nodes[0]
        if unknown:
            return OutcomeUnknown(f"{what}: sent to {address}, no answer: {last}")
        downs = [d for d in map(self.breaker.down, nodes) if d is not None]
        detail = "".join(f"; {down.describe()}" for down in downs)
        if last.endswith("timed out") or spent >= call.timeout:
            head = last if last.endswith("timed out") else f"{what}: no answer"
            return TimedOut(
                f"{head}; the call took {spent:.2f}s (timeout {call.timeout:g}s){detail}",
                address,
            )
        if downs:
            return NodeDown(f"{what}{detail.replace(';', ':', 1)}", downs[0])
        return Unavailable(f"{what}: {last or f'{address} cannot serve it'}")

    @staticmethod
    def _check(status: int, data: bytes, what: str) -> None:
        if status >= 500:
            raise ServerError(status, data, what)
        if status >= 300 and status != 404:
            # 3xx here: still redirected after max_redirects (nodes with conflicting maps).
            raise RequestError(status, data, what)

    def get(self, key: bytes, *, timeout: float | None = None) -> bytes | None:
        """The value of ``key``, or None; within ``timeout`` seconds (the client's default)."""
        return self.read(key, timeout=timeout).value

    def read(self, key: bytes, *, timeout: float | None = None) -> Read:
        """A read of ``key`` with where it came from: whether a replica answered (a read that
        may be stale) and how far behind its leader that replica said it was."""
        call = self._start(timeout)
        response = self._send(key, "GET", f"/get?key={_q(key)}", None, write=False, call=call)
        lag = response.header(LAG_ENTRIES_HEADER)
        if response.status != 404:
            self._check(response.status, response.body, f"get {key!r}")
        return Read(
            None if response.status == 404 else response.body,
            stale=lag is not None,
            lag_entries=int(lag) if lag is not None and lag.isdigit() else None,
        )

    def set(self, key: bytes, value: bytes, *, timeout: float | None = None) -> None:
        call = self._start(timeout)
        response = self._send(key, "PUT", f"/set?key={_q(key)}", value, write=True, call=call)
        self._check(response.status, response.body, f"set {key!r}")

    def delete(self, key: bytes, *, timeout: float | None = None) -> None:
        call = self._start(timeout)
        response = self._send(key, "DELETE", f"/delete?key={_q(key)}", None, write=True, call=call)
        self._check(response.status, response.body, f"delete {key!r}")

    # --- batches --------------------------------------------------------------------------

    def _batches(self, ops: list[list], *, write: bool, call: _Call) -> list:
        """Group ops per shard, send each group as /batch calls in parallel, keep order."""
        results: list = [None] * len(ops)
        pending = list(range(len(ops)))
        for round_ in range(3):
            pending = self._batch_round(
                ops, pending, results, write=write, single=round_ == 2, call=call
            )
            if not pending:
                return results
            # A node answered 421 (its keys span shards under the map it routes by, e.g. in
            # the middle of a reshard): take the map again and regroup, at last key by key.
            self._refetch(call.end)
        raise ClientError(f"{len(pending)} batch ops could not be placed on one shard each")

    def _batch_round(
        self,
        ops: list[list],
        indexes: list[int],
        results: list,
        *,
        write: bool,
        single: bool,
        call: _Call,
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
                call=call,
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

    def get_many(
        self, keys: Iterable[bytes], *, timeout: float | None = None
    ) -> dict[bytes, bytes | None]:
        keys = list(keys)
        values = self._batches([["get", k] for k in keys], write=False, call=self._start(timeout))
        return dict(zip(keys, values, strict=True))

    def set_many(
        self,
        pairs: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]],
        *,
        timeout: float | None = None,
    ) -> None:
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        self._batches([["set", k, v] for k, v in items], write=True, call=self._start(timeout))

    def delete_many(self, keys: Iterable[bytes], *, timeout: float | None = None) -> None:
        self._batches([["delete", k] for k in keys], write=True, call=self._start(timeout))

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _positive(value: float, name: str) -> float:
    if not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _why(exc: RequestFailed) -> str:
    """The reason of a failed request without the request in front of it."""
    return str(exc).rpartition(": ")[2] or "no answer"


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
    "NodeDown",
    "NotANode",
    "OutcomeUnknown",
    "Read",
    "RequestError",
    "ServerError",
    "TimedOut",
    "Unavailable",
]
