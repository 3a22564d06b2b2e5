"""Replica progress on a leader: how far the log may be trimmed, and min_replicas waits."""

from __future__ import annotations

import threading
import time

from distribkv.replication.progress import ProgressTracker


def test_without_replicas_the_whole_log_may_go():
    assert ProgressTracker().trim_target(last=100, trimmed=0, retention=1000) == 100


def test_nothing_is_trimmed_until_every_replica_reported():
    progress = ProgressTracker(["r0", "r1"])
    progress.acknowledge("r0", 80)
    assert progress.trim_target(last=100, trimmed=10, retention=1000) == 10
    progress.acknowledge("r1", 50)
    assert progress.trim_target(last=100, trimmed=10, retention=1000) == 50


def test_the_retention_cap_wins_over_a_slow_replica_but_not_over_a_resync_or_a_hold():
    progress = ProgressTracker(["r0", "r1"])
    progress.acknowledge("r0", 95)
    progress.acknowledge("r1", 5)
    assert progress.trim_target(last=100, trimmed=0, retention=50) == 50  # r1 will resync
    progress.resyncing("r1", 20)  # it reloads a snapshot taken at seq 20
    assert progress.trim_target(last=100, trimmed=0, retention=50) == 20
    progress.acknowledge("r1", 97)
    assert progress.trim_target(last=100, trimmed=20, retention=50) == 95
    progress.hold("reshard:x", 30, ttl=60)
    assert progress.trim_target(last=100, trimmed=20, retention=50) == 30
    progress.release("reshard:x")
    assert progress.trim_target(last=100, trimmed=20, retention=50) == 95


def test_a_hold_lapses_after_its_ttl():
    progress = ProgressTracker()
    progress.hold("reshard:x", 10, ttl=0.0)
    time.sleep(0.01)
    assert progress.trim_target(last=100, trimmed=0, retention=1000) == 100
    assert progress.holds == {}


def test_an_acknowledgement_never_goes_back():
    progress = ProgressTracker(["r0"])
    progress.acknowledge("r0", 40)
    progress.acknowledge("r0", 30)  # a late pull
    assert progress.replicas["r0"].acked == 40


def test_wait_replicated_returns_when_enough_replicas_applied_or_times_out():
    progress = ProgressTracker(["r0", "r1"])
    assert not progress.wait_replicated(5, 1, timeout=0.05)
    threading.Timer(0.05, progress.acknowledge, args=("r0", 5)).start()
    assert progress.wait_replicated(5, 1, timeout=10)
    assert not progress.wait_replicated(5, 2, timeout=0.05)


def test_status_reports_each_replica_and_its_lag():
    progress = ProgressTracker(["r0", "r1"])
    progress.acknowledge("r0", 7)
    status = progress.status(10, lambda acked: None if acked < 0 else 0.5)
    assert status["r0"]["applied_seq"] == 7 and status["r0"]["lag_entries"] == 3
    assert status["r0"]["lag_seconds"] == 0.5
    assert status["r1"] == {
        "applied_seq": None,
        "lag_entries": None,
        "lag_seconds": None,
        "last_seen_s_ago": None,
    }
