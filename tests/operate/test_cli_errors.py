"""The command line's errors: each is one line on stderr, never a traceback, with the exit status
of its kind (usage 2, configuration 2, database unreachable 3, refused by the queue 1); a closed
pipe ends it quietly, Ctrl-C with 130. Every number is checked before anything is touched, and
every option says what it is for."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pg8000.native
import pytest

from handler.errors import EXIT_STATUS
from handler.local import cli
from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import SERVICE_ROLE_KEY, cli_env_of, cli_process, job_state, run_cli

TENANT = uuid.UUID("5a0c7e2d-41b3-4f6e-9d8a-7c6b5e4d3f21")


def one_line(err: str) -> str:
    """The whole of stderr, checked to be one line of ours."""
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("queue-worker"), err
    return err.strip()


# Usage: argparse refuses the value, one line, exit 2, nothing touched ---------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["run", "--budget", "-1"], "--budget"),
        (["run", "--budget", "0"], "--budget"),
        (["run", "--budget", "901"], "--budget"),
        (["run", "--budget", "nan"], "--budget"),
        (["run", "--budget", "soon"], "--budget"),
        (["enqueue", str(TENANT), "ingest_slack", "--priority", str(2**31)], "--priority"),
        (["enqueue", str(TENANT), "ingest_slack", "--max-attempts", "0"], "--max-attempts"),
        (["dead-letters", "list", "--limit", "0"], "--limit"),
        (["dead-letters", "requeue", "--all", "--limit", "-5"], "--limit"),
        (["schedules", "fire", "--limit", "0"], "--limit"),
        (["schedules", "set", str(TENANT), "n", "j", "@daily", "--priority", "x"], "--priority"),
        (["schedules", "set", str(TENANT), "n", "j", "@daily", "--max-attempts", "0"], "attempts"),
        (["explain", "job-42"], "job_id"),
        (["tenants", "set", "--default", "--weight", "0"], "--weight"),
        (["tenants", "set", "--default", "--weight", "101"], "--weight"),
        (["tenants", "set", "--default", "--rate", "fast"], "--rate"),
        (["tenants", "set", "--default", "--rate", "0/s"], "--rate"),
        (["tenants", "set", "--default", "--rate", "1/s", "--burst", "0.5"], "--burst"),
        (["tenants", "set"], "--default"),
        (["tenants", "clear", str(TENANT), "--default"], "--default"),
        (["no-such-command"], "no-such-command"),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(value)[:60],
)
def test_a_bad_argument_is_one_line_naming_it_exit_2_and_touches_nothing(
    argv: list[str],
    names: str,
    cli_env: str,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # When a command is given a value out of range (or of the wrong kind)
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    # Then argparse stops it with exit status 2 and one line that names the argument
    out, err = capsys.readouterr()
    assert exited.value.code == EXIT_STATUS["usage"]
    assert out == ""
    assert names in one_line(err)
    assert conn.run("SELECT count(*) FROM queue_jobs") == [[0]]
    assert conn.run("SELECT count(*) FROM queue_tenant_limits") == [[0]]


def test_the_budget_range_is_lambdas(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The bounds themselves: a run may have up to Lambda's 900 s, and any time above 0."""
    parser = cli._parser()
    assert parser.parse_args(["run", "--budget", "900"]).budget == 900.0
    assert parser.parse_args(["run", "--budget", "0.5"]).budget == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--budget", "900.001"])
    assert "at most 900" in capsys.readouterr().err


