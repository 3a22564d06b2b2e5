"""Generated requests over raw sockets against real nodes, on both servers: no answer is a 5xx
(but a 505 to a version the node does not serve), every 4xx has the node's JSON form (but the
answers a server's HTTP stack gives itself, as its ``ServerSpec.stack_limits`` declares), no
request goes unanswered, no traceback reaches a node's log, and the node serves reads and
writes afterwards.

Hypothesis draws each connection's requests: a pipeline of well-framed requests with odd
targets (percent-encodings of any bytes, malformed escapes), headers (repeated, huge, the
node's own) and bodies (JSON and msgpack batches, broken or truncated ones, binary, large
within the limits), then one malformed request (request lines, versions, control bytes,
Content-Length and Transfer-Encoding combinations, broken chunks, folded or broken header
lines) or a body cut short by a half-close. The explicit corpus of the server suite
(smuggling, HTTP/9.9, HTTP/0.9, NUL in a target, ...) and the malformed batches go first.

The servers' parsing does not depend on the storage backend: this runs in the lmdb run of the
test matrix only. ``DISTRIBKV_FUZZ_REQUESTS`` (default 10,000) is how many answered requests
each server must get within ``FUZZ_DEADLINE`` seconds. A connection that went unanswered is
written to a file (in ``DISTRIBKV_FUZZ_SAVE_DIR``, or the test's temporary directory) that the
failure names, to be sent again as it is.
"""

from __future__ import annotations

import json
import os
import string
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from distribkv.http.api import ServerSpec
from distribkv.plugins import load_plugins
from distribkv.testing import cluster_fixture
from distribkv.testing.cluster import Cluster, allocate_hosts, call, write_config
from distribkv.testing.rawhttp import Answer, exchange
from distribkv.testing.server_suite import MALFORMED_REQUESTS, stack_answered

REQUESTS = int(os.environ.get("DISTRIBKV_FUZZ_REQUESTS", "10000"))
#: The whole run's bound per server, in seconds (it takes about a tenth of that here).
FUZZ_DEADLINE = 240.0
#: How long one connection's exchange may take before its silence is a failure.
IO_TIMEOUT = 10.0
#: Hypothesis examples per round; rounds go on until REQUESTS answers or the deadline.
EXAMPLES_PER_ROUND = 100
#: Each example's requests are sent in this many pipelines, each in another order (drawing
#: a request costs Hypothesis about four times what sending it costs).
PIPELINES = 3
MAX_ROUNDS = 100
MAX_VALUE = 200_000


class Sent:
    """A request as sent, and what its answer may be."""

    __slots__ = ("cut_short", "raw", "smuggles", "version_ok")

    def __init__(
        self,
        raw: bytes,
        *,
        version_ok: bool = True,
        cut_short: bool = False,
        smuggles: bool = False,
    ):
        self.raw = raw
        self.version_ok = version_ok  # False: a 505 is a right answer
        self.cut_short = cut_short  # its body is cut short by a half-close: 400 expected
        # It carries a request after its body that is never to be answered (its framing is
        # ambiguous: a Content-Length next to Transfer-Encoding, or Transfer-Encoding in
        # HTTP/1.0); a request after one that is refused is never answered either.
        self.smuggles = smuggles

    def __repr__(self) -> str:
        return f"<Sent {self.raw[:300]!r}{'...' if len(self.raw) > 300 else ''}>"


# --- strategies ---------------------------------------------------------------------------

PATHS = [
    "/get", "/set", "/delete", "/batch", "/healthz", "/status", "/cluster", "/purge",
    "/digest", "/", "/nope", "//get", "/get/", "/%67et", "/caf%C3%A9", "/%ff%fe", "/a%00b",
    "/%2e%2e/get", "/get%3Fkey=a", "/%0d%0aX:%20y",
]  # fmt: skip
ODD_ESCAPES = [
    "%", "%z", "%%", "%0", "%zz", "+", "%2B", "%25", "&", "=", ";", "%u0041", "%C0%80",
    "%ED%A0%80", "%00", "%0A", "%FF",
]  # fmt: skip
SAFE_TEXT = string.ascii_letters + string.digits + "-._~!$'()*,/:@"
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))

