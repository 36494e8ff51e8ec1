"""Fixtures of the alert tests: the collector tests' running collectors."""

from tests.collector.conftest import collectors  # noqa: F401 - shared fixture, not redefined here
