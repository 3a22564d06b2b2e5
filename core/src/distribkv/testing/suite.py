"""The storage conformance suite: every backend must pass all of it.

Import it into a test module of the backend's distribution (``from distribkv.testing.suite
import *``) and run pytest with ``-p distribkv.testing --distribkv-backend=NAME``. Tests that
need persistence, compaction or a particular capability skip on backends that do not declare it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from distribkv.storage.api import MAX_KEY_SIZE, Delete, Namespace, Put, StorageStats
from distribkv.storage.errors import (
    BackendClosedError,
    BackendLockedError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    StorageError,
    StorageFullError,
    UnsupportedOperationError,
)
from distribkv.testing import worker
from distribkv.testing.cluster import wait_until
from distribkv.testing.disk import MiB, free_bytes, small_disk, take_space

__all__ = [
    "TestAtomicity",
    "TestBasics",
    "TestCorruption",
    "TestDiskFull",
    "TestDurability",
    "TestEngine",
    "TestLifecycle",
    "TestLimits",
    "TestModel",
    "TestScan",
]

DATA, LOG, META = Namespace.DATA, Namespace.LOG, Namespace.META


def needs_persistence(store) -> None:
    if not store.capabilities.persistent:
        pytest.skip(f"backend {store.name!r} is not persistent")


class TestBasics:
    def test_missing_key_reads_as_none(self, store):
        assert store.get(b"absent") is None
        assert store.get_many([b"absent", b"also-absent"]) == [None, None]

    def test_put_get_overwrite_delete(self, store):
        store.put(b"k", b"v1", sync=True)
        assert store.get(b"k") == b"v1"
        store.put(b"k", b"v2", sync=False)
        assert store.get(b"k") == b"v2"
        store.delete(b"k", sync=True)
        assert store.get(b"k") is None

    def test_delete_of_missing_key_is_not_an_error(self, store):
        store.delete(b"never-written", sync=False)
        assert store.get(b"never-written") is None

    def test_keys_and_values_are_bytes_end_to_end(self, store):
        pairs = {
            bytes(range(256))[:200]: bytes(range(256)),
            b"\x00": b"\x00\x00",
            b"%FF%FE": b"\xff\xfe",
            b"\xff\xfe": b"%FF%FE",
            b"a&b=c d/e+f": b"\x00 & / % +",
            b"\xff" * MAX_KEY_SIZE: b"",
        }
        store.apply([Put(DATA, k, v) for k, v in pairs.items()], sync=False)
        for key, value in pairs.items():
            assert store.get(key) == value
        assert store.get_many(list(pairs)) == list(pairs.values())

    def test_empty_value_is_not_a_missing_value(self, store):
        store.put(b"empty", b"", sync=False)
        assert store.get(b"empty") == b""

    def test_large_value_round_trips(self, store):
        value = random.Random(1).randbytes(4 * 1024 * 1024)
        store.put(b"big", value, sync=True)
        assert store.get(b"big") == value

    def test_namespaces_are_separate(self, store):
        store.apply(
            [Put(DATA, b"k", b"data"), Put(LOG, b"k", b"log"), Put(META, b"k", b"meta")],
            sync=False,
        )
        assert [store.get(b"k", ns) for ns in (DATA, LOG, META)] == [b"data", b"log", b"meta"]
        store.delete(b"k", ns=LOG, sync=False)
        assert [store.get(b"k", ns) for ns in (DATA, LOG, META)] == [b"data", None, b"meta"]

    def test_ops_of_one_apply_take_effect_in_order(self, store):
        store.apply([Put(DATA, b"a", b"1"), Delete(DATA, b"a")], sync=False)
        store.apply([Delete(DATA, b"b"), Put(DATA, b"b", b"2")], sync=False)
        store.apply([Put(DATA, b"c", b"1"), Put(DATA, b"c", b"3")], sync=False)
        assert store.get_many([b"a", b"b", b"c"]) == [None, b"2", b"3"]

    def test_empty_apply_is_a_no_op(self, store):
        store.apply([], sync=True)
        assert store.get(b"x") is None

    def test_get_many_keeps_order_and_duplicates(self, store):
        store.apply([Put(DATA, b"x", b"1"), Put(DATA, b"y", b"2")], sync=False)
        assert store.get_many([b"y", b"missing", b"x", b"y"]) == [b"2", None, b"1", b"2"]
        assert store.get_many([]) == []

    def test_stats_describe_the_backend(self, store):
        store.apply([Put(DATA, b"k%d" % i, b"v") for i in range(10)], sync=True)
        stats = store.stats()
        assert isinstance(stats, StorageStats)
        assert stats.backend == store.name
        assert set(stats.keys) == {ns.value for ns in Namespace}
        assert stats.keys["data"] in (None, 10) or stats.keys["data"] > 0
        assert stats.disk_bytes >= 0

    def test_compaction_keeps_data_or_is_declared_unsupported(self, store):
        store.apply([Put(DATA, b"k%03d" % i, b"v%d" % i) for i in range(200)], sync=False)
        store.apply([Delete(DATA, b"k%03d" % i) for i in range(0, 200, 2)], sync=False)
        if not store.capabilities.compaction:
            with pytest.raises(UnsupportedOperationError):
                store.compact()
            return
        store.compact()
        store.compact(DATA)
        with store.scan() as pairs:
            assert list(pairs) == [(b"k%03d" % i, b"v%d" % i) for i in range(1, 200, 2)]


class TestEngine:
    """The bare engine, below the core's envelope and key checks."""

    def test_engine_stores_values_unchanged_including_empty_ones(self, store):
        engine = store.engine
        engine.apply(
            [Put(DATA, b"empty", b""), Put(META, b"k" * MAX_KEY_SIZE, b"\x00")], sync=False
        )
        assert engine.get(DATA, b"empty") == b""
        assert engine.get(META, b"k" * MAX_KEY_SIZE) == b"\x00"
        assert engine.get_many(DATA, [b"empty", b"absent"]) == [b"", None]
        with engine.scan(DATA) as pairs:
            assert list(pairs) == [(b"empty", b"")]

    def test_engine_close_is_idempotent_and_later_use_raises(self, store):
        engine = store.engine
        engine.close()
        engine.close()
        for call in (
            lambda: engine.get(DATA, b"k"),
            lambda: engine.apply([], sync=True),
            lambda: engine.scan(DATA),
            lambda: engine.get_many(DATA, [b"k"]),
        ):
            with pytest.raises(BackendClosedError):
                call()


