"""Connections to PostgreSQL: libpq-style URLs (and RDS secrets) turned into pg8000 connections.

What each sslmode and sslrootcert means is libpq's (docs/database-tls.md has the table): the
order of attempts (`allow` plain first, `prefer` TLS first), what is verified (`require`
verifies the chain when a root certificate is given, as `verify-ca` does), and what is refused
before any connection is made (`verify-ca` or `verify-full` with no root certificate, a weaker
mode with `sslrootcert=system`).

connect_timeout bounds connecting only (TCP, TLS, startup and authentication); the socket then
blocks for as long as a statement takes: statements are bounded by the server's
statement_timeout, and TCP keep-alive notices a dead peer.

The password never leaves this module in a message: `ConnectionSettings.__repr__` and
`describe()` leave it out, a URL that cannot be what was meant is refused without quoting any
of it, and a failed connection is reported in one line of ours (DatabaseConfigurationError or
DatabaseUnavailableError), never pg8000's own.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote

import pg8000.converters
import pg8000.native

from handler.errors import (
    ConfigurationError,
    DatabaseConfigurationError,
    DatabaseUnavailableError,
)
from handler.frozen import Frozen

_Kind = Literal["configuration", "unreachable"]

__all__ = [
    "ConnectionSettings",
    "DatabaseConfigurationError",
    "DatabaseUnavailableError",
    "connect",
    "parse_database_url",
    "settings_from_rds_secret",
]

SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_VERIFYING: Final = ("verify-ca", "verify-full")
SYSTEM_ROOTS: Final = "system"  # sslrootcert=system: the system's trusted CAs

# Encryption tried in order, as libpq does: `allow` plain first, TLS only when the server
# refuses the plain attempt; `prefer` TLS first, plain when the server answers "no TLS" (on the
# same connection), the handshake fails or the server refuses the TLS attempt.
_METHODS: Final[Mapping[str, tuple[str, ...]]] = {
    "disable": ("plain",),
    "allow": ("plain", "tls"),
    "prefer": ("tls", "plain"),
    "require": ("tls",),
    "verify-ca": ("tls",),
    "verify-full": ("tls",),
}

CONNECT_TIMEOUT_S: Final = 10.0

# TCP keep-alive when the URL says nothing (libpq leaves it to the system, which on Linux sends
# the first probe after 2 hours idle and retransmits unacknowledged data for ~15 minutes): a
# probe after 60 s of silence, then every 10 s, the peer declared dead after 6 unanswered, so a
# statement waiting on a server that vanished fails within ~2 minutes instead of hanging.
# TCP_USER_TIMEOUT (the same 120 s) covers what keep-alive does not: data sent and never
# acknowledged. A live server answers the probes, so no statement is ever cut short by these.
KEEPALIVES_IDLE_S: Final = 60
KEEPALIVES_INTERVAL_S: Final = 10
KEEPALIVES_COUNT: Final = 6
TCP_USER_TIMEOUT_MS: Final = (KEEPALIVES_IDLE_S + KEEPALIVES_INTERVAL_S * KEEPALIVES_COUNT) * 1000

# A server that is starting up, shutting down or recovering (57P03), or a refused port (a
# restart in progress), is tried again after these pauses: at most 5 attempts and 3 s of
# pauses in all, on top of each attempt's own connect_timeout.
RETRY_DELAYS_S: Final = (0.2, 0.4, 0.8, 1.6)

# The libpq URL parameters this module honours; any other is refused, as libpq refuses what it
# does not know, rather than silently ignored.
_URL_PARAMETERS: Final = frozenset(
    {
        "host",
        "port",
        "dbname",
        "user",
        "password",
        "sslmode",
        "sslrootcert",
        "connect_timeout",
        "application_name",
        "options",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    }
)

_MISPLACED = (
    "cannot be what was meant: {where} (is a '/', '?', '#' or '@' in the user name or password "
    "not percent-encoded? write them %2F, %3F, %23, %40)"
)


class ConnectionSettings(Frozen):
    """Where and how to connect. Built from a URL or an RDS secret, never logged whole: `repr`
    leaves the password out."""

    __slots__ = (
        "application_name",
        "connect_timeout",
        "database",
        "host",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "password",
        "port",
        "source",
        "sslmode",
        "sslrootcert",
        "tcp_user_timeout",
        "unix_socket",
        "user",
    )
    _hidden = frozenset({"password"})

    host: str | None  # a host name, or None with unix_socket set
    port: int
    database: str
    user: str
    password: str | None
    unix_socket: str | None  # the socket file's full path
    sslmode: str
    # The CA file the server's certificate is verified against, SYSTEM_ROOTS, or None (no
    # verification, which only the modes below verify-ca accept).
    sslrootcert: str | None
    connect_timeout: float | None  # None: no limit (libpq's 0)
    application_name: str
    options: str | None  # libpq's `options`: command-line options for the server
    keepalives: bool
    keepalives_idle: int  # seconds; 0: the system's default
    keepalives_interval: int  # seconds; 0: the system's default
    keepalives_count: int  # 0: the system's default
    tcp_user_timeout: int  # milliseconds; 0: the system's default
    source: str  # the variable these settings came from, named in errors (not in equality)

    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 5432,
        database: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        unix_socket: str | None = None,
        sslmode: str = "prefer",
        sslrootcert: str | None = None,
        connect_timeout: float | None = CONNECT_TIMEOUT_S,
        application_name: str = "queue-worker",
        options: str | None = None,
        keepalives: bool = True,
        keepalives_idle: int = KEEPALIVES_IDLE_S,
        keepalives_interval: int = KEEPALIVES_INTERVAL_S,
        keepalives_count: int = KEEPALIVES_COUNT,
        tcp_user_timeout: int = TCP_USER_TIMEOUT_MS,
        source: str = "DATABASE_URL",
    ) -> None:
        self._fill(locals())

    def _compared(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__ if name != "source")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConnectionSettings):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())

    def describe(self) -> str:
        """Where this connects, without credentials: safe for logs and errors."""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        where = self.unix_socket or f"{host}:{self.port}"
        return f"{self.user}@{where}/{self.database}"


# -- Parsing -------------------------------------------------------------------------------------


def parse_database_url(
    url: str, *, variable: str = "DATABASE_URL", sslrootcert: str | None = None
) -> ConnectionSettings:
    """Parses the libpq URL forms: postgresql://user:password@host:port/dbname?param=value&...,
    the host a name, an address ([::1] for IPv6) or a unix socket folder (?host=/run/postgresql,
    or %2F-encoded in the host part). As in libpq, a query parameter overrides the same setting
    in the rest of the URL. `sslrootcert` (from DATABASE_SSLROOTCERT) applies when the URL has
    none. Raises ConfigurationError naming `variable`, never quoting the password."""
    scheme, separator, rest = url.strip().partition("://")
    if not separator or scheme.lower() not in ("postgres", "postgresql"):
        raise ConfigurationError(
            variable, "must start with postgresql:// (e.g. postgresql://user:password@host:5432/db)"
        )
    # The authority ends at the first '/', '?' or '#' (as in libpq). An '@' after it means
    # that one of those characters sits unescaped in the password: everything after it would
    # be read as the database name or parameters, so nothing of it may be quoted.
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "@" in tail:
        raise ConfigurationError(variable, _MISPLACED.format(where="an '@' follows the host part"))
    if authority.count("@") > 1:
        raise ConfigurationError(
            variable, _MISPLACED.format(where="more than one '@' precedes the host")
        )
    userinfo, at, hostport = authority.rpartition("@")
    user: str | None = None
    password: str | None = None
    if at:
        name, colon, secret = userinfo.partition(":")
        user = unquote(name) or None
        password = unquote(secret) if colon else None

    host, port = _host_and_port(hostport, variable)
    path, _, query = tail.partition("?")
    if "#" in tail:
        raise ConfigurationError(variable, _MISPLACED.format(where="it has a '#' fragment"))
    if "/" in path[1:]:
        raise ConfigurationError(variable, _MISPLACED.format(where="the database name holds a '/'"))
    database = unquote(path[1:]) or None
    params = _query_parameters(query, variable)

    if "host" in params:
        host = _check_host(params["host"], variable)
    if "port" in params:
        port = _port(params["port"], variable)
    database = params.get("dbname") or database or "postgres"
    user = params.get("user") or user or "postgres"
    password = params.get("password", password)
    sslmode = params.get("sslmode")
    if sslmode is not None and sslmode not in SSL_MODES:
        raise ConfigurationError(
            variable, f"has sslmode={sslmode!r}; use one of {', '.join(SSL_MODES)}"
        )
    unix_socket = None
    if host is None or host.startswith("/"):
        socket_dir = host or "/var/run/postgresql"
        unix_socket = f"{socket_dir.rstrip('/')}/.s.PGSQL.{port}"
        host = None
    url_root = params.get("sslrootcert")
    sslmode, root = _tls_choice(
        sslmode,
        url_root if url_root is not None else sslrootcert,
        variable=variable,
        root_variable=variable if url_root is not None else "DATABASE_SSLROOTCERT",
        local=unix_socket is not None,
    )
    return ConnectionSettings(
        host=host,
        port=port,
        database=database,
        user=user,
        password=password or None,
        unix_socket=unix_socket,
        sslmode="disable" if unix_socket else sslmode,  # libpq never tries TLS on a socket
        sslrootcert=root,
        connect_timeout=_connect_timeout(params.get("connect_timeout"), variable),
        application_name=params.get("application_name") or "queue-worker",
        options=params.get("options") or None,
        keepalives=_count(params.get("keepalives", "1"), "keepalives", variable) != 0,
        keepalives_idle=_count(
            params.get("keepalives_idle", str(KEEPALIVES_IDLE_S)), "keepalives_idle", variable
        ),
        keepalives_interval=_count(
            params.get("keepalives_interval", str(KEEPALIVES_INTERVAL_S)),
            "keepalives_interval",
            variable,
        ),
        keepalives_count=_count(
            params.get("keepalives_count", str(KEEPALIVES_COUNT)), "keepalives_count", variable
        ),
        tcp_user_timeout=_count(
            params.get("tcp_user_timeout", str(TCP_USER_TIMEOUT_MS)), "tcp_user_timeout", variable
        ),
        source=variable,
    )


def settings_from_rds_secret(
    secret: Mapping[str, Any], *, variable: str, sslrootcert: str | None = None
) -> ConnectionSettings:
    """The JSON shape RDS and Secrets Manager rotation use: username, password, host, port,
    dbname (and, beyond that shape, an optional sslmode). TLS defaults to verify-full: RDS
    always offers TLS, and its certificates chain to the RDS CA bundle, which `sslrootcert`
    (DATABASE_SSLROOTCERT) names."""
    missing = [key for key in ("username", "password", "host") if not secret.get(key)]
    if missing:
        raise ConfigurationError(
            variable, f"secret lacks {', '.join(missing)} (RDS secret JSON shape)"
        )
    try:
        port = int(secret.get("port") or 5432)
    except (TypeError, ValueError):
        raise ConfigurationError(variable, "secret has a port that is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigurationError(variable, "secret has a port outside 1-65535")
    given = secret.get("sslmode")
    if given is not None and given not in SSL_MODES:
        raise ConfigurationError(
            variable, f"secret has sslmode={given!r}; use one of {', '.join(SSL_MODES)}"
        )
    sslmode, root = _tls_choice(
        str(given) if given else "verify-full",
        sslrootcert,
        variable=variable,
        root_variable="DATABASE_SSLROOTCERT",
        local=False,
        from_secret=True,
        secret_default=not given,
    )
    return ConnectionSettings(
        host=str(secret["host"]),
        port=port,
        database=str(secret.get("dbname") or "postgres"),
        user=str(secret["username"]),
        password=str(secret["password"]),
        sslmode=sslmode,
        sslrootcert=root,
        source=variable,
    )


def check_root_certificate(path: str, variable: str) -> str:
    """`path` as an absolute path once it is known to hold certificates that load; "system"
    as it is. Raises ConfigurationError naming `variable` otherwise."""
    if path == SYSTEM_ROOTS:
        return path
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ConfigurationError(
            variable,
            f"names the root certificate file {full!r}, which does not exist: ship the CA "
            "certificate with the function and give its path, or use 'system' for the "
            "system's trusted CAs (see docs/database-tls.md)",
        )
    try:
        ssl.create_default_context(cafile=full)
    except (ssl.SSLError, OSError, ValueError):
        raise ConfigurationError(
            variable,
            f"names {full!r}, which holds no PEM certificate that can be loaded: it must be "
            "the CA certificate (or bundle) in PEM form",
        ) from None
    return full


def _tls_choice(
    sslmode: str | None,
    sslrootcert: str | None,
    *,
    variable: str,
    root_variable: str,
    local: bool,
    from_secret: bool = False,
    secret_default: bool = False,
) -> tuple[str, str | None]:
    """(sslmode, sslrootcert) as libpq settles them, or the error libpq would give. None for
    sslmode: not given. `secret_default`: verify-full is an RDS secret's default, not asked for."""
    if sslrootcert == SYSTEM_ROOTS:
        # The system's CAs sign certificates for anyone's names: only a check of the name
        # means something with them, so libpq makes verify-full the default and refuses less.
        if sslmode not in (None, "verify-full"):
            origin = "" if root_variable == variable else f" (from {root_variable})"
            raise ConfigurationError(
                variable,
                f"has sslmode={sslmode} with sslrootcert=system{origin}, which libpq refuses: "
                "the system's CAs vouch for any name they have signed, so only sslmode="
                "verify-full protects anything with them; use verify-full (or leave sslmode "
                "out), or give the server's own CA file as the root certificate",
            )
        return "verify-full", SYSTEM_ROOTS
    sslmode = sslmode or "prefer"
    if sslrootcert is not None:
        return sslmode, check_root_certificate(sslrootcert, root_variable)
    default_root = _default_root_file()
    if default_root is not None:
        return sslmode, default_root
    if sslmode in _VERIFYING and not local:
        if from_secret:  # the secret holds no root: only the variable can name one
            default = " (the default for a secret)" if secret_default else ""
            raise ConfigurationError(
                "DATABASE_SSLROOTCERT",
                f"is not set, and the database in the {variable} secret is reached with "
                f"sslmode={sslmode}{default}, which verifies the server's "
                "certificate: set DATABASE_SSLROOTCERT to the RDS CA bundle shipped with the "
                "function (global-bundle.pem; see docs/database-tls.md), or to 'system' if "
                "the server's certificate is publicly trusted",
            )
        raise ConfigurationError(
            variable,
            f"has sslmode={sslmode}, which verifies the server's certificate, but no root "
            "certificate to verify it against: add sslrootcert=<CA file> to the URL or set "
            "DATABASE_SSLROOTCERT (the RDS bundle global-bundle.pem, Supabase's CA certificate "
            "from its dashboard; see docs/database-tls.md), use sslrootcert=system for a "
            "publicly trusted certificate, or sslmode=require to encrypt without verifying",
        )
    return sslmode, None


