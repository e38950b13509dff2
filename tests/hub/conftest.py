"""Fixtures of the Hub tests."""

from tests.hub_server import loopback_hub  # noqa: F401 (the loopback Hub server fixture)
