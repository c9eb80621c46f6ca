"""Throwaway PostgreSQL clusters for the connection tests: initdb in a temporary folder, a free
port on 127.0.0.1, TLS with a certificate from a CA nobody trusts, pg_hba.conf as each test
needs, stopped and deleted at the end.

The binaries are found at run time: those of the embedded server (the `local` extra) when
DATABASE_URL is unset, as tests/conftest.py then uses it, else an installed PostgreSQL
(`pg_config --bindir`, or `initdb` on PATH); either one when the other is missing. So the two
ways of running the suite test two versions. A server with TLS needs binaries built with
OpenSSL, which the embedded ones are not: it takes the first such binaries found.
QUEUE_WORKER_TEST_PG_BINDIR, when set, is tried first.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pg8000.native

from handler.local import embedded

ADMIN = "postgres"  # the superuser initdb makes (trust)
WORKER = "worker"  # a role with trust authentication
SECRET_USER = "secret_user"  # a role that must give its password (scram-sha-256)
SECRET_PASSWORD = "right-pass/word?#@"  # what percent-encoding is for
EITHER_WAY = "either_way"  # a database the TLS server also admits without TLS


def find_bindir(*, tls: bool = False) -> Path | None:
    """A folder holding initdb and pg_ctl (built with OpenSSL if `tls`), or None."""
    override = os.environ.get("QUEUE_WORKER_TEST_PG_BINDIR")
    candidates = [Path(override)] if override else []
    found = [_embedded_bindir(), _installed_bindir()]
    candidates += found if not os.environ.get("DATABASE_URL") else found[::-1]
    for folder in candidates:
        if folder is None or not (folder / "initdb").is_file() or not (folder / "pg_ctl").is_file():
            continue
        if (not tls or _built_with_openssl(folder)) and _runs_as_server_user(folder):
            return folder
    return None


def _runs_as_server_user(folder: Path) -> bool:
    """Whether the server's user can run the folder's programs: a checkout under a folder only
    root may enter (`mktemp -d` makes them 0700) holds an embedded server that user cannot reach."""
    try:
        answer = subprocess.run(
            [str(folder / "initdb"), "--version"],
            user=server_user(),
            capture_output=True,
            check=False,
            timeout=30,
        )
    except OSError:
        return False
    return answer.returncode == 0


def _built_with_openssl(folder: Path) -> bool:
    """What pg_config says of the build (the embedded server is built without TLS)."""
    if not (folder / "pg_config").is_file():
        return False
    answer = subprocess.run(
        [str(folder / "pg_config"), "--configure"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return "openssl" in answer.stdout


def _embedded_bindir() -> Path | None:
    try:
        module = embedded._server_module()
    except RuntimeError:
        return None
    return Path(module.__file__).parent / "pginstall" / "bin"


def _installed_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        answer = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if answer.returncode == 0 and answer.stdout.strip():
            return Path(answer.stdout.strip())
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def server_user() -> str | None:
    """PostgreSQL refuses to run as root: the tests running as root run it as an unprivileged
    user of the machine. None: as the current user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerCertificate:
    """The server's certificate (for `names`) and key, and the CA file that signed it."""

    cert_file: Path
    key_file: Path
    ca_file: Path


class Cluster:
    """One PostgreSQL cluster of a test's own."""

    def __init__(
        self,
        bindir: Path,
        root: Path,
        name: str,
        *,
        certificate: ServerCertificate | None,
        hba: Sequence[str],
        settings: dict[str, str] | None = None,
        standby: bool = False,
    ) -> None:
        self.bindir = bindir
        self.user = server_user()
        self.data = root / name / "data"
        self.log = root / name / "log"
        self.port = free_port()
        self.tls = certificate is not None
        self.data.parent.mkdir(parents=True)
        self._chown(self.data.parent)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ADMIN,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "off",
            "ssl": "on" if certificate else "off",
            "password_encryption": "'scram-sha-256'",
            **(settings or {}),
        }
        if certificate is not None:
            # In the data folder, owned by the server's user; the key readable by it alone.
            shutil.copyfile(certificate.cert_file, self.data / "server.crt")
            shutil.copyfile(certificate.key_file, self.data / "server.key")
            (self.data / "server.key").chmod(0o600)
            self._chown(self.data / "server.crt")
            self._chown(self.data / "server.key")
        with (self.data / "postgresql.conf").open("a") as file:
            file.writelines(f"{k} = {v}\n" for k, v in conf.items())
        (self.data / "pg_hba.conf").write_text("".join(f"{line}\n" for line in hba))
        if standby:
            (self.data / "standby.signal").touch()
            self._chown(self.data / "standby.signal")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.log), "start")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._pg_ctl("-m", "immediate", "stop")

    def promote(self) -> None:
        self._pg_ctl("promote")

    def url(
        self,
        user: str = WORKER,
        *,
        host: str = "127.0.0.1",
        password: str | None = None,
        database: str = "postgres",
        **params: str,
    ) -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params.items())
        return f"postgresql://{auth}@{host}:{self.port}/{database}" + (f"?{query}" if query else "")

    def admin(self) -> pg8000.native.Connection:
        """A superuser connection made with pg8000 alone (not the code under test)."""
        context: ssl.SSLContext | bool = False
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return pg8000.native.Connection(
            ADMIN, host="127.0.0.1", port=self.port, ssl_context=context, timeout=30
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args)

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / program), *args],
            user=self.user,
            cwd=self.data.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # a pipe would be inherited by the server: pg_ctl hangs
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else "(no log)"
            raise RuntimeError(f"{program} {' '.join(args)} failed ({result.returncode}):\n{log}")

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


def make_root() -> Path:
    """A temporary folder the server's user may enter."""
    root = Path(tempfile.mkdtemp(prefix="queue-worker-connection-"))
    user = server_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root
