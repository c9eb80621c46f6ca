"""Fixtures shared by every test: a real PostgreSQL, never a mock.

With DATABASE_URL unset, an embedded PostgreSQL starts in a temporary folder for the session;
with it set, that server is used. Either way the session works in a database of its own, created
empty, migrated once, and dropped at the end; every test starts from empty tables.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pg8000.native
import pytest

from handler.local import embedded
from handler.queue import connection, migrations
from handler.queue.store import QueueStore

# The tests' own SQL names the queue's tables and functions as the README's examples do, with
# the queue's schema on the search path (callers may; the project's own code names it).
TEST_SEARCH_PATH = "SET search_path = queue_worker, public"

# Tables emptied before each test (a later migration adds its own here).
_TABLES = (
    "queue_jobs",
    "queue_jobs_dead_letter",
    "queue_job_dependencies",
    "queue_idempotency",
    "queue_schedules",
    "queue_tenants",
    "queue_tenant_limits",
    "queue_functions",
    "queue_routes",
)


@pytest.fixture(scope="session", autouse=True)
def _no_users_data_folder() -> Iterator[None]:
    """The embedded database's default folders point into a temporary folder for the whole
    session: a test that reaches the default by mistake never touches the user's own."""
    folder = Path(tempfile.mkdtemp(prefix="queue-worker-test-user-"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_DATA_HOME", str(folder / "data"))
        patch.setenv("QUEUE_WORKER_DATA_DIR", str(folder / "data" / "queue-worker" / "pgdata"))
        yield
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The server's URL (its maintenance database)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    # Not under pytest's own temporary root: pytest resets that folder's permissions when a
    # session starts, which would lock the server's system user out of a concurrent session's data.
    return embedded.start(
        Path(tempfile.mkdtemp(prefix="queue-worker-test-")) / "pgdata", temporary=True
    )


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A fresh database for this test session, with every migration applied."""
    admin_settings = connection.parse_database_url(server_url)
    name = f"queue_worker_test_{uuid.uuid4().hex[:12]}"
    admin = connection.connect(admin_settings)
    admin.run(f'CREATE DATABASE "{name}"')
    settings = admin_settings.replace(database=name)
    conn = connection.connect(settings)
    migrations.migrate(conn)
    conn.close()
    yield _url_with_database(server_url, name)
    admin.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = :name AND pid <> pg_backend_pid()",
        name=name,
    )
    admin.run(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


def _url_with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
def connect(database_url: str) -> Iterator[object]:
    """Opens extra connections to the test database; closes them after the test."""
    opened: list[pg8000.native.Connection] = []

    def _connect() -> pg8000.native.Connection:
        conn = connection.connect(connection.parse_database_url(database_url))
        conn.run(TEST_SEARCH_PATH)
        opened.append(conn)
        return conn

    yield _connect
    for conn in opened:
        with contextlib.suppress(Exception):  # a test may have killed it on purpose
            conn.close()


@pytest.fixture
def conn(database_url: str) -> Iterator[pg8000.native.Connection]:
    """A connection to an empty queue."""
    session = connection.connect(connection.parse_database_url(database_url))
    session.run(TEST_SEARCH_PATH)
    session.run("TRUNCATE " + ", ".join(_TABLES))
    yield session
    session.close()


@pytest.fixture
def store(conn: pg8000.native.Connection) -> QueueStore:
    return QueueStore(conn)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto in server mode (a real local HTTP endpoint) for the AWS services with no local server."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def use_fake_aws(monkeypatch: pytest.MonkeyPatch, config_dir: Path, region: str) -> None:
    """Dummy credentials and no profile, so that no boto3 client can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_dir / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(config_dir / "no-credentials"))
