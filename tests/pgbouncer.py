"""A real PgBouncer in transaction mode in front of the test server, for the pooling tests.

PgBouncer (the Debian package `pgbouncer`) runs in the foreground on a free port of 127.0.0.1,
with `pool_mode = transaction` and a pool as small as the test asks, in front of whichever
server the tests use (the embedded one over its unix socket, or DATABASE_URL's). It refuses to
run as root, so when the tests run as root it runs as the owner of the server's socket folder
(or `nobody` for a TCP server). Without the binary the tests that need it are skipped, unless CI
is set, where its absence fails them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import pytest

from handler.queue import connection

START_TIMEOUT_S = 30.0


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )
    if found is None:
        message = "PgBouncer is not installed (the Debian package pgbouncer); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """PgBouncer in transaction mode in front of `server_url`'s server (every database)."""

    def __init__(self, server_url: str, *, pool_size: int, users: tuple[str, ...] = ()) -> None:
        self._settings = connection.parse_database_url(server_url)
        self._server_url = server_url
        self.pool_size = pool_size
        self._users = (self._settings.user, *users)
        self.port = _free_port()
        self._folder = Path(tempfile.mkdtemp(prefix="queue-worker-pgbouncer-"))
        self._process: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._reader: threading.Thread | None = None

    def url(self, database: str | None = None) -> str:
        """A URL like the server's, for `database` (default: the server URL's), via PgBouncer."""
        name = database or self._settings.database
        user = self._settings.user
        return f"postgresql://{user}@127.0.0.1:{self.port}/{name}?sslmode=disable"

    def url_like(self, url: str) -> str:
        """`url` (a database on the same server) through PgBouncer, user and database kept."""
        settings = connection.parse_database_url(url)
        parts = urlsplit(url)
        return urlunsplit(
            (
                "postgresql",
                f"{settings.user}@127.0.0.1:{self.port}",
                parts.path,
                "sslmode=disable",
                "",
            )
        )

    def start(self) -> Self:
        binary = pgbouncer_binary()
        if self._settings.unix_socket is not None:
            socket_dir = str(Path(self._settings.unix_socket).parent)
            target = f"host={socket_dir} port={self._settings.port}"
        else:
            socket_dir = None
            target = f"host={self._settings.host} port={self._settings.port}"
        users = "\n".join(f'"{user}" ""' for user in self._users)
        (self._folder / "users.txt").write_text(users + "\n")
        (self._folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = {target}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self._folder / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "server_tls_sslmode = disable\n"
            "client_tls_sslmode = disable\n"
        )
        command = [binary]
        if os.geteuid() == 0:  # PgBouncer will not run as root
            owner = pwd.getpwuid(os.stat(socket_dir).st_uid).pw_name if socket_dir else "nobody"
            self._folder.chmod(0o755)
            command += ["-u", owner]
        command.append(str(self._folder / "pgbouncer.ini"))
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        listening = threading.Event()

        def read_log() -> None:
            assert self._process is not None
            assert self._process.stderr is not None
            for line in self._process.stderr:
                self._log.append(line)
                if "listening on" in line:
                    listening.set()
            listening.set()  # it exited: start() reports that

        self._reader = threading.Thread(target=read_log, daemon=True)
        self._reader.start()
        if not listening.wait(START_TIMEOUT_S) or self._process.poll() is not None:
            self.stop()
            raise RuntimeError("PgBouncer did not start:\n" + "".join(self._log[-20:]))
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            if self._reader is not None:
                self._reader.join(10)
            if process.stderr is not None:
                process.stderr.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
