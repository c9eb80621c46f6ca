"""The command line with neither DATABASE_URL nor DATABASE_SECRET_ARN: the embedded PostgreSQL in
the user's data folder, the same from whatever folder a command is started, said on stderr,
movable with QUEUE_WORKER_DATA_DIR or --data-dir; `run` works on it out of the box (stand-in
functions, a database migrated when it was created), and `demo --keep` prints a command that
works.

Each test runs `queue-worker` in processes of its own, as a person does, with a home and
XDG_DATA_HOME of the test's own (the Linux rule for the user data folder) and a server that
stops when the last command using it exits.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.local import embedded
from handler.queue import migrations

from .conftest import as_a_person_runs_it, cli_env_of, printed_command

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the folder asserted is the Linux (XDG) user data folder"
)

TENANT = "3e1f9a70-5b2c-4d8e-a6f1-0c9b8d7e6f54"


@pytest.fixture(scope="module", autouse=True)
def _embedded_installed() -> None:
    try:
        embedded._server_module()
    except RuntimeError as exc:
        pytest.skip(f"no embedded PostgreSQL: {exc}")


@pytest.fixture
def home() -> Iterator[Path]:
    """A home folder of the test's own, outside pytest's temporary root (the server runs as
    a user of its own under root, and pytest resets that root's permissions)."""
    folder = Path(tempfile.mkdtemp(prefix="queue-worker-home-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def user_env(home: Path) -> dict[str, str]:
    """A user's environment: no database named, a data folder of their own."""
    return cli_env_of(HOME=str(home), XDG_DATA_HOME=str(home / "data"))


def queue_worker(
    *argv: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "handler.local.cli", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """What the command said on stderr, but the worker's JSON log lines."""
    assert "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if not line.startswith("{")]


def test_the_embedded_database_is_the_users_wherever_a_command_starts(
    home: Path, user_env: dict[str, str]
) -> None:
    first, second = home / "project", home / "elsewhere"
    first.mkdir()
    second.mkdir()
    folder = home / "data" / "queue-worker" / "pgdata"
    # When a job is enqueued from one folder (creating the database) ...
    enqueued = queue_worker("enqueue", TENANT, "ingest_slack", env=user_env, cwd=first)
    assert enqueued.returncode == 0, enqueued.stderr
    job_id = enqueued.stdout.strip()
    # ... and the stats are asked for from another
    stats = queue_worker("stats", env=user_env, cwd=second)
    # Then both used the one database in the user's data folder, and each said where it is
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["by_status"] == {"pending": 1}
    [created] = said(enqueued)
    assert created.startswith("queue-worker: created an embedded PostgreSQL and migrated it in")
    assert str(folder) in created
    [using] = said(stats)
    assert using.startswith(f"queue-worker: using the embedded PostgreSQL in {folder} ")
    assert not (first / ".queue-worker").exists()
    assert not (second / ".queue-worker").exists()
    uuid.UUID(job_id)


def test_queue_worker_data_dir_and_data_dir_move_it(home: Path, user_env: dict[str, str]) -> None:
    moved, chosen = home / "moved" / "pgdata", home / "chosen"
    # QUEUE_WORKER_DATA_DIR moves it
    env = user_env | {"QUEUE_WORKER_DATA_DIR": str(moved)}
    result = queue_worker("enqueue", TENANT, "ingest_slack", env=env)
    assert result.returncode == 0, result.stderr
    assert str(moved) in said(result)[0]
    assert (moved / "PG_VERSION").exists()
    # --data-dir, before or after the command, wins over it
    for argv in (["--data-dir", str(chosen), "stats"], ["stats", "--data-dir", str(chosen)]):
        result = queue_worker(*argv, env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["by_status"] == {}  # another, empty database
        assert str(chosen) in said(result)[0]
    assert not (home / "data" / "queue-worker").exists()


def test_an_existing_embedded_database_that_is_behind_is_not_migrated_but_by_migrate(
    home: Path, user_env: dict[str, str]
) -> None:
    # Given an embedded database that exists but has no schema (made by an older version, say)
    folder = home / "old" / "pgdata"
    url = queue_worker("migrate", "--check", "--data-dir", str(folder), env=user_env)
    assert url.returncode == 1  # created it; --check changes nothing: pending
    assert url.stdout.startswith("pending: 0001_queue")
    # When another command runs on it
    result = queue_worker("stats", "--data-dir", str(folder), env=user_env)
    # Then it is refused, naming migrate; migrate then applies everything
    assert result.returncode != 0
    assert "queue-worker migrate" in said(result)[-1]
    result = queue_worker("migrate", "--data-dir", str(folder), env=user_env)
    assert result.returncode == 0, result.stderr
    shipped = ", ".join(m.version for m in migrations.available())
    assert result.stdout == f"applied: {shipped}\n"


def test_run_on_the_embedded_database_works_out_of_the_box(user_env: dict[str, str]) -> None:
    # Given a newcomer's first commands: a job, then a run, with nothing configured
    enqueued = queue_worker("enqueue", TENANT, "ingest_slack", '{"channel": "C1"}', env=user_env)
    assert enqueued.returncode == 0, enqueued.stderr
    # When `run` runs
    result = queue_worker("run", "--budget", "30", env=user_env)
    # Then the job went to stand-in functions started for the run, and completed
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["claimed"], summary["completed"]) == (1, 1)
    lines = said(result)
    assert lines[0].startswith("queue-worker: using the embedded PostgreSQL in")
    assert lines[1].startswith("queue-worker: no SUPABASE_URL or FUNCTIONS_BASE_URL: calling")
    assert "stand-in functions at http://127.0.0.1:" in lines[1]
    assert len(lines) == 2


def test_run_on_the_embedded_database_with_a_functions_url_needs_the_key(
    user_env: dict[str, str],
) -> None:
    env = user_env | {"SUPABASE_URL": "https://abc.supabase.co"}
    result = queue_worker("run", env=env)
    assert result.returncode == 2
    assert said(result)[-1].startswith("queue-worker: SUPABASE_SERVICE_ROLE_KEY is not set")
    assert "stand-in" not in result.stderr


# demo --keep -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_keep_on_the_embedded_database_prints_a_command_that_works(
    home: Path, user_env: dict[str, str]
) -> None:
    # When the demo runs with --keep and no DATABASE_URL
    result = queue_worker("demo", "--keep", env=user_env, timeout=240)
    assert result.returncode == 0, result.stderr
    # Then it worked in a cluster of its own, beside the user's data folder (which it left alone)
    [line] = said(result)
    assert "the demo's own embedded PostgreSQL in" in line
    assert "(kept)" in line
    kept = [p for p in (home / "data" / "queue-worker").iterdir() if p.name.startswith("demo-")]
    assert len(kept) == 1
    assert not (home / "data" / "queue-worker" / "pgdata").exists()
    # and the command it printed, run later as a person would, shows the demo's jobs
    command = printed_command(result.stdout)
    assert shlex.split(command)[0] == "queue-worker"
    looked = as_a_person_runs_it(command, user_env)
    assert looked.returncode == 0, looked.stderr
    stats = json.loads(looked.stdout)
    assert stats["dead_letters"] == 2
    assert stats["by_status"]["completed"] >= 15


@pytest.mark.slow
def test_demo_without_keep_leaves_no_cluster_behind(home: Path, user_env: dict[str, str]) -> None:
    result = queue_worker("demo", env=user_env, timeout=240)
    assert result.returncode == 0, result.stderr
    [line] = said(result)
    assert "(deleted afterwards)" in line
    folder = Path(line.split(" in ", 1)[1].rsplit(" (", 1)[0])
    assert not folder.exists()
    assert "look at it" not in result.stdout
    assert not (home / "data").exists()


def test_a_data_folder_left_in_the_old_place_is_pointed_out(
    home: Path, user_env: dict[str, str]
) -> None:
    # Given a project folder holding a database where older versions kept it
    project = home / "project"
    old = project / ".queue-worker" / "pgdata"
    old.mkdir(parents=True)
    (old / "PG_VERSION").write_text("16\n")
    # When the first command creates the user's database
    result = queue_worker("stats", env=user_env, cwd=project)
    # Then it says where the old one is and how to open it
    assert result.returncode == 0, result.stderr
    [line] = said(result)
    assert "--data-dir .queue-worker/pgdata opens it" in line
