"""Each sslmode against real servers, as libpq means it (docs/database-tls.md has the table):
what is tried first, when the other way is tried, what is verified with and without a root
certificate. The TLS server's certificate is for "localhost", from a CA nobody trusts."""

from __future__ import annotations

from pathlib import Path

import pg8000.native
import pytest

from handler.errors import DatabaseConfigurationError, DatabaseUnavailableError
from handler.queue import connection

from .clusters import EITHER_WAY, Cluster, ServerCertificate


def connect(url: str) -> pg8000.native.Connection:
    return connection.connect(connection.parse_database_url(url))


def encrypted(conn: pg8000.native.Connection) -> bool:
    """Whether the server sees this session as TLS, then closes it."""
    try:
        [[ssl]] = conn.run("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        conn.close()
    return bool(ssl)


def refused(url: str) -> DatabaseConfigurationError | DatabaseUnavailableError:
    with pytest.raises((DatabaseConfigurationError, DatabaseUnavailableError)) as caught:
        connect(url)
    message = str(caught.value)
    assert "\n" not in message
    assert "{" not in message  # never pg8000's dict
    return caught.value


# --- disable ---------------------------------------------------------------------------------


def test_disable_connects_without_tls(plain_server: Cluster) -> None:
    assert not encrypted(connect(plain_server.url(sslmode="disable")))


def test_disable_is_refused_by_a_server_that_insists_on_tls(tls_server: Cluster) -> None:
    error = refused(tls_server.url(sslmode="disable"))

    assert isinstance(error, DatabaseConfigurationError)
    assert (error.kind, error.sqlstate) == ("configuration", "28000")
    assert "no pg_hba.conf entry" in str(error)
    assert "sslmode=disable" in str(error)


# --- allow: plain first, TLS only when the server insists ------------------------------------


def test_allow_connects_without_tls_when_the_server_takes_that(plain_server: Cluster) -> None:
    assert not encrypted(connect(plain_server.url(sslmode="allow")))


def test_allow_does_not_use_tls_when_plain_will_do(tls_server: Cluster) -> None:
    # A server that offers TLS and admits plain too
    assert not encrypted(connect(tls_server.url(database=EITHER_WAY, sslmode="allow")))


def test_allow_tries_tls_when_the_server_insists(tls_server: Cluster) -> None:
    assert encrypted(connect(tls_server.url(sslmode="allow")))


# --- prefer (the default): TLS first, plain if refused ---------------------------------------


@pytest.mark.parametrize("params", [{"sslmode": "prefer"}, {}], ids=["prefer", "default"])
def test_prefer_uses_tls_when_the_server_offers_it(
    tls_server: Cluster, params: dict[str, str]
) -> None:
    assert encrypted(connect(tls_server.url(**params)))


def test_prefer_uses_tls_even_when_plain_would_do(tls_server: Cluster) -> None:
    assert encrypted(connect(tls_server.url(database=EITHER_WAY, sslmode="prefer")))


def test_prefer_goes_on_without_tls_when_the_server_offers_none(plain_server: Cluster) -> None:
    assert not encrypted(connect(plain_server.url(sslmode="prefer")))


def test_prefer_with_a_root_that_fails_goes_on_without_tls(
    tls_server: Cluster, other_ca_file: str
) -> None:
    # libpq verifies the chain with a root file under prefer too, and tries plain when TLS fails
    url = tls_server.url(database=EITHER_WAY, sslmode="prefer", sslrootcert=other_ca_file)

    assert not encrypted(connect(url))


def test_prefer_with_a_root_that_fails_tries_plain_and_reports_the_tls_failure(
    tls_server: Cluster, other_ca_file: str
) -> None:
    # When the server then refuses plain (no pg_hba.conf entry), the TLS failure is reported
    error = refused(tls_server.url(sslmode="prefer", sslrootcert=other_ca_file))

    assert error.kind == "configuration"
    assert f"does not verify against sslrootcert={other_ca_file}" in str(error)


# --- require: encrypt, verify nothing; the chain when a root certificate is given -------------


def test_require_encrypts_without_verifying_a_certificate_nobody_trusts(
    tls_server: Cluster,
) -> None:
    assert encrypted(connect(tls_server.url(sslmode="require")))


def test_require_is_refused_by_a_server_without_tls(plain_server: Cluster) -> None:
    error = refused(plain_server.url(sslmode="require"))

    assert error.kind == "configuration"
    assert "the server does not offer TLS, but sslmode=require requires it" in str(error)


def test_require_with_the_right_root_verifies_the_chain(
    tls_server: Cluster, certificate: ServerCertificate
) -> None:
    url = tls_server.url(sslmode="require", sslrootcert=str(certificate.ca_file))

    assert encrypted(connect(url))


def test_require_with_another_root_refuses_the_unknown_ca(
    tls_server: Cluster, other_ca_file: str
) -> None:
    error = refused(tls_server.url(sslmode="require", sslrootcert=other_ca_file))

    assert error.kind == "configuration"
    assert "the server's certificate does not verify against" in str(error)
    assert f"sslrootcert={other_ca_file}" in str(error)
    assert "sslmode=require" in str(error)


def test_require_verifies_with_libpqs_default_root_file(
    tls_server: Cluster, other_ca_file: str, home: Path
) -> None:
    # Given ~/.postgresql/root.crt holding a CA that did not sign the server's certificate
    (home / ".postgresql").mkdir()
    (home / ".postgresql" / "root.crt").write_bytes(Path(other_ca_file).read_bytes())

    error = refused(tls_server.url(sslmode="require"))

    assert "does not verify against sslrootcert=" in str(error)
    assert ".postgresql/root.crt" in str(error)


# --- verify-ca: the chain, not the host name --------------------------------------------------


def test_verify_ca_accepts_the_right_root_whatever_the_host_name(
    tls_server: Cluster, certificate: ServerCertificate
) -> None:
    # The certificate is for "localhost"; the connection goes to 127.0.0.1
    url = tls_server.url(sslmode="verify-ca", sslrootcert=str(certificate.ca_file))

    assert encrypted(connect(url))


def test_verify_ca_refuses_another_root(tls_server: Cluster, other_ca_file: str) -> None:
    error = refused(tls_server.url(sslmode="verify-ca", sslrootcert=other_ca_file))

    assert error.kind == "configuration"
    assert "does not verify against" in str(error)
    assert "sslmode=verify-ca" in str(error)


# --- verify-full: the chain and the host name -------------------------------------------------


def test_verify_full_refuses_a_certificate_for_another_name(
    tls_server: Cluster, certificate: ServerCertificate
) -> None:
    error = refused(
        tls_server.url(
            host="127.0.0.1", sslmode="verify-full", sslrootcert=str(certificate.ca_file)
        )
    )

    assert error.kind == "configuration"
    assert "the server's certificate is not for the host name '127.0.0.1'" in str(error)


def test_verify_full_accepts_the_right_name(
    tls_server: Cluster, certificate: ServerCertificate
) -> None:
    url = tls_server.url(
        host="localhost", sslmode="verify-full", sslrootcert=str(certificate.ca_file)
    )

    assert encrypted(connect(url))


def test_verify_full_refuses_another_root_for_the_right_name(
    tls_server: Cluster, other_ca_file: str
) -> None:
    error = refused(
        tls_server.url(host="localhost", sslmode="verify-full", sslrootcert=other_ca_file)
    )

    assert "does not verify against" in str(error)


# --- sslrootcert=system: the system's CAs, verify-full ---------------------------------------


def test_system_roots_are_the_systems_and_check_the_name(
    tls_server: Cluster,
    certificate: ServerCertificate,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # Given a system whose trusted CAs are the server's CA (as libpq's own tests make it)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.ca_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    # Then the right name connects, and another name is refused: verify-full is implied
    assert encrypted(connect(tls_server.url(host="localhost", sslrootcert="system")))
    error = refused(tls_server.url(host="127.0.0.1", sslrootcert="system"))
    assert "is not for the host name '127.0.0.1'" in str(error)


def test_system_roots_refuse_a_certificate_from_a_ca_the_system_does_not_trust(
    tls_server: Cluster,
) -> None:
    error = refused(tls_server.url(host="localhost", sslrootcert="system"))

    assert error.kind == "configuration"
    assert "does not verify against the system's trusted CAs (sslrootcert=system)" in str(error)
