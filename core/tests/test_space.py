"""The free-space reserve: a check on every write's path that asks the file system seldom."""

from __future__ import annotations

import pytest

from distribkv.storage import space
from distribkv.storage.errors import StorageFullError
from distribkv.storage.space import SpaceReserve


class Disk:
    """A file system whose free space the test sets, counting how often it is asked."""

    def __init__(self, free: int):
        self.free = free
        self.asked = 0

    def __call__(self, path) -> int:
        self.asked += 1
        return self.free


@pytest.fixture
def disk(monkeypatch):
    fake = Disk(1000)
    monkeypatch.setattr(space, "free_bytes", fake)
    return fake


def test_writes_stop_before_the_reserve_and_resume_when_space_is_back(disk, tmp_path):
    now = [0.0]
    reserve = SpaceReserve(tmp_path, 600, interval=0.1, clock=lambda: now[0])
    reserve.check(300)  # 1000 free - 300 = 700 left >= 600
    with pytest.raises(StorageFullError, match=r"min_free_bytes"):
        reserve.check(300)  # counted off the last answer: 400 would be left
    disk.free = 5000
    with pytest.raises(StorageFullError):
        reserve.check(300)  # not asked again within the interval
    now[0] = 0.2
    reserve.check(300)
    assert disk.asked == 2


def test_the_file_system_is_asked_at_most_once_per_interval(disk, tmp_path):
    now = [0.0]
    disk.free = 10**12
    reserve = SpaceReserve(tmp_path, 1, interval=0.1, clock=lambda: now[0])
    for step in range(1000):
        now[0] = step * 0.001  # 1000 writes in one second
        reserve.check(100)
    assert disk.asked == 10


def test_the_reserve_logs_once_when_writes_stop_and_once_when_they_resume(disk, tmp_path, caplog):
    now = [0.0]
    reserve = SpaceReserve(tmp_path, 600, interval=0.1, clock=lambda: now[0])
    disk.free = 700
    with caplog.at_level("INFO", logger="distribkv.storage.space"):
        for _ in range(50):  # every write refused: one line, not fifty
            with pytest.raises(StorageFullError):
                reserve.check(200)
        disk.free = 5000
        now[0] = 1.0
        for _ in range(50):
            reserve.check(1)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0][0] == "WARNING" and "below the reserve" in lines[0][1]
    assert lines[1][0] == "INFO" and "has room again" in lines[1][1]
