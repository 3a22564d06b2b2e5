"""The conformance suite is only worth something if it fails on broken backends: run it against
each deliberately broken backend of broken_backends.py and check that it catches the fault,
and against the healthy backend with the same selection as the control."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distribkv.testing import resolve_backend

TESTS_DIR = Path(__file__).parent

# fault -> (the broken backend, the suite's tests that must catch it)
FAULTS = {
    "stale get": ("STALE_GET", "test_put_get_overwrite_delete"),
    "non-atomic apply": ("NON_ATOMIC_APPLY", "test_readers_never_see_half_an_apply"),
    "deletes dropped in batches": ("DROPS_DELETES", "test_ops_of_one_apply_take_effect_in_order"),
    "unordered scan": ("UNORDERED_SCAN", "test_scan_returns_all_pairs_in_byte_order"),
    "scan of live data": ("LIVE_SCAN", "test_scan_sees_the_snapshot_of_its_start"),
    "scan ignores limit": ("IGNORES_LIMIT", "test_scan_bounds_and_limit"),
    "native exception escapes": (
        "NATIVE_ERROR_AFTER_CLOSE",
        "test_every_use_after_close_raises_backend_closed",
    ),
    "close is not idempotent": ("CLOSE_TWICE_FAILS", "test_close_is_idempotent"),
}
TIMED_FAULT = "GIL held through a sync"
FULL_DISK_FAULT = "writes stay refused after a full disk"
PERSISTENT_FAULTS = {
    "batch torn by a crash": ("SPLIT_APPLY", "test_apply_is_all_or_nothing_across_kill_9"),
    "sync flag ignored": ("IGNORES_SYNC", "test_sync_flag_is_honoured and async-True"),
    FULL_DISK_FAULT: (
        "STAYS_FULL",
        "test_a_full_disk_is_storage_full_and_writes_resume_once_space_is_freed",
    ),
    TIMED_FAULT: (
        "HOLDS_GIL_WHILE_SYNCING",
        "test_other_threads_run_while_a_synced_apply_waits_for_the_disk",
    ),
}


@pytest.fixture
def run_suite(pytester, backend_name):
    pytester.makepyfile(test_suite="from distribkv.testing.suite import *  # noqa: F403\n")
    pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])

    def run(backend: str, selection: str):
        os.environ["PYTHONPATH"] = pythonpath
        os.environ["DISTRIBKV_TEST_BACKEND"] = backend_name
        try:
            return pytester.runpytest_subprocess(
                "-p",
                "distribkv.testing",
                f"--distribkv-backend={backend}",
                "-k",
                selection,
                "-p",
                "no:cacheprovider",
                "-q",
                timeout=300,
            )
        finally:
            os.environ.pop("DISTRIBKV_TEST_BACKEND", None)

    old = os.environ.get("PYTHONPATH")
    yield run
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_suite_catches_a_memory_backend_fault(run_suite, backend_name, fault):
    if backend_name != "lmdb":
        # These broken backends wrap the memory backend, whichever backend the run is for.
        pytest.skip("the memory backend's faults do not depend on the run's backend: lmdb only")
    attribute, selection = FAULTS[fault]
    broken = run_suite(f"broken_backends:{attribute}", selection)
    assert broken.parseoutcomes().get("failed", 0) >= 1, broken.stdout.str()[-3000:]
    healthy = run_suite("memory", selection)
    outcomes = healthy.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and "failed" not in outcomes, healthy.stdout.str()


@pytest.mark.parametrize(
    "fault",
    [
        # The suite's test of this one is a timing measurement that runs apart (serial).
        pytest.param(fault, marks=pytest.mark.serial)
        if fault == "GIL held through a sync"
        else fault
        for fault in sorted(PERSISTENT_FAULTS)
    ],
)
def test_the_suite_catches_a_persistent_backend_fault(run_suite, backend_name, fault):
    if not resolve_backend(backend_name).capabilities.persistent:
        pytest.skip(f"backend {backend_name!r} is not persistent")
    if fault == "sync flag ignored" and not _has_strace():
        pytest.skip("strace is not installed")
    if fault == FULL_DISK_FAULT and os.geteuid() != 0:
        pytest.skip("the suite's full-disk tests mount a tmpfs, which needs root")
    attribute, selection = PERSISTENT_FAULTS[fault]
    broken = run_suite(f"broken_backends:{attribute}", selection)
    assert broken.parseoutcomes().get("failed", 0) >= 1, broken.stdout.str()[-3000:]
    healthy = run_suite(backend_name, selection)
    outcomes = healthy.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and "failed" not in outcomes, healthy.stdout.str()


def _has_strace() -> bool:
    import shutil

    return shutil.which("strace") is not None
