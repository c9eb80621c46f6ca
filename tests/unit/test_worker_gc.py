"""A worker keeps what its container has loaded out of the garbage collector's way."""

from __future__ import annotations

import gc

from handler.runtime.settings import parse_settings
from handler.runtime.worker import Worker

ENV = {
    "DATABASE_URL": "postgresql://worker@127.0.0.1:1/queue",  # never connected to here
    "SUPABASE_URL": "https://project.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": "key",
    "IDEMPOTENCY_STORE": "off",
}


def test_making_a_worker_freezes_what_the_process_has_loaded() -> None:
    # Given a process with its modules loaded
    # When its worker is made
    worker = Worker(parse_settings(ENV))
    try:
        # Then those objects sit in the collector's permanent generation, which no collection
        # (a full one included) traverses
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        # and a second worker in the same process freezes nothing more
        Worker(parse_settings(ENV)).close()
        assert gc.get_freeze_count() == frozen
    finally:
        worker.close()
