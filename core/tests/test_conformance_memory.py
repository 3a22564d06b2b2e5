"""The shared storage conformance suite, run against the built-in memory backend."""

from distribkv.testing.suite import *  # noqa: F403
