"""Pickup latency: from an enqueue's commit to the function receiving the POST, with one lingering
rounds-mode invocation, over a direct connection (LISTEN/NOTIFY) and through PgBouncer in
transaction mode (polling).

Each run: a fresh child process runs one scheduled invocation (``{"scheduled_time": ...}``, so it
lingers) with ``RUN_MODE=rounds``, ``IDEMPOTENCY_STORE=off``, and a budget of
``--budget`` seconds; its ``DATABASE_URL`` is either the server itself
(``DATABASE_POOL_MODE=session``: it LISTENs) or the same database through a real PgBouncer in
``pool_mode = transaction`` (tests/pgbouncer.py; ``DATABASE_POOL_MODE=transaction``: it polls).
Once it lingers (``queue_linger`` holds it), this process enqueues ``--jobs`` jobs one at a time
(``QueueStore.enqueue``, its own transaction each, over a direct connection), at random intervals
of ``--min-gap-ms`` to ``--max-gap-ms`` (uniform, seeded by the repetition, the same gaps for both
connections), and notes ``time.time()`` just after each COMMIT returns. The stand-in notes
``time.time()`` when each request's head has arrived (``received_at``); both clocks are this
machine's. Latency = received_at - commit time, per job (matched by the payload's ``seq``). The
functions answer at once (0 ms), so each job finds the invocation lingering, not busy.

Then the linger is taken over, as the next tick would, the invocation returns, and every job must
have been delivered exactly once and completed. The two connections take turns, ``--repeat``
times; percentiles per run, median (min-max) over the runs, and over every job of a connection.

Run (2-3 minutes; writes ``bench/results/pickup_latency.md``)::

    python bench/pickup_latency.py --database-url postgresql://postgres@localhost:5432/postgres
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time
from typing import Any
from uuid import UUID

import benchlib

JOBS = 200
MIN_GAP_MS = 20.0
MAX_GAP_MS = 200.0
REPETITIONS = 3
BUDGET_S = 300.0
POOL_SIZE = 2
DATABASE = "qw_bench_pickup"
PACKAGES = ("pg8000", "httpx", "h11", "aws-lambda-powertools")
MODES = {
    "direct": "direct connection (LISTEN/NOTIFY)",
    "pgbouncer": "PgBouncer, transaction mode (polling)",
}
TARGET_P50_MS = 100.0
TARGET_P99_MS = 1000.0
BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1000)


def one_run(
    mode: str, url: str, worker_url: str, standin: Any, args: argparse.Namespace, *, rep: int
) -> dict[str, Any]:
    from handler.queue.store import QueueStore

    benchlib.reset_queue(url)
    standin.reset()
    env = benchlib.worker_env(
        worker_url,
        standin.base_url,
        run_mode="rounds",
        database_pool_mode="session" if mode == "direct" else "transaction",
    )
    rng = random.Random(rep)
    gaps = [rng.uniform(args.min_gap_ms, args.max_gap_ms) / 1000 for _ in range(args.jobs)]
    committed: dict[int, float] = {}
    load = benchlib.load_average()
    with benchlib.Invocation(
        env, event=benchlib.SCHEDULED_EVENT, remaining_seconds=args.budget
    ) as invocation:
        invocation.wait_started()
        benchlib.wait_for_linger(url)
        conn = benchlib.connect(url)
        store = QueueStore(conn)
        try:
            for seq, gap in enumerate(gaps):
                time.sleep(gap)
                store.enqueue(UUID(benchlib.tenant_id(seq)), benchlib.job_type(seq), {"seq": seq})
                committed[seq] = time.time()  # just after COMMIT returned
        finally:
            conn.close()
        standin.wait_for_requests(args.jobs, timeout=60)
        benchlib.end_linger(url)
        result = invocation.result(timeout=60)
    requests = standin.requests()
    check = benchlib.delivery_check([r.body for r in requests], args.jobs)
    received: dict[int, float] = {}
    for request in requests:
        seq = request.body["payload"]["seq"]
        received.setdefault(seq, request.received_at)
    latencies = [1000 * (received[seq] - committed[seq]) for seq in sorted(received)]
    conn = benchlib.connect(url)
    try:
        states = dict(conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY status"))
        dead = int(conn.run("SELECT count(*) FROM queue_jobs_dead_letter")[0][0])
    finally:
        conn.close()
    summary = result["runs"][0]
    ok = (
        check["undelivered"] == 0
        and check["repeats"] == 0
        and int(states.get("completed", 0)) == args.jobs
        and dead == 0
    )
    run = {
        "mode": mode,
        "rep": rep,
        "load": load,
        "latencies_ms": latencies,
        "p50": benchlib.percentile(latencies, 50),
        "p90": benchlib.percentile(latencies, 90),
        "p99": benchlib.percentile(latencies, 99),
        "max": max(latencies),
        "claims": summary["rounds"],
        "lingered_ms": summary["lingered_ms"],
        "completed": summary["completed"],
        "cpu_s": result["cpu_s"],
        "ok": ok,
        "check": check,
    }
    print(
        f"rep {rep} {mode:<9} p50 {run['p50']:6.1f} ms p99 {run['p99']:7.1f} ms "
        f"max {run['max']:7.1f} ms claims {run['claims']} {'ok' if ok else 'CHECK FAILED'} "
        f"load {load}",
        flush=True,
    )
    return run


def report(runs: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    from handler.batch import linger

    command = benchlib.command_line(
        "pickup_latency.py",
        args,
        defaults={"jobs": JOBS, "repeat": REPETITIONS} if not args.quick else {},
    )
    lines = [
        "# Pickup latency: from an enqueue's commit to the function's POST",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        *benchlib.machine_lines(info),
        "## Method",
        "",
        "- One invocation in a fresh process: `Worker.run` of a scheduled event "
        '(`{"scheduled_time": ...}`, so it lingers when nothing is due) with `RUN_MODE=rounds`, '
        f"`IDEMPOTENCY_STORE=off`, a budget of {args.budget:.0f} s, 50 lanes. Its database is "
        "either the server itself (`DATABASE_POOL_MODE=session`: it LISTENs on "
        "`queue_worker_due`, which `enqueue_job` notifies) or the same database through PgBouncer "
        f"in `pool_mode = transaction` (pool of {POOL_SIZE} server connections; "
        "`DATABASE_POOL_MODE=transaction`: it polls `queue_linger_poll`, first after "
        f"{linger.FIRST_POLL_SECONDS * 1000:.0f} ms, doubling to at most "
        f"{linger.MAX_POLL_SECONDS * 1000:.0f} ms while nothing comes).",
        f"- Once it lingers, this process enqueues {args.jobs} jobs one at a time "
        "(`QueueStore.enqueue`: `enqueue_job` in a transaction of its own, over a direct "
        f"connection), {args.min_gap_ms:.0f}-{args.max_gap_ms:.0f} ms apart (uniform random, "
        "seeded by the repetition: both connections get the same gaps), noting `time.time()` "
        "just after each COMMIT returns. The stand-in (its own process) notes `time.time()` when "
        "a request's head has arrived. Latency = that minus the commit time, per job. The "
        "functions answer at once, so every job finds the invocation lingering.",
        "- Afterwards the linger is taken over, as the next tick would; the invocation returns. "
        "Checks: every job delivered exactly once, completed, none dead-lettered.",
        f"- The two connections take turns, {args.repeat} repetition(s); percentiles per run "
        "(interpolated), median (min-max) over the runs; and over every job of a connection.",
        "",
        "## Results",
        "",
        "| connection | p50 ms | p90 ms | p99 ms | max ms | p50 of all jobs | p99 of all jobs "
        "| claims per job | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    medians: dict[str, dict[str, float]] = {}
    for mode, label in MODES.items():
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        every = [x for r in mine for x in r["latencies_ms"]]
        medians[mode] = {k: statistics.median(r[k] for r in mine) for k in ("p50", "p99")}
        claims = [r["claims"] / args.jobs for r in mine]
        checks = "all delivered once, all completed" if all(r["ok"] for r in mine) else "FAILED"
        lines.append(
            f"| {label} | {benchlib.fmt([r['p50'] for r in mine], 1)} "
            f"| {benchlib.fmt([r['p90'] for r in mine], 1)} "
            f"| {benchlib.fmt([r['p99'] for r in mine], 1)} "
            f"| {benchlib.fmt([r['max'] for r in mine], 1)} "
            f"| {benchlib.percentile(every, 50):.1f} | {benchlib.percentile(every, 99):.1f} "
            f"| {statistics.median(claims):.2f} | {checks} |"
        )
    lines += ["", "## Targets", ""]
    if "direct" in medians:
        p50, p99 = medians["direct"]["p50"], medians["direct"]["p99"]
        lines += [
            f"- Direct connection, p50 (median of the runs): **{p50:.1f} ms**; target ≤ "
            f"{TARGET_P50_MS:.0f} ms: {benchlib.met(p50 <= TARGET_P50_MS)}.",
            f"- Direct connection, p99 (median of the runs): **{p99:.1f} ms**; target ≤ "
            f"{TARGET_P99_MS:.0f} ms: {benchlib.met(p99 <= TARGET_P99_MS)}.",
        ]
    if "pgbouncer" in medians:
        lines.append(
            f"- Through PgBouncer (polling; stated, no target): p50 "
            f"**{medians['pgbouncer']['p50']:.1f} ms**, p99 "
            f"**{medians['pgbouncer']['p99']:.1f} ms**."
        )
    lines += [
        "",
        "## Distribution (every job of a connection)",
        "",
        "| connection | "
        + " | ".join(
            f"{low}-{high} ms" for low, high in zip((0, *BUCKETS_MS), BUCKETS_MS, strict=False)
        )
        + f" | ≥ {BUCKETS_MS[-1]} ms |",
        "|---|" + "---:|" * (len(BUCKETS_MS) + 1),
    ]
    for mode, label in MODES.items():
        every = [x for r in runs if r["mode"] == mode for x in r["latencies_ms"]]
        if not every:
            continue
        counts, low = [], 0.0
        for bound in BUCKETS_MS:
            counts.append(sum(low <= x < bound for x in every))
            low = bound
        counts.append(sum(x >= BUCKETS_MS[-1] for x in every))
        lines.append(f"| {label} | " + " | ".join(str(c) for c in counts) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| rep | connection | p50 ms | p90 ms | p99 ms | max ms | claims | lingered s "
        "| worker CPU ms/job | check | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rep']} | {MODES[r['mode']]} | {r['p50']:.1f} | {r['p90']:.1f} "
            f"| {r['p99']:.1f} | {r['max']:.1f} | {r['claims']} | {r['lingered_ms'] / 1000:.1f} "
            f"| {1000 * r['cpu_s'] / args.jobs:.2f} | {'ok' if r['ok'] else r['check']} "
            f"| {r['load']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--min-gap-ms", type=float, default=MIN_GAP_MS)
    parser.add_argument("--max-gap-ms", type=float, default=MAX_GAP_MS)
    parser.add_argument("--repeat", type=int, default=REPETITIONS)
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="the invocation's seconds")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.repeat = 20, 1
    from handler.local.standin import StandIn

    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    info["pgbouncer"] = benchlib.pgbouncer_version()
    runs = []
    with benchlib.postgres(args.database_url) as admin_url:
        info.update(benchlib.describe_server(admin_url, bool(args.database_url)))
        url = benchlib.recreate_database(admin_url, DATABASE)
        try:
            benchlib.install_queue_schema(url)
            with (
                benchlib.pgbouncer(admin_url, pool_size=POOL_SIZE) as bouncer,
                StandIn(delay_ms=0, record=True) as standin,
            ):
                urls = {"direct": url, "pgbouncer": bouncer.url_like(url)}
                modes = list(MODES)
                for rep in range(1, args.repeat + 1):
                    order = modes if rep % 2 else modes[::-1]
                    for mode in order:
                        runs.append(one_run(mode, url, urls[mode], standin, args, rep=rep))
        finally:
            benchlib.drop_database(admin_url, DATABASE)
    info["load_after"] = benchlib.load_average()
    text = report(runs, info, args)
    path = benchlib.write_report("pickup_latency", text, args.output)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {path.name})")


if __name__ == "__main__":
    main()
