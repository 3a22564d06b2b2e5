"""The shared storage conformance suite, run against the rocksdb backend.

Run with: pytest -p distribkv.testing --distribkv-backend=rocksdb backends/rocksdb/tests
"""

from distribkv.testing.suite import *  # noqa: F403
