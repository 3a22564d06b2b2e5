"""Where a request for a key is answered: here, at its owner (redirect or forward), or nowhere.

:meth:`Router.route` is the one rule, for ``/get``, ``/set``, ``/delete`` and ``/batch`` alike:

- a client write of a key that a reshard has fenced: 503 ``moving`` (not applied; retry);
- the key's shard is this node's: a leader answers; a replica answers reads (possibly stale)
  unless the client asked for the leader (``X-Distribkv-Read: leader``), and sends writes to
  its leader (307 with ``routing = "redirect"``, 403 naming it with ``"proxy"``);
- another shard's key: 307 to its owner (``redirect``) or forwarded to it (``proxy``) over
  pooled keep-alive connections with a timeout; the owner's status and body come back. Where
  the server lets the node answer later (``defer``), the request is handed to the forwarding
  engine (:mod:`distribkv.http.forwarding`) and answered when the owner answers, holding no
  thread meanwhile; else (a ``/batch``, a server without deferred answers, ``[tls]``) the
  thread that serves it waits for the owner;
- a forwarded request (``X-Distribkv-Hop``) for a key this node does not own: 421, never
  forwarded again, so two nodes with different maps cannot bounce a request between them.

Targets only ever come from the node's own shard map: nothing in a request chooses where a
node sends or redirects it. :func:`check_map` answers 409 to a request routed with another
map's fingerprint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import falcon

from distribkv.hashing.shardmap import ShardInfo
from distribkv.http.answers import NOT_FOUND, VALUE_HEADERS
from distribkv.http.api import DEFERRED, Answer, Completion, Header, status_line
from distribkv.http.errors import ApiError, error_response
from distribkv.http.forwarding import ForwardingEngine, OwnerBusy
from distribkv.httpclient import HttpClient, RequestFailed, Response, source_host
from distribkv.protocol import (
    HOP_HEADER,
    JSON,
    MAP_HEADER,
    READ_HEADER,
    SHARD_HEADER,
    TOKEN_HEADER,
)

__all__ = [
    "BLOCKS",
    "Blocks",
    "Forwarder",
    "MapCheck",
    "Router",
    "check_map",
    "forwards_later",
    "misdirected",
    "moving",
]

#: Header names as ``Header`` lookups take them.
MAP = MAP_HEADER.lower()
HOP = HOP_HEADER.lower()
READ = READ_HEADER.lower()
TOKEN = TOKEN_HEADER.lower()

#: Response headers of the owner that are passed back to the client (the shard header is the
#: forwarding node's own).
_PASS_BACK = frozenset(("content-type", "x-distribkv-leader", "location"))


class Blocks:
    __slots__ = ()

    def __repr__(self) -> str:
        return "BLOCKS"


#: What :meth:`Router.route` gives for a request that must be forwarded where the caller may
#: not wait for the owner: the caller leaves the request to a thread that may.
BLOCKS = Blocks()


def forwards_later(node) -> bool:
    """True if ``node`` forwards through the engine (``routing = "proxy"``, no ``[tls]``):
    a forwarded request then never waits on the thread that serves it, where the server can
    answer it later."""
    return node.config.cluster.routing == "proxy" and node.client_tls is None


class Forwarder:
    """Sends a request on to the key's owner and gives back the owner's answer: at once
    (:meth:`forward`, on a thread that waits for it) or later (:meth:`forward_later`, through
    the request's completion)."""

    def __init__(self, node):
        server = node.config.server
        self.me = node.name
        self.counts = node.metrics
        self.timeout = server.forward_timeout
        self.source = source_host(node.address.host)
        self.client = HttpClient(
            server.forward_timeout,
            per_address=server.threads,
            source_host=self.source,
            ssl_context=node.client_tls,
        )
        #: The engine, started with the first request it carries.
        self.engine: ForwardingEngine | None = None
        self.defers = forwards_later(node)
        #: The head of forwarded reads, by owner, map and credentials (see :meth:`_group`).
        self._groups: dict[tuple[str, str, tuple[str | None, ...]], bytes] = {}
        self._closed = False

    def forward(
        self,
        owner: ShardInfo,
        address: str,
        fingerprint: str,
        method: str,
        target: str,
        body: bytes | None,
        header: Header,
    ) -> Answer:
        headers = {HOP_HEADER: self.me, MAP_HEADER: fingerprint, **dict(_carried(header))}
        counts = self.counts
        if counts is not None:
            counts.add(counts.forwards, owner.name)
        try:
            response = self.client.request(address, method, target, body, headers)
        except RequestFailed as exc:
            raise self._failed(owner, address, exc) from exc
        return response.status, _passed_back(response, owner.name), response.body

    def forward_later(
        self,
        owner: ShardInfo,
        address: str,
        fingerprint: str,
        method: str,
        target: str,
        body: bytes | None,
        header: Header,
        defer: Callable[[], Completion],
        path: str,
    ) -> None:
        """:meth:`forward`, answered through ``defer()``'s completion when the owner answers
        (or fails to: 502, 504, as :meth:`forward`), from the engine's thread. What it refuses
        at once (a malformed header, a node that is stopping) it raises before it defers."""
        engine = self.engine
        if engine is None:
            engine = self._start_engine()
        read = None
        if method == "GET" and not body and target.startswith("/get?key=") and "&" not in target:
            # A read of one key alone: it may go to the owner with others (forwarding.py).
            read = _encoded(target[5:])
            group = self._group(address, fingerprint, header)
        else:
            data = _request_bytes(self.me, address, fingerprint, method, target, body, header)
        counts = self.counts
        if counts is not None:
            counts.add(counts.forwards, owner.name)
        name = owner.name
        completion = defer()

        def done(response: Response | None, error: RequestFailed | None) -> None:
            if response is not None:
                headers = _passed_back(response, name)
                data = response.body
                headers.append(("Content-Length", str(len(data))))
                status = response.status
                completion.finish("200 OK" if status == 200 else status_line(status), headers, data)
                return
            assert error is not None
            completion.finish(*error_response(self._failed(owner, address, error), method, path))

        if read is not None:
            engine.submit_read(address, group, read, done, f"{method} {target[:80]}")
        else:
            engine.submit(address, data, done, f"{method} {target[:80]}")

    def _group(self, address: str, fingerprint: str, header: Header) -> bytes:
        """The head of a forwarded read after its request line (the same for every read to
        one owner with the same map and credentials, so kept)."""
        carried = tuple(header(name) for name, _ in _CARRIED)
        key = (address, fingerprint, carried)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= 256:  # one per owner and token in use: a bound for many
                self._groups.clear()
            lines = _head_lines(self.me, address, fingerprint, header)
            group = self._groups[key] = _encoded("\r\n".join(lines) + "\r\n\r\n")
        return group

    def _start_engine(self) -> ForwardingEngine:
        if self._closed:
            raise ApiError(falcon.HTTP_503, "stopping", "the node is stopping; try another node")
        self.engine = ForwardingEngine(
            self.timeout, source_host=self.source, read_answer=_response_of_read
        )
        return self.engine

    def _failed(self, owner: ShardInfo, address: str, exc: RequestFailed) -> ApiError:
        """The error answered for a forward that failed (counted for the metrics)."""
        counts = self.counts
        if isinstance(exc, OwnerBusy):
            if counts is not None:
                counts.add(counts.forward_failures, (owner.name, "busy"))
            return ApiError(
                falcon.HTTP_503,
                "owner busy",
                f"shard {owner.name!r} at {address}: {exc}; retry shortly",
                headers={"Retry-After": "1"},
            )
        if counts is not None:
            reason = "timeout" if exc.timed_out else "unreachable"
            counts.add(counts.forward_failures, (owner.name, reason))
        if exc.timed_out:
            return ApiError(
                falcon.HTTP_504, "owner timed out", f"shard {owner.name!r} at {address}: {exc}"
            )
        return ApiError(
            falcon.HTTP_502, "owner unreachable", f"shard {owner.name!r} at {address}: {exc}"
        )

    def close(self) -> None:
        self._closed = True
        self.client.close()
        if self.engine is not None:
            self.engine.close()


#: The client's headers a forwarded request carries, as asked of the request and as sent:
#: its content type, and its credentials (the owner checks them as this node did).
_CARRIED = (
    ("content-type", "Content-Type"),
    (TOKEN, TOKEN_HEADER),
    ("authorization", "Authorization"),
)


def _carried(header: Header) -> Iterator[tuple[str, str]]:
    """The client's headers that go along with a forwarded request, as (name, value)."""
    for name, sent in _CARRIED:
        value = header(name)
        if value:
            yield sent, value


def _head_lines(me: str, address: str, fingerprint: str, header: Header) -> list[str]:
    """The header lines of a forwarded request: the hop and map headers, and the client's
    content type and credentials (the owner checks them as this node did)."""
    lines = [f"Host: {address}", f"{HOP_HEADER}: {me}", f"{MAP_HEADER}: {fingerprint}"]
    for sent, value in _carried(header):
        if "\r" in value or "\n" in value:
            raise ApiError(falcon.HTTP_400, "bad request", f"a line break in {sent}")
        lines.append(f"{sent}: {value}")
    return lines


def _encoded(text: str) -> bytes:
    """Request text as bytes: latin-1 is how a server hands over the bytes it received."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _request_bytes(
    me: str,
    address: str,
    fingerprint: str,
    method: str,
    target: str,
    body: bytes | None,
    header: Header,
) -> bytes:
    """The forwarded request as it goes out (see :func:`_head_lines`)."""
    lines = [f"{method} {target} HTTP/1.1", *_head_lines(me, address, fingerprint, header)]
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body) if body else 0}")
    head = _encoded("\r\n".join(lines) + "\r\n\r\n")
    return head + body if body else head


#: A read the owner does not hold, answered from a request of many reads.
_NOT_FOUND_RESPONSE = Response(*NOT_FOUND)


def _response_of_read(value: bytes | None) -> Response:
    """The owner's answer to one read, from its value among many (as it answers it alone)."""
    return _NOT_FOUND_RESPONSE if value is None else Response(200, VALUE_HEADERS, value)


class Router:
    """Decides, per key, whether this node answers; otherwise it answers for the owner."""

    def __init__(self, node, forwarder: Forwarder):
        self.node = node
        self.forwarder = forwarder
        self.redirects = node.config.cluster.routing == "redirect"
        self.scheme = node.scheme
        self.counts = node.metrics

    def leads(self, key: bytes) -> bool:
        """True if this node is the leader of ``key``'s shard and no reshard is under way: the
        common case, in which :meth:`route` gives None for reads and writes alike (asked first,
        so that the common request pays for no more of the rules)."""
        node = self.node
        maps = node.maps
        return (
            maps.transition is None and node.is_leader and maps.route(key)[0].name == node.me.name
        )

    def owner(self, key: bytes) -> tuple[ShardInfo, str]:
        """The shard that answers for ``key`` now, and the map fingerprint to route it with."""
        return self.node.maps.route(key)

    def route(
        self,
        key: bytes,
        write: bool,
        method: str,
        path: str,
        query: str,
        header: Header,
        body: bytes | None,
        may_block: bool,
        defer: Callable[[], Completion] | None = None,
    ) -> Answer | Blocks | Any | None:
        """None if this node answers for ``key``; else the answer given for the owner (a
        redirect, a forwarded answer), ``DEFERRED`` where the request is forwarded through
        the engine and answered through ``defer()``'s completion, or :data:`BLOCKS` where
        forwarding would wait and ``may_block`` is false. Raises the errors it answers (403,
        421, 503 moving)."""
        node = self.node
        maps = node.maps
        if write and maps.transition is not None and maps.verdict(key) is not None:
            # A reshard fenced this key: nobody writes it until the new map is committed.
            raise moving(node, key)
        owner, fingerprint = maps.route(key)
        me = node.me
        if owner.name == me.name:
            if node.is_leader:
                return None
            if not write and header(READ) != "leader":
                return None  # a replica serves reads itself, possibly stale
            if write and not self.redirects:
                leader = leader_or_503(node, owner)
                raise ApiError(
                    falcon.HTTP_403,
                    "read-only replica",
                    f"{node.name} is a replica; write to the leader at {leader}",
                    leader=leader,
                )
        elif header(HOP) is not None:
            if self.counts is not None:
                self.counts.bump("misdirected")
            raise misdirected(owner, node.leader_of(owner) or "?", node.name)
        # Another shard's key, a write to a replica (redirect mode) or a leader-only read.
        target = f"{path}?{query}" if query else path
        leader = leader_or_503(node, owner)
        if self.redirects:
            counts = self.counts
            if counts is not None:
                reason = "not_leader" if owner.name == me.name else "wrong_shard"
                counts.add(counts.redirects, reason)
            if owner.name == me.name:  # a write to this replica, or a read for the leader
                what = "a write" if write else f"a read with {READ_HEADER}: leader"
                return redirect(
                    self.scheme,
                    owner,
                    leader,
                    target,
                    "not the leader",
                    f"{node.name} is a replica of shard {owner.name!r}; {what} goes to its"
                    f" leader at {leader}",
                )
            return redirect(
                self.scheme,
                owner,
                leader,
                target,
                "wrong shard",
                f"shard {owner.name!r} at {leader} owns it",
            )
        forwarder = self.forwarder
        if defer is not None and forwarder.defers:
            forwarder.forward_later(
                owner, leader, fingerprint, method, target, body, header, defer, path
            )
            return DEFERRED
        if not may_block:
            return BLOCKS
        return forwarder.forward(owner, leader, fingerprint, method, target, body, header)


def leader_or_503(node, owner: ShardInfo) -> str:
    """The address of ``owner``'s leader, or 503 "not the leader" while none is known (an
    election is under way): the client waits and asks again."""
    leader = node.leader_of(owner)
    if leader is None:
        raise ApiError(
            falcon.HTTP_503,
            "not the leader",
            f"{node.name} knows no leader of shard {owner.name!r} now (an election is under"
            " way); retry shortly",
            headers={"Retry-After": "1"},
        )
    if leader == str(node.address):
        # Named the leader a moment ago, and taking the lead now: not a redirect to itself.
        raise ApiError(
            falcon.HTTP_503,
            "not the leader",
            f"{node.name} is taking the lead of shard {owner.name!r}; retry shortly",
            headers={"Retry-After": "1"},
        )
    return leader


def redirect(
    scheme: str, owner: ShardInfo, leader: str, target: str, error: str, detail: str
) -> Answer:
    """307 to the shard's leader: it keeps the method and the body (a 301/302 may turn a PUT
    into a GET). ``scheme``: "https" in a ``[tls]`` cluster."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    headers = [
        ("Location", f"{scheme}://{leader}{target}"),
        (SHARD_HEADER, owner.name),
        ("Content-Type", JSON),
    ]
    return 307, headers, body


def misdirected(owner: ShardInfo, leader: str, me: str) -> ApiError:
    return ApiError(
        falcon.HTTP_421,
        "misdirected request",
        f"node {me} received a forwarded request for a key of shard {owner.name!r}"
        f" ({leader}); the cluster maps disagree",
        owner=owner.name,
    )


def moving(node, key: bytes) -> ApiError:
    """503 for a write to a key that a reshard is moving: it was not applied; retry."""
    transition = node.maps.transition
    old, new = transition.owners(key) if transition is not None else ("?", "?")
    return ApiError(
        falcon.HTTP_503,
        "moving",
        f"the key is moving from shard {old} to {new} (reshard"
        f" {transition.id if transition else '?'}); the write was not applied, retry shortly",
        headers={"Retry-After": "1"},
    )


def check_map(maps, theirs: str | None) -> None:
    """409 for a request stamped with another map's fingerprint (a node in a fenced reshard
    also accepts the target map's: it answers such requests for the keys it receives)."""
    if theirs is None:
        return
    ours = maps.routing.fingerprint
    if theirs == ours or theirs == maps.map.fingerprint:
        return
    transition = maps.transition
    if transition is not None and transition.fenced and theirs == transition.target.fingerprint:
        return
    raise ApiError(
        falcon.HTTP_409,
        "shard map mismatch",
        f"the request was routed with map {theirs}; this node has map {ours} (fetch /cluster)",
        yours=theirs,
        ours=ours,
    )


class MapCheck:
    """Falcon middleware: :func:`check_map` for every route."""

    def __init__(self, node):
        self.node = node

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        check_map(self.node.maps, req.get_header(MAP_HEADER))


def _passed_back(response: Response, shard: str) -> list[tuple[str, str]]:
    """The owner's headers a forwarded answer keeps, and the shard that answered it."""
    passed = [(name, value) for name, value in response.headers if name.lower() in _PASS_BACK]
    passed.append((SHARD_HEADER, shard))
    return passed
