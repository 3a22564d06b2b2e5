"""Leadership that moves at run time, on real nodes: a coordination that the test steers (a
"board" that says who leads, from which term, and where each term's history began) over two
nodes of one shard, each served on loopback with the configured server and backend.

What is checked is the node's side of a failover: the new leader continues the history, the
old one follows it without a resync when it holds nothing more, and when it does hold more,
those entries go to a rollback file and its data is reloaded, so that both end equal. A
leader past its coordinator's deadline acknowledges nothing."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import msgpack
import pytest

from distribkv import hookimpl
from distribkv.config import parse_config
from distribkv.coordination.api import CoordinationSpec, Coordinator, Leadership
from distribkv.node import Node
from distribkv.plugins import load_plugins
from distribkv.testing.cluster import call, free_port, q, serving, wait_until

HOST = "127.0.0.1"


class Board:
    """Who leads shard s0, as the test says; every node's coordinator reads it."""

    def __init__(self) -> None:
        self.lead: Leadership | None = None
        self.forks: dict[int, int] = {}
        self.deadline: float | None = None
        self.listeners: list = []

    def move(self, lead: Leadership, fork: int | None = None) -> None:
        if fork is not None:
            self.forks[lead.term] = fork
        self.lead = lead
        for changed in list(self.listeners):
            changed()


class BoardCoordinator(Coordinator):
    def __init__(self, board: Board, node) -> None:
        self.board, self.node = board, node

    def start(self, changed) -> None:
        self.board.listeners.append(changed)
        changed()

    def stop(self, timeout: float) -> None:
        pass

    def leader(self, shard: str) -> Leadership | None:
        return self.board.lead

    def fork_after(self, shard: str, term: int) -> int | None:
        later = [fork for t, fork in self.board.forks.items() if t > term]
        return min(later) if later else None

    def deadline(self) -> float | None:
        return self.board.deadline


@pytest.fixture
def board() -> Board:
    return Board()


@pytest.fixture
def pair(tmp_path: Path, board: Board, backend_name: str, server_name: str):
    """The leader and the replica of a one-shard cluster under the board (not yet serving)."""

    class Plugin:
        @hookimpl
        def distribkv_coordinations(self):
            return [
                CoordinationSpec(
                    "board",
                    lambda node, settings: BoardCoordinator(board, node),
                    "the test says who leads",
                    elects=True,
                )
            ]

    registry = load_plugins(extra={"board": Plugin()})
    text = (
        f'[cluster]\ncoordination = "board"\nserver = "{server_name}"\n'
        f'[storage]\nbackend = "{backend_name}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[[shards]]\nname = "s0"\nidx = 0\naddress = "{HOST}:{free_port(HOST)}"\n'
        f'replicas = ["{HOST}:{free_port(HOST)}"]\n'
    )
    path = tmp_path / "sharding.toml"
    path.write_text(text)
    config = parse_config(text, path)
    nodes = [Node(config, "s0", replica, registry=registry, environ={}) for replica in (None, 0)]
    return registry, nodes


def lead(node: Node, term: int) -> Leadership:
    return Leadership("s0", node.node_config.node_name, str(node.address), term)


def wait(predicate, what: str) -> None:
    wait_until(predicate, 20.0, interval=0.02, message=what)


def put(node: Node, key: bytes, value: bytes):
    return call(str(node.address), "PUT", f"/set?key={q(key)}", body=value)


def digest(node: Node) -> dict:
    return json.loads(call(str(node.address), "GET", "/digest").body)


def following(replica: Node, leader: Node) -> bool:
    status = replica.status()
    return (
        not replica.is_leader
        and leader.is_leader
        and status["replication"].get("state") == "following"
        and status["replication"].get("applied_seq") == leader.applied_seq()
    )


@contextlib.contextmanager
def following_pair(pair, board: Board, monkeypatch, writes: dict[bytes, bytes]):
    """Both nodes served, the first leading in term 1 with ``writes`` applied, the second
    following it and caught up."""
    registry, (first, second) = pair
    board.move(lead(first, 1))
    with serving(first, registry, monkeypatch), serving(second, registry, monkeypatch):
        wait(lambda: following(second, first), "the replica follows the first leader")
        for key, value in writes.items():
            assert put(first, key, value).status == 200
        wait(lambda: following(second, first), "the replica caught up")
        yield first, second