class TestLimits:
    @pytest.mark.parametrize("key", [b"", b"x" * (MAX_KEY_SIZE + 1), "text", None, bytearray(b"k")])
    def test_invalid_keys_are_rejected_everywhere(self, store, key):
        with pytest.raises(InvalidKeyError):
            store.put(key, b"v", sync=False)
        with pytest.raises(InvalidKeyError):
            store.get(key)
        with pytest.raises(InvalidKeyError):
            store.get_many([b"ok", key])
        with pytest.raises(InvalidKeyError):
            store.delete(key, sync=False)

    def test_longest_key_is_accepted(self, store):
        key = b"k" * MAX_KEY_SIZE
        store.put(key, b"v", sync=False)
        assert store.get(key) == b"v"

    def test_invalid_values_are_rejected(self, store):
        for value in ("text", None, bytearray(b"v"), 7):
            with pytest.raises(InvalidValueError):
                store.put(b"k", value, sync=False)
        assert store.get(b"k") is None

    def test_a_batch_with_one_invalid_op_writes_nothing(self, store):
        store.put(b"before", b"old", sync=False)
        ops = [Put(DATA, b"before", b"new"), Put(DATA, b"x" * (MAX_KEY_SIZE + 1), b"v")]
        with pytest.raises(InvalidKeyError):
            store.apply(ops, sync=False)
        assert store.get(b"before") == b"old"


