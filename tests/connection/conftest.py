"""Real PostgreSQL servers of these tests' own (see clusters.py), started once per session:

- `tls_server` speaks TLS only (`hostssl` in pg_hba.conf), with a certificate for "localhost"
  from a CA nobody trusts (`certificate.ca_file` is that CA); except to its database
  EITHER_WAY, which it also lets in without TLS;
- `plain_server` has no TLS at all (it answers "N" to a request for it);
- `standby_server` (one per test) is a standby that accepts no connection (57P03) until promoted.

On each, `worker` logs in without a password and `secret_user` with SECRET_PASSWORD
(scram-sha-256). Connections go to 127.0.0.1, or to "localhost" to match the certificate.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from handler.queue import connection

from .clusters import (
    EITHER_WAY,
    SECRET_PASSWORD,
    SECRET_USER,
    WORKER,
    Cluster,
    ServerCertificate,
    find_bindir,
    make_root,
)


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    folder = find_bindir()
    if folder is None:
        pytest.skip(
            "no PostgreSQL binaries (initdb, pg_ctl) found: install PostgreSQL (pg_config on "
            "PATH), or the local extra (pip install -e '.[local]'), or set "
            "QUEUE_WORKER_TEST_PG_BINDIR"
        )
    return folder


@pytest.fixture(scope="session")
def pg_tls_bindir() -> Path:
    folder = find_bindir(tls=True)
    if folder is None:
        pytest.skip(
            "no PostgreSQL binaries built with OpenSSL found (the embedded server has no TLS): "
            "install PostgreSQL (pg_config on PATH) or set QUEUE_WORKER_TEST_PG_BINDIR"
        )
    return folder


@pytest.fixture(scope="session")
def clusters_root() -> Iterator[Path]:
    root = make_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def certificate(clusters_root: Path) -> ServerCertificate:
    """The server's certificate, for "localhost" only, signed by a CA of its own."""
    folder = clusters_root / "certificates"
    folder.mkdir()
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.crt"))
    issued.private_key_pem.write_to_path(str(folder / "server.key"))
    with (folder / "server.crt").open("wb") as file:
        for pem in issued.cert_chain_pems:
            file.write(pem.bytes())
    return ServerCertificate(folder / "server.crt", folder / "server.key", folder / "ca.crt")


@pytest.fixture(scope="session")
def other_ca_file(clusters_root: Path) -> str:
    """A CA that signed nothing the servers show."""
    path = clusters_root / "certificates" / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def _hba(kind: str) -> list[str]:
    return [
        f"{kind} all {SECRET_USER} 127.0.0.1/32 scram-sha-256",
        f"host {EITHER_WAY} all 127.0.0.1/32 trust",
        f"{kind} all all 127.0.0.1/32 trust",
    ]


def _started(cluster: Cluster) -> Cluster:
    cluster.start()
    admin = cluster.admin()
    try:
        admin.run(f"CREATE ROLE {WORKER} LOGIN")
        admin.run(f"CREATE ROLE {SECRET_USER} LOGIN PASSWORD '{SECRET_PASSWORD}'")
        admin.run(f"CREATE DATABASE {EITHER_WAY}")
    finally:
        admin.close()
    return cluster


@pytest.fixture(scope="session")
def tls_server(
    pg_tls_bindir: Path, clusters_root: Path, certificate: ServerCertificate
) -> Iterator[Cluster]:
    cluster = Cluster(
        pg_tls_bindir, clusters_root, "tls", certificate=certificate, hba=_hba("hostssl")
    )
    try:
        yield _started(cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def plain_server(pg_bindir: Path, clusters_root: Path) -> Iterator[Cluster]:
    cluster = Cluster(pg_bindir, clusters_root, "plain", certificate=None, hba=_hba("host"))
    try:
        yield _started(cluster)
    finally:
        cluster.stop()


@pytest.fixture
def standby_server(pg_bindir: Path, clusters_root: Path) -> Iterator[Cluster]:
    """A standby with no primary and hot_standby off: every connection gets 57P03 ("the
    database system is not accepting connections") until `promote()`."""
    name = f"standby-{len(list(clusters_root.glob('standby-*')))}"
    cluster = Cluster(
        pg_bindir,
        clusters_root,
        name,
        certificate=None,
        hba=_hba("host"),
        settings={"hot_standby": "off"},
        standby=True,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A home folder of the test's own (libpq's default root file, ~/.postgresql/root.crt,
    counts when it exists), and no TLS context cached across tests (a test may change what the
    system's CAs are)."""
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    connection._verifying_context.cache_clear()
    yield folder
    connection._verifying_context.cache_clear()
