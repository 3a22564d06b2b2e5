"""The shared storage conformance suite, run against the template backend.

Run with: pytest -p distribkv.testing --distribkv-backend=template backends/_template/tests
"""

from distribkv.testing.suite import *  # noqa: F403
