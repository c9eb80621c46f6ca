"""Flow control under load: a function's rate limit across concurrent invocations, the adaptive
limit of calls in flight against a function that refuses more than 8, and weighted tenants.

Three measurements, each run in fresh child processes (the worker's real code path,
``Worker.run`` with ``RUN_MODE=rounds``, ``IDEMPOTENCY_STORE=off`` but in b), against the stand-in
functions (their own process, 50 ms per call), taking turns ``--repeat`` times:

a. ``rate``: four processes, each its own Worker, each running rounds invocations back to back
   (a direct invocation ends when nothing is due; the next one starts at once, or after 50 ms
   when the last one claimed nothing), against 400 jobs of one function limited to 10 requests/s
   (``JOB_ROUTES`` ``{"ingest_slack": {"function": "ingest-slack", "rate": "10/s", "burst":
   2}}``). The stand-in's requests per second in each 5 s window (from ``received_at``, from the
   first request), and the most in any 5 s window (sliding); every job completed, none
   dead-lettered.
b. ``adaptive``: the function answers 429 at once to a call that arrives while 8 are in flight
   (the stand-in's ``max_in_flight`` 8); one invocation, 50 lanes, a backlog it cannot drain.
   The worker's adaptive limit for the function (sampled every 100 ms inside the worker's
   process) and each call's answer as the worker saw it, with ``IDEMPOTENCY_STORE=postgres`` (the
   default; see the report for why); after 20 s the stand-in's limit is
   lifted (reconfigured), and the time the limit takes to climb back to its cap (50).
c. ``weights``: two tenants of weights 1 and 3 (``set_tenant_limits``), 50,000 jobs each, one
   invocation with a 60 s budget, 50 lanes: each tenant's share of the requests, overall and per
   10 s, with ``MAX_JOBS_PER_TENANT`` 10 (the default) and 100.

Run (about 10 minutes; writes ``bench/results/flow_control.md``)::

    python bench/flow_control.py --database-url postgresql://postgres@localhost:5432/postgres

``--parts rate adaptive weights`` runs some of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import time
from collections import Counter
from typing import Any
from uuid import UUID

import benchlib

DELAY_MS = 50.0
REPETITIONS = 3
DATABASE = "qw_bench_flow"
PACKAGES = ("pg8000", "httpx", "h11", "aws-lambda-powertools")
FUNCTION = "ingest-slack"
JOB_TYPE = "ingest_slack"

# a. rate
RATE_JOBS = 400
RATE = 10.0
BURST = 2
RATE_INVOCATIONS = 4
RATE_WINDOW_S = 5.0
RATE_TOLERANCE = 0.10
RATE_TIMEOUT_S = 180.0

# b. adaptive
ADAPTIVE_JOBS = 60_000
REFUSE_ABOVE = 8
LIFT_AT_S = 20.0
ADAPTIVE_BUDGET_S = 50.0
CAP = 50
SETTLE_WITHIN_S = 10.0
REFUSED_SHARE = 0.05

# c. weights
WEIGHT_JOBS = 50_000  # per tenant
WEIGHTS = (1.0, 3.0)
WEIGHT_BUDGET_S = 60.0
PER_TENANT = (10, 100)
SHARE_POINTS = 5.0
SHARE_WINDOW_S = 10.0

PARTS = ("rate", "adaptive", "weights")


def database_states(url: str) -> tuple[dict[str, int], int]:
    conn = benchlib.connect(url)
    try:
        states = {
            str(k): int(v)
            for k, v in conn.run("SELECT status, count(*) FROM queue_jobs GROUP BY status")
        }
        dead = int(conn.run("SELECT count(*) FROM queue_jobs_dead_letter")[0][0])
    finally:
        conn.close()
    return states, dead


def insert(url: str, n: int, *, tenants: int) -> None:
    conn = benchlib.connect(url, timeout=600)
    try:
        benchlib.insert_jobs(conn, n, tenants=tenants, job_types=[JOB_TYPE])
    finally:
        conn.close()
    benchlib.vacuum(url)


# --------------------------------------------------------------------------------------------
# a. A function's rate across four concurrent invocations
# --------------------------------------------------------------------------------------------


def run_rate(url: str, standin: Any, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    jobs = args.rate_jobs
    benchlib.reset_queue(url)
    insert(url, jobs, tenants=benchlib.TENANTS)
    standin.reset()
    routes = {JOB_TYPE: {"function": FUNCTION, "rate": f"{RATE:g}/s", "burst": BURST}}
    env = benchlib.worker_env(
        url, standin.base_url, run_mode="rounds", job_routes=json.dumps(routes)
    )
    load = benchlib.load_average()
    invocations = [
        benchlib.Invocation(env, remaining_seconds=30, repeat=True) for _ in range(RATE_INVOCATIONS)
    ]
    started = time.monotonic()
    for invocation in invocations:
        invocation.start()
    try:
        while time.monotonic() - started < RATE_TIMEOUT_S:
            states, dead = database_states(url)
            if states.get("completed", 0) + dead >= jobs:
                break
            time.sleep(0.25)
        for invocation in invocations:
            invocation.stop()
        results = [invocation.result(timeout=90) for invocation in invocations]
    finally:
        for invocation in invocations:
            invocation.kill()
    states, dead = database_states(url)
    requests = standin.requests()
    check = benchlib.delivery_check([r.body for r in requests], jobs)
    received = sorted(r.received_at for r in requests)
    counts = benchlib.windows(received, RATE_WINDOW_S, received[0]) if received else []
    # Full windows only: the last one ends when the jobs run out.
    full = [c / RATE_WINDOW_S for c in counts[:-1]] if len(counts) > 1 else []
    sliding = max(
        (
            sum(1 for t in received[i:] if t < start + RATE_WINDOW_S)
            for i, start in enumerate(received)
        ),
        default=0,
    )
    run = {
        "rep": rep,
        "load": load,
        "windows": full,
        "last_window": counts[-1] / RATE_WINDOW_S if counts else 0.0,
        "sliding_max": sliding / RATE_WINDOW_S,
        "span_s": received[-1] - received[0] if received else 0.0,
        "overall": (len(received) - 1) / (received[-1] - received[0]) if len(received) > 1 else 0.0,
        "completed": states.get("completed", 0),
        "dead": dead,
        "check": check,
        "invocations": [len(r["runs"]) for r in results],
        "claimed": [sum(x["claimed"] for x in r["runs"]) for r in results],
        "claims": [sum(x["rounds"] for x in r["runs"]) for r in results],
        "ok": states.get("completed", 0) == jobs
        and dead == 0
        and check["undelivered"] == 0
        and check["repeats"] == 0,
    }
    print(
        f"rep {rep} rate: windows {', '.join(f'{w:.1f}' for w in full)} req/s, sliding max "
        f"{run['sliding_max']:.1f}, claimed per process {run['claimed']}, "
        f"{'ok' if run['ok'] else 'CHECK FAILED ' + str(check)}, load {load}",
        flush=True,
    )
    return run


# --------------------------------------------------------------------------------------------
# b. The adaptive limit against a function that refuses more than 8 calls in flight
# --------------------------------------------------------------------------------------------


def run_adaptive(url: str, standin: Any, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    benchlib.reset_queue(url)
    insert(url, args.adaptive_jobs, tenants=benchlib.TENANTS)
    standin.reset()
    standin.configure(FUNCTION, {"max_in_flight": REFUSE_ABOVE, "delay_ms": DELAY_MS})
    env = benchlib.worker_env(
        url,
        standin.base_url,
        run_mode="rounds",
        max_concurrency=str(CAP),
        max_jobs_per_tenant="100000",
        # The default store: the figures do not depend on the fix of the store-less path (see
        # the report).
        idempotency_store="postgres",
    )
    load = benchlib.load_average()
    with benchlib.Invocation(
        env, remaining_seconds=args.adaptive_budget, sample_every=0.1
    ) as invocation:
        t0 = invocation.wait_started()
        time.sleep(max(0.0, t0 + args.lift_at - time.time()))
        peak_before = standin.stats().get(FUNCTION)
        standin.configure(FUNCTION, None)  # no limit any more: 200 after 50 ms
        lifted = time.time()
        result = invocation.result(timeout=args.adaptive_budget + 120)
    samples = [(t - t0, limit) for t, fn, limit, _ in result["samples"] if fn == FUNCTION]
    calls = [(t - t0, status) for t, status, *_ in result["calls"]]
    lift = lifted - t0
    seconds = math.ceil(max((t for t, _ in samples), default=0.0))
    per_second: list[dict[str, Any]] = []
    for s in range(seconds):
        limits = [v for t, v in samples if s <= t < s + 1]
        answers = [status for t, status in calls if s <= t < s + 1]
        refused = sum(1 for status in answers if status == 429)
        per_second.append(
            {
                "second": s,
                "limit_min": min(limits) if limits else None,
                "limit_median": statistics.median(limits) if limits else None,
                "limit_max": max(limits) if limits else None,
                "calls": len(answers),
                "refused": refused,
                "share": refused / len(answers) if answers else None,
                "lifted": s + 1 > lift,
            }
        )
    before = [row for row in per_second if row["second"] + 1 <= lift]

    def settled_from(good: Any) -> float | None:
        """The first second from which every second until the lift is good."""
        for row in before:
            if all(good(r) for r in before if r["second"] >= row["second"]):
                return float(row["second"])
        return None

    limit_settled = settled_from(
        lambda r: r["limit_max"] is not None and math.floor(r["limit_max"]) <= REFUSE_ABOVE
    )
    share_settled = settled_from(lambda r: r["share"] is not None and r["share"] < REFUSED_SHARE)
    climbed = next((t - lift for t, v in samples if t >= lift and v >= CAP), None)
    late = [v for t, v in samples if SETTLE_WITHIN_S <= t < lift]
    within = sum(1 for v in late if math.floor(v) <= REFUSE_ABOVE) / len(late) if late else None
    after_settle = [status for t, status in calls if (limit_settled or SETTLE_WITHIN_S) <= t < lift]
    summary = result["runs"][0]
    states, dead = database_states(url)
    run = {
        "rep": rep,
        "load": load,
        "per_second": per_second,
        "lift_s": lift,
        "limit_settled_s": limit_settled,
        "share_settled_s": share_settled,
        "climbed_s": climbed,
        "samples_within": within,
        "refused_after_settle": sum(1 for s in after_settle if s == 429) / len(after_settle)
        if after_settle
        else None,
        "peak_before_lift": peak_before.peak_in_flight if peak_before else None,
        "final_limit": summary["concurrency_limits"].get(FUNCTION),
        "completed": summary["completed"],
        "retried": summary["retried"],
        "dead": dead,
        "processing": states.get("processing", 0),
        "ok": dead == 0 and states.get("processing", 0) == 0 and summary["unsettled"] == 0,
    }
    print(
        f"rep {rep} adaptive: limit <= {REFUSE_ABOVE} from {limit_settled} s, 429s < 5% from "
        f"{share_settled} s, back to {CAP} {climbed and f'{climbed:.1f}'} s after the lift, "
        f"{'ok' if run['ok'] else 'CHECK FAILED'}, load {load}",
        flush=True,
    )
    return run


# --------------------------------------------------------------------------------------------
# c. Two tenants of weights 1 and 3
# --------------------------------------------------------------------------------------------


def run_weights(
    url: str, standin: Any, args: argparse.Namespace, rep: int, per_tenant: int
) -> dict[str, Any]:
    from handler.queue.store import QueueStore

    benchlib.reset_queue(url)
    insert(url, 2 * args.weight_jobs, tenants=2)
    conn = benchlib.connect(url)
    try:
        store = QueueStore(conn)
        for k, weight in enumerate(WEIGHTS):
            store.set_tenant_limits(UUID(benchlib.tenant_uuid(k)), weight=weight)
    finally:
        conn.close()
    standin.reset()
    env = benchlib.worker_env(
        url,
        standin.base_url,
        run_mode="rounds",
        max_concurrency=str(CAP),
        max_jobs_per_tenant=str(per_tenant),
    )
    load = benchlib.load_average()
    with benchlib.Invocation(env, remaining_seconds=args.weight_budget) as invocation:
        result = invocation.result(timeout=args.weight_budget + 120)
    requests = standin.requests()
    start = result["runs"][0]["started_at"]
    tenants = [benchlib.tenant_uuid(k) for k in range(len(WEIGHTS))]
    by_tenant = Counter(r.body["tenant_id"] for r in requests)
    total = sum(by_tenant.values())
    windows = []
    for k in range(math.ceil(args.weight_budget / SHARE_WINDOW_S)):
        mine = Counter(
            r.body["tenant_id"]
            for r in requests
            if k * SHARE_WINDOW_S <= r.received_at - start < (k + 1) * SHARE_WINDOW_S
        )
        count = sum(mine.values())
        windows.append(
            {"count": count, "shares": [mine[t] / count if count else 0.0 for t in tenants]}
        )
    check = benchlib.delivery_check([r.body for r in requests], 2 * args.weight_jobs)
    summary = result["runs"][0]
    run = {
        "rep": rep,
        "per_tenant": per_tenant,
        "load": load,
        "total": total,
        "shares": [by_tenant[t] / total if total else 0.0 for t in tenants],
        "windows": windows,
        "rate": summary["completed"] / (summary["duration_ms"] / 1000),
        "ok": check["repeats"] == 0 and summary["unsettled"] == 0,
        "left": [args.weight_jobs - by_tenant[t] for t in tenants],
    }
    print(
        f"rep {rep} weights (MAX_JOBS_PER_TENANT {per_tenant}): shares "
        + ", ".join(f"{100 * s:.1f}%" for s in run["shares"])
        + f" of {total:,}, {'ok' if run['ok'] else 'CHECK FAILED'}, load {load}",
        flush=True,
    )
    return run


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def percent(share: float | None, digits: int = 1) -> str:
    return "n/a" if share is None else f"{100 * share:.{digits}f}%"


def report_rate(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    high = RATE * (1 + RATE_TOLERANCE)
    low = RATE * (1 - RATE_TOLERANCE)
    windows = [w for r in runs for w in r["windows"]]
    worst = max(windows, default=0.0)
    ok = all(r["ok"] for r in runs)
    lines = [
        f"## a. A function limited to {RATE:g} requests/s, {RATE_INVOCATIONS} concurrent "
        "invocations",
        "",
        f"`JOB_ROUTES` = `{json.dumps({JOB_TYPE: {'function': FUNCTION, 'rate': f'{RATE:g}/s', 'burst': BURST}})}`: "
        f"the function's bucket (in `queue_functions`, taken by every claim) holds {BURST} "
        f"tokens and refills at {RATE:g}/s, so any 5 s holds at most {BURST} + "
        f"{RATE * RATE_WINDOW_S:.0f} calls by construction (burst chosen for that: a bucket of "
        f"5, the default for {RATE:g}/s, would allow exactly 11/s in a window). "
        f"{args.rate_jobs} jobs over 10 tenants; {RATE_INVOCATIONS} processes, each its own "
        "Worker, running rounds invocations back to back (direct, so none lingers: one returns "
        "when nothing is due and the next starts at once, or after 50 ms when it claimed "
        "nothing), stopped when every job is finished.",
        "",
        "| rep | requests/s per full 5 s window | last (partial) window | most in any 5 s "
        "(sliding) | jobs claimed per process | invocations per process | completed | dead "
        "| check | load |",
        "|---:|---|---:|---:|---|---|---:|---:|---|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rep']} | {', '.join(f'{w:.1f}' for w in r['windows'])} "
            f"| {r['last_window']:.1f} | {r['sliding_max']:.1f} "
            f"| {', '.join(str(c) for c in r['claimed'])} "
            f"| {', '.join(str(c) for c in r['invocations'])} | {r['completed']} | {r['dead']} "
            f"| {'each job delivered once' if r['ok'] else r['check']} | {r['load']} |"
        )
    in_band = all(low <= w <= high for w in windows)
    lines += [
        "",
        f"- Target: every full 5 s window at most {RATE:g} requests/s + {RATE_TOLERANCE:.0%} "
        f"({high:g}/s), no job lost or dead-lettered: highest window **{worst:.1f}/s**, "
        f"sliding maximum {max(r['sliding_max'] for r in runs):.1f}/s; "
        f"{benchlib.met(worst <= high and ok)}. Every full window "
        f"{'within' if in_band else 'not always within'} {low:g}-{high:g}/s "
        f"(lowest {min(windows, default=0.0):.1f}/s): the limit "
        f"{'is used, not only kept' if in_band else 'leaves capacity unused at times'}.",
        "",
    ]
    return lines


def report_adaptive(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        f"## b. A function that answers 429 above {REFUSE_ABOVE} calls in flight",
        "",
        f"The stand-in's `max_in_flight` {REFUSE_ABOVE} with 50 ms calls; one invocation "
        f"(`MAX_CONCURRENCY` {CAP}, `MAX_JOBS_PER_TENANT` 100000, a budget of "
        f"{args.adaptive_budget:.0f} s) against {args.adaptive_jobs:,} jobs of that function; "
        "the function's limit starts at its cap (no state left by an earlier invocation). The "
        "worker allows floor(limit) calls in flight; its limit is sampled every 100 ms and "
        "each call's answer recorded inside its process (observed, not changed). After "
        f"{args.lift_at:.0f} s the stand-in's limit is lifted.",
        "",
        "`IDEMPOTENCY_STORE=postgres` here (the default), so that the figures do not depend "
        "on a fix made with this benchmark: until then, with `off`, `DeliveryGuard._deliver` "
        "let the `DispatchFailedError` its `_send` raises for any answer but 2xx escape, and the "
        "lane released the job as after an unexpected failure, so that no 429 reached the "
        "settlement or the adaptive limit (measured: 3,569 claimed, 528 completed, 3,041 "
        "released, 0 retried, the limit at 50 throughout), and a 400 or a 500 was released "
        "instead of dead-lettered or retried.",
        "",
        "| rep | limit ≤ 8 from (s) | samples ≤ 8 from 10 s to the lift "
        "| 429s < 5% from (s) | 429 share from 10 s to the lift "
        "| peak in flight at the function | back to 50 after the lift (s) | final limit "
        "| completed | retried (429s) | check | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]

    def num(value: float | None, digits: int = 1) -> str:
        return "never" if value is None else f"{value:.{digits}f}"

    for r in runs:
        share = r["refused_after_settle"]
        lines.append(
            f"| {r['rep']} | {num(r['limit_settled_s'], 0)} | {percent(r['samples_within'])} "
            f"| {num(r['share_settled_s'], 0)} "
            f"| {percent(share)} | {r['peak_before_lift']} "
            f"| {num(r['climbed_s'])} | {num(r['final_limit'])} | {r['completed']:,} "
            f"| {r['retried']:,} | {'ok' if r['ok'] else 'FAILED'} | {r['load']} |"
        )
    settle = [r["limit_settled_s"] for r in runs]
    shares = [r["share_settled_s"] for r in runs]
    climbs = [r["climbed_s"] for r in runs]
    settled_ok = all(s is not None and s <= SETTLE_WITHIN_S for s in settle)
    shares_ok = all(s is not None and s <= SETTLE_WITHIN_S for s in shares)
    lines += [
        "",
        f"- Target: within {SETTLE_WITHIN_S:.0f} s the limit settles at ≤ {REFUSE_ABOVE} "
        "(floor(limit) ≤ 8 in every sample from then until the lift): from "
        f"**{', '.join(num(s, 0) for s in settle)} s**; {benchlib.met(settled_ok)}. Share of "
        "the samples from 10 s to the lift with floor(limit) ≤ 8: "
        f"{', '.join(percent(r['samples_within']) for r in runs)}.",
        f"- Target: within {SETTLE_WITHIN_S:.0f} s 429s fall below {REFUSED_SHARE:.0%} of calls "
        "(every second from then until the lift): from "
        f"**{', '.join(num(s, 0) for s in shares)} s**; {benchlib.met(shares_ok)}.",
        f"- The limit lifted, back to its cap of {CAP} after "
        f"**{', '.join(num(c) for c in climbs)} s** (stated).",
        "",
    ]
    median_run = sorted(runs, key=lambda r: r["rep"])[len(runs) // 2]
    lines += [
        f"Repetition {median_run['rep']}, second by second (the lift at "
        f"{median_run['lift_s']:.1f} s):",
        "",
        "| second | limit min | median | max | calls answered | 429s | 429 share |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in median_run["per_second"]:
        mark = " (lifted)" if row["lifted"] and row["second"] < median_run["lift_s"] else ""
        lines.append(
            f"| {row['second']}{mark} | {num(row['limit_min'])} | {num(row['limit_median'])} "
            f"| {num(row['limit_max'])} | {row['calls']} | {row['refused']} "
            f"| {percent(row['share'])} |"
        )
    return [*lines, ""]


def report_weights(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = [
        "## c. Two tenants of weights 1 and 3",
        "",
        f"{args.weight_jobs:,} jobs for each of two tenants, weights "
        f"{WEIGHTS[0]:g} and {WEIGHTS[1]:g} (`set_tenant_limits`); one invocation, "
        f"{args.weight_budget:.0f} s budget, {CAP} lanes; shares of the requests the stand-in "
        "received.",
        "",
        "| MAX_JOBS_PER_TENANT | rep | requests | weight 1 | weight 3 | per 10 s window "
        "(weight 3's share) | jobs/s | check | load |",
        "|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["per_tenant"], r["rep"])):
        lines.append(
            f"| {r['per_tenant']} | {r['rep']} | {r['total']:,} | {100 * r['shares'][0]:.1f}% "
            f"| {100 * r['shares'][1]:.1f}% "
            f"| {', '.join(percent(w['shares'][1], 0) for w in r['windows'] if w['count'])} "
            f"| {r['rate']:,.0f} | {'ok' if r['ok'] else 'FAILED'} | {r['load']} |"
        )
    lines.append("")
    weight_sum = sum(WEIGHTS)
    for per_tenant in sorted({r["per_tenant"] for r in runs}):
        mine = [r for r in runs if r["per_tenant"] == per_tenant]
        shares = [
            statistics.median(100 * r["shares"][k] for r in mine) for k in range(len(WEIGHTS))
        ]
        worst = max(
            abs(100 * r["shares"][k] - 100 * WEIGHTS[k] / weight_sum)
            for r in mine
            for k in range(len(WEIGHTS))
        )
        ok = all(r["ok"] for r in mine) and worst <= SHARE_POINTS
        lines.append(
            f"- Target (`MAX_JOBS_PER_TENANT` {per_tenant}): shares "
            f"{100 * WEIGHTS[0] / weight_sum:.0f}% and {100 * WEIGHTS[1] / weight_sum:.0f}% "
            f"within {SHARE_POINTS:.0f} points: **{shares[0]:.1f}% and {shares[1]:.1f}%** "
            f"(median; the furthest of any run {worst:.1f} points off); {benchlib.met(ok)}."
        )
    return [*lines, ""]


def report(
    runs: dict[str, list[dict[str, Any]]], info: dict[str, str], args: argparse.Namespace
) -> str:
    command = benchlib.command_line(
        "flow_control.py", args, defaults={} if args.quick else {"repeat": REPETITIONS}
    )
    if args.parts != list(PARTS):
        command += " --parts " + " ".join(args.parts)
    lines = [
        "# Flow control: rate limits, adaptive concurrency, weighted tenants",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        *benchlib.machine_lines(info),
        "## Method",
        "",
        "- The worker's real code path in fresh child processes: `Worker(parse_settings(env))"
        ".run(...)` with `RUN_MODE=rounds`, `IDEMPOTENCY_STORE=off` (b: `postgres`, see there); "
        "the functions are the "
        f"stand-in (its own process), {DELAY_MS:.0f} ms per call unless said otherwise. Each "
        "measurement starts from an emptied queue (jobs, tenants, function states, routes).",
        f"- {args.repeat} repetition(s), the measurements taking turns; every run is listed.",
        "",
    ]
    if runs.get("rate"):
        lines += report_rate(runs["rate"], args)
    if runs.get("adaptive"):
        lines += report_adaptive(runs["adaptive"], args)
    if runs.get("weights"):
        lines += report_weights(runs["weights"], args)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeat", type=int, default=REPETITIONS)
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    args.rate_jobs, args.adaptive_jobs, args.weight_jobs = RATE_JOBS, ADAPTIVE_JOBS, WEIGHT_JOBS
    args.adaptive_budget, args.lift_at = ADAPTIVE_BUDGET_S, LIFT_AT_S
    args.weight_budget = WEIGHT_BUDGET_S
    if args.quick:
        args.repeat = 1
        args.rate_jobs, args.adaptive_jobs, args.weight_jobs = 60, 8_000, 5_000
        args.adaptive_budget, args.lift_at, args.weight_budget = 16.0, 6.0, 8.0
    from handler.local.standin import StandIn

    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    runs: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
    with benchlib.postgres(args.database_url) as admin_url:
        info.update(benchlib.describe_server(admin_url, bool(args.database_url)))
        url = benchlib.recreate_database(admin_url, DATABASE)
        try:
            benchlib.install_queue_schema(url)
            with StandIn(delay_ms=DELAY_MS, record=True) as standin:
                for rep in range(1, args.repeat + 1):
                    shift = (rep - 1) % len(args.parts)
                    for part in args.parts[shift:] + args.parts[:shift]:
                        if part == "rate":
                            runs[part].append(run_rate(url, standin, args, rep))
                        elif part == "adaptive":
                            runs[part].append(run_adaptive(url, standin, args, rep))
                        else:
                            for per_tenant in PER_TENANT:
                                runs[part].append(run_weights(url, standin, args, rep, per_tenant))
        finally:
            benchlib.drop_database(admin_url, DATABASE)
    info["load_after"] = benchlib.load_average()
    text = report(runs, info, args)
    path = benchlib.write_report("flow_control", text, args.output)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {path.name})")


if __name__ == "__main__":
    main()