def _default_root_file() -> str | None:
    """libpq's default root certificate, ~/.postgresql/root.crt, when it exists."""
    try:
        path = Path.home() / ".postgresql" / "root.crt"
    except RuntimeError:  # no home directory to speak of
        return None
    return str(path) if path.is_file() else None


def _host_and_port(hostport: str, variable: str) -> tuple[str | None, int]:
    if "," in hostport:
        raise ConfigurationError(
            variable, "lists several hosts; queue-worker connects to one: name only that one"
        )
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")) or not _is_address(inside):
            raise ConfigurationError(
                variable, _MISPLACED.format(where="its host part is not an address")
            )
        host: str | None = inside
        port_text = after[1:] if after else ""
    else:
        name, _, port_text = hostport.partition(":")
        host = _check_host(unquote(name), variable) if name else None
    port = _port(port_text, variable) if port_text else 5432
    return host, port


def _check_host(host: str, variable: str) -> str | None:
    """A host name, an IP address or a socket folder; anything else is most likely a piece of
    a password with an unescaped character, so it is not quoted."""
    if not host:
        return None
    if host.startswith("/"):
        return host
    if "," in host:
        raise ConfigurationError(
            variable, "lists several hosts; queue-worker connects to one: name only that one"
        )
    if not _is_address(host) and (
        host[0] in "-." or not all(c.isalnum() or c in "-._" for c in host)
    ):
        raise ConfigurationError(variable, _MISPLACED.format(where="its host is not a host name"))
    return host


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port(text: str, variable: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ConfigurationError(
            variable,
            "is not a valid URL: its port is not a number from 1 to 65535 (is a ':', '/', "
            "'?', '#' or '@' in the password not percent-encoded?)",
        )
    return int(text)


def _query_parameters(query: str, variable: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in query.split("&"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigurationError(
                variable, "has a query parameter without '=' and a value (write name=value)"
            )
        name = unquote(key)
        if name not in _URL_PARAMETERS:
            # Named only when it looks like a parameter name, not a piece of something else.
            shown = f" {name!r}" if name.isascii() and name.replace("_", "").isalpha() else ""
            raise ConfigurationError(
                variable,
                f"has a query parameter{shown} queue-worker does not take; it takes "
                f"{', '.join(sorted(_URL_PARAMETERS))}",
            )
        params[name] = unquote(value)  # libpq decodes %XX only: '+' stays a '+'
    return params


def _connect_timeout(value: str | None, variable: str) -> float | None:
    """libpq's meaning: whole seconds, zero or less for no limit, and at least 2."""
    if value is None:
        return CONNECT_TIMEOUT_S
    seconds = _int_param(value, "connect_timeout", variable)
    if seconds <= 0:
        return None
    return float(max(seconds, 2))


def _count(value: str, name: str, variable: str) -> int:
    number = _int_param(value, name, variable)
    if number < 0:
        raise ConfigurationError(variable, f"has {name}={number}, which must not be negative")
    return number


def _int_param(value: str, name: str, variable: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(
            variable, f"has {name}={value!r}, which is not a whole number"
        ) from None


# -- Connecting ----------------------------------------------------------------------------------


def connect(
    settings: ConnectionSettings, *, sleep: Callable[[float], None] = time.sleep
) -> pg8000.native.Connection:
    """Opens one connection, as libpq would with these settings.

    A server that is starting, stopping or recovering, or a refused port, is tried again after
    each pause of RETRY_DELAYS_S (`sleep` makes the pause). Raises DatabaseConfigurationError
    (the settings must change) or DatabaseUnavailableError (nothing usable answered), each one
    line without the password.
    """
    started = time.monotonic()
    delays = iter(RETRY_DELAYS_S)
    attempts = 0
    while True:
        attempts += 1
        try:
            return _connect_once(settings)
        except _Failed as failed:
            delay = next(delays, None) if failed.transient else None
            if delay is None:
                if attempts > 1:
                    failed.message += (
                        f" (tried {attempts} times over {time.monotonic() - started:.1f} s)"
                    )
                raise failed.error(settings) from None
            sleep(delay)


class _Failed(Exception):
    """One attempt's failure, before it becomes the error the caller sees."""

    def __init__(
        self,
        kind: _Kind,
        message: str,
        *,
        rank: int,
        next_method: bool = False,
        transient: bool = False,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # When attempts with and without TLS both fail, the one reported is the most telling:
        # a server error other than 28000 (3), a TLS failure (2), "no pg_hba.conf entry" or
        # another 28000 (1), anything else (0); the first one on a tie.
        self.rank = rank
        self.next_method = next_method  # libpq would go on with the next method of sslmode
        self.transient = transient  # worth trying again after a pause
        self.sqlstate = sqlstate
        self.on_plain = False  # the attempt had gone on without TLS

    def error(
        self, settings: ConnectionSettings
    ) -> DatabaseConfigurationError | DatabaseUnavailableError:
        if self.kind == "configuration":
            return DatabaseConfigurationError(settings.source, self.message, sqlstate=self.sqlstate)
        return DatabaseUnavailableError(self.message, sqlstate=self.sqlstate)


def _connect_once(settings: ConnectionSettings) -> pg8000.native.Connection:
    """One pass through sslmode's methods (as libpq's), reporting the most telling failure."""
    methods = ["plain"] if settings.unix_socket else list(_METHODS[settings.sslmode])
    failures: list[_Failed] = []
    while methods:
        method = methods.pop(0)
        try:
            return _attempt(settings, tls=method == "tls", plain_next="plain" in methods)
        except _Failed as failed:
            failures.append(failed)
            if failed.on_plain and "plain" in methods:
                methods.remove("plain")  # prefer went on without TLS on the same connection
            if not failed.next_method:
                break
    raise max(failures, key=lambda failed: failed.rank)


_SSL_REQUEST: Final = struct.pack("!ii", 8, 80877103)  # PostgreSQL's SSLRequest message


def _attempt(
    settings: ConnectionSettings, *, tls: bool, plain_next: bool
) -> pg8000.native.Connection:
    """One connection, with TLS or without. The socket is ours, not pg8000's: each step is
    bounded by what is left of connect_timeout, and once connected the socket blocks."""
    deadline = (
        None if settings.connect_timeout is None else (time.monotonic() + settings.connect_timeout)
    )
    sock = _open_socket(settings, deadline)
    on_plain = not tls
    try:
        if tls:
            context = _tls_context(settings)
            sock.settimeout(_remaining(deadline))
            sock.sendall(_SSL_REQUEST)
            answer = sock.recv(1)  # one byte: nothing sent in clear after it may be read
            if answer == b"S":
                try:
                    sock = context.wrap_socket(sock, server_hostname=settings.host)
                except ssl.SSLError as exc:
                    raise _tls_failure(exc, settings) from None
                except TimeoutError:
                    raise _timed_out(settings) from None
                except OSError as exc:
                    failed = _unreachable(exc, settings)
                    failed.next_method = True  # libpq: a failed handshake goes on to plain
                    raise failed from None
            elif answer == b"N" and plain_next:
                on_plain = True  # the server offers no TLS: go on without, as libpq does
            elif answer == b"N":
                raise _Failed(
                    "configuration",
                    f"{_where(settings)}: the server does not offer TLS, but sslmode="
                    f"{settings.sslmode} requires it; turn ssl on at the server, or set "
                    f"sslmode=prefer in {_source(settings)}",
                    rank=0,
                )
            elif answer == b"E":  # not trusted further: nothing has authenticated the server
                raise _Failed(
                    "unreachable",
                    f"{_where(settings)}: the server answered the request for TLS with an error "
                    "(is it out of connections or processes?)",
                    rank=0,
                )
            elif not answer:
                raise _closed_early(settings)
            else:
                raise _not_postgresql(settings)
        sock.settimeout(_remaining(deadline))
        conn = pg8000.native.Connection(
            user=settings.user,
            # An empty password rather than none: the server then refuses it with 28P01,
            # which is reported clearly (pg8000 fails obscurely on SCRAM without one).
            password=settings.password or "",
            host=settings.host or "localhost",
            port=settings.port,
            database=settings.database,
            sock=sock,
            ssl_context=False,  # TLS, if any, is set up above
            application_name=settings.application_name,
            startup_params={"options": settings.options} if settings.options else None,
        )
    except BaseException as exc:
        _close_for_good(sock)
        exc = _refusal_behind(exc)
        if isinstance(exc, _Failed):
            failed = exc
        elif isinstance(exc, pg8000.native.DatabaseError):
            failed = _server_failure(exc, settings)
        elif isinstance(exc, pg8000.native.InterfaceError):
            failed = _interface_failure(exc, settings)
        elif isinstance(exc, TimeoutError):
            failed = _timed_out(settings)
        elif isinstance(exc, ssl.SSLError):
            failed = _tls_failure(exc, settings)
        elif isinstance(exc, OSError):
            failed = _unreachable(exc, settings)
        elif isinstance(exc, Exception):
            # Not PostgreSQL at all: pg8000 then fails in ways of its own (UnicodeDecodeError,
            # KeyError, struct.error).
            failed = _not_postgresql(settings)
        else:
            raise  # KeyboardInterrupt and the like
        failed.on_plain = on_plain
        raise failed from None
    sock.settimeout(None)  # statements take as long as the server lets them
    conn.register_in_adapter(_TIMESTAMPTZ_OID, _timestamptz_in)
    return conn


def _open_socket(settings: ConnectionSettings, deadline: float | None) -> socket.socket:
    try:
        if settings.unix_socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(_remaining(deadline))
                sock.connect(settings.unix_socket)
            except BaseException:
                sock.close()
                raise
            return sock
        return _tcp_socket(settings, _remaining(deadline))
    except TimeoutError:
        raise _timed_out(settings) from None
    except OSError as exc:
        raise _unreachable(exc, settings) from None


def _tcp_socket(
    settings: ConnectionSettings, timeout: float | None = CONNECT_TIMEOUT_S
) -> socket.socket:
    """A connected socket with Nagle's algorithm off and keep-alive as the settings say.

    Nagle off: pg8000 writes a statement whose parameters pass its 8 KiB buffer (the settle of
    a batch) in more than one segment; with Nagle on, the last one waits for the server's
    delayed ACK, ~40 ms per statement."""
    sock = socket.create_connection((settings.host or "localhost", settings.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(settings.keepalives))
        if settings.keepalives:
            # Each where the platform has it (Linux has all three); 0 leaves the system's.
            idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
            for option, value in (
                (idle, settings.keepalives_idle),
                (getattr(socket, "TCP_KEEPINTVL", None), settings.keepalives_interval),
                (getattr(socket, "TCP_KEEPCNT", None), settings.keepalives_count),
            ):
                if option is not None and value > 0:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
        if user_timeout is not None and settings.tcp_user_timeout > 0:
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, settings.tcp_user_timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _remaining(deadline: float | None) -> float | None:
    """What is left of the connect timeout (a socket timeout of 0 would mean non-blocking)."""
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.001)


def _close_for_good(sock: socket.socket) -> None:
    """Closes the descriptor now: a file object pg8000 made over the socket would otherwise
    keep it open until garbage-collected. It may be closed already (a failed handshake closes
    its socket; so does pg8000 when startup fails)."""
    fd = sock.detach()
    if fd >= 0:
        os.close(fd)


def _tls_context(settings: ConnectionSettings) -> ssl.SSLContext:
    if settings.sslrootcert is not None:
        return _verifying_context(settings.sslrootcert, settings.sslmode == "verify-full")
    if settings.sslmode in _VERIFYING:  # parse_database_url refuses this; a hand-made one may not
        raise _Failed(
            "configuration",
            f"{_where(settings)}: sslmode={settings.sslmode} needs a root certificate "
            "(sslrootcert or DATABASE_SSLROOTCERT) to verify the server's against",
            rank=2,
        )
    return _encrypting_context()


@functools.cache
def _verifying_context(root: str, check_hostname: bool) -> ssl.SSLContext:
    """The chain is verified against `root` (a CA file or the system's CAs), the host name only
    for verify-full. One context per root: loading CAs takes a while (~0.2 s for the system's)."""
    if root == SYSTEM_ROOTS:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=root)
    # Python 3.13 turned on strict X.509 checks and partial chains; libpq keeps OpenSSL's
    # defaults, so with these off a certificate passes or fails alike on every Python.
    context.verify_flags &= ~(ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN)
    context.check_hostname = check_hostname
    return context


@functools.cache
def _encrypting_context() -> ssl.SSLContext:
    """Encryption without verification: libpq's require (or prefer, allow) with no root."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.2 or later
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- Failures ------------------------------------------------------------------------------------


def _where(settings: ConnectionSettings) -> str:
    return f"cannot connect to PostgreSQL at {settings.describe()}"


def _source(settings: ConnectionSettings) -> str:
    if settings.source == "DATABASE_SECRET_ARN":
        return "the DATABASE_SECRET_ARN secret"
    return settings.source


def _server_failure(exc: pg8000.native.DatabaseError, settings: ConnectionSettings) -> _Failed:
    """The server answered with an error during startup: what it said, and what to do."""
    fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code = str(fields.get("C", ""))
    said = " ".join(str(fields.get("M") or "an error without a message").split())
    if fields.get("D"):
        said += f" ({' '.join(str(fields['D']).split())})"
    if settings.password:
        said = said.replace(settings.password, "***")
    where, source = _where(settings), _source(settings)
    if code == "57P03":  # starting up, shutting down, recovering: libpq tries the next host
        return _Failed("unreachable", f"{where}: {said}", rank=3, transient=True, sqlstate=code)
    if code == "28P01":
        given = "" if settings.password else " (none was given)"
        return _Failed(
            "configuration",
            f"{where}: {said}; check the password{given} in {source}",
            rank=3,
            next_method=True,
            sqlstate=code,
        )
    if code == "28000":
        return _Failed(
            "configuration",
            f"{where}: {said}; check the user name in {source}, and that the server's "
            f"pg_hba.conf admits this user, database and address with sslmode={settings.sslmode}",
            rank=1,
            next_method=True,
            sqlstate=code,
        )
    if code == "3D000":  # after authentication: libpq does not try another method
        return _Failed(
            "configuration",
            f"{where}: {said}; check the database name in {source}, or create it",
            rank=3,
            sqlstate=code,
        )
    kind: _Kind = "unreachable" if code[:2] in ("08", "53", "57", "58", "XX") else "configuration"
    return _Failed(
        kind, f"{where}: {said} (SQLSTATE {code})", rank=3, next_method=True, sqlstate=code
    )


def _refusal_behind(exc: BaseException) -> BaseException:
    """The server's refusal, when pg8000 lost it. pg8000 closes a connection whose startup the
    server refused by sending it a Terminate message; when the server has already closed its end
    (on a Unix socket, the write then fails at once with a broken pipe), the InterfaceError of
    that write replaces the server's error, which is left in the exception's context."""
    context = exc.__context__ if isinstance(exc, pg8000.native.InterfaceError) else None
    while context is not None and not isinstance(context, pg8000.native.DatabaseError):
        context = context.__context__  # the write's OSError, then the server's error
    return context or exc


def _interface_failure(exc: pg8000.native.InterfaceError, settings: ConnectionSettings) -> _Failed:
    """pg8000's own refusals: the socket failed, or the server asked for what pg8000 cannot do
    (an authentication method such as GSSAPI or SSPI)."""
    if isinstance(exc.__cause__, TimeoutError):
        return _timed_out(settings)
    if isinstance(exc.__cause__, OSError) or str(exc) == "network error":  # (EOF: no cause)
        return _closed_early(settings)
    said = str(exc).replace(settings.password, "***") if settings.password else str(exc)
    return _Failed(
        "configuration",
        f"{_where(settings)}: {said} (pg8000 speaks password, md5 and scram-sha-256: check the "
        "server's pg_hba.conf method for this user)",
        rank=1,
    )


# OpenSSL's codes for a certificate that is valid but for another name or address.
_NAME_MISMATCH: Final = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _tls_failure(exc: ssl.SSLError, settings: ConnectionSettings) -> _Failed:
    where, source, mode = _where(settings), _source(settings), settings.sslmode
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code in _NAME_MISMATCH:
        message = (
            f"{where}: the server's certificate is not for the host name {settings.host!r} "
            f"(sslmode={mode} checks it); connect by a name the certificate holds, or check "
            f"the host in {source}"
        )
    elif isinstance(exc, ssl.SSLCertVerificationError):
        roots = (
            "the system's trusted CAs (sslrootcert=system)"
            if settings.sslrootcert == SYSTEM_ROOTS
            else f"sslrootcert={settings.sslrootcert}"
        )
        message = (
            f"{where}: the server's certificate does not verify against {roots} "
            f"({exc.verify_message}; sslmode={mode}); the root certificate must be the CA "
            "that signed the server's certificate (see docs/database-tls.md)"
        )
    else:
        reason = exc.reason or type(exc).__name__
        message = (
            f"{where}: the TLS handshake failed ({reason}); check sslmode={mode} and "
            f"sslrootcert in {source}"
        )
    return _Failed("configuration", message, rank=2, next_method=True)


def _unreachable(exc: OSError, settings: ConnectionSettings) -> _Failed:
    where = _where(settings)
    if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
        # Nothing listens there (or no socket file): a server restarting looks like this too.
        return _Failed(
            "unreachable",
            f"{where}: connection refused (is PostgreSQL running there, on that port?)",
            rank=0,
            transient=True,
        )
    if isinstance(exc, socket.gaierror):
        return _Failed(
            "unreachable", f"{where}: the host name does not resolve ({exc.strerror})", rank=0
        )
    return _Failed("unreachable", f"{where}: {exc.strerror or type(exc).__name__}", rank=0)


def _timed_out(settings: ConnectionSettings) -> _Failed:
    return _Failed(
        "unreachable",
        f"{_where(settings)}: no answer within connect_timeout={settings.connect_timeout:g} s",
        rank=0,
    )


def _closed_early(settings: ConnectionSettings) -> _Failed:
    return _Failed(
        "unreachable",
        f"{_where(settings)}: the server closed the connection while it was being set up",
        rank=0,
    )


def _not_postgresql(settings: ConnectionSettings) -> _Failed:
    return _Failed(
        "unreachable",
        f"{_where(settings)}: what answered does not speak PostgreSQL's protocol "
        "(is that the database's port?)",
        rank=0,
    )


# -- Types ---------------------------------------------------------------------------------------

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
