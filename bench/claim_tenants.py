"""Does the claim slow down with the number of tenants that have due work? A claim of 1,000 jobs
with 100 and with 10,000 such tenants, and a shard's claim against the whole claim.

Two databases on the same server, both migrated, each holding ``--pending`` (200,000) pending
jobs over its tenants (100 or 10,000) and the 5 job types, and ``--history`` (1,000,000) completed
jobs of the same tenants (finished over the past week), inserted in bulk through the table's
triggers (so ``queue_tenants`` knows every tenant's next due time), then ``VACUUM ANALYZE``.

A measurement is one ``claim_jobs`` through ``QueueStore.claim`` inside a transaction that is
rolled back afterwards, so that every claim sees the same queue (the same jobs, the same
tenants' clocks); the round trip and the decoding of the rows are included. Then ``VACUUM`` of
the queue's tables (not timed), so that the dead rows a rolled-back claim leaves do not pile up
in front of the next one. Two kinds of claim: the whole claim (``p_max_jobs`` 1,000,
``p_max_per_tenant`` 10, ``p_shards`` 1) and a shard's claim (``p_max_jobs`` 250, ``p_shards``
4, the shard turning 0, 1, 2, 3 from one claim to the next), as a fanned-out run's copies make
them. The databases and kinds take turns, ``--claims`` (40) each after a warm-up round; median
(min-max).

Then one claim of each kind and database again with ``auto_explain`` (``log_analyze``,
``log_buffers``, ``log_nested_statements``, its plans sent to this client as notices): the
time and buffers of each statement inside ``claim_jobs``, to say where the time goes.

Run (1-2 minutes, a third of it the bulk inserts; writes ``bench/results/claim_tenants.md``)::

    python bench/claim_tenants.py --database-url postgresql://postgres@localhost:5432/postgres
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import time
from collections import deque
from typing import Any

import benchlib

TENANT_COUNTS = (100, 10_000)
PENDING = 200_000
HISTORY = 1_000_000
CLAIMS = 40
PER_TENANT = 10
WHOLE = 1000
SHARDS = 4
TARGET_TENANTS_RATIO = 2.0
TARGET_SHARD_RATIO = 1.2
BULK_TIMEOUT_S = 1800.0
PACKAGES = ("pg8000",)
KINDS = {"whole": "whole claim (1,000 jobs)", "shard": f"a shard's claim (1 of {SHARDS}, 250)"}


def database_name(tenants: int) -> str:
    return f"qw_bench_claim_t{tenants}"


def prepare(admin_url: str, tenants: int, args: argparse.Namespace) -> str:
    url = benchlib.recreate_database(admin_url, database_name(tenants))
    benchlib.install_queue_schema(url)
    conn = benchlib.connect(url, timeout=BULK_TIMEOUT_S)
    try:
        started = time.perf_counter()
        benchlib.insert_jobs(conn, args.history, tenants=tenants, completed=True)
        benchlib.insert_jobs(conn, args.pending, tenants=tenants, first=args.history)
        print(
            f"{tenants:,} tenants: {args.pending:,} pending, {args.history:,} completed in "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    finally:
        conn.close()
    benchlib.vacuum(url, "queue_jobs", "queue_tenants")
    return url


def describe(url: str) -> dict[str, Any]:
    conn = benchlib.connect(url)
    try:
        rows, due, table, indexes = conn.run(
            "SELECT (SELECT count(*) FROM queue_jobs),"
            " (SELECT count(*) FROM queue_tenants WHERE next_due_at <= now()),"
            " pg_size_pretty(pg_table_size('queue_jobs')),"
            " pg_size_pretty(pg_indexes_size('queue_jobs'))"
        )[0]
        return {"rows": int(rows), "due_tenants": int(due), "table": table, "indexes": indexes}
    finally:
        conn.close()


def claim_arguments(kind: str, n: int) -> tuple[int, int, int]:
    """(max_jobs, shard, shards)."""
    if kind == "whole":
        return WHOLE, 0, 1
    return WHOLE // SHARDS, n % SHARDS, SHARDS


def timed_claim(conn: Any, kind: str, n: int) -> tuple[float, int]:
    """(ms, jobs) of one claim in a transaction rolled back afterwards."""
    from handler.queue.store import QueueStore

    store = QueueStore(conn)
    max_jobs, shard, shards = claim_arguments(kind, n)
    conn.run("BEGIN")
    try:
        started = time.perf_counter()
        jobs = store.claim(
            f"claim-tenants-{kind}-{n}",
            lease_seconds=300,
            max_jobs=max_jobs,
            max_per_tenant=PER_TENANT,
            shard=shard,
            shards=shards,
        )
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        conn.run("ROLLBACK")
    return elapsed, len(jobs)


def measure(urls: dict[int, str], claims: int) -> list[dict[str, Any]]:
    conns = {tenants: benchlib.connect(url, timeout=600) for tenants, url in urls.items()}
    samples = []
    try:
        for n in range(claims + 1):  # the first round warms up and is not counted
            for tenants, conn in conns.items():
                for kind in KINDS:
                    ms, jobs = timed_claim(conn, kind, n)
                    conn.run("VACUUM queue_jobs, queue_tenants")
                    if n:
                        samples.append(
                            {"round": n, "tenants": tenants, "kind": kind, "ms": ms, "jobs": jobs}
                        )
            if n:
                print(
                    f"round {n}: "
                    + ", ".join(
                        f"{s['tenants']} {s['kind']} {s['ms']:.1f} ms ({s['jobs']})"
                        for s in samples
                        if s["round"] == n
                    ),
                    flush=True,
                )
    finally:
        for conn in conns.values():
            conn.close()
    return samples


_DURATION = re.compile(r"duration: ([\d.]+) ms")
_BUFFERS = re.compile(r"Buffers: ([^\n]+)")
_CLAIM_LINE = re.compile(
    r"^PL/pgSQL function queue_worker\.claim_jobs\(.*?\) line (\d+)", re.MULTILINE
)
_FUNCTION = re.compile(r'^(?:SQL function "|PL/pgSQL function )([\w.]+)', re.MULTILINE)


def _field(notice: dict[Any, Any], key: str) -> str:
    value = notice.get(key.encode(), notice.get(key, b""))
    return value.decode() if isinstance(value, bytes) else str(value)


def explain(url: str, kind: str) -> dict[str, Any]:
    """One claim as auto_explain saw it: each statement claim_jobs runs (by its line in the
    function), with its time, top plan node and buffers, and the calls of other functions made
    inside those statements (counted, not added: their time is inside their statement's)."""
    conn = benchlib.connect(url, timeout=600)
    try:
        conn.run("LOAD 'auto_explain'")
        for setting, value in (
            ("log_min_duration", "0"),
            ("log_analyze", "on"),
            ("log_buffers", "on"),
            ("log_timing", "on"),
            ("log_nested_statements", "on"),
            ("log_level", "notice"),
        ):
            conn.run(f"SET auto_explain.{setting} = {value}")
        conn.notices = deque(maxlen=1_000_000)  # pg8000 keeps the last 100 only
        ms, jobs = timed_claim(conn, kind, 1)
        notices = list(conn.notices)
    finally:
        conn.close()
    statements = []
    nested: dict[str, list[float]] = {}
    total = None
    for notice in notices:
        message, context = _field(notice, "M"), _field(notice, "W")
        found = _DURATION.search(message)
        if not found:
            continue
        duration = float(found.group(1))
        lines = message.split("Query Text:", 1)[-1].strip("\n").splitlines()
        # The query text runs over several lines; the plan starts at its first node.
        start = next((i for i, line in enumerate(lines) if "(actual" in line), len(lines))
        query, plan = " ".join(x.strip() for x in lines[:start]), lines[start:]
        # The context, innermost first (a statement's text spans lines): a statement of
        # claim_jobs itself has no other function's frame before claim_jobs' own.
        at = _CLAIM_LINE.search(context)
        inner = _FUNCTION.search(context[: at.start()] if at else context)
        if not context:
            total = duration
        elif at is not None and inner is None:
            buffers = _BUFFERS.search("\n".join(plan))
            statements.append(
                {
                    "line": int(at.group(1)),
                    "ms": duration,
                    "query": query,
                    "top": plan[0].strip() if plan else "",
                    "buffers": buffers.group(1).strip() if buffers else "",
                    "plan": "\n".join(plan),
                }
            )
        else:
            name = inner.group(1) if inner else context.splitlines()[0][:60]
            nested.setdefault(name, []).append(duration)
    return {
        "claim_ms": ms,
        "jobs": jobs,
        "total_ms": total,
        "statements": statements,
        "nested": {name: (len(v), sum(v)) for name, v in nested.items()},
    }


def short(query: str, limit: int = 110) -> str:
    query = re.sub(r"\s+", " ", query)
    return query if len(query) <= limit else query[: limit - 1] + "…"


def report(
    samples: list[dict[str, Any]],
    sizes: dict[int, dict[str, Any]],
    plans: dict[tuple[int, str], dict[str, Any]],
    info: dict[str, str],
    args: argparse.Namespace,
) -> str:
    command = benchlib.command_line(
        "claim_tenants.py",
        args,
        defaults={} if args.quick else {"pending": PENDING, "history": HISTORY, "claims": CLAIMS},
    )

    def ms_of(tenants: int, kind: str) -> list[float]:
        return [s["ms"] for s in samples if s["tenants"] == tenants and s["kind"] == kind]

    def median(tenants: int, kind: str) -> float:
        return statistics.median(ms_of(tenants, kind))

    low, high = TENANT_COUNTS
    lines = [
        "# Claim time and the number of tenants with due work",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        *benchlib.machine_lines(info),
        "## Method",
        "",
        f"- Two databases on the same server, one with {low:,} and one with {high:,} tenants: "
        f"each holds {args.pending:,} pending jobs of its tenants (due now, 5 job types) and "
        f"{args.history:,} completed ones (finished over the past week), inserted in bulk "
        "through the table's triggers (so that `queue_tenants` knows each tenant's next due "
        "time), then `VACUUM ANALYZE`.",
        "- One measurement: `QueueStore.claim` (one `claim_jobs` call: round trip and decoding "
        "of the rows included) inside a transaction rolled back afterwards, so that every claim "
        "sees the same jobs and the same tenants' clocks; then `VACUUM` of `queue_jobs` and "
        "`queue_tenants`, not timed, so that the rows a rolled-back claim leaves dead do not "
        "pile up in front of the next claim.",
        f"- Claims: the whole claim (`p_max_jobs` {WHOLE:,}, `p_max_per_tenant` {PER_TENANT}, "
        f"`p_shards` 1) and a shard's (`p_max_jobs` {WHOLE // SHARDS}, `p_shards` {SHARDS}, the "
        "shard turning from one claim to the next). Databases and kinds take turns; "
        f"{args.claims} claims of each after a warm-up round; median (min-max).",
        "- Where the time goes: one claim of each kind again with `auto_explain` "
        "(`log_analyze`, `log_buffers`, `log_timing`, `log_nested_statements`), each statement "
        "inside `claim_jobs` with its time and buffers (timing every plan node slows the claim "
        "down: these times are larger than the measured ones, and only their proportions "
        "count).",
        "",
        "## Results",
        "",
        "| tenants with due work | rows in queue_jobs | table size | index size "
        "| whole claim ms | jobs | a shard's claim ms | jobs | shard / (whole / 4) "
        "| the same per job claimed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for tenants in TENANT_COUNTS:
        size = sizes[tenants]
        jobs = {
            kind: statistics.median(
                s["jobs"] for s in samples if s["tenants"] == tenants and s["kind"] == kind
            )
            for kind in KINDS
        }
        lines.append(
            f"| {size['due_tenants']:,} | {size['rows']:,} | {size['table']} | {size['indexes']} "
            f"| {benchlib.fmt(ms_of(tenants, 'whole'), 2)} | {jobs['whole']:,.0f} "
            f"| {benchlib.fmt(ms_of(tenants, 'shard'), 2)} | {jobs['shard']:,.0f} "
            f"| {median(tenants, 'shard') / (median(tenants, 'whole') / SHARDS):.2f} "
            f"| {(median(tenants, 'shard') / jobs['shard']) / (median(tenants, 'whole') / jobs['whole']):.2f} |"
        )
    ratio = median(high, "whole") / median(low, "whole")
    paired = [
        h["ms"] / lo["ms"]
        for h in samples
        if h["tenants"] == high and h["kind"] == "whole"
        for lo in samples
        if lo["tenants"] == low and lo["kind"] == "whole" and lo["round"] == h["round"]
    ]
    lines += [
        "",
        "## Targets",
        "",
        f"- Whole claim, {high:,} tenants / {low:,} tenants: **{ratio:.2f}×** (per round "
        f"{min(paired):.2f}-{max(paired):.2f}); target ≤ {TARGET_TENANTS_RATIO:g}×: "
        f"{benchlib.met(ratio <= TARGET_TENANTS_RATIO)}.",
    ]
    for tenants in TENANT_COUNTS:
        shard_ratio = median(tenants, "shard") / (median(tenants, "whole") / SHARDS)
        rounds = sorted({s["round"] for s in samples})
        pairs = [
            statistics.median(
                s["ms"]
                for s in samples
                if s["tenants"] == tenants and s["kind"] == "shard" and s["round"] == n
            )
            / (
                statistics.median(
                    s["ms"]
                    for s in samples
                    if s["tenants"] == tenants and s["kind"] == "whole" and s["round"] == n
                )
                / SHARDS
            )
            for n in rounds
        ]
        lines.append(
            f"- A shard's claim with {tenants:,} tenants: {median(tenants, 'shard'):.2f} ms "
            f"against {median(tenants, 'whole'):.2f} / {SHARDS} = "
            f"{median(tenants, 'whole') / SHARDS:.2f} ms, **{shard_ratio:.2f}×**; target ≤ "
            f"{TARGET_SHARD_RATIO:g}×: {benchlib.met(shard_ratio <= TARGET_SHARD_RATIO)} "
            f"(the ratio within each round, shard and whole claim back to back: median "
            f"{statistics.median(pairs):.2f}×, {min(pairs):.2f}-{max(pairs):.2f}). "
            "(A shard's tenants are those whose key falls in its quarter: with few tenants a "
            "shard may hold fewer than a quarter of them, and claim fewer jobs; the last column "
            "above compares the time per job claimed.)"
        )
    lines += ["", "## Where the time goes (auto_explain, one claim each)", ""]
    for (tenants, kind), seen in plans.items():
        inner = seen["statements"]
        whole = sum(st["ms"] for st in inner) or 1.0
        lines += [
            f"### {tenants:,} tenants, {KINDS[kind]}: {seen['jobs']} jobs, "
            f"{seen['claim_ms']:.1f} ms under auto_explain (the statement "
            f"{seen['total_ms'] or 0:.1f} ms; its statements {whole:.1f} ms)",
            "",
            "| line | statement inside claim_jobs | ms | share | top plan node "
            "| buffers (top node) |",
            "|---:|---|---:|---:|---|---|",
        ]
        for st in sorted(inner, key=lambda st: -st["ms"])[:8]:
            lines.append(
                f"| {st['line']} | `{short(st['query'])}` | {st['ms']:.2f} "
                f"| {100 * st['ms'] / whole:.0f}% | `{short(st['top'], 70)}` | {st['buffers']} |"
            )
        if seen["nested"]:
            lines += [
                "",
                "Functions called inside those statements (their time is part of the "
                "statement's): "
                + "; ".join(
                    f"`{name}` {count:,} calls, {ms:.1f} ms"
                    for name, (count, ms) in sorted(seen["nested"].items())
                )
                + ".",
            ]
        lines.append("")
    heaviest = max(
        ((key, st) for key, seen in plans.items() for st in seen["statements"]),
        key=lambda item: item[1]["ms"],
        default=None,
    )
    if heaviest is not None:
        (tenants, kind), st = heaviest
        lines += [
            f"The heaviest statement ({tenants:,} tenants, {KINDS[kind]}, line {st['line']} of "
            "claim_jobs), its plan:",
            "",
            "```",
            short(st["query"], 400),
            st["plan"],
            "```",
            "",
        ]
    lines += [
        "## Every claim",
        "",
        "| round | "
        + " | ".join(f"{t:,} tenants: {kind} ms" for t in TENANT_COUNTS for kind in KINDS)
        + " |",
        "|---:|" + "---:|" * (len(TENANT_COUNTS) * len(KINDS)),
    ]
    for n in sorted({s["round"] for s in samples}):
        cells = []
        for tenants in TENANT_COUNTS:
            for kind in KINDS:
                found = [
                    s["ms"]
                    for s in samples
                    if s["round"] == n and s["tenants"] == tenants and s["kind"] == kind
                ]
                cells.append(f"{found[0]:.2f}" if found else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pending", type=int, default=PENDING)
    parser.add_argument("--history", type=int, default=HISTORY, help="completed jobs")
    parser.add_argument("--claims", type=int, default=CLAIMS)
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.pending, args.history, args.claims = 20_000, 20_000, 2
    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    with benchlib.postgres(args.database_url) as admin_url:
        info.update(benchlib.describe_server(admin_url, bool(args.database_url)))
        try:
            urls = {tenants: prepare(admin_url, tenants, args) for tenants in TENANT_COUNTS}
            sizes = {tenants: describe(url) for tenants, url in urls.items()}
            samples = measure(urls, args.claims)
            plans = {
                (tenants, kind): explain(url, kind)
                for tenants, url in urls.items()
                for kind in KINDS
            }
        finally:
            for tenants in TENANT_COUNTS:
                benchlib.drop_database(admin_url, database_name(tenants))
    info["load_after"] = benchlib.load_average()
    text = report(samples, sizes, plans, info, args)
    path = benchlib.write_report("claim_tenants", text, args.output)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {path.name})")


if __name__ == "__main__":
    main()