def test_a_replica_takes_the_lead_and_the_old_leader_follows_it_without_a_resync(
    pair, board, monkeypatch
):
    writes = {b"k-%d" % i: b"\x00v%d" % i for i in range(50)}
    with following_pair(pair, board, monkeypatch, writes) as (first, second):
        board.move(lead(second, 2), fork=second.applied_seq())
        wait(lambda: following(first, second), "the old leader follows the new one")
        assert second.term == first.term == 2
        for i in range(50, 80):
            assert put(second, b"k-%d" % i, b"\x00v%d" % i).status == 200
        wait(lambda: following(first, second), "the old leader caught up with the new one")
        status = first.status()
        assert status["replication"]["resyncs"] == 0, status
        assert status["coordination"]["rolled_back"] == 0
        assert not (first.data_dir / "rollback").exists()
        assert digest(first)["digest"] == digest(second)["digest"]
        assert digest(first)["keys"] == 80
        # A write sent to the old leader now goes to the new one.
        answer = put(first, b"k-late", b"v")
        assert answer.status == 307, answer
        assert answer.headers["location"].startswith(f"http://{second.address}/")


def test_entries_the_new_history_lacks_go_to_a_rollback_file_and_the_data_is_reloaded(
    pair, board, monkeypatch
):
    writes = {b"k-%d" % i: b"v%d" % i for i in range(20)}
    with following_pair(pair, board, monkeypatch, writes) as (first, second):
        # The replica stops following, as a candidate does; the leader writes on.
        fork = second.stand_for_election()
        assert fork == first.applied_seq()
        lost = [(b"lost-%d" % i, b"\xff\x00%d" % i) for i in range(5)]
        for key, value in lost:
            assert put(first, key, value).status == 200
        board.move(lead(second, 2), fork=fork)
        wait(lambda: following(first, second), "the old leader follows the new one")
        rollback = first.data_dir / "rollback" / f"1-{fork + 1}.msgpack"
        with open(rollback, "rb") as stream:
            header, *entries = list(msgpack.Unpacker(stream, raw=False))
        assert (header["term"], header["fork"], header["entries"]) == (1, fork, 5)
        assert header["terms"] == [[1, 1]]  # the term it led, from its first seq
        assert second.status()["coordination"]["terms_led"] == [[2, fork + 1]]
        assert {e["term"] for e in entries} == {1}
        assert [(e["key"], e["value"], e["op"]) for e in entries] == [
            (key, value, "put") for key, value in lost
        ]
        assert [e["seq"] for e in entries] == list(range(fork + 1, fork + 6))
        status = first.status()
        assert status["coordination"]["rolled_back"] == 5
        assert status["replication"]["resyncs"] == 1
        assert digest(first)["digest"] == digest(second)["digest"]
        assert digest(first)["keys"] == 20
        for key, _ in lost:
            assert call(str(second.address), "GET", f"/get?key={q(key)}").status == 404


def test_a_leader_past_its_deadline_acknowledges_no_write(pair, board, monkeypatch):
    registry, (first, second) = pair
    board.move(lead(first, 1))
    with serving(first, registry, monkeypatch), serving(second, registry, monkeypatch):
        wait(lambda: following(second, first), "the replica follows the leader")
        assert put(first, b"before", b"v").status == 200
        board.deadline = time.monotonic() - 1
        answer = put(first, b"after", b"v")
        assert answer.status == 503, answer
        assert json.loads(answer.body)["error"] == "not the leader"
        assert answer.headers["retry-after"] == "1"
        # Nor does it feed its replica any more.
        pulled = call(str(first.address), "GET", "/replication/pull?after=0&term=1&replica=x")
        assert pulled.status == 503, pulled
        board.deadline = None
        assert put(first, b"after", b"v").status == 200
