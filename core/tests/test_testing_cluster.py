"""The cluster helpers' address allocator: every test gets loopback hosts no other test holds."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from distribkv.testing.cluster import (
    HOSTS_PER_RANGE,
    HostRange,
    allocate_hosts,
    free_port,
    worker_index,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ranges are claimed on Linux")


def test_the_worker_number_comes_from_pytest_xdist():
    assert worker_index({"PYTEST_XDIST_WORKER": "gw3"}) == 3
    assert worker_index({"PYTEST_XDIST_WORKER": "gw12"}) == 12
    assert worker_index({}) == 0


def test_ranges_held_at_once_are_distinct_and_a_released_one_is_free_again():
    first, second = allocate_hosts(), allocate_hosts()
    try:
        assert first.prefix != second.prefix
        # Nobody else, in this process or another, can claim a range that is held.
        claim = subprocess.run(
            [
                sys.executable,
                "-c",
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n"
                f"    s.bind('\\0distribkv-test-hosts-{first.number}')\n"
                "except OSError:\n"
                "    sys.exit(3)\n",
            ],
            timeout=60,
        )
        assert claim.returncode == 3
    finally:
        first.release()
        second.release()
    again = HostRange(first.number, None)
    assert again.prefix == first.prefix


def test_each_worker_takes_its_ranges_from_a_share_of_its_own():
    def prefix(worker: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from distribkv.testing.cluster import allocate_hosts\n"
                "with allocate_hosts() as hosts:\n"
                "    print(hosts.prefix)",
            ],
            env={**os.environ, "PYTEST_XDIST_WORKER": worker},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()

    shares = {prefix(worker).split(".")[1] for worker in ("gw0", "gw1", "gw2")}
    assert len(shares) == 3  # 127.<share>.x.y: a share of 4 second octets per worker


def test_hosts_of_a_range_are_loopback_distinct_and_counted(hosts):
    taken = [hosts.host() for _ in range(10)]
    assert len(set(taken)) == 10
    assert all(ipaddress.ip_address(host).is_loopback for host in taken)
    assert all(host.startswith(hosts.prefix) for host in taken)
    host, _, port = hosts.address().rpartition(":")
    assert host.startswith(hosts.prefix) and 0 < int(port) < 65536
    assert free_port(host) > 0
    with HostRange(hosts.number, None) as plenty:
        for _ in range(HOSTS_PER_RANGE):
            plenty.host()
        with pytest.raises(RuntimeError, match="are used"):
            plenty.host()