class TestScan:
    KEYS = [
        b"\x00",
        b"\x00\x00",
        b"a",
        b"a\x00",
        b"ab",
        b"b",
        b"\x7f",
        b"\x80",
        b"\xfe",
        b"\xff",
        b"\xff\xff",
    ]

    @pytest.fixture
    def filled(self, store):
        store.apply([Put(DATA, k, b"v" + k) for k in self.KEYS], sync=False)
        # Neighbours in the other namespaces must never leak into a data scan.
        store.apply([Put(LOG, b"\xff\xff\xff", b"log"), Put(META, b"\x00", b"meta")], sync=False)
        return store

    def test_scan_returns_all_pairs_in_byte_order(self, filled):
        with filled.scan() as pairs:
            assert list(pairs) == [(k, b"v" + k) for k in sorted(self.KEYS)]

    @pytest.mark.parametrize(
        ("start", "stop", "limit"),
        [
            (b"a", b"b", None),
            (b"a\x00", None, None),
            (None, b"a", None),
            (b"\x80", b"\xff", 1),
            (None, None, 0),
            (None, None, 3),
            (b"b", b"a", None),
            (b"zz", None, None),
        ],
    )
    def test_scan_bounds_and_limit(self, filled, start, stop, limit):
        expected = [
            (k, b"v" + k)
            for k in sorted(self.KEYS)
            if (start is None or k >= start) and (stop is None or k < stop)
        ][:limit]
        with filled.scan(DATA, start, stop, limit=limit) as pairs:
            assert list(pairs) == expected

    def test_scan_of_other_namespaces(self, filled):
        with filled.scan(LOG) as pairs:
            assert list(pairs) == [(b"\xff\xff\xff", b"log")]
        with filled.scan(META) as pairs:
            assert list(pairs) == [(b"\x00", b"meta")]

    def test_scan_sees_the_snapshot_of_its_start(self, filled):
        with filled.scan() as pairs:
            first = next(pairs)
            filled.apply(
                [Put(DATA, b"ac", b"new"), Delete(DATA, b"b"), Put(DATA, b"a", b"x")], sync=False
            )
            rest = list(pairs)
        assert [first, *rest] == [(k, b"v" + k) for k in sorted(self.KEYS)]
        assert filled.get(b"ac") == b"new"

    def test_closed_scans_free_their_snapshots(self, filled):
        # More scans than LMDB's reader table holds: each must give its slot back.
        for _ in range(600):
            with filled.scan() as pairs:
                next(pairs)
        assert filled.get(b"a") == b"va"

    def test_closing_the_backend_ends_open_scans(self, open_backend, tmp_path):
        store = open_backend(tmp_path / "db")
        store.apply([Put(DATA, b"k%02d" % i, b"v") for i in range(10)], sync=False)
        scan = store.scan()
        assert next(scan) == (b"k00", b"v")
        store.close()
        with pytest.raises(BackendClosedError):
            next(scan)
        scan.close()
        if store.capabilities.persistent:
            again = open_backend(tmp_path / "db")
            assert again.get(b"k05") == b"v"

    def test_scans_can_be_closed_early_and_many_can_be_open(self, filled):
        scans = [filled.scan() for _ in range(20)]
        for scan in scans:
            next(scan)
        for scan in scans:
            scan.close()
            scan.close()
        with filled.scan() as pairs:
            assert len(list(pairs)) == len(self.KEYS)


