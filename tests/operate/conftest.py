"""Fixtures for the operator-facing specifications: the end-to-end ones, re-exported, and the
command line's (in this process, or in its own as a person runs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handler.local.cli import main
from handler.local.standin import StandIn
from tests.e2e.conftest import *  # noqa: F403
from tests.e2e.conftest import SERVICE_ROLE_KEY

# What the command line reads besides the database (unset for its tests unless a test sets it).
CLI_VARIABLES = (
    "DATABASE_SECRET_ARN",
    "DATABASE_SSLROOTCERT",
    "QUEUE_WORKER_DATA_DIR",
    "SUPABASE_URL",
    "FUNCTIONS_BASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
    "JOB_ROUTES",
    "IDEMPOTENCY_STORE",
)


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The command line pointed at the test database, with no other configuration."""
    for name in CLI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def functions_env(cli_env: str, standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """What `run` needs besides the database: where the functions are, and the key."""
    monkeypatch.setenv("FUNCTIONS_BASE_URL", standin.base_url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    return standin


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def cli_process(
    *argv: str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """`queue-worker ...` as a person runs it: its own process, its own stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "handler.local.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_env_of(**variables: str) -> dict[str, str]:
    """This process's environment without the command line's variables, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in (*CLI_VARIABLES, "DATABASE_URL")}
    return env | variables


def printed_command(out: str) -> str:
    """The command the demo printed for the database it kept (the line after "look at it")."""
    lines = out.splitlines()
    [at] = [i for i, line in enumerate(lines) if "; look at it with" in line]
    return lines[at + 1].strip()


def as_a_person_runs_it(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The printed line through a shell, with the installed `queue-worker` on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    assert (Path(bin_dir) / "queue-worker").exists()
    path = bin_dir + os.pathsep + env.get("PATH", "")
    return subprocess.run(  # noqa: S602 - the line is the test's subject
        command,
        shell=True,
        env=env | {"PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        executable=shutil.which("bash") or "/bin/sh",
    )
