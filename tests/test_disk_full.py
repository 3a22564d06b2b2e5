"""A node on a full disk, over real HTTP: its data directory on a small tmpfs of the test's own
(root only; skipped elsewhere). The engines' own behaviour is the storage suite's
(distribkv.testing.suite.TestDiskFull); this is what a client of the node sees."""

from __future__ import annotations

import random

import pytest

from distribkv.config import load_config
from distribkv.testing.cluster import NodeProcess, call, q, wait_until, write_config
from distribkv.testing.disk import MiB, free_bytes, small_disk, take_space

DISK = 64 * MiB
RESERVE = 24 * MiB
GIVE_BACK = 24 * MiB
VALUE = 64 * 1024
# The reserve must hold what the engine flushes from memory once writes stop: RocksDB's
# default memtables (16 MiB, two per column family, and a node writes data and log) need more
# than this small disk has.
SETTINGS = {"rocksdb": f"[storage.rocksdb]\nwrite_buffer_size = {4 * MiB}"}


def _sizes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _set(address: str, key: bytes, value: bytes) -> int:
    return call(address, "PUT", f"/set?key={q(key)}", value, timeout=10).status


def test_a_node_on_a_full_disk_answers_507_deletes_and_resumes_without_restart(
    tmp_path, hosts, backend_name
):
    if backend_name == "memory":
        pytest.skip("the memory backend takes no disk and keeps nothing across a restart")
    with small_disk(tmp_path / "disk", DISK) as disk:
        config = write_config(
            tmp_path,
            hosts=hosts,
            shards=1,
            backend=backend_name,
            durability="sync",
            data_dir=str(disk / "data"),
            extra=f"min_free_bytes = {RESERVE}\n{SETTINGS.get(backend_name, '')}",
        )
        filler = disk / "filler"
        # Room to give back later: more than the engine may flush from memory into the reserve
        # after writes stop (RocksDB here: up to two 4 MiB memtables for each of data and log,
        # written while the log they replace still takes its space).
        take_space(filler, DISK - GIVE_BACK)
        node = NodeProcess(config, "shard-0")
        address = str(load_config(config).shards[0].address)
        node.start(address)
        try:
            rng = random.Random(13)
            acked: dict[bytes, bytes] = {}
            statuses: list[int] = []
            for i in range(2 * DISK // VALUE):
                key, value = b"k%05d" % i, rng.randbytes(VALUE)
                status = _set(address, key, value)
                if status not in (200, 204):
                    statuses.append(status)
                    break
                acked[key] = value
            assert statuses == [507], f"a full disk answered {statuses}, not 507"
            assert len(acked) > 8
            assert _set(address, b"more", b"v" * VALUE) == 507

            # Deletes go on, and free space once space is freed.
            doomed = next(iter(acked))
            assert call(address, "DELETE", f"/delete?key={q(doomed)}").status in (200, 204)
            assert call(address, "GET", f"/get?key={q(doomed)}").status == 404
            del acked[doomed]

            filler.unlink()
            try:
                wait_until(
                    lambda: _set(address, b"after", b"space") in (200, 204),
                    timeout=10,
                    message="SETs did not succeed again after space was freed",
                )
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}: {free_bytes(disk)} bytes free, reserve {RESERVE};"
                    f" files: {_sizes(disk / 'data')}; node log ends:\n{node.log_tail()}"
                ) from None
            acked[b"after"] = b"space"

            # A restart loses no acknowledged write.
            assert node.stop() == 0
            node.start(address)
            lost = []
            for key, value in acked.items():
                got = call(address, "GET", f"/get?key={q(key)}", timeout=10)
                if got.status != 200 or got.body != value:
                    lost.append(key)
            assert lost == [], f"{len(lost)} of {len(acked)} acknowledged writes lost"
        finally:
            node.stop()
