"""One node's coordinator on etcd: leases, the leader key of each shard, terms and elections.

What is kept in etcd, under the cluster's prefix::

    <prefix>/shards/<shard>/leader          {"node", "address", "fork"}, on the leader's lease
    <prefix>/shards/<shard>/terms/<id>      {"node", "fork"}, for ever
    <prefix>/shards/<shard>/members/<node>  {"address", "applied", "eligible", "vacancy"},
                                            on that node's lease

A term is the revision that last wrote a leader key (an election creates it; a switchover
writes it over, on the new leader's lease; renewing a lease does not write it). Its terms
record is written in the same transaction, so that record's create revision is the term, and
``fork`` is the last seq the new leader held when it took the lead (its history carries on
from there).

The loop (a thread, every ``poll_interval``):

1. renews this node's lease every third of ``lease_ttl``. The leader may acknowledge writes
   until ``sent + lease_ttl - margin``, where ``sent`` is when the last renewal that succeeded
   was sent, on this process's monotonic clock: etcd counts the TTL from when it received it,
   which is later, so the lease cannot have expired before then, even if etcd is unreachable
   since;
2. reads the whole prefix: who leads every shard, the terms, the members of its shard;
3. publishes its member key when it changed (at most every half second for the applied seq
   alone);
4. when its shard has no leader: every eligible node stops following (so its applied seq
   stays put) and publishes it, marked with the revision at which it saw the vacancy. Once
   every live member has done so, the most advanced one that is within ``failover_max_lag`` of
   the highest seq known creates the leader key. With ``min_replicas = 0`` a member that does
   not publish, or a more advanced one that does not take the key, is passed over after a
   lease TTL; with ``min_replicas >= 1`` never (it may hold the only copy of an acknowledged
   write). A shard's very first leader is the one ``sharding.toml`` names.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from distribkv.coordination.api import (
    CoordinationError,
    Coordinator,
    HandoverUnknown,
    Leadership,
)
from distribkv.httpclient import source_host
from distribkv_etcd.client import EtcdClient, EtcdError, KeyValue

log = logging.getLogger(__name__)

__all__ = ["EtcdCoordinator"]

#: How often the applied seq alone is published (state changes go at once).
PUBLISH_INTERVAL = 0.5


class EtcdCoordinator(Coordinator):
    def __init__(self, node, settings: Mapping[str, Any], client: EtcdClient | None = None):
        from distribkv_etcd import Settings

        self.node = node
        self.settings = Settings.from_table(settings, node.config)
        # From the node's own address, like all of its traffic to other nodes.
        self.client = client or self.settings.client(source_host(node.address.host))
        self.prefix = self.settings.prefix.encode()
        self.shard = node.me.name
        self.name = node.node_config.node_name
        self.ttl = self.settings.lease_ttl
        self.margin = max(0.25, self.ttl / 4)
        self.interval = self.settings.poll_interval
        self._changed: Callable[[], None] = lambda: None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # The lease
        self._lease = 0
        self._lease_until = 0.0  # monotonic: the lease lasts at least until then
        self._renew_at = 0.0
        # What was read from etcd
        self._leaders: dict[str, Leadership] = {}
        self._forks: dict[str, dict[int, int]] = {}
        self._leader_lease = 0  # the lease of this shard's leader key
        self._members: dict[str, tuple[KeyValue, dict]] = {}
        self._view_time = 0.0  # monotonic: when etcd was last read
        self._known_term = 0  # the term _known_seq belongs to
        self._revision = 0
        self._vacant_since: tuple[int, float] | None = None  # (revision, monotonic)
        self._published: dict[str, Any] | None = None
        self._published_at = 0.0
        self._known_seq = 0  # the highest seq this shard is known to have reached
        self._candidate_seq: int | None = None
        self.elections = 0
        self.last_error: str | None = None
        self.connected = False

    # --- the contract --------------------------------------------------------------------

    def start(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._thread = threading.Thread(
            target=self._run, name=f"distribkv-etcd-{self.node.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        lease = self._lease
        self._lease = 0
        self._lease_until = 0.0
        if lease:
            # Without the lease, this node's keys go at once: if it led, the others elect now
            # instead of after a lease TTL.
            try:
                self.client.revoke(lease)
            except EtcdError as exc:
                log.warning("%s: could not revoke its etcd lease: %s", self.node.name, exc)
        self.client.close()

    def leader(self, shard: str) -> Leadership | None:
        return self._leaders.get(shard)

    def fork_after(self, shard: str, term: int) -> int | None:
        later = [fork for t, fork in self._forks.get(shard, {}).items() if t > term]
        return min(later) if later else None

    def hand_over(self, shard: str, node: str, address: str, fork: int) -> Leadership:
        lead = self._leaders.get(shard)
        if lead is None or lead.node != self.name or self._leader_lease != self._lease:
            raise CoordinationError(f"{self.node.name} does not hold the lead of {shard} in etcd")
        member = self._members.get(node)
        if member is None or not member[0].lease:
            raise CoordinationError(f"{node} has no live member key in etcd (is it running?)")
        lease = member[0].lease
        base = self.prefix + f"/shards/{shard}".encode()
        doc = {"node": node, "address": address, "fork": fork}
        try:
            done, revision = self.client.hand_over(
                base + b"/leader",
                json.dumps(doc).encode(),
                mod_revision=lead.term,
                lease=lease,
                lease_key=base + f"/members/{node}".encode(),
                with_puts=[
                    (
                        base + f"/terms/{node}-{uuid.uuid4().hex}".encode(),
                        json.dumps({"node": node, "fork": fork}).encode(),
                    )
                ],
            )
        except EtcdError:
            done, revision = False, 0  # it may have been applied all the same: look
        if not done:
            # Either nothing changed (the lead or the target's lease moved meanwhile) or the
            # transaction went through and its answer was lost: the key says which.
            try:
                _, kvs = self.client.range_prefix(base + b"/leader")
            except EtcdError as exc:
                raise HandoverUnknown(
                    f"the switchover of {shard} to {node} may or may not have happened: {exc}"
                ) from exc
            now = {kv.key: kv for kv in kvs}.get(base + b"/leader")
            holder = json.loads(now.value)["node"] if now is not None else None
            if now is None or holder != node:
                if now is not None and now.mod_revision == lead.term and holder == self.name:
                    raise CoordinationError(
                        f"the switchover of {shard} to {node} did not happen in etcd (the lead"
                        f" or {node}'s lease changed meanwhile); {self.name} still leads"
                    )
                raise HandoverUnknown(
                    f"after the switchover of {shard} to {node}, etcd names {holder or 'no leader'}"
                )
            revision = now.mod_revision
        log.warning(
            "%s: handed shard %s over to %s: term %d", self.node.name, shard, node, revision
        )
        kv_revision, kvs = self.client.range_prefix(self.prefix + b"/shards/")
        self._read(kv_revision, kvs)
        return Leadership(shard, node, address, revision)

    def view_time(self) -> float:
        return self._view_time

    def deadline(self) -> float | None:
        if self._leader_lease and self._leader_lease == self._lease:
            return self._lease_until - self.margin
        return 0.0  # not this node's leadership (any more): acknowledge nothing

    def status(self) -> dict[str, Any]:
        lead = self._leaders.get(self.shard)
        until = self._lease_until - time.monotonic() if self._lease else None
        return {
            "endpoints": self.settings.endpoints,
            "prefix": self.settings.prefix,
            "connected": self.connected,
            "lease_ttl": self.ttl,
            "lease_left_s": None if until is None else round(until, 3),
            "leader": None if lead is None else lead.node,
            "elections_won": self.elections,
            "last_error": self.last_error,
            "leaders": {
                shard: {"node": lead.node, "address": lead.address, "term": lead.term}
                for shard, lead in sorted(self._leaders.items())
            },
        }

    # --- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._round()
                if self.last_error is not None:
                    log.info("%s: etcd answers again", self.node.name)
                self.last_error = None
                self.connected = True
                failures = 0
            except EtcdError as exc:
                failures += 1
                self.connected = False
                self.last_error = str(exc)
                if failures == 1 or failures % 50 == 0:
                    log.warning("%s: etcd: %s", self.node.name, exc)
            except Exception as exc:
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: coordination round failed", self.node.name)
            self._stopping.wait(self.interval)

    def _round(self) -> None:
        renewed = self._renew()
        revision, kvs = self.client.range_prefix(self.prefix + b"/shards/")
        self._read(revision, kvs)
        # The deadline moves on only with a view read after the renewal: a leader that was
        # cut off never acknowledges on an extended lease before it knows it still leads.
        if renewed is not None:
            self._lease_until = renewed
        self._view_time = time.monotonic()
        lead = self._leaders.get(self.shard)
        if lead is None:
            self._vacancy(revision)
        else:
            self._vacant_since = None
            self._candidate_seq = None
        self._publish()

    def _renew(self) -> float | None:
        """Grant or renew this node's lease when due; until when it lasts at least, or None
        if nothing was renewed."""
        now = time.monotonic()
        if not self._lease:
            lease, ttl = self.client.grant(self.ttl)
            self._lease = lease
            self._renew_at = now + ttl / 3
            self._published = None
            return now + ttl
        if now < self._renew_at:
            return None
        ttl = self.client.keepalive(self._lease)
        if ttl <= 0:
            log.warning("%s: its etcd lease expired; taking a new one", self.node.name)
            self._lease, self._lease_until = 0, 0.0
            self._changed()
            return self._renew()
        self._renew_at = now + ttl / 3
        return now + ttl

    def _read(self, revision: int, kvs: list[KeyValue]) -> None:
        base = self.prefix + b"/shards/"
        leaders: dict[str, Leadership] = {}
        forks: dict[str, dict[int, int]] = {}
        members: dict[str, tuple[KeyValue, dict]] = {}
        leader_lease = 0
        for kv in kvs:
            parts = kv.key[len(base) :].split(b"/")
            try:
                shard = parts[0].decode()
                doc = json.loads(kv.value)
            except ValueError:
                continue
            ours = shard == self.shard and parts[1:] == [b"leader"]
            if ours and kv.mod_revision != self._known_term:
                # A new term: the highest seq known starts again from its fork.
                self._known_term = kv.mod_revision
                self._known_seq = 0
            if parts[1:] == [b"leader"]:
                if shard == self.shard and doc["node"] == self.name and kv.lease != self._lease:
                    # This node's leadership from before it restarted: that process is gone
                    # (this one serves its address), so its lease goes now, not in a TTL.
                    log.warning(
                        "%s: its leadership of term %d was held by a former process; giving it up",
                        self.node.name,
                        kv.mod_revision,
                    )
                    self.client.revoke(kv.lease)
                    continue
                # The term: the revision that wrote the key (an election creates it, a
                # switchover writes it over; renewing the lease does not change it).
                leaders[shard] = Leadership(shard, doc["node"], doc["address"], kv.mod_revision)
                if shard == self.shard:
                    leader_lease = kv.lease
                    self._known_seq = max(self._known_seq, int(doc.get("fork", 0)))
            elif len(parts) == 3 and parts[1] == b"terms":
                forks.setdefault(shard, {})[kv.create_revision] = int(doc["fork"])
            elif len(parts) == 3 and parts[1] == b"members" and shard == self.shard:
                members[parts[2].decode()] = (kv, doc)
                self._known_seq = max(self._known_seq, int(doc.get("applied", 0)))
        with self._lock:
            moved = leaders != self._leaders or leader_lease != self._leader_lease
            self._leaders, self._forks, self._leader_lease = leaders, forks, leader_lease
            self._members = members
            self._revision = revision
        if moved:
            self._changed()

    def _member_doc(self) -> dict[str, Any]:
        node = self.node
        doc: dict[str, Any] = {
            "address": str(node.address),
            "applied": node.applied_seq(),
            "term": node.term,
            "role": node.role,
        }
        if self._candidate_seq is not None:
            doc["applied"] = self._candidate_seq
        if self._vacant_since is not None:
            doc["vacancy"] = self._vacant_since[0]
            doc["eligible"] = self._candidate_seq is not None
        return doc

    def _publish(self) -> None:
        if not self._lease:
            return
        doc = self._member_doc()
        now = time.monotonic()
        previous = self._published
        if previous == doc:
            return
        only_seq = previous is not None and {**previous, "applied": doc["applied"]} == doc
        if only_seq and now - self._published_at < PUBLISH_INTERVAL:
            return
        key = self.prefix + f"/shards/{self.shard}/members/{self.name}".encode()
        self.client.put(key, json.dumps(doc).encode(), lease=self._lease)
        self._published, self._published_at = doc, now

    # --- elections -----------------------------------------------------------------------

    def _vacancy(self, revision: int) -> None:
        now = time.monotonic()
        if self._vacant_since is None:
            self._vacant_since = (revision, now)
            log.warning(
                "%s: shard %s has no leader (revision %d)", self.node.name, self.shard, revision
            )
            self._changed()
        first = not self._forks.get(self.shard)
        if first and self.name != "leader":
            return  # the shard's very first leader is the one sharding.toml names
        if self._candidate_seq is None:
            self._candidate_seq = self.node.stand_for_election(first=first)
            self._publish()
            if self._candidate_seq is None:
                return
        seq = self._candidate_seq
        _, since = self._vacant_since
        if not first:
            # A peer that saw this vacancy marks its position with a revision after the latest
            # term's (nodes see the vacancy at different revisions).
            latest = max(self._forks[self.shard])
            peers = {
                name: doc
                for name, (kv, doc) in self._members.items()
                if name != self.name and kv.lease
            }
            waited = now - since
            settled = all(doc.get("vacancy", -1) > latest for doc in peers.values())
            # With min_replicas >= 1 an acknowledged write may be on one replica only: never
            # take the lead past a live peer that may be further (one that has not published
            # since the vacancy, or has published more); without, a stuck peer is passed over
            # after a lease TTL.
            patient = self.node.config.cluster.min_replicas >= 1
            if not settled and (patient or waited < self.ttl):
                return  # a peer has not published its position since the vacancy
            better = [
                name
                for name, doc in peers.items()
                if doc.get("vacancy", -1) > latest
                and doc.get("eligible")
                and (int(doc.get("applied", 0)), _rank(self.node, name))
                > (seq, _rank(self.node, self.name))
            ]
            if better and (patient or waited < self.ttl):
                return  # a more advanced peer takes it (or, without min_replicas, a TTL passes)
            if seq < self._known_seq - self.settings.failover_max_lag:
                if waited < self.ttl:
                    log.warning(
                        "%s: %d entries behind the highest known seq %d: more than"
                        " failover_max_lag (%d); not standing",
                        self.node.name,
                        self._known_seq - seq,
                        self._known_seq,
                        self.settings.failover_max_lag,
                    )
                return
        self._campaign(seq)

    def _campaign(self, seq: int) -> None:
        if not self._lease:
            return
        doc = {"node": self.name, "address": str(self.node.address), "fork": seq}
        base = self.prefix + f"/shards/{self.shard}".encode()
        term_key = base + f"/terms/{self.name}-{uuid.uuid4().hex}".encode()
        won, revision = self.client.create(
            base + b"/leader",
            json.dumps(doc).encode(),
            lease=self._lease,
            with_puts=[(term_key, json.dumps({"node": self.name, "fork": seq}).encode())],
        )
        if won:
            self.elections += 1
            log.warning(
                "%s: won the election of shard %s: term %d, from seq %d",
                self.node.name,
                self.shard,
                revision,
                seq,
            )
            # Read it back at once, so that the node takes the lead without waiting a round.
            revision, kvs = self.client.range_prefix(self.prefix + b"/shards/")
            self._read(revision, kvs)
            self._vacant_since = None
            self._candidate_seq = None


def _rank(node, name: str) -> tuple[int, int]:
    """Between nodes at the same seq: the file's leader first, then replica-0, replica-1..."""
    if name == "leader":
        return (1, 0)
    try:
        return (0, -int(name.removeprefix("replica-")))
    except ValueError:
        return (0, -1000)
