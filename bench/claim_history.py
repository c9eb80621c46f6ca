"""Does the claim slow down as history grows? Claim time on an empty table and with 1,000,000
completed jobs.

Two databases on the same server, both migrated: ``empty`` (no history) and ``history``
(1,000,000 completed jobs over 10 tenants and the 5 job types, inserted with one
``INSERT ... SELECT generate_series``, then ``VACUUM ANALYZE``). Each measurement enqueues 100
pending jobs in bulk (10 per tenant), then times one ``claim_jobs`` of up to 100 jobs through
``handler.store.QueueStore.claim`` (``max_per_tenant`` 10, the worker's default; the round trip
and the decoding of the 100 rows included) and settles them as completed with one
``settle_jobs``, as a batch would. The two tables are measured in turn (empty, history, empty,
...), 20 claims each; median (min-max). The ratio history / empty is the target (at most 2).

Run (under a minute here, most of it the bulk insert; writes ``bench/results/claim_history.md``)::

    python bench/claim_history.py --database-url postgresql://postgres@localhost:5432/postgres

Without ``--database-url`` an embedded PostgreSQL in a temporary folder is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from pathlib import Path
from typing import Any

import benchlib

CLAIMS = 20
BATCH = 100
PER_TENANT = 10
HISTORY = 1_000_000
TARGET_RATIO = 2.0
BULK_TIMEOUT_S = 1800.0
DATABASES = {"empty": "qw_bench_claim_empty", "history": "qw_bench_claim_history"}
PACKAGES = ("pg8000",)

# A million finished jobs, as a week or so of a busy queue leaves them: completed over the past
# week, every tenant and type, a few with an error history.
HISTORY_SQL = (
    "INSERT INTO queue_jobs (tenant_id, job_type, payload, status, attempts, scheduled_at,"
    " locked_by, last_error, errors, created_at, updated_at, completed_at)"
    " SELECT ('00000000-0000-4000-8000-' || lpad((i % 10)::text, 12, '0'))::uuid,"
    " (CAST(:job_types AS text[]))[1 + (i / 10) % 5], jsonb_build_object('seq', i), 'completed',"
    " 1 + (i % 50 = 0)::int, t, 'queue-worker:history', NULL, '[]'::jsonb, t, t, t"
    " FROM generate_series(1, :n) AS i,"
    " LATERAL (SELECT now() - interval '7 days' + i * interval '7 days' / :n AS t) AS x"
)


def prepare(admin_url: str, history: int) -> dict[str, str]:
    urls = {}
    for kind, name in DATABASES.items():
        urls[kind] = benchlib.recreate_database(admin_url, name)
        benchlib.install_queue_schema(urls[kind])
    conn = benchlib.connect(urls["history"], timeout=BULK_TIMEOUT_S)
    try:
        started = time.perf_counter()
        conn.run(HISTORY_SQL, job_types=list(benchlib.JOB_TYPES), n=history)
        conn.run("VACUUM ANALYZE queue_jobs")
        print(f"{history:,} completed jobs in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        conn.close()
    conn = benchlib.connect(urls["empty"])
    try:
        conn.run("VACUUM ANALYZE queue_jobs")
    finally:
        conn.close()
    return urls


def table_size(url: str) -> dict[str, Any]:
    conn = benchlib.connect(url)
    try:
        rows, table, indexes = conn.run(
            "SELECT (SELECT count(*) FROM queue_jobs),"
            " pg_size_pretty(pg_table_size('queue_jobs')),"
            " pg_size_pretty(pg_indexes_size('queue_jobs'))"
        )[0]
        return {"rows": int(rows), "table": table, "indexes": indexes}
    finally:
        conn.close()


def measure(urls: dict[str, str], claims: int) -> dict[str, list[dict[str, float]]]:
    from handler.queue.store import QueueStore, Settlement

    stores = {kind: QueueStore(benchlib.connect(url)) for kind, url in urls.items()}
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in stores}
    try:
        for call in range(claims + 1):  # the first round warms up and is not counted
            for kind, store in stores.items():
                store.conn.run(
                    benchlib.INSERT_JOBS_SQL, job_types=list(benchlib.JOB_TYPES), n=BATCH
                )
                worker = f"claim-history-{kind}-{call}"
                started = time.perf_counter()
                jobs = store.claim(
                    worker, lease_seconds=300, max_jobs=BATCH, max_per_tenant=PER_TENANT
                )
                claim_ms = (time.perf_counter() - started) * 1000
                started = time.perf_counter()
                store.settle(worker, [Settlement(j.id, j.attempt, "completed") for j in jobs])
                settle_ms = (time.perf_counter() - started) * 1000
                if len(jobs) != BATCH:
                    raise SystemExit(f"{kind}: claimed {len(jobs)} jobs, expected {BATCH}")
                if call:
                    samples[kind].append({"claim_ms": claim_ms, "settle_ms": settle_ms})
            if call:
                print(
                    f"claim {call}: "
                    + ", ".join(f"{k} {samples[k][-1]['claim_ms']:.1f} ms" for k in stores),
                    flush=True,
                )
    finally:
        for store in stores.values():
            store.conn.close()
    return samples


def plan_of_claim(url: str) -> str:
    """EXPLAIN of the claim's row-choosing statement is not reachable inside the function;
    show the index the live-job lookups use instead (the claim index, partial on live jobs)."""
    conn = benchlib.connect(url)
    try:
        rows = conn.run(
            "EXPLAIN (COSTS OFF) SELECT id FROM queue_jobs"
            " WHERE tenant_id = '00000000-0000-4000-8000-000000000001'"
            " AND status IN ('pending', 'processing') AND scheduled_at <= now()"
            " ORDER BY priority DESC, scheduled_at LIMIT 10"
        )
        return " / ".join(str(r[0]).strip() for r in rows)
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--claims", type=int, default=CLAIMS)
    parser.add_argument("--history", type=int, default=HISTORY, help="completed jobs")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL admin URL (default: an embedded server)",
    )
    parser.add_argument("--output", help="where to write the report (default bench/results/)")
    args = parser.parse_args()
    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    with benchlib.postgres(args.database_url) as admin_url:
        info["postgres"] = benchlib.server_version(admin_url)
        info["postgres_settings"] = benchlib.server_settings(admin_url)
        try:
            urls = prepare(admin_url, args.history)
            sizes = {kind: table_size(url) for kind, url in urls.items()}
            plan = plan_of_claim(urls["history"])
            samples = measure(urls, args.claims)
            after = {kind: table_size(url) for kind, url in urls.items()}
        finally:
            for name in DATABASES.values():
                benchlib.drop_database(admin_url, name)
    info["load_after"] = benchlib.load_average()
    claim = {k: [s["claim_ms"] for s in v] for k, v in samples.items()}
    settle = {k: [s["settle_ms"] for s in v] for k, v in samples.items()}
    ratio = statistics.median(claim["history"]) / statistics.median(claim["empty"])
    paired = [h / e for h, e in zip(claim["history"], claim["empty"], strict=True)]
    command = "python bench/claim_history.py"
    if args.database_url:
        command += " --database-url <PostgreSQL URL>"
    if args.history != HISTORY or args.claims != CLAIMS:
        command += f" --history {args.history} --claims {args.claims}"
    labels = {"empty": "empty table", "history": f"{args.history:,} completed jobs"}
    lines = [
        "# Claim time as history grows",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}), {info['memory']} RAM",
        f"- {info['python']} on {info['os']}; {info['packages']}; queue-worker at commit "
        f"{info['source']}",
        f"- PostgreSQL {info['postgres']} on this machine: {info['postgres_settings']}",
        f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']} "
        "(other work shares this machine)",
        "",
        "## Method",
        "",
        "- Two databases on the same server: an empty `queue_jobs`, and one holding "
        f"{args.history:,} completed jobs (one `INSERT ... SELECT generate_series`, completed "
        "over the past week, 10 tenants, 5 types); `VACUUM ANALYZE` on both.",
        f"- Each measurement: enqueue {BATCH} pending jobs in bulk ({PER_TENANT} per tenant), "
        f"time `QueueStore.claim(max_jobs={BATCH}, max_per_tenant={PER_TENANT})` (one "
        "`claim_jobs` call: round trip and decoding of the rows included), then settle them "
        "as completed with one `settle_jobs` (timed too). The two databases take turns; "
        f"{args.claims} claims each after one warm-up round; median (min-max).",
        "",
        "## Results",
        "",
        "| table | rows before | table size | index size | claim of 100, ms | settle of 100, ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in ("empty", "history"):
        lines.append(
            f"| {labels[kind]} | {sizes[kind]['rows']:,} | {sizes[kind]['table']} "
            f"| {sizes[kind]['indexes']} | {benchlib.fmt(claim[kind], 2)} "
            f"| {benchlib.fmt(settle[kind], 2)} |"
        )
    lines += [
        "",
        f"Ratio history / empty (claim): **{ratio:.2f}** (per round {min(paired):.2f}-"
        f"{max(paired):.2f}); target ≤ {TARGET_RATIO:g}: "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}.",
        "",
        f"Rows after the run: empty table {after['empty']['rows']:,}, history "
        f"{after['history']['rows']:,} (each claimed batch stays as completed history).",
        "",
        "The claim reads live jobs only through `queue_jobs_claim_idx`, partial on "
        "`status IN ('pending', 'processing')`, so finished jobs are not in its way. A "
        f"per-tenant lookup like the claim's, on the history table: `{plan}`.",
        "",
        "## Every claim",
        "",
        "| round | empty: claim ms | history: claim ms | empty: settle ms | history: settle ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i in range(len(claim["empty"])):
        lines.append(
            f"| {i + 1} | {claim['empty'][i]:.2f} | {claim['history'][i]:.2f} "
            f"| {settle['empty'][i]:.2f} | {settle['history'][i]:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    out_path = Path(args.output) if args.output else benchlib.RESULTS / "claim_history.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {out_path.name})")


if __name__ == "__main__":
    main()