query_piece = st.one_of(
    st.binary(max_size=16).map(lambda b: quote_from_bytes(b, safe="")),
    st.sampled_from(ODD_ESCAPES),
    st.text(alphabet=SAFE_TEXT, max_size=10),
)
query = st.lists(
    st.tuples(
        st.sampled_from(["key", "value", "Key", "key[]", "", "x", "key"]),
        st.lists(query_piece, max_size=3).map("".join),
    ),
    max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
target = st.builds(lambda p, q: p + ("?" + q if q else ""), st.sampled_from(PATHS), query)

header_field = st.tuples(
    st.sampled_from(
        [
            "Accept",
            "X-Junk",
            "Content-Type",
            "X-Distribkv-Map",
            "X-Distribkv-Token",
            "Authorization",
            "X-Distribkv-Hop",
            "Expect",
            "User-Agent",
            "X_Underscore",
            "Cookie",
            "Host",
            "Accept-Encoding",
            "Range",
        ]
    ),
    st.one_of(
        st.text(alphabet=VISIBLE + " ", max_size=30).map(str.strip),
        st.sampled_from(
            [
                "application/json",
                "application/msgpack",
                "text/plain",
                "100-continue",
                "0123456789abcdef",
                "",
                "Bearer x",
                "bytes=0-1",
                "\u00e9t\u00e9",
            ]
        ),
        st.integers(0, 8000).map(lambda n: "v" * n),
    ),
)

key_text = st.one_of(st.text(max_size=12), st.sampled_from(["", "k" * 600, "\ud800"]))
key_bytes = st.one_of(st.binary(max_size=12), st.sampled_from([b"", b"k" * 600]))
json_op = st.one_of(
    st.tuples(st.just("get"), key_text),
    st.tuples(st.just("set"), key_text, st.text(max_size=12)),
    st.tuples(st.just("delete"), key_text),
    st.sampled_from([[], ["get"], ["set", 1, 2], ["frob", "k"], "get", None, {"op": "get"}]),
)
msgpack_op = st.one_of(
    st.tuples(st.just("set"), key_bytes, st.binary(max_size=24)),
    st.tuples(st.sampled_from(["get", "delete", b"get"]), key_bytes),
    st.sampled_from([[], ["set", 1, 2], ["get", None]]),
)


def _json_batch(ops, base64: bool) -> bytes:
    doc: dict = {"ops": [list(op) if isinstance(op, tuple) else op for op in ops]}
    if base64:
        doc["encoding"] = "base64"
    return json.dumps(doc).encode("utf-8", "surrogatepass")


json_batch = st.builds(_json_batch, st.lists(json_op, max_size=6), st.booleans())
msgpack_batch = st.lists(msgpack_op, max_size=6).map(
    lambda ops: msgpack.packb({"ops": [list(op) if isinstance(op, tuple) else op for op in ops]})
)
LONE_SURROGATE = b'{"ops": [["set", "\\ud800", "v"]]}'
DEEP_NESTING = b'{"ops": [["get", "k"]], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

body = st.one_of(
    st.just(b""),
    st.binary(max_size=48),
    st.integers(0, 4096).map(lambda n: b"x" * n),
    json_batch,
    msgpack_batch,
    st.tuples(json_batch, st.integers(1, 20)).map(lambda jt: jt[0][: -jt[1]]),
    st.sampled_from([LONE_SURROGATE, b"\xc1", b"null", b"{}", b'{"ops": 1}']),
)
#: Bodies that cost the node real work (each some 200 KB): drawn for one request in 50.
large_body = st.sampled_from(
    [b"x" * MAX_VALUE, b"x" * (MAX_VALUE + 1), DEEP_NESTING, b"[" * 100_000]
)
content_type = st.sampled_from(
    [None, "application/json", "application/msgpack", "text/plain", "application/json; x=y"]
)


@st.composite
def clean_request(draw) -> Sent:
    """A request framed as RFC 9112 says, on HTTP/1.1: any answer is the node's."""
    method = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]))
    if method != "GET" or draw(st.booleans()):
        payload = draw(large_body if draw(st.sampled_from(range(50))) == 0 else body)
    else:
        payload = b""
    lines = [f"{method} {draw(target)} HTTP/1.1", "Host: fuzz"]
    lines += [f"{name}: {value}" for name, value in draw(st.lists(header_field, max_size=4))]
    kind = draw(content_type)
    if kind is not None:
        lines.append(f"Content-Type: {kind}")
    if payload and draw(st.integers(0, 4)) == 0:
        # At most 32 chunks: a body in thousands of tiny chunks costs a server a parsing
        # step (granian: a Python callback) per chunk, which is a load test, not a fuzz.
        size = max(draw(st.integers(1, 4096)), -(-len(payload) // 32))
        pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        lines.append("Transfer-Encoding: chunked")
    else:
        framed = payload
        if payload or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(payload)}")
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    return Sent(head + framed)


BAD_VERSIONS = [b"HTTP/9.9", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"]
MALFORMED_VERSIONS = [b"http/1.1", b"HTTP/1", b"HTTP/1.1.1", b"HTTP/11", b"", b"HTTP/1.1 x"]
ODD_METHODS = [b"get", b"G T", b"GET\x00", b"\x16\x03\x01", b"", b"G(T", b"BREW", b"CONNECT"]
CONTENT_LENGTHS = [
    b"-1", b"+5", b"0x10", b"1 1", "\u0661".encode(), b"99999999999999999999", b"", b"1,1",
    b"01",
]  # fmt: skip
CODINGS = [
    b"gzip", b"identity", b"chunked, chunked", b"gzip, chunked", b"chunked, gzip", b"Chunked",
    b" chunked", b"chunked;q=1", b"\tchunked", b"xchunked", b"",
]  # fmt: skip


@st.composite
def malformed_request(draw) -> Sent:
    """A request with one thing wrong, that a server can tell at once (never one that only
    more bytes could complete)."""
    what = draw(st.sampled_from(range(8)))
    head = b"GET /get?key=a HTTP/1.1\r\nHost: fuzz\r\n"
    if what == 0:  # the version
        version = draw(st.sampled_from(BAD_VERSIONS + MALFORMED_VERSIONS))
        return Sent(b"GET /healthz " + version + b"\r\nHost: fuzz\r\n\r\n", version_ok=False)
    if what == 1:  # the method or the target
        odd = draw(st.binary(min_size=1, max_size=4))
        method = draw(st.sampled_from([*ODD_METHODS, b"GET", b"OPTIONS", b"DELETE"]))
        path = draw(st.sampled_from([b"/get?key=a", b"*", b"*?key=a", b"http://x/get?key=a"]))
        line = method + b" " + path + draw(st.sampled_from([odd, b""])) + b"b HTTP/1.1"
        return Sent(line + b"\r\nHost: fuzz\r\n\r\n")
    if what == 2:  # HTTP/0.9
        return Sent(b"GET " + draw(st.sampled_from([b"/", b"/healthz", b"/get?key=a"])) + b"\r\n")
    if what == 3:  # a broken header line
        value = draw(st.binary(min_size=1, max_size=8))
        line = draw(
            st.sampled_from(
                [
                    b"X-A: a" + value.replace(b"\r\n", b"") + b"b",
                    b"X A: b",
                    b"X-A : b",
                    b"XA",
                    b": b",
                    b"X-A: a\r\n b",
                    b"X-A: a\r\n\tb",
                    b"X-\x00A: b",
                    b"X-A: " + b"v" * 500_000,
                ]
            )
        )
        ending = draw(st.sampled_from([b"\r\n", b"\n"]))
        return Sent(head + line + ending + b"\r\n")
    if what == 4:  # Content-Length
        lengths = draw(
            st.lists(st.sampled_from([*CONTENT_LENGTHS, b"2", b"3"]), min_size=1, max_size=3)
        )
        fields = b"".join(b"Content-Length: " + n + b"\r\n" for n in lengths)
        return Sent(b"PUT /set?key=a HTTP/1.1\r\nHost: fuzz\r\n" + fields + b"\r\nabc")
    if what == 5:  # Transfer-Encoding, with or without a Content-Length
        codings = draw(st.lists(st.sampled_from([*CODINGS, b"chunked"]), min_size=1, max_size=2))
        fields = b"".join(b"Transfer-Encoding: " + c + b"\r\n" for c in codings)
        with_length = draw(st.booleans())
        if with_length:
            fields += b"Content-Length: 5\r\n"
        version = draw(st.sampled_from([b"1.1", b"1.0"]))
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: fuzz\r\n\r\n"
        raw = b"POST /set?key=a HTTP/" + version + b"\r\nHost: fuzz\r\n" + fields
        ambiguous = with_length or version == b"1.0"
        return Sent(raw + b"\r\n0\r\n\r\n" + smuggled, smuggles=ambiguous)
    if what == 6:  # a broken chunk that a parser sees at once
        chunk = draw(
            st.sampled_from(
                [b"zz\r\nab\r\n", b"-1\r\nab\r\n", b"0x2\r\nab\r\n", b"2\r\nabXX", b"2;;\r\nab\r\n",
                 b"2 2\r\nab\r\n", b"ffffffffffffffffffff\r\nab\r\n"]
            )
        )  # fmt: skip
        raw = b"PUT /set?key=a HTTP/1.1\r\nHost: fuzz\r\nTransfer-Encoding: chunked\r\n\r\n"
        return Sent(raw + chunk + b"0\r\n\r\n")
    # many header fields, or bare LF line endings throughout
    if draw(st.booleans()):
        return Sent(head + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n")
    return Sent(b"GET /healthz HTTP/1.1\nHost: fuzz\n\n")


@st.composite
def cut_short_request(draw) -> Sent:
    """A request whose body stops before its Content-Length, and then the client's half-close."""
    payload = draw(st.one_of(st.binary(max_size=32), json_batch))
    missing = draw(st.integers(1, 1000))
    target_ = draw(st.sampled_from(["/set?key=cut", "/batch", "/nope", "/set"]))
    head = f"PUT {target_} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: {len(payload) + missing}"
    return Sent(head.encode() + b"\r\n\r\n" + payload, cut_short=True)


# --- the oracle ---------------------------------------------------------------------------


class Tally:
    """What the run sent and got back, and every answer that broke a rule (the first few
    kept in full)."""

    def __init__(self, spec: ServerSpec, saved: Path):
        self.spec = spec
        self.saved = saved  # where the connections with a failure are written
        self.sent = 0
        self.answered = 0
        self.server_errors = 0  # 5xx other than a 505 to a version the node does not serve
        self.version_refusals = 0
        self.statuses: dict[int, int] = {}
        self.io_seconds = 0.0
        self.failures: list[str] = []
        self.failure_count = 0

    def fail(self, why: str, sent: Sent, answer: Answer | None = None) -> None:
        self.failure_count += 1
        if len(self.failures) < 10:
            self.failures.append(f"{why}: {sent!r} -> {answer!r}")

    def check(self, address: str, requests: list[Sent], *, half_close: bool = False) -> None:
        """Send ``requests`` pipelined on one connection and check every answer."""
        self.sent += len(requests)
        began = time.monotonic()
        answers, closed = exchange(
            address,
            b"".join(r.raw for r in requests),
            # One more for a smuggling request: the server must close instead.
            expect=len(requests) + requests[-1].smuggles,
            half_close=half_close,
            timeout=IO_TIMEOUT,
        )
        self.io_seconds += time.monotonic() - began
        self.answered += min(len(answers), len(requests))
        for sent, answer in zip(requests, answers, strict=False):
            self._check_answer(sent, answer)
        last = requests[-1]
        if len(answers) > len(requests) and b"/smuggled" in answers[len(requests)].body:
            if last.smuggles or answers[len(requests) - 1].status >= 400:
                self.fail("a smuggled request was answered", last, answers[len(requests)])
        if len(answers) < len(requests):
            missing = requests[len(answers)]
            said_close = bool(answers) and answers[-1].headers.get("connection") == "close"
            if said_close and closed:
                return
            saved = self.saved / f"connection-{self.failure_count + 1}.bin"
            saved.write_bytes(b"".join(r.raw for r in requests))
            why = "no answer" if not closed else "the connection closed without an answer"
            self.fail(f"{why} (after {len(answers)} answers; all it sent: {saved})", missing)

    def _check_answer(self, sent: Sent, answer: Answer) -> None:
        status = answer.status
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 505 and not sent.version_ok:
            self.version_refusals += 1
        elif status >= 500:
            self.server_errors += 1
            self.fail("a 5xx", sent, answer)
            return
        if sent.cut_short and status != 400:
            self.fail("a body cut short is not a 400", sent, answer)
        if status >= 400 and not stack_answered(self.spec, answer):
            try:
                json.loads(answer.body)["error"]
            except (ValueError, KeyError, TypeError):
                self.fail("an error without the node's JSON body", sent, answer)


def node_logs(cluster: Cluster) -> str:
    logs = sorted((cluster.config.parent / "data" / "logs").glob("*.log"))
    return cluster.text + "".join(path.read_text(errors="replace") for path in logs)


# --- the run --------------------------------------------------------------------------------


@cluster_fixture
def fuzzed(request, tmp_path_factory, backend_name) -> Iterator[tuple[str, Cluster]]:
    """One node of ``request.param``'s server (one shard, so every key is the node's own)."""
    server = request.param
    if backend_name != "lmdb":
        pytest.skip("parsing does not depend on the backend: fuzzed in the lmdb run only")
    if server == "granian":
        pytest.importorskip("distribkv_granian")
    with allocate_hosts() as hosts:
        path = write_config(
            tmp_path_factory.mktemp(f"fuzz-{server}"),
            hosts=hosts,
            shards=1,
            backend=backend_name,
            server=server,
            extra=f"max_value_size = {MAX_VALUE}",
        )
        cluster = Cluster(path).start()
        try:
            yield server, cluster
        finally:
            assert cluster.stop() == 0, cluster.text[-3000:]


@pytest.mark.parametrize("fuzzed", ["waitress", "granian"], indirect=True)
def test_generated_requests_get_no_5xx_and_json_errors_and_the_node_serves_on(
    fuzzed, capsys, tmp_path
):
    server, cluster = fuzzed
    address = cluster.address("shard-0")
    saved = Path(os.environ.get("DISTRIBKV_FUZZ_SAVE_DIR", tmp_path))
    tally = Tally(load_plugins().http_server(server), saved)
    started = time.monotonic()
    deadline = started + FUZZ_DEADLINE

    # The explicit corpus first: each case on a connection of its own.
    for raw, status in MALFORMED_REQUESTS.values():
        tally.check(address, [Sent(raw, version_ok=status != 505, smuggles=True)])
    batch_head = b"POST /batch HTTP/1.1\r\nHost: fuzz\r\nContent-Type: %s\r\nContent-Length: %d"
    for kind, payload in [
        (b"application/json", LONE_SURROGATE),
        (b"application/json", DEEP_NESTING),
        (b"text/plain", b'{"ops": [["get", "k"]]}'),
    ]:
        tally.check(address, [Sent(batch_head % (kind, len(payload)) + b"\r\n\r\n" + payload)])
    tally.check(
        address,
        [
            Sent(
                b"PUT /set?key=a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
                cut_short=True,
            )
        ],
        half_close=True,
    )

    @settings(
        max_examples=EXAMPLES_PER_ROUND,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        pool=st.lists(clean_request(), min_size=2, max_size=10),
        last=st.one_of(malformed_request(), cut_short_request(), st.none()),
        order=st.randoms(use_true_random=False),
    )
    def connections(pool: list[Sent], last: Sent | None, order) -> None:
        if time.monotonic() > deadline or tally.answered >= REQUESTS:
            return
        for n in range(PIPELINES):
            pipeline = order.sample(pool, len(pool))
            if n < PIPELINES - 1 or last is None:
                tally.check(address, pipeline)
            elif last.cut_short:
                # A half-close ends the connection: on some stacks (hyper) it drops the
                # answers still to come, so the body cut short goes on a connection of its own.
                tally.check(address, pipeline)
                tally.check(address, [last], half_close=True)
            else:
                tally.check(address, [*pipeline, last])

    for _ in range(MAX_ROUNDS):
        if time.monotonic() > deadline or tally.answered >= REQUESTS:
            break
        connections()
    seconds = time.monotonic() - started

    assert call(address, "PUT", "/set?key=after-fuzz", body=b"\x00\xff").status == 200
    response = call(address, "GET", "/get?key=after-fuzz")
    assert (response.status, response.body) == (200, b"\x00\xff")
    with capsys.disabled():
        print(
            f"\nfuzz {server}: {tally.sent} requests sent, {tally.answered} answered,"
            f" {tally.server_errors} 5xx (and {tally.version_refusals} 505 to a version),"
            f" {seconds:.1f}s ({tally.io_seconds:.1f}s on sockets); statuses"
            f" {dict(sorted(tally.statuses.items()))}"
        )
    assert not tally.failures, f"{tally.failure_count} failures:\n" + "\n".join(tally.failures)
    assert tally.answered >= REQUESTS, (
        f"only {tally.answered} requests answered in {FUZZ_DEADLINE}s (at least {REQUESTS})"
    )
    logs = node_logs(cluster)
    assert "Traceback" not in logs, logs[-5000:]