class TestLifecycle:
    def test_close_is_idempotent(self, store):
        store.close()
        store.close()

    def test_every_use_after_close_raises_backend_closed(self, store):
        store.put(b"k", b"v", sync=False)
        store.close()
        calls = [
            lambda: store.get(b"k"),
            lambda: store.get_many([b"k"]),
            lambda: store.put(b"k", b"v", sync=False),
            lambda: store.delete(b"k", sync=True),
            lambda: store.apply([], sync=False),
            lambda: store.scan(),
            lambda: store.stats(),
        ]
        if store.capabilities.compaction:
            calls.append(lambda: store.compact())
        for call in calls:
            with pytest.raises(BackendClosedError):
                call()

    def test_reopen_after_close_keeps_data(self, open_backend, tmp_path):
        path = tmp_path / "db"
        store = open_backend(path)
        store.apply([Put(DATA, b"k", b"v"), Put(META, b"seq", b"7")], sync=True)
        store.close()
        again = open_backend(path)
        if not again.capabilities.persistent:
            assert again.get(b"k") is None
            return
        assert again.get(b"k") == b"v"
        assert again.get(b"seq", META) == b"7"

    def test_a_second_open_of_one_directory_is_refused(self, open_backend, tmp_path):
        store = open_backend(tmp_path / "db")
        needs_persistence(store)
        with pytest.raises(BackendLockedError):
            open_backend(tmp_path / "db")
        store.put(b"still", b"works", sync=False)
        assert store.get(b"still") == b"works"

    def test_a_second_process_cannot_open_an_open_directory(self, store, tmp_path, backend_name):
        needs_persistence(store)
        code = (
            "import sys\n"
            "from distribkv.storage.store import open_store\n"
            "from distribkv.storage.errors import BackendLockedError\n"
            "from distribkv.testing import resolve_backend\n"
            "try:\n"
            f"    open_store(resolve_backend({backend_name!r}), {str(tmp_path / 'db')!r})\n"
            "except BackendLockedError:\n"
            "    sys.exit(3)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
        assert result.returncode == 3, result.stderr.decode()

    def test_data_survives_many_reopens(self, open_backend, tmp_path):
        path = tmp_path / "db"
        for round_ in range(5):
            store = open_backend(path)
            if not store.capabilities.persistent:
                pytest.skip("not persistent")
            for earlier in range(round_):
                assert store.get(b"round-%d" % earlier) == b"done"
            store.put(b"round-%d" % round_, b"done", sync=False)
            store.close()


class TestAtomicity:
    KEYS = [b"atom-%02d" % i for i in range(16)]

    def test_readers_never_see_half_an_apply(self, store):
        """A writer rewrites 16 keys per apply; readers must see all or none of each apply."""
        store.apply([Put(DATA, k, b"0") for k in self.KEYS], sync=False)
        stop = threading.Event()
        torn: list[object] = []
        counts = {"writes": 0, "reads": 0}

        def writer() -> None:
            # Runs for a fixed time (and at most 20,000 batches) so readers overlap many writes.
            deadline = time.monotonic() + 1.5
            for gen in range(1, 20_000):
                if time.monotonic() > deadline or torn:
                    break
                value = b"%d" % gen
                store.apply([Put(DATA, k, value) for k in self.KEYS], sync=False)
                counts["writes"] += 1
            stop.set()

        def reader() -> None:
            while not stop.is_set() and not torn:
                values = store.get_many(self.KEYS)
                if len(set(values)) != 1:
                    torn.append(("get_many", values))
                with store.scan(DATA, b"atom-", b"atom.") as pairs:
                    values = [v for _, v in pairs]
                if len(set(values)) != 1 or len(values) != len(self.KEYS):
                    torn.append(("scan", values))
                counts["reads"] += 1

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not torn, f"a reader saw a partly applied batch: {torn[0]}"
        assert counts["writes"] >= 20 and counts["reads"] >= 20, f"too little overlap: {counts}"

    def test_concurrent_writers_lose_nothing(self, store):
        def write(worker_id: int) -> None:
            for i in range(100):
                store.apply(
                    [
                        Put(DATA, b"w%d-%03d" % (worker_id, i), b"%d" % i),
                        Put(LOG, b"w%d" % worker_id, b"%d" % i),
                    ],
                    sync=False,
                )

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        with store.scan() as pairs:
            assert len(list(pairs)) == 400
        assert store.get_many([b"w%d" % n for n in range(4)], LOG) == [b"99"] * 4


def _child_env(backend_settings) -> dict[str, str]:
    env = dict(os.environ)
    env[worker.SETTINGS_ENV] = json.dumps(backend_settings)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class TestDurability:
    @pytest.mark.parametrize("durability", ["sync", "async"])
    def test_apply_is_all_or_nothing_across_kill_9(
        self, store, tmp_path, backend_name, backend_settings, open_backend, durability
    ):
        """kill -9 a writer at random moments; after each, every batch is whole or absent."""
        needs_persistence(store)
        store.close()
        path = tmp_path / "db"
        keys = 32
        rng = random.Random(f"{backend_name}-{durability}")
        for round_ in range(4):
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distribkv.testing.worker",
                    "crash",
                    backend_name,
                    str(path),
                    durability,
                    str(keys),
                ],
                stdout=subprocess.PIPE,
                env=_child_env(backend_settings),
            )
            assert child.stdout is not None
            try:
                ready = child.stdout.readline().split()
                assert ready[:1] == [b"ready"], f"worker did not start: {ready!r}"
                acked = int(ready[1])
                wanted = rng.randint(1, 150)
                deadline = time.monotonic() + 30
                for _ in range(wanted):
                    line = child.stdout.readline()
                    assert line, f"round {round_}: the writer died before it was killed"
                    assert time.monotonic() < deadline, f"round {round_}: the writer stalled"
                    acked = int(line)
                # Kill while it is in the middle of further applies.
                time.sleep(rng.random() * 0.01)
                assert child.poll() is None, f"round {round_}: the writer stopped on its own"
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                child.wait(timeout=30)
                child.stdout.close()
            reopened = open_backend(path, durability=durability)
            values = reopened.get_many([b"key-%03d" % i for i in range(keys)])
            gen = reopened.get(b"gen", META)
            reopened.close()
            assert len(set(values)) == 1, f"round {round_}: a torn batch survived: {set(values)}"
            assert values[0] == gen, f"round {round_}: data {values[0]!r} but meta {gen!r}"
            assert gen is not None and int(gen.split(b"-")[1]) >= acked, (
                f"round {round_}: batch {acked} was acknowledged but {gen!r} survived"
            )

    @pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
    @pytest.mark.parametrize(
        ("durability", "sync", "expect"),
        [("sync", True, "every"), ("async", True, "every"), ("async", False, "none")],
    )
    def test_sync_flag_is_honoured(
        self, store, tmp_path, backend_name, backend_settings, durability, sync, expect
    ):
        """strace the writer: sync=True flushes before each apply returns, async never does."""
        needs_persistence(store)
        store.close()
        count = 40
        trace = tmp_path / "trace"
        result = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-o",
                str(trace),
                "-e",
                "trace=fsync,fdatasync,msync,sync_file_range,syncfs,chdir",
                sys.executable,
                "-m",
                "distribkv.testing.worker",
                "sync-audit",
                backend_name,
                str(tmp_path / "db"),
                durability,
                "1" if sync else "0",
                str(count),
            ],
            capture_output=True,
            timeout=120,
            env=_child_env(backend_settings),
        )
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        lines = trace.read_text().splitlines()
        begin = next(i for i, line in enumerate(lines) if worker.MARK_BEGIN in line)
        end = next(i for i, line in enumerate(lines) if worker.MARK_END in line)
        syncs = [line for line in lines[begin:end] if "chdir" not in line]
        if expect == "every":
            assert len(syncs) >= count, f"{len(syncs)} syncs for {count} sync applies"
        else:
            assert syncs == [], f"async applies flushed: {syncs[:5]}"

    # Whether another thread gets a core during an apply is only telling on a machine that
    # runs nothing else: where other processes keep the cores busy (parallel test workers), it
    # rarely does, whatever the engine does with the GIL.
    @pytest.mark.serial
    def test_other_threads_run_while_a_synced_apply_waits_for_the_disk(self, store):
        """A node serves every request from threads of one process: an engine that held the
        GIL through its fsync would stop them all (reads too) for each durable write."""
        needs_persistence(store)
        count = 40
        ran = 0
        running = threading.Event()
        stop = threading.Event()

        def other() -> None:
            nonlocal ran
            running.set()
            while not stop.is_set():
                ran += 1
                time.sleep(0)  # lets go of the GIL: the applying thread goes on when it can

        interval = sys.getswitchinterval()
        thread = threading.Thread(target=other, daemon=True)
        waits = []  # (other thread's runs during the apply) for each apply that waited
        try:
            thread.start()
            assert running.wait(10), "the other thread did not start"
            # No forced switch within an apply (they take well under 50 ms): the other
            # thread runs during one only if the applying thread lets go of the GIL itself.
            sys.setswitchinterval(0.05)
            for i in range(count):
                before, started = ran, time.perf_counter()
                store.apply([Put(DATA, b"k%d" % i, b"v" * 100)], sync=True)
                if time.perf_counter() - started >= 0.00005:  # it waited for the disk
                    waits.append(ran - before)
        finally:
            sys.setswitchinterval(interval)
            stop.set()
            thread.join(timeout=10)
        if len(waits) < count // 4:
            pytest.skip(f"syncs here are too fast to tell ({len(waits)} of {count} took 50 µs)")
        idle = sum(runs == 0 for runs in waits)
        assert idle <= len(waits) // 2, (
            f"no other thread ran during {idle} of {len(waits)} applies that waited for the disk"
        )


