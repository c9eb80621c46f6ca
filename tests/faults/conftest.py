"""Fault injection: the real worker, a real PostgreSQL and the stand-in functions, each test
ending with an exact account of every job (see accounting.py)."""

from tests.e2e.conftest import *  # noqa: F403
