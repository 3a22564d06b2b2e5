"""The shared storage conformance suite, run against the lmdb backend.

Run with: pytest -p distribkv.testing --distribkv-backend=lmdb backends/lmdb/tests
"""

from distribkv.testing.suite import *  # noqa: F403
