"""``distribkv reshard --from OLD.toml --to NEW.toml``: change the layout without losing a write.

Steps (each node keeps its phase in its metadata, so this process may die at any point and a
rerun picks up from what the nodes say):

1. **plan** — every old leader counts the keys that change owner; ``--dry-run`` stops here.
2. **copy** — nodes enter phase ``copy`` (shards only in the new map refuse client writes);
   targets drop stale copies of keys they will receive; each old leader's leaving keys are
   copied page by page, then its log from the first page's seq is replayed on the targets
   while clients keep writing.
3. **fence** — old owners refuse writes of moving keys (503; clients retry), and the rest of
   their log, up to the seq each reported after the fence, is replayed.
4. **verify** — the count and digest of every moved range are compared on both sides; on a
   mismatch the fence is lifted and nothing else changes.
5. **switch** — reads of moving keys go to the new owners; then **commit**: every node serves
   the new map (first commit = point of no return: a rerun only finishes committing).
6. **purge** — every leader deletes the keys it no longer owns.

A rerun before any commit starts again at step 2 (the copy is idempotent); after one, it
commits the remaining nodes and purges.

For fault tests, ``DISTRIBKV_RESHARD_KILL_AT=<step>`` makes the process SIGKILL itself at that
step (copy, fence, verify, switch, commit, purge).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO
from urllib.parse import quote_from_bytes

import msgpack

from distribkv.config import Config
from distribkv.hashing.shardmap import ShardMap
from distribkv.httpclient import HttpClient, RequestFailed
from distribkv.plugins import PluginRegistry
from distribkv.protocol import MSGPACK, TOKEN_HEADER
from distribkv.tls import node_context

INGEST_OPS = 1000
#: Catch-up rounds stop when the sources are this close to their last seq.
CATCH_UP_SLACK = 500
CATCH_UP_ROUNDS = 50
COPY_ATTEMPTS = 3


class ReshardError(Exception):
    """The reshard cannot go on; the message says why and what to do."""


class LogTrimmed(ReshardError):
    """A source trimmed log entries the copy still needed: the copy starts again."""


def _kill_point(step: str) -> None:
    if os.environ.get("DISTRIBKV_RESHARD_KILL_AT") == step:
        sys.stderr.write(f"reshard: killed at step {step} (DISTRIBKV_RESHARD_KILL_AT)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class Progress:
    """The copy's progress: a ``rich`` bar (count, rate, elapsed, time left) on a terminal, a
    plain line every few seconds otherwise (a log file or a pipe keeps its lines)."""

    def __init__(self, out: TextIO, label: str, total: int):
        self.out, self.label, self.total = out, label, max(total, 0)
        self.done = 0
        self.started = time.monotonic()
        self.last_line = 0.0
        self.tty = out.isatty()
        self.lock = threading.Lock()
        self.bar: Any = None
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=out),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=self.total or None, rate="")
            self.bar.start()

    def advance(self, count: int) -> None:
        with self.lock:
            self.done += count
        self.show()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def show(self, final: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{self.rate():,.0f} keys/s")
            if final:
                self.bar.stop()
            return
        now = time.monotonic()
        if not final and now - self.last_line < 5.0:
            return
        self.last_line = now
        rate = self.rate()
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = f"{self.label} [{bar:<30}] {self.done:,}/{self.total:,} ({rate:,.0f}/s"
            left = max(self.total - self.done, 0)
            text += ")" if final or not rate else f", about {left / rate:,.0f}s left)"
        else:
            text = f"{self.label} {self.done:,} ({rate:,.0f}/s)"
        self.out.write(text + "\n")
        self.out.flush()


class Reshard:
    def __init__(
        self,
        source: Config,
        target: Config,
        *,
        registry: PluginRegistry,
        token: str | None,
        timeout: float = 30.0,
        max_rate: float | None = None,
        out: TextIO = sys.stderr,
    ):
        self.source_config, self.target_config = source, target
        self.source = ShardMap.from_config(source, registry.hashing_scheme(source.cluster.hashing))
        self.target = ShardMap.from_config(target, registry.hashing_scheme(target.cluster.hashing))
        self.id = f"{self.source.fingerprint}-{self.target.fingerprint}"
        self.out = out
        self.max_rate = max_rate
        self.http = HttpClient(timeout, per_address=8, ssl_context=node_context(source.tls))
        self.headers = {TOKEN_HEADER: token} if token else {}
        self._check_layouts()

    # --- helpers --------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _check_layouts(self) -> None:
        src, dst = self.source_config.path, self.target_config.path
        if self.source.fingerprint == self.target.fingerprint:
            raise ReshardError(f"{src} and {dst} describe the same map: nothing to move")
        for shard in self.source.shards:
            try:
                new = self.target.shard(shard.name)
            except KeyError:
                raise ReshardError(
                    f"{dst}: shard {shard.name!r} of {src} is missing; reshard adds shards or"
                    " changes the hashing, it does not remove shards"
                ) from None
            if (new.leader, new.replicas) != (shard.leader, shard.replicas):
                raise ReshardError(
                    f"{dst}: shard {shard.name!r} has other addresses than in {src}"
                    f" ({new.leader} {list(new.replicas)} vs {shard.leader}"
                    f" {list(shard.replicas)}); reshard moves keys, not nodes"
                )

    def nodes(self) -> list[tuple[str, str, str]]:
        """Every node of the target map: (address, shard name, role)."""
        out = []
        for shard in self.target.shards:
            out.append((shard.leader, shard.name, "leader"))
            out.extend((r, shard.name, f"replica {i}") for i, r in enumerate(shard.replicas))
        return out

    def call(
        self,
        address: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        packed: bool = False,
        ok: tuple[int, ...] = (200,),
    ) -> tuple[int, Any]:
        headers = dict(self.headers)
        data = None
        if body is not None:
            if packed:
                data = msgpack.packb(body, use_bin_type=True)
                headers["Content-Type"] = MSGPACK
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
        try:
            response = self.http.request(address, method, path, data, headers)
        except RequestFailed as exc:
            raise ReshardError(f"{method} {path.split('?')[0]} on {address}: {exc}") from None
        status = response.status
        try:
            doc = response.document()
        except ValueError:
            doc = response.body
        if status not in ok:
            detail = doc.get("detail") or doc.get("error") if isinstance(doc, dict) else doc
            raise ReshardError(
                f"{method} {path.split('?')[0]} on {address}: HTTP {status}: {detail}"
            )
        return status, doc

    def _for_nodes(self, fn: Callable[[str], Any], addresses: list[str]) -> dict[str, Any]:
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(addresses)))) as ex:
            futures = {a: ex.submit(fn, a) for a in addresses}
            return {a: f.result() for a, f in futures.items()}

    def _maps_body(self) -> dict:
        return {"source": self.source.describe(), "target": self.target.describe()}

    # --- steps ----------------------------------------------------------------------------

    def states(self) -> dict[str, dict]:
        addresses = [a for a, _, _ in self.nodes()]
        states = {}
        for address, shard, role in self.nodes():
            try:
                states[address] = self.call(address, "GET", "/reshard/state")[1]
            except ReshardError as exc:
                raise ReshardError(
                    f"{shard} {role} at {address} does not answer ({exc}); every node of the"
                    f" new map must run (new shards: distribkv serve --config"
                    f" {self.target_config.path} --shard {shard})"
                ) from None
        fps = (self.source.fingerprint, self.target.fingerprint)
        for address in addresses:
            state = states[address]
            if state["fingerprint"] not in fps:
                raise ReshardError(
                    f"{state['node']} at {address} serves map {state['fingerprint']}, neither"
                    f" {fps[0]} ({self.source_config.path}) nor {fps[1]}"
                    f" ({self.target_config.path})"
                )
            other = state["transition"]
            if other is not None and other["id"] != self.id:
                raise ReshardError(
                    f"{state['node']} at {address} is part of another reshard ({other['id']});"
                    " finish it first (rerun it) or abort it"
                )
        return states

    def committed_anywhere(self, states: dict[str, dict]) -> bool:
        return any(
            s["fingerprint"] == self.target.fingerprint
            and s["switched_from"] == self.source.fingerprint
            for s in states.values()
        )

    def plan(self) -> dict:
        leaders = [s.leader for s in self.source.shards]
        answers = self._for_nodes(
            lambda a: self.call(a, "POST", "/reshard/plan", self._maps_body())[1], leaders
        )
        moves: dict[str, int] = {}
        total = 0
        for shard in self.source.shards:
            answer = answers[shard.leader]
            total += answer["keys"]
            for name, move in answer["moves"].items():
                if name.startswith(f"{shard.name}>"):
                    moves[name] = move["keys"]
        moved = sum(moves.values())
        return {"keys": total, "moves": moves, "moved": moved, "fraction": moved / max(total, 1)}

    def prepare(self, phase: str, addresses: list[str] | None = None) -> dict[str, dict]:
        body = {"id": self.id, "phase": phase, **self._maps_body()}
        return self._for_nodes(
            lambda a: self.call(a, "POST", "/reshard/prepare", body)[1],
            [a for a, _, _ in self.nodes()] if addresses is None else addresses,
        )

    def _ingest(self, shard_name: str, ops: list[list]) -> None:
        leader = self.target.shard(shard_name).leader
        for start in range(0, len(ops), INGEST_OPS):
            chunk = ops[start : start + INGEST_OPS]
            self.call(leader, "POST", "/reshard/ingest", {"id": self.id, "ops": chunk}, packed=True)

    def copy_shard(self, address: str, progress: Progress) -> int:
        """Copy one old leader's leaving keys; return the seq read before its first page."""
        after: bytes | None = None
        first_seq = None
        while True:
            target = f"/reshard/scan?id={self.id}"
            if after is not None:
                target += f"&after={quote_from_bytes(after, safe='')}&hold={first_seq}"
            page = self.call(address, "GET", target)[1]
            if first_seq is None:
                first_seq = page["seq"]
            groups: dict[str, list[list]] = {}
            for key, value, owner in page["pairs"]:
                groups.setdefault(owner, []).append([1, key, value])
            for owner, ops in groups.items():
                self._ingest(owner, ops)
            progress.advance(len(page["pairs"]))
            _kill_point("copy")
            if self.max_rate:
                # Hold the whole copy to max_rate keys per second (all sources together).
                ahead = progress.done / self.max_rate - (time.monotonic() - progress.started)
                if ahead > 0:
                    time.sleep(ahead)
            if page["done"] or page["next"] is None:
                return first_seq
            after = page["next"]

    def replay(self, address: str, after: int, upto: int | None) -> tuple[int, int]:
        """Replay one old leader's log entries of leaving keys after ``after``: up to ``upto``,
        or (None) until within CATCH_UP_SLACK of its end. Returns (last seq, entries)."""
        applied = 0
        for _ in range(100000):
            status, doc = self.call(
                address, "GET", f"/reshard/log?id={self.id}&after={after}", ok=(200, 410)
            )
            if status == 410:
                raise LogTrimmed(f"{address}: {doc.get('detail')}")
            groups: dict[str, list[list]] = {}
            for _seq, op, key, value, owner in doc["entries"]:
                groups.setdefault(owner, []).append([op, key, value])
            for owner, ops in groups.items():
                self._ingest(owner, ops)
            applied += len(doc["entries"])
            progressed = doc["last"] > after
            after = doc["last"]
            if upto is not None:
                if after >= upto:
                    return after, applied
                if not progressed:
                    raise ReshardError(f"{address}: its log ends before seq {upto}")
            elif doc["committed"] - after <= CATCH_UP_SLACK or not progressed:
                return after, applied
        raise ReshardError(f"{address}: the log replay did not finish")

    def copy(self, plan: dict) -> dict[str, int]:
        """Clean the targets, copy every source, catch up; return each source's replayed seq."""
        # Each target leader scans all of its keys for stale copies: in parallel, so that the
        # wait is the largest shard's scan, not the sum of them all.
        targets = {shard.leader: shard.name for shard in self.target.shards}
        cleaned = self._for_nodes(
            lambda a: self.call(a, "POST", "/reshard/clean", {"id": self.id})[1], list(targets)
        )
        for leader, doc in cleaned.items():
            if doc["deleted"]:
                name = targets[leader]
                self.say(f"  {name}: dropped {doc['deleted']:,} stale copies of arriving keys")
        progress = Progress(self.out, "  copy", plan["moved"])
        leaders = [s.leader for s in self.source.shards]
        try:
            firsts = self._for_nodes(lambda a: self.copy_shard(a, progress), leaders)
        finally:
            progress.show(final=True)  # also ends a terminal's bar when the copy fails
        seqs = dict(firsts)
        for rounds in range(1, CATCH_UP_ROUNDS + 1):
            start = dict(seqs)

            def catch_up(address: str, start: dict[str, int] = start) -> tuple[int, int]:
                return self.replay(address, start[address], None)

            results = self._for_nodes(catch_up, leaders)
            seqs = {a: r[0] for a, r in results.items()}
            entries = sum(r[1] for r in results.values())
            self.say(f"  catch-up round {rounds}: {entries:,} log entries replayed")
            if entries <= CATCH_UP_SLACK:
                break
        return seqs

    def verify(self) -> list[str]:
        """Compare count and digest of every moved range on its old and its new owner."""
        addresses = sorted({s.leader for s in self.target.shards})
        answers = self._for_nodes(
            lambda a: self.call(a, "POST", "/reshard/plan", self._maps_body())[1], addresses
        )
        names = {name for answer in answers.values() for name in answer["moves"]}
        problems = []
        for name in sorted(names):
            old, new = name.split(">")
            mine = answers[self.target.shard(old).leader]["moves"].get(name)
            theirs = answers[self.target.shard(new).leader]["moves"].get(name)
            if mine != theirs:
                problems.append(
                    f"{old} -> {new}: {mine['keys'] if mine else 0} keys on {old},"
                    f" {theirs['keys'] if theirs else 0} on {new} (digests differ)"
                )
        return problems

    def commit(self) -> None:
        body = {
            "id": self.id,
            "source": self.source.fingerprint,
            "target": self.target.fingerprint,
        }
        # New shards first: their commit only lets them take writes of keys they already have.
        order = sorted(self.nodes(), key=lambda n: self.source_has(n[1]))
        for i, (address, shard, role) in enumerate(order):
            self.call(address, "POST", "/reshard/commit", body)
            self.say(f"  {shard} {role} ({address}) serves map {self.target.fingerprint}")
            if i == 0:
                _kill_point("commit")

    def source_has(self, name: str) -> bool:
        return any(s.name == name for s in self.source.shards)

    def purge(self) -> int:
        """Every leader scans all of its keys and deletes those it no longer owns: all at
        once, so that the wait is the largest shard's, not the sum of them all."""
        names = {shard.leader: shard.name for shard in self.target.shards}

        def purge(address: str) -> dict:
            doc = self.call(address, "POST", "/purge")[1]
            self.say(f"  {names[address]}: purged {doc['deleted']:,} keys, kept {doc['kept']:,}")
            _kill_point("purge")  # the first to finish: the others are still purging
            return doc

        return sum(doc["deleted"] for doc in self._for_nodes(purge, list(names)).values())

    # --- the whole move -------------------------------------------------------------------

    def run(self, *, dry_run: bool = False) -> dict:
        started = time.monotonic()
        src, dst = self.source_config.path, self.target_config.path
        self.say(f"reshard {src} -> {dst}")
        self.say(f"  maps {self.source.fingerprint} -> {self.target.fingerprint}")
        states = self.states()
        plan = self.plan()
        self.say(f"plan: {plan['moved']:,} of {plan['keys']:,} keys move ({plan['fraction']:.1%})")
        for name, count in sorted(plan["moves"].items()):
            old, new = name.split(">")
            self.say(f"  {old} -> {new}: {count:,} keys")
        if dry_run:
            self.say("dry run: nothing was changed")
            return {"plan": plan, "state": "planned"}
        phases = {(s["transition"] or {}).get("phase") for s in states.values()}
        if self.committed_anywhere(states):
            self.say("a previous run committed the new map on some nodes: finishing the commit")
        elif phases & {"verified", "switch"}:
            # Verified before any node committed: finish the switch, then commit.
            self.say("a previous run verified the copies: finishing the switch")
            self.switch()
        else:
            self._check_new_shards(states)
            self._move(plan)
        self.say("commit")
        self.commit()
        self.say("purge")
        purged = self.purge()
        seconds = time.monotonic() - started
        self.say(
            f"done in {seconds:.1f}s: the cluster serves map {self.target.fingerprint};"
            f" use {dst} from now on (nodes started with {src} keep the new map)"
        )
        return {"plan": plan, "state": "done", "purged": purged, "seconds": seconds}

    def _check_new_shards(self, states: dict[str, dict]) -> None:
        """A shard that joins must start empty: keys there before the move began were
        written by someone who should not have known about it, and the copy would replace
        them (a node that joined an earlier, aborted run of this move is fine)."""
        for shard in self.target.shards:
            if self.source_has(shard.name) or states[shard.leader]["joining"]:
                continue
            doc = self.call(shard.leader, "POST", "/reshard/plan", self._maps_body())[1]
            if doc["keys"]:
                raise ReshardError(
                    f"{shard.name} at {shard.leader} already holds {doc['keys']:,} keys; a new"
                    " shard must start empty (were clients given its address before the"
                    " move?). Stop it, remove its data directory, start it and rerun."
                )

    def _move(self, plan: dict) -> None:
        for attempt in range(1, COPY_ATTEMPTS + 1):
            self.say("copy" + (f" (attempt {attempt})" if attempt > 1 else ""))
            self.prepare("copy")
            try:
                seqs = self.copy(plan)
                self.say("fence: writes of moving keys wait (503, retried by clients)")
                fenced = self.prepare("fence")
                _kill_point("fence")
                for shard in self.source.shards:
                    address = shard.leader
                    upto = fenced[address]["seq"]
                    _, entries = self.replay(address, seqs[address], upto)
                    self.say(f"  {shard.name}: replayed {entries:,} entries up to seq {upto}")
            except LogTrimmed as exc:
                self.say(f"  the log was trimmed under the copy ({exc}); copying again")
                continue
            break
        else:
            self.prepare("copy")
            raise ReshardError(
                f"the sources trimmed their logs under {COPY_ATTEMPTS} copies; raise"
                " [cluster] log_retention and rerun"
            )
        _kill_point("verify")
        self.say("verify")
        problems = self.verify()
        if problems:
            self.prepare("copy")  # lift the fence; nothing switched
            raise ReshardError(
                "the copies differ from their sources, nothing was switched (rerun to copy"
                " again):\n  " + "\n  ".join(problems)
            )
        self.say(f"  {len(plan['moves'])} moved ranges match their sources")
        self.switch()

    def switch(self) -> None:
        # Two fan-outs: every node first answers reads of moving keys it holds (old or new
        # owner alike), and only then do old owners send those reads to the new owners, so
        # no read bounces between a node that switched and one that did not yet.
        behind = [
            address
            for address, state in self.states().items()
            if (state["transition"] or {}).get("phase") in ("copy", "fence")
        ]
        if behind:
            self.prepare("verified", behind)
        self.say("switch: reads of moving keys go to their new owners")
        self.prepare("switch")
        _kill_point("switch")

    def abort(self) -> None:
        """Lift the fence and forget the move on every node (before any commit only)."""
        states = self.states()
        phases = {(s["transition"] or {}).get("phase") for s in states.values()}
        if self.committed_anywhere(states) or phases & {"verified", "switch"}:
            raise ReshardError(
                "the copies were verified and nodes switched to them; the move cannot be"
                " aborted, rerun it to finish"
            )
        body = {"id": self.id}
        for address, shard, role in self.nodes():
            self.call(address, "POST", "/reshard/abort", body)
            self.say(f"  {shard} {role} ({address}): reshard {self.id} aborted")

    def close(self) -> None:
        self.http.close()