class TestCorruption:
    def test_flipped_bytes_in_data_files_are_errors_never_wrong_values(
        self, open_backend, tmp_path
    ):
        path = tmp_path / "db"
        store = open_backend(path)
        needs_persistence(store)
        rng = random.Random(20)
        values = {b"key-%04d" % i: rng.randbytes(300) for i in range(400)}
        store.apply([Put(DATA, k, v) for k, v in values.items()], sync=True)
        if store.capabilities.compaction:
            store.compact()  # move the values out of the write-ahead log into table files
        store.close()

        flipped = 0
        targets = rng.sample(sorted(values), 20)
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            data = bytearray(file.read_bytes())
            changed = False
            for key in targets:
                at = data.find(values[key][:24])
                while at != -1:
                    data[at + 100] ^= 0x5A
                    changed = True
                    flipped += 1
                    at = data.find(values[key][:24], at + 1)
            if changed:
                file.write_bytes(bytes(data))
        assert flipped >= len(targets), "the values were not found in the data files"

        try:
            damaged = open_backend(path)
        except CorruptionError:
            return  # refusing to open damaged files is an error, not a wrong value
        wrong, errors = [], 0
        for key, value in values.items():
            try:
                got = damaged.get(key)
            except CorruptionError:
                errors += 1
                continue
            if got != value:
                wrong.append(key)
        try:
            with damaged.scan() as pairs:
                for key, value in pairs:
                    if values.get(key) != value:
                        wrong.append(key)
        except CorruptionError:
            errors += 1
        assert wrong == [], f"{len(wrong)} damaged values were served as data: {wrong[:5]}"
        assert errors > 0, "no read reported the damage"


