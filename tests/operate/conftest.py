"""Fixtures for the operator-facing specifications: the end-to-end ones, re-exported."""

from tests.e2e.conftest import *  # noqa: F403