def test_burst_without_a_rate_is_usage_and_sets_nothing(
    cli_env: str, conn: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(capsys, "tenants", "set", str(TENANT), "--burst", "5")
    assert (status, out) == (EXIT_STATUS["usage"], "")
    assert "--burst needs --rate" in one_line(err)
    assert conn.run("SELECT count(*) FROM queue_tenant_limits") == [[0]]


def test_data_dir_with_database_url_set_is_usage(
    cli_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given DATABASE_URL, when --data-dir also names a database
    status, out, err = run_cli(capsys, "--data-dir", "elsewhere/pgdata", "stats")
    # Then it is refused: which one was meant is not for us to guess
    assert (status, out) == (EXIT_STATUS["usage"], "")
    assert "--data-dir" in one_line(err)
    assert "DATABASE_URL" in err


# Configuration: one line naming the variable, exit 2 -------------------------------------------


@pytest.mark.parametrize(
    ("variables", "names"),
    [
        ({"DATABASE_URL": "mysql://db.example.test/queue"}, "DATABASE_URL"),
        ({"DATABASE_SECRET_ARN": "queue-db-secret"}, "DATABASE_SECRET_ARN"),
        (
            {"DATABASE_URL": "postgresql://u@db.example.test/q", "DATABASE_SSLROOTCERT": "/no/ca"},
            "DATABASE_SSLROOTCERT",
        ),
        (
            {"DATABASE_URL": "postgresql://u@db.example.test/q?sslmode=verify-full"},
            "DATABASE_SSLROOTCERT",
        ),
    ],
    ids=["url-not-postgresql", "arn-not-an-arn", "root-file-missing", "verify-full-no-root"],
)
@pytest.mark.parametrize("command", [["stats"], ["migrate"], ["run"]], ids=lambda c: c[0])
def test_a_bad_database_setting_is_one_line_naming_the_variable_and_exit_2(
    variables: dict[str, str],
    names: str,
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in cli_env_of(**variables).items():
        monkeypatch.setenv(name, value)
    for name in ("DATABASE_URL", "DATABASE_SECRET_ARN", "DATABASE_SSLROOTCERT"):
        if name not in variables:
            monkeypatch.delenv(name, raising=False)
    status, out, err = run_cli(capsys, *command)
    assert (status, out) == (EXIT_STATUS["configuration"], "")
    assert names in one_line(err)


def test_run_with_a_functions_url_but_no_key_names_the_key(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    job = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, err = run_cli(capsys, "run")
    assert (status, out) == (EXIT_STATUS["configuration"], "")
    assert one_line(err).startswith("queue-worker: SUPABASE_SERVICE_ROLE_KEY is not set")
    assert job_state(conn, job)["attempts"] == 0


# Unreachable: exit 3 ---------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", [["stats"], ["migrate", "--check"], ["schedules", "list"]])
def test_a_database_nobody_answers_for_is_one_line_and_exit_3(
    command: list[str],
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://ops:pa55word@127.0.0.1:{closed_port}/q")
    status, out, err = run_cli(capsys, *command)
    assert (status, out) == (EXIT_STATUS["unreachable"], "")
    assert f"127.0.0.1:{closed_port}" in one_line(err)
    assert "pa55word" not in err


# Refused by the queue: exit 1 ------------------------------------------------------------------


def test_a_request_the_queue_refuses_is_one_line_and_exit_1(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    pending = queue.enqueue(TENANT, "ingest_slack", {})
    status, out, err = run_cli(capsys, "dead-letters", "requeue", str(pending))
    assert (status, out) == (EXIT_STATUS["refused"], "")
    assert "not in the dead letter table" in one_line(err)


def test_a_value_postgresql_refuses_is_one_line_and_exit_1(
    cli_env: str, conn: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # A payload PostgreSQL's jsonb cannot hold (a NUL character): refused by the server
    status, out, err = run_cli(capsys, "enqueue", str(TENANT), "ingest_slack", '{"a": "\\u0000"}')
    assert (status, out) == (EXIT_STATUS["refused"], "")
    assert "PostgreSQL refused the request" in one_line(err)
    assert conn.run("SELECT count(*) FROM queue_jobs") == [[0]]


# A closed pipe: quiet ---------------------------------------------------------------------------


@pytest.fixture
def closed_pipe() -> Iterator[int]:
    """The write end of a pipe whose reader has already gone (as `| head -1` is once it has its
    line): any write to it fails, every time."""
    read, write = os.pipe()
    os.close(read)
    yield write
    os.close(write)


@pytest.mark.parametrize("command", [["schedules", "list"], ["stats"], ["migrate", "--check"]])
def test_a_reader_that_went_away_ends_the_command_quietly(
    command: list[str], closed_pipe: int, cli_env: str, queue: QueueStore
) -> None:
    # Given something to print (a schedule, the stats, the schema's state)
    cli.main(["schedules", "set", str(TENANT), "nightly", "generate_digest", "@daily"])
    # When the command's stdout is a pipe nobody reads any more
    result = subprocess.run(
        [sys.executable, "-m", "handler.local.cli", *command],
        env=cli_env_of(DATABASE_URL=cli_env),
        stdout=closed_pipe,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )
    # Then it stops without a word, as Unix tools do (the status a shell shows for SIGPIPE)
    assert result.stderr == ""
    assert result.returncode == cli.EXIT_BROKEN_PIPE


# Ctrl-C ----------------------------------------------------------------------------------------


@pytest.fixture
def held_run(
    database_url: str, standin: StandIn, queue: QueueStore
) -> Iterator[tuple[subprocess.Popen[str], uuid.UUID]]:
    """`queue-worker run` in its own process with one call in flight, held by the stand-in
    until the test releases it."""
    standin.configure("ingest-slack", {"hold": True})
    job = queue.enqueue(TENANT, "ingest_slack", {})
    env = cli_env_of(
        DATABASE_URL=database_url,
        FUNCTIONS_BASE_URL=standin.base_url,
        SUPABASE_SERVICE_ROLE_KEY=SERVICE_ROLE_KEY,
        HTTP_TIMEOUT_SECONDS="60",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "handler.local.cli", "run", "--budget", "120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        standin.wait_for_requests(1, timeout=60)
        yield process, job
    finally:
        standin.release()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)


def test_ctrl_c_during_a_run_says_so_at_once_settles_the_call_in_flight_and_exits_130(
    held_run: tuple[subprocess.Popen[str], uuid.UUID],
    standin: StandIn,
    conn: pg8000.native.Connection,
) -> None:
    process, job = held_run
    assert process.stderr is not None
    # When Ctrl-C reaches the run while its call is in flight
    process.send_signal(signal.SIGINT)
    # Then it says so at once, in one line (before the call has answered) ...
    said = process.stderr.readline()
    assert said.startswith("queue-worker: interrupted"), said
    assert job_state(conn, job)["status"] == "processing"
    # ... lets the call finish, settles it, and exits 130 with nothing more to say
    standin.release()
    out, rest = process.communicate(timeout=60)
    assert process.returncode == cli.EXIT_INTERRUPTED
    assert out == ""
    assert rest == ""
    assert job_state(conn, job)["status"] == "completed"


def test_a_second_ctrl_c_stops_the_run_at_once_leaving_the_job_to_its_lease(
    held_run: tuple[subprocess.Popen[str], uuid.UUID], conn: pg8000.native.Connection
) -> None:
    process, job = held_run
    assert process.stderr is not None
    process.send_signal(signal.SIGINT)
    assert process.stderr.readline().startswith("queue-worker: interrupted")
    # When Ctrl-C comes again while the call is still held
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=60)
    # Then the process ends there (130), quietly, and the job waits for its lease to expire
    assert process.returncode == cli.EXIT_INTERRUPTED
    assert (out, rest) == ("", "")
    assert job_state(conn, job)["status"] == "processing"


def test_ctrl_c_in_any_other_command_is_one_line_and_130(
    cli_env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_stats", interrupted)
    status, out, err = run_cli(capsys, "stats")
    assert (status, out) == (cli.EXIT_INTERRUPTED, "")
    assert one_line(err) == "queue-worker: interrupted"


# Help ------------------------------------------------------------------------------------------


def every_parser(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from every_parser(child)


def test_every_option_and_argument_of_every_command_has_help() -> None:
    def described(action: argparse.Action) -> list[argparse.Action]:
        if isinstance(action, argparse._SubParsersAction):
            return list(action._choices_actions)  # each command: its line in the list
        return [] if isinstance(action, argparse._HelpAction) else [action]

    missing = [
        f"{parser.prog} {action.option_strings or action.dest}"
        for parser in every_parser(cli._parser())
        for each in parser._actions
        for action in described(each)
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []
    assert len(list(every_parser(cli._parser()))) >= 20  # every command and action was seen


def test_help_cites_nothing_outside_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    for parser in every_parser(cli._parser()):
        text = parser.format_help()
        assert "DESIGN" not in text, parser.prog
        assert "section" not in text.lower(), parser.prog


def test_help_is_printed_by_the_installed_command() -> None:
    result = cli_process("--help", env=cli_env_of(), timeout=60)
    assert result.returncode == 0
    assert "DATABASE_SECRET_ARN" in result.stdout
    assert "exit status" in result.stdout