def _takes(store, key: bytes, value: bytes) -> bool:
    """True if ``store`` takes a durable write of ``value`` under ``key``, False if it refuses it
    as StorageFullError (any other error is raised)."""
    try:
        store.put(key, value, sync=True)
    except StorageFullError:
        return False
    return True


class TestDiskFull:
    """A real full disk: a tmpfs of the test's own (root only; skipped elsewhere).

    The disk is 64 MiB: an engine with its default settings must keep its promises there,
    with a reserve of 24 MiB (the core's ``min_free_bytes``) and without one."""

    DISK = 64 * MiB
    RESERVE = 24 * MiB
    VALUE = 64 * 1024

    @pytest.fixture
    def disk(self, tmp_path):
        with small_disk(tmp_path / "disk", self.DISK) as path:
            yield path

    def _fill(self, store, disk, prefix: bytes) -> dict[bytes, bytes]:
        """Write until StorageFullError; the writes acknowledged before it."""
        rng = random.Random(prefix)
        acked: dict[bytes, bytes] = {}
        stand_in = disk / "stand-in"  # a memory engine's data takes no disk: this file does
        deadline = time.monotonic() + 60
        for i in range(2 * self.DISK // self.VALUE):
            assert time.monotonic() < deadline, "filling the disk took over 60 s"
            key, value = prefix + b"%05d" % i, rng.randbytes(self.VALUE)
            try:
                store.put(key, value, sync=i % 8 == 0)
            except StorageFullError:
                return acked
            except StorageError as exc:
                pytest.fail(f"a full disk must be StorageFullError (HTTP 507), got {exc!r}")
            acked[key] = value
            if not store.capabilities.persistent:
                with open(stand_in, "ab") as out:
                    out.write(b"\0" * self.VALUE)
        pytest.fail(f"{len(acked)} writes of {self.VALUE} bytes never filled the disk")

    def _check(self, store, acked: dict[bytes, bytes]) -> None:
        lost = [key for key, value in acked.items() if store.get(key) != value]
        assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost: {lost[:3]}"

    def test_below_the_reserve_writes_are_refused_deletes_work_and_writes_resume(
        self, open_backend, disk
    ):
        filler = disk / "filler"
        take_space(filler, self.DISK - 8 * MiB)  # 8 MiB to give back later
        store = open_backend(disk / "db", min_free_bytes=self.RESERVE)
        acked = self._fill(store, disk, b"k")
        assert len(acked) > 8, f"only {len(acked)} writes before the disk was full"
        with pytest.raises(StorageFullError):
            store.apply(
                [Put(DATA, b"new", b"v" * self.VALUE), Delete(DATA, next(iter(acked)))], sync=True
            )

        # Deletes go on: they are how space is freed (with the log and metadata they take).
        doomed = list(acked)[:4]
        store.delete(doomed[0], sync=True)
        store.apply([Delete(DATA, key) for key in doomed[1:]] + [Put(META, b"m", b"1")], sync=True)
        for key in doomed:
            assert store.get(key) is None
            del acked[key]

        # Space comes back: writes resume with no reopen.
        filler.unlink()

        def resumed() -> bool:
            return _takes(store, b"after", b"space")

        wait_until(resumed, timeout=5, message="writes did not resume after space was freed")
        acked[b"after"] = b"space"
        self._check(store, acked)

        # Nearly full again (below the reserve): the engine closes and opens there.
        take_space(filler, self.RESERVE // 2)
        store.close()
        again = open_backend(disk / "db", min_free_bytes=self.RESERVE)
        if again.capabilities.persistent:
            self._check(again, acked)
        # Closing and opening may have freed space (RocksDB drops its old logs): below again,
        # which the reserve sees at its next look at the file system.
        take_space(filler, self.RESERVE // 2)

        def refused() -> bool:
            return not _takes(again, b"probe", b"x")

        wait_until(refused, timeout=5, message="writes below the reserve were not refused")
        with pytest.raises(StorageFullError):
            again.put(b"more", b"x" * self.VALUE, sync=True)
        again.delete(b"after", sync=True)
        assert again.get(b"after") is None

    def test_a_full_disk_is_storage_full_and_writes_resume_once_space_is_freed(
        self, open_backend, disk
    ):
        """No reserve: the engine itself meets the full disk (ENOSPC, or LMDB's EIO)."""
        store = open_backend(disk / "db")
        needs_persistence(store)
        filler = disk / "filler"
        # Room for the engine to come back: it may replay its log into table files.
        take_space(filler, self.DISK - 28 * MiB)
        acked = self._fill(store, disk, b"k")
        assert len(acked) > 8, f"only {len(acked)} writes before the disk was full"
        with pytest.raises(StorageFullError):
            store.put(b"more", b"x" * self.VALUE, sync=True)
        for key, value in list(acked.items())[-3:]:
            assert store.get(key) == value  # reads go on while writes cannot

        filler.unlink()

        def resumed() -> bool:
            return _takes(store, b"after", b"space")

        wait_until(resumed, timeout=5, message="writes did not resume after space was freed")
        acked[b"after"] = b"space"
        acked.update(self._fill_some(store, b"again", 8))
        store.delete(b"k00000", sync=True)
        del acked[b"k00000"]
        self._check(store, acked)
        store.close()
        self._check(open_backend(disk / "db"), acked)
        assert free_bytes(disk) > 0

    def _fill_some(self, store, prefix: bytes, count: int) -> dict[bytes, bytes]:
        written = {prefix + b"%d" % i: b"v%d" % i for i in range(count)}
        for key, value in written.items():
            store.put(key, value, sync=True)
        return written


# --- the model-based test ---------------------------------------------------------------

KEY = st.one_of(
    st.sampled_from([b"a", b"b", b"ab", b"\x00", b"\xff", b"\xff\xff", b"k" * MAX_KEY_SIZE]),
    st.binary(min_size=1, max_size=3),
)
VALUE = st.binary(max_size=40)
NS = st.sampled_from(list(Namespace))
OP = st.one_of(st.builds(Put, NS, KEY, VALUE), st.builds(Delete, NS, KEY))


class StorageModel(RuleBasedStateMachine):
    """Random operations against the backend and a dict, compared after every step."""

    opener: Any = None  # set per test
    path: Path

    def __init__(self):
        super().__init__()
        self.model: dict[Namespace, dict[bytes, bytes]] = {ns: {} for ns in Namespace}
        self.store: Any = None

    @initialize()
    def open(self):
        if self.path.exists():
            shutil.rmtree(self.path)
        self.store = type(self).opener(self.path)

    def _apply_model(self, ops):
        for op in ops:
            if type(op) is Put:
                self.model[op.ns][op.key] = op.value
            else:
                self.model[op.ns].pop(op.key, None)

    @rule(op=OP, sync=st.booleans())
    def single(self, op, sync):
        self.store.apply([op], sync=sync)
        self._apply_model([op])

    @rule(ops=st.lists(OP, max_size=12))
    def batch(self, ops):
        self.store.apply(ops, sync=False)
        self._apply_model(ops)

    @rule(ns=NS, key=KEY)
    def get(self, ns, key):
        assert self.store.get(key, ns) == self.model[ns].get(key)

    @rule(ns=NS, keys=st.lists(KEY, max_size=6))
    def get_many(self, ns, keys):
        assert self.store.get_many(keys, ns) == [self.model[ns].get(k) for k in keys]

    @rule(ns=NS, start=st.none() | KEY, stop=st.none() | KEY, limit=st.none() | st.integers(0, 5))
    def scan(self, ns, start, stop, limit):
        expected = sorted(
            (k, v)
            for k, v in self.model[ns].items()
            if (start is None or k >= start) and (stop is None or k < stop)
        )[:limit]
        with self.store.scan(ns, start, stop, limit=limit) as pairs:
            assert list(pairs) == expected

    @precondition(lambda self: self.store.capabilities.persistent)
    @rule()
    def reopen(self):
        self.store.close()
        self.store = type(self).opener(self.path)

    @invariant()
    def data_matches(self):
        if self.store is None:
            return
        with self.store.scan(DATA) as pairs:
            assert dict(pairs) == self.model[DATA]

    def teardown(self):
        if self.store is not None:
            self.store.close()


class TestModel:
    def test_backend_behaves_like_a_dict(self, open_backend, tmp_path):
        machine = type(
            "BackendModel",
            (StorageModel,),
            {
                "opener": staticmethod(open_backend),
                "path": tmp_path / "model",
            },
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=int(os.environ.get("DISTRIBKV_MODEL_EXAMPLES", "40")),
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
            ),
        )
