"""Connections to PostgreSQL: libpq-style URLs (and RDS secrets) turned into pg8000 connections.

The password never leaves this module in a message: `ConnectionSettings.__repr__` and
`describe()` leave it out, and connection errors are re-raised without the URL.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pg8000.converters
import pg8000.native

from handler.errors import ConfigurationError, DatabaseUnavailableError

__all__ = ["ConnectionSettings", "DatabaseUnavailableError", "connect", "parse_database_url"]

_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class ConnectionSettings:
    """Where and how to connect. Built from a URL or an RDS secret, never logged whole."""

    host: str | None = None  # a host name, or None with unix_socket set
    port: int = 5432
    database: str = "postgres"
    user: str = "postgres"
    password: str | None = field(default=None, repr=False)
    unix_socket: str | None = None  # the socket file's full path
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    connect_timeout: float = 10.0
    application_name: str = "queue-worker"

    def describe(self) -> str:
        """Where this connects, without credentials: safe for logs and errors."""
        where = self.unix_socket or f"{self.host}:{self.port}"
        return f"{self.user}@{where}/{self.database}"


def parse_database_url(url: str, *, variable: str = "DATABASE_URL") -> ConnectionSettings:
    """Parses the libpq URL forms: postgresql://user:pass@host:port/db?sslmode=…&host=/socket/dir."""
    try:
        parts = urlsplit(url.strip())
        port_in_netloc = parts.port
    except ValueError:
        # Not the parser's message: it may quote a piece of the password (an unescaped '/').
        raise ConfigurationError(
            variable, "is not a valid URL (is a special character in the password not %-escaped?)"
        ) from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigurationError(
            variable, "must start with postgresql:// (e.g. postgresql://user:password@host:5432/db)"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    host = unquote(parts.hostname) if parts.hostname else None
    host = query.pop("host", None) or host
    port = port_in_netloc or 5432
    if "port" in query:
        port = _int_param(query.pop("port"), "port", variable)
    database = unquote(parts.path.lstrip("/")) or query.pop("dbname", "") or "postgres"
    user = unquote(parts.username) if parts.username else query.pop("user", "postgres")
    password = (
        unquote(parts.password) if parts.password is not None else query.pop("password", None)
    )
    sslmode = query.pop("sslmode", "prefer")
    if sslmode not in _SSL_MODES:
        raise ConfigurationError(
            variable, f"has sslmode={sslmode!r}; use one of {', '.join(_SSL_MODES)}"
        )
    timeout = _int_param(query.pop("connect_timeout", "10"), "connect_timeout", variable)
    unix_socket = None
    if host is None or host.startswith("/"):
        socket_dir = host or "/var/run/postgresql"
        unix_socket = f"{socket_dir.rstrip('/')}/.s.PGSQL.{port}"
        host = None
    return ConnectionSettings(
        host=host,
        port=port,
        database=database,
        user=user,
        password=password or None,
        unix_socket=unix_socket,
        sslmode="disable" if unix_socket else sslmode,
        sslrootcert=query.pop("sslrootcert", None),
        connect_timeout=float(timeout),
        application_name=query.pop("application_name", "queue-worker"),
    )


def settings_from_rds_secret(secret: Mapping[str, Any], *, variable: str) -> ConnectionSettings:
    """The JSON shape RDS and Secrets Manager rotation use: username, password, host, port, dbname."""
    missing = [key for key in ("username", "password", "host") if not secret.get(key)]
    if missing:
        raise ConfigurationError(
            variable, f"secret lacks {', '.join(missing)} (RDS secret JSON shape)"
        )
    try:
        port = int(secret.get("port") or 5432)
    except (TypeError, ValueError):
        raise ConfigurationError(variable, "secret has a port that is not a number") from None
    return ConnectionSettings(
        host=str(secret["host"]),
        port=port,
        database=str(secret.get("dbname") or "postgres"),
        user=str(secret["username"]),
        password=str(secret["password"]),
        # RDS always offers TLS; verify it when the bundle is present in the runtime.
        sslmode=str(secret.get("sslmode") or "require"),
    )


def connect(settings: ConnectionSettings) -> pg8000.native.Connection:
    """Opens one connection. `prefer`/`allow` try TLS and fall back to plain, as libpq does."""
    # pg8000 reads ssl_context=False as "no TLS"; None would make it try TLS with a new context.
    attempts: list[ssl.SSLContext | bool]
    if settings.sslmode == "disable":
        attempts = [False]
    elif settings.sslmode in ("allow", "prefer"):
        attempts = [_ssl_context("require", settings.sslrootcert), False]
    else:
        attempts = [_ssl_context(settings.sslmode, settings.sslrootcert)]
    last: Exception | None = None
    for context in attempts:
        sock = None
        try:
            if settings.unix_socket is None:
                sock = _tcp_socket(settings)
            conn = pg8000.native.Connection(
                user=settings.user,
                password=settings.password,
                host=settings.host or "localhost",
                port=settings.port,
                database=settings.database,
                unix_sock=settings.unix_socket,
                sock=sock,
                ssl_context=context,
                timeout=settings.connect_timeout,
                application_name=settings.application_name,
                tcp_keepalive=True,
            )
        except BaseException as exc:
            if sock is not None:
                _close_for_good(sock)
            if isinstance(exc, pg8000.native.DatabaseError) or not isinstance(exc, Exception):
                raise  # the server answered (bad password, no such database): say so as it is
            # Unreachable, refused, TLS refused, or not PostgreSQL at all (pg8000 then fails
            # in ways of its own, a UnicodeDecodeError among them): try the next way, if any.
            last = exc
            continue
        conn.register_in_adapter(_TIMESTAMPTZ_OID, _timestamptz_in)
        return conn
    raise DatabaseUnavailableError(
        f"cannot connect to PostgreSQL at {settings.describe()}: {_without_secret(last, settings)}"
    ) from None


def _tcp_socket(settings: ConnectionSettings) -> socket.socket:
    """A connected socket with Nagle's algorithm off. pg8000 writes a statement whose
    parameters pass its 8 KiB buffer (the settle of a batch) in more than one segment; with
    Nagle on, the last one waits for the server's delayed ACK, ~40 ms per statement."""
    sock = socket.create_connection(
        (settings.host or "localhost", settings.port), timeout=settings.connect_timeout
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def _close_for_good(sock: socket.socket) -> None:
    """Closes the descriptor now: a file object pg8000 made over the socket would otherwise
    keep it open until garbage-collected. pg8000 may have closed it already (TLS refused)."""
    fd = sock.detach()
    if fd >= 0:
        os.close(fd)


_TIMESTAMPTZ_OID = 1184


def _timestamptz_in(data: str) -> datetime | str:
    """timestamptz text to datetime: fromisoformat is ~10x faster than pg8000's strptime, which
    shows in a claim of thousands of jobs. Anything it cannot read (infinity, years past 9999)
    goes to pg8000's own parser."""
    try:
        return datetime.fromisoformat(data)
    except ValueError:
        result: datetime | str = pg8000.converters.timestamptz_in(data)
        return result


@functools.cache
def _ssl_context(sslmode: str, cafile: str | None) -> ssl.SSLContext:
    """One context per mode and CA file: loading the system's CAs costs ~0.2 s each time."""
    context = ssl.create_default_context(cafile=cafile)
    if sslmode == "require":  # libpq's meaning: encrypt, do not verify
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif sslmode == "verify-ca":
        context.check_hostname = False
    return context


def _without_secret(exc: Exception | None, settings: ConnectionSettings) -> str:
    text = str(exc) if exc else "unknown error"
    if settings.password:
        text = text.replace(settings.password, "***")
    return text


def _int_param(value: str, name: str, variable: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(
            variable, f"has {name}={value!r}, which is not a whole number"
        ) from None
