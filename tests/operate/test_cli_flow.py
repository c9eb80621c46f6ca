"""`queue-worker explain` and `queue-worker tenants set|clear`: flow control from the command line,
thin over the queue's own calls (explain_job, set_tenant_limits, clear_tenant_limits)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pg8000.native
import pytest

from handler.local import cli
from handler.queue.store import QueueStore

from .conftest import run_cli

TENANT = uuid.UUID("9c2e4a61-7d3b-4f80-b5e6-1a2b3c4d5e6f")
NIL = "00000000-0000-0000-0000-000000000000"


def limits(conn: pg8000.native.Connection) -> dict[str, list[Any]]:
    rows = conn.run("SELECT tenant_id, weight, rate, burst FROM queue_tenant_limits")
    return {str(row[0]): row[1:] for row in rows}


def claim_one(queue: QueueStore) -> None:
    assert len(queue.claim("cli-flow", lease_seconds=60, max_jobs=10, max_per_tenant=10)) == 1


# tenants ----------------------------------------------------------------------------------------


def test_tenants_set_with_a_rate_in_job_routes_syntax_holds_the_tenants_second_job_back(
    cli_env: str,
    queue: QueueStore,
    conn: pg8000.native.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # When a tenant is given 1 job a minute, a bucket of 1
    status, out, err = run_cli(
        capsys, "tenants", "set", str(TENANT), "--rate", "1/min", "--burst", "1"
    )
    # Then it is stored as jobs per second, and said so
    assert (status, err) == (0, "")
    assert out == f"set limits of tenant {TENANT}: weight 1, rate 0.0166667/s, burst 1\n"
    assert limits(conn) == {str(TENANT): [1.0, pytest.approx(1 / 60), 1.0]}
    # and with two due jobs, one claim takes one; explain names the rate for the other
    queue.record_routes({"ingest_slack": {"function": "ingest-slack"}})
    queue.enqueue(TENANT, "ingest_slack", {})
    second = queue.enqueue(TENANT, "ingest_slack", {})
    claim_one(queue)
    status, out, _ = run_cli(capsys, "explain", str(second), "--json")
    assert status == 0
    assert json.loads(out)["reason"] == "tenant_rate_limit"


def test_tenants_set_options_left_out_take_their_defaults(
    cli_env: str, conn: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "tenants", "set", str(TENANT), "--rate", "20/s")[0] == 0
    status, out, _ = run_cli(capsys, "tenants", "set", str(TENANT), "--weight", "2.5")
    assert (status, out) == (0, f"set limits of tenant {TENANT}: weight 2.5, no rate limit\n")
    assert limits(conn) == {str(TENANT): [2.5, None, None]}


def test_tenants_set_default_sets_every_tenants_default(
    cli_env: str, conn: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_cli(capsys, "tenants", "set", "--default", "--rate", "600/min")
    assert (status, out) == (0, "set the default limits: weight 1, rate 10/s\n")
    assert limits(conn) == {NIL: [1.0, 10.0, None]}


def test_tenants_clear_drops_the_tenants_own_limits_and_exits_1_when_there_were_none(
    cli_env: str, conn: pg8000.native.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(capsys, "tenants", "set", str(TENANT), "--weight", "3")
    run_cli(capsys, "tenants", "set", "--default", "--weight", "2")
    assert run_cli(capsys, "tenants", "clear", str(TENANT)) == (
        0,
        f"cleared limits of tenant {TENANT}\n",
        "",
    )
    assert limits(conn) == {NIL: [2.0, None, None]}
    assert run_cli(capsys, "tenants", "clear", str(TENANT)) == (
        1,
        "",
        f"queue-worker: limits of tenant {TENANT}: none were set\n",
    )
    assert run_cli(capsys, "tenants", "clear", "--default")[:2] == (
        0,
        "cleared the default limits\n",
    )
    assert limits(conn) == {}


def test_the_rate_takes_exactly_the_job_routes_syntax() -> None:
    parser = cli._parser()
    for text, per_second in (("20/s", 20.0), ("90/min", 1.5), ("3600/h", 1.0), ("0.5", 0.5)):
        args = parser.parse_args(["tenants", "set", "--default", "--rate", text])
        assert args.rate == per_second, text


# explain ----------------------------------------------------------------------------------------


def test_explain_prints_what_holds_a_job_back(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    first = queue.enqueue(TENANT, "ingest_slack", {}, scheduled_at=queue.now().replace(year=2100))
    second = queue.enqueue(TENANT, "generate_digest", {}, depends_on=[first])
    status, out, err = run_cli(capsys, "explain", str(second))
    assert (status, err) == (0, "")
    assert out.startswith(f"Waiting on dependency {first}")
    assert out.count("\n") == 1


def test_explain_json_gives_reason_message_and_detail(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    later = queue.enqueue(TENANT, "ingest_slack", {}, scheduled_at=queue.now().replace(year=2100))
    status, out, _ = run_cli(capsys, "explain", "--json", str(later))
    assert status == 0
    answer = json.loads(out)
    assert set(answer) == {"reason", "message", "detail"}
    assert answer["reason"] == "scheduled"
    assert answer["message"].startswith("Scheduled for 2100")
    assert isinstance(answer["detail"], dict)


def test_explain_of_a_job_that_is_not_there_says_so_and_exits_0(
    cli_env: str, queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = uuid.uuid4()
    status, out, _ = run_cli(capsys, "explain", str(missing), "--json")
    assert status == 0
    assert json.loads(out)["reason"] == "not_found"
    assert str(missing) in json.loads(out)["message"]
