"""Shared fixtures live in tests/fixtures/ and are loaded here as plugins."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.pki",
    "tests.fixtures.server",
]
