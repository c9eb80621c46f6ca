"""Rounds under a backlog larger than one invocation can drain: jobs/s sustained over a 60 s
budget by one invocation in rounds mode, 50 in flight, 50 ms functions, and CPU per job.

Each repetition: ``--jobs`` (80,000) pending jobs over 10 tenants and the 5 job types of the
default routes, inserted in bulk (``VACUUM ANALYZE``, ``CHECKPOINT``), then a fresh child process
runs one invocation, ``Worker.run(parse_event({}), remaining_seconds=60)``, with
``RUN_MODE=rounds``, ``MAX_CONCURRENCY=50``, ``MAX_JOBS_PER_TENANT=100000`` (so that the
per-tenant share never binds), ``IDEMPOTENCY_STORE=off``. The functions (the stand-in, its own
process) answer 200 after 50 ms, so 50 calls in flight bound the rate at 1,000 jobs/s.

Throughput: jobs completed / the invocation's duration (``duration_ms`` of its summary: from the
start of the run to its return, so the start, the last settle and the end of the budget, when no
call may start any more, count against it). Also the stand-in's requests per 5 s window. CPU:
the worker process's CPU time, the stand-in's, and that of the server processes that served the
run (its backends, reaped at exit), each per job. Checks: no job delivered twice, every delivered
job completed in the database and none left processing or dead-lettered.

Run (3-4 minutes; writes ``bench/results/rounds.md``)::

    python bench/rounds.py --database-url postgresql://postgres@localhost:5432/postgres
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from typing import Any

import benchlib

JOBS = 80_000
BUDGET_S = 60.0
CONCURRENCY = 50
DELAY_MS = 50.0
REPETITIONS = 3
TARGET_SHARE = 0.85
WINDOW_S = 5.0
DATABASE = "qw_bench_rounds"
PACKAGES = ("pg8000", "httpx", "h11", "aws-lambda-powertools")


def one_run(
    url: str, standin: Any, args: argparse.Namespace, *, rep: int, postmaster: int | None
) -> dict[str, Any]:
    benchlib.reset_queue(url)
    conn = benchlib.connect(url, timeout=600)
    try:
        benchlib.insert_jobs(conn, args.jobs)
    finally:
        conn.close()
    benchlib.vacuum(url)
    standin.reset()
    env = benchlib.worker_env(
        url,
        standin.base_url,
        run_mode="rounds",
        max_concurrency=str(CONCURRENCY),
        max_jobs_per_tenant="100000",
    )
    load = benchlib.load_average()
    standin0 = benchlib.cpu_seconds(standin.pid)
    db0 = benchlib.cpu_seconds(postmaster, children=True) if postmaster else None
    # Every call's latency as the worker measured it, and its calls in flight each second.
    with benchlib.Invocation(env, remaining_seconds=args.budget, sample_every=1.0) as invocation:
        result = invocation.result(timeout=args.budget + 120)
    time.sleep(0.3)  # the child's backends exit and are reaped by the server
    standin1 = benchlib.cpu_seconds(standin.pid)
    db1 = benchlib.cpu_seconds(postmaster, children=True) if postmaster else None
    summary = result["runs"][0]
    requests = standin.requests()
    check = benchlib.delivery_check([r.body for r in requests], args.jobs)
    conn = benchlib.connect(url)
    try:
        states = {
            k: int(v)
            for k, v in conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY status")
        }
        dead = int(conn.run("SELECT count(*) FROM queue_jobs_dead_letter")[0][0])
    finally:
        conn.close()
    completed = summary["completed"]
    ok = (
        check["repeats"] == 0
        and check["foreign"] == 0
        and states.get("completed", 0) == completed == check["requests"]
        and states.get("processing", 0) == 0
        and dead == 0
    )
    received = [r.received_at for r in requests]
    start = summary["started_at"]
    counts = benchlib.windows(received, WINDOW_S, start)
    duration = summary["duration_ms"] / 1000
    # Calls in flight at the function, on average over the run: how full the 50 lanes kept it.
    busy = sum(r.answered_at - r.received_at for r in requests if r.answered_at is not None)
    latencies = [call[3] for call in result["calls"] if call[3] is not None]
    run = {
        "rep": rep,
        "load": load,
        "completed": completed,
        "duration_s": duration,
        "rate": completed / duration,
        "claims": summary["rounds"],
        "settles": summary["settle_statements"],
        "released": summary["released"],
        "retried": summary["retried"],
        "windows": [c / WINDOW_S for c in counts],
        "first_request_s": min(received) - start if received else None,
        "last_answer_s": max(r.answered_at or 0 for r in requests) - start if requests else None,
        "in_flight": busy / duration,
        "worker_in_flight": sum(latencies) / 1000 / duration,
        "latency_p50": benchlib.percentile(latencies, 50) if latencies else None,
        "latency_p90": benchlib.percentile(latencies, 90) if latencies else None,
        "cpu_ms": 1000 * result["cpu_s"] / completed,
        "standin_ms": None
        if standin0 is None or standin1 is None
        else 1000 * (standin1 - standin0) / completed,
        "db_ms": None if db0 is None or db1 is None else 1000 * (db1 - db0) / completed,
        "rss": result["peak_rss_mib"],
        "left": states.get("pending", 0),
        "ok": ok,
        "check": {**check, "states": states, "dead": dead},
    }
    print(
        f"rep {rep}: {completed:,} jobs in {duration:.1f} s = {run['rate']:,.0f} jobs/s, "
        f"worker CPU {run['cpu_ms']:.2f} ms/job, claims {run['claims']}, "
        f"{'ok' if ok else 'CHECK FAILED ' + str(run['check'])}, load {load}",
        flush=True,
    )
    return run


def report(runs: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    from handler.batch import budget, runner

    command = benchlib.command_line(
        "rounds.py",
        args,
        defaults={} if args.quick else {"jobs": JOBS, "budget": BUDGET_S, "repeat": REPETITIONS},
    )
    bound = CONCURRENCY / (args.delay_ms / 1000)
    rates = [r["rate"] for r in runs]
    median = statistics.median(rates)
    margin = max(budget.MIN_SAFETY_MARGIN_SECONDS, args.budget * budget.SAFETY_MARGIN_FRACTION)
    last_start = args.budget - margin - budget.MIN_CALL_SECONDS
    ok = all(r["ok"] for r in runs)

    def optional(key: str) -> str:
        values = [r[key] for r in runs if r[key] is not None]
        return benchlib.fmt(values, 2) if values else "n/a"

    parts = [
        statistics.median(r[key] for r in runs if r[key] is not None)
        for key in ("cpu_ms", "standin_ms", "db_ms")
        if any(r[key] is not None for r in runs)
    ]
    together = (
        f"; together {sum(parts):.2f} ms a job, {sum(parts) * bound / 1000:.2f} cores at "
        f"{bound:,.0f} jobs/s"
        if len(parts) == 3
        else ""
    )
    lines = [
        "# Rounds: one invocation against a backlog it cannot drain",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        *benchlib.machine_lines(info),
        "## Method",
        "",
        f"- Backlog: {args.jobs:,} pending jobs, 10 tenants, the 5 job types of the default "
        "routes, inserted in bulk before each repetition (`VACUUM ANALYZE`, `CHECKPOINT`).",
        f"- One invocation in a fresh process: `Worker.run(parse_event({{}}), "
        f"remaining_seconds={args.budget:.0f})` with `RUN_MODE=rounds`, "
        f"`MAX_CONCURRENCY={CONCURRENCY}`, `MAX_JOBS_PER_TENANT=100000` (the tenants' share "
        "never binds), `IDEMPOTENCY_STORE=off`; the stand-in (its own process) answers 200 "
        f"after {args.delay_ms:.0f} ms, so the bound is {CONCURRENCY} / "
        f"{args.delay_ms / 1000:g} s = {bound:,.0f} jobs/s. A round claims as many jobs as lanes "
        f"are free once {runner.ROUND_CLAIM_SHARE:.0%} of them are; rounds settle every "
        f"{runner.ROUND_SETTLE_SECONDS * 1000:.0f} ms.",
        f"- Throughput: jobs completed / the invocation's `duration_ms` (start of the run to its "
        f"return). The budget keeps a safety margin of {margin:.0f} s and starts no call with "
        f"less than {budget.MIN_CALL_SECONDS:.0f} s to go, so calls start only during the first "
        f"{last_start:.0f} s; that tail counts against the figure too.",
        "- Per 5 s window: the stand-in's requests received (from the run's start). Calls in "
        "flight at the function: the sum of the requests' time at the stand-in (received to "
        f"answered) over the run's duration; {CONCURRENCY} would be every lane busy all along. "
        "At the worker: the same from each call's latency as the worker measured it (recorded "
        "inside its process when the call gives its slot back; it only reads). The difference "
        "between the two is time a call spends in the worker and the network, not at the "
        "function; lanes not in a call at all wait for the next round's jobs.",
        "- CPU per job: the worker process (all its threads), the stand-in process over the run, "
        "and the PostgreSQL backends that served the run (reaped at exit).",
        "- Checks: no job delivered twice; the database's completed count equals the "
        "summary's and the stand-in's requests; nothing left processing; no dead letters.",
        f"- {args.repeat} repetition(s); median (min-max).",
        "",
        "## Results",
        "",
        "| jobs/s | % of the bound | completed | invocation s | claims | settles "
        "| worker CPU ms/job | stand-in CPU ms/job | DB CPU ms/job | peak RSS MiB | check |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {benchlib.fmt(rates, 0)} | {100 * median / bound:.1f}% "
        f"| {benchlib.fmt([r['completed'] for r in runs], 0)} "
        f"| {benchlib.fmt([r['duration_s'] for r in runs], 1)} "
        f"| {benchlib.fmt([r['claims'] for r in runs], 0)} "
        f"| {benchlib.fmt([r['settles'] for r in runs], 0)} "
        f"| {optional('cpu_ms')} | {optional('standin_ms')} | {optional('db_ms')} "
        f"| {benchlib.fmt([r['rss'] for r in runs], 0)} "
        f"| {'no repeats, all settled, none dead' if ok else 'FAILED'} |",
        "",
        "## Targets",
        "",
        f"- Jobs/s sustained over the {args.budget:.0f} s budget: **{median:,.0f}** "
        f"({100 * median / bound:.1f}% of the {bound:,.0f} jobs/s bound); target ≥ "
        f"{TARGET_SHARE:.0%} ({TARGET_SHARE * bound:,.0f} jobs/s): "
        f"{benchlib.met(median >= TARGET_SHARE * bound and ok)}.",
        f"- CPU per job (stated): worker {optional('cpu_ms')} ms, stand-in "
        f"{optional('standin_ms')} ms, PostgreSQL {optional('db_ms')} ms{together}. On 2 "
        f"cores, {bound:,.0f} jobs/s leaves {2000 / bound:.1f} ms of CPU per job for all three "
        "and whatever else runs.",
        "",
        "## Requests per second, per 5 s window",
        "",
        "| rep | "
        + " | ".join(
            f"{int(k * WINDOW_S)}-{int((k + 1) * WINDOW_S)} s"
            for k in range(max(len(r["windows"]) for r in runs))
        )
        + " |",
        "|---:|" + "---:|" * max(len(r["windows"]) for r in runs),
    ]
    for r in runs:
        lines.append(f"| {r['rep']} | " + " | ".join(f"{w:,.0f}" for w in r["windows"]) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| rep | jobs/s | completed | invocation s | first request s | last answer s "
        "| calls in flight at the function (mean) | calls in flight at the worker (mean) "
        "| worker's call latency p50 / p90 ms | claims | released | retried | left pending "
        "| worker CPU ms/job | check | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rep']} | {r['rate']:,.0f} | {r['completed']:,} | {r['duration_s']:.2f} "
            f"| {r['first_request_s']:.2f} | {r['last_answer_s']:.2f} | {r['in_flight']:.1f} "
            f"| {r['worker_in_flight']:.1f} | {r['latency_p50']:.1f} / {r['latency_p90']:.1f} "
            f"| {r['claims']:,} "
            f"| {r['released']:,} | {r['retried']:,} | {r['left']:,} | {r['cpu_ms']:.2f} "
            f"| {'ok' if r['ok'] else r['check']} | {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="the invocation's seconds")
    parser.add_argument("--delay-ms", type=float, default=DELAY_MS)
    parser.add_argument("--repeat", type=int, default=REPETITIONS)
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.budget, args.repeat = 8_000, 10.0, 1
    from handler.local.standin import StandIn

    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    runs = []
    with benchlib.postgres(args.database_url) as admin_url:
        info.update(benchlib.describe_server(admin_url, bool(args.database_url)))
        postmaster = benchlib.postmaster_pid(admin_url)
        url = benchlib.recreate_database(admin_url, DATABASE)
        try:
            benchlib.install_queue_schema(url)
            with StandIn(delay_ms=args.delay_ms, record=True) as standin:
                for rep in range(1, args.repeat + 1):
                    runs.append(one_run(url, standin, args, rep=rep, postmaster=postmaster))
        finally:
            benchlib.drop_database(admin_url, DATABASE)
    info["load_after"] = benchlib.load_average()
    text = report(runs, info, args)
    path = benchlib.write_report("rounds", text, args.output)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {path.name})")


if __name__ == "__main__":
    main()
