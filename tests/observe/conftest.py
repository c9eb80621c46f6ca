"""Observability, secrets and command-line specifications share the end-to-end fixtures."""

from tests.e2e.conftest import *  # noqa: F403
