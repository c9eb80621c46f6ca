"""A chain of five jobs, each depending on the one before, through one running rounds invocation:
the time from the chain's enqueue to its last POST answered.

Each repetition: a fresh child process runs one scheduled invocation with ``RUN_MODE=rounds``
(so it lingers when nothing is due), ``IDEMPOTENCY_STORE=off``, over a direct connection; the
functions (the stand-in, its own process) answer after ``--delay-ms`` (50). Once the invocation
lingers, this process enqueues ``--chains`` chains, one after the other: each is ``--links`` (5)
``enqueue_job`` calls in one transaction, link k with ``p_depends_on`` = link k-1, so that the
chain appears at once. The clock starts just before that transaction's BEGIN (``time.time()``)
and stops at the stand-in's ``answered_at`` of the last link (``time.time()`` of the same
machine, when it wrote the answer); the worker still has to settle that link, which the
measure leaves out, as it leaves out nothing before. Between chains, a pause of 200-400 ms
(random) lets the invocation go back to lingering.

Then the linger is taken over, the invocation returns; every link must have been delivered
exactly once, each after the one it depends on was answered, and completed.

For the old behaviour, one batch-mode invocation (``RUN_MODE=batch``, what every tick did
before rounds) runs over a fresh chain: how many links it delivers. With one invocation a minute,
a chain of five needs that many ticks.

Run (about 30 seconds; writes ``bench/results/chain.md``)::

    python bench/chain.py --database-url postgresql://postgres@localhost:5432/postgres
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import benchlib

CHAINS = 10
LINKS = 5
DELAY_MS = 50.0
REPETITIONS = 3
BUDGET_S = 300.0
TARGET_S = 1.0
DATABASE = "qw_bench_chain"
PACKAGES = ("pg8000", "httpx", "h11", "aws-lambda-powertools")


def enqueue_chain(conn: Any, first_seq: int, links: int) -> tuple[float, float]:
    """One chain in one transaction: (time before BEGIN, time after COMMIT)."""
    from handler.queue.store import QueueStore

    store = QueueStore(conn)
    tenant = UUID(benchlib.tenant_uuid(first_seq % benchlib.TENANTS))
    before = time.time()
    conn.run("BEGIN")
    previous = None
    for link in range(links):
        previous = store.enqueue(
            tenant,
            "ingest_slack",
            {"seq": first_seq + link, "link": link},
            depends_on=[previous] if previous else None,
        )
    conn.run("COMMIT")
    return before, time.time()


def wait_answered(standin: Any, count: int, timeout: float = 60.0) -> list[Any]:
    """The stand-in's requests once ``count`` have arrived and all of them are answered."""
    standin.wait_for_requests(count, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests = standin.requests()
        if len(requests) >= count and all(r.answered_at is not None for r in requests):
            return list(requests)
        time.sleep(0.005)
    raise RuntimeError(f"{count} requests were not all answered within {timeout:.0f} s")


def rounds_run(url: str, standin: Any, args: argparse.Namespace, rep: int) -> list[dict[str, Any]]:
    benchlib.reset_queue(url)
    standin.reset()
    standin.configure_default({"delay_ms": args.delay_ms})
    env = benchlib.worker_env(url, standin.base_url, run_mode="rounds")
    rng = random.Random(rep)
    chains: list[dict[str, Any]] = []
    load = benchlib.load_average()
    with benchlib.Invocation(
        env, event=benchlib.SCHEDULED_EVENT, remaining_seconds=args.budget
    ) as invocation:
        invocation.wait_started()
        benchlib.wait_for_linger(url)
        conn = benchlib.connect(url)
        try:
            for n in range(args.chains):
                time.sleep(rng.uniform(0.2, 0.4))
                first = n * args.links
                before, committed = enqueue_chain(conn, first, args.links)
                requests = wait_answered(standin, first + args.links)
                mine = sorted(
                    (r for r in requests if first <= r.body["payload"]["seq"] < first + args.links),
                    key=lambda r: r.body["payload"]["seq"],
                )
                chains.append(
                    {
                        "rep": rep,
                        "load": load,
                        "before": before,
                        "committed": committed,
                        "links": [(r.received_at, r.answered_at) for r in mine],
                    }
                )
        finally:
            conn.close()
        benchlib.end_linger(url)
        result = invocation.result(timeout=60)
    requests = standin.requests()
    check = benchlib.delivery_check([r.body for r in requests], args.chains * args.links)
    conn = benchlib.connect(url)
    try:
        completed = int(
            conn.run("SELECT count(*) FROM queue_jobs WHERE status = 'completed'")[0][0]
        )
    finally:
        conn.close()
    for chain in chains:
        links = chain["links"]
        ordered = len(links) == args.links and all(
            links[k][0] >= links[k - 1][1] for k in range(1, len(links))
        )
        chain["total_s"] = links[-1][1] - chain["before"]
        chain["from_commit_s"] = links[-1][1] - chain["committed"]
        chain["enqueue_ms"] = 1000 * (chain["committed"] - chain["before"])
        chain["first_pickup_ms"] = 1000 * (links[0][0] - chain["committed"])
        chain["gaps_ms"] = [1000 * (links[k][0] - links[k - 1][1]) for k in range(1, len(links))]
        chain["ordered"] = ordered
    ok = (
        check["undelivered"] == 0
        and check["repeats"] == 0
        and completed == args.chains * args.links
        and all(c["ordered"] for c in chains)
    )
    for chain in chains:
        chain["ok"] = ok
        chain["claims"] = result["runs"][0]["rounds"]
    totals = [c["total_s"] for c in chains]
    print(
        f"rep {rep}: chain median {statistics.median(totals) * 1000:.0f} ms, max "
        f"{max(totals) * 1000:.0f} ms, {'ok' if ok else f'CHECK FAILED {check}'}, load {load}",
        flush=True,
    )
    return chains


def batch_run(url: str, standin: Any, args: argparse.Namespace) -> int:
    """Links of a fresh chain that one batch-mode invocation delivers."""
    benchlib.reset_queue(url)
    standin.reset()
    standin.configure_default({"delay_ms": args.delay_ms})
    conn = benchlib.connect(url)
    try:
        enqueue_chain(conn, 0, args.links)
    finally:
        conn.close()
    env = benchlib.worker_env(url, standin.base_url, run_mode="batch")
    with benchlib.Invocation(env, event=benchlib.SCHEDULED_EVENT, remaining_seconds=60) as run:
        result = run.result(timeout=120)
    delivered = len(standin.requests())
    print(f"batch mode: one invocation delivered {delivered} of {args.links} links", flush=True)
    assert result["runs"][0]["completed"] == delivered
    return delivered


def report(
    chains: list[dict[str, Any]], batch: list[int], info: dict[str, str], args: argparse.Namespace
) -> str:
    from handler.batch import runner

    command = benchlib.command_line(
        "chain.py",
        args,
        defaults={} if args.quick else {"chains": CHAINS, "repeat": REPETITIONS},
    )
    reps = sorted({c["rep"] for c in chains})
    per_rep = {rep: [c["total_s"] for c in chains if c["rep"] == rep] for rep in reps}
    medians = [statistics.median(v) for v in per_rep.values()]
    median = statistics.median(medians)
    worst = max(c["total_s"] for c in chains)
    ok = all(c["ok"] for c in chains)
    lines = [
        "# A chain of five jobs through one rounds invocation",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        *benchlib.machine_lines(info),
        "## Method",
        "",
        "- One invocation in a fresh process per repetition: `Worker.run` of a scheduled event "
        f"with `RUN_MODE=rounds` (lingering when nothing is due), `IDEMPOTENCY_STORE=off`, a "
        f"budget of {args.budget:.0f} s, over a direct connection (LISTEN/NOTIFY). The functions "
        f"(the stand-in, its own process) answer 200 after {args.delay_ms:.0f} ms. Rounds "
        f"settle every {runner.ROUND_SETTLE_SECONDS * 1000:.0f} ms (at once when nothing is in "
        "flight) and claim again after a settle that completed a job, which released its "
        "dependent.",
        f"- Once it lingers, {args.chains} chains one after the other, each {args.links} "
        "`enqueue_job` calls in one transaction, link k depending on link k-1 "
        "(`p_depends_on`), 200-400 ms apart (random). Time: from just before the chain's BEGIN "
        "(`time.time()` here) to the stand-in's `answered_at` of the last link (`time.time()` "
        "there, when it wrote the answer; same machine clock). The settle of the last link "
        "comes after and is not counted.",
        "- Checks: every link delivered exactly once, each after the answer to the one it "
        "depends on, and completed.",
        f"- {args.repeat} repetition(s) of {args.chains} chains; median (min-max) of the "
        "per-repetition medians, and every chain.",
        "- The old behaviour: one batch-mode invocation (`RUN_MODE=batch`: one claim, its jobs, "
        "the end) over a fresh chain, once per repetition.",
        "",
        "## Results",
        "",
        "| measure | median (min-max) of the repetitions' medians | every chain: median "
        "| every chain: max |",
        "|---|---:|---:|---:|",
    ]
    rows: dict[str, Callable[[dict[str, Any]], list[float]]] = {
        "enqueue of the chain (5 calls, one transaction)": lambda c: [c["enqueue_ms"]],
        "commit to the first link's POST received": lambda c: [c["first_pickup_ms"]],
        "a link answered to the next link's POST received": lambda c: c["gaps_ms"],
        "chain: before BEGIN to the last link answered": lambda c: [1000 * c["total_s"]],
        "chain: after COMMIT to the last link answered": lambda c: [1000 * c["from_commit_s"]],
    }
    for label, values_of in rows.items():
        per = [
            statistics.median(v for c in chains if c["rep"] == rep for v in values_of(c))
            for rep in reps
        ]
        every = [v for c in chains for v in values_of(c)]
        lines.append(
            f"| {label}, ms | {benchlib.fmt(per, 1)} | {statistics.median(every):.1f} "
            f"| {max(every):.1f} |"
        )
    lower = args.links * args.delay_ms
    lines += [
        "",
        f"The functions alone take {lower:.0f} ms for {args.links} links one after the other: "
        f"the rest, {1000 * median - lower:.0f} ms at the median, is the queue's "
        "(enqueue, pickup, settle, claim, dispatch, per link).",
        "",
        "## Targets",
        "",
        f"- Chain of {args.links} to its last POST answered (median of the repetitions' "
        f"medians): **{1000 * median:.0f} ms**; target ≤ {TARGET_S * 1000:.0f} ms: "
        f"{benchlib.met(median <= TARGET_S and ok)}. The slowest of the "
        f"{len(chains)} chains: {1000 * worst:.0f} ms "
        f"({'within' if worst <= TARGET_S else 'over'} the target). Checks: "
        f"{'every link delivered once, in order, completed' if ok else 'FAILED'}.",
        f"- The old behaviour: one batch-mode invocation delivered "
        f"{', '.join(str(b) for b in batch)} link(s) of {args.links} (per repetition): with one "
        f"invocation a minute, a chain of {args.links} takes {args.links} ticks, about "
        f"{args.links - 1}-{args.links} minutes.",
        "",
        "## Every chain",
        "",
        "| rep | chain | enqueue ms | first pickup ms | gaps between links, ms "
        "| to last answer ms | claims in the invocation | load |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for i, c in enumerate(chains):
        lines.append(
            f"| {c['rep']} | {i % args.chains + 1} | {c['enqueue_ms']:.1f} "
            f"| {c['first_pickup_ms']:.1f} | {', '.join(f'{g:.0f}' for g in c['gaps_ms'])} "
            f"| {1000 * c['total_s']:.0f} | {c['claims']} | {c['load']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chains", type=int, default=CHAINS, help="chains per repetition")
    parser.add_argument("--links", type=int, default=LINKS)
    parser.add_argument("--delay-ms", type=float, default=DELAY_MS)
    parser.add_argument("--repeat", type=int, default=REPETITIONS)
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="the invocation's seconds")
    benchlib.add_common_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.chains, args.repeat = 3, 1
    from handler.local.standin import StandIn

    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    chains: list[dict[str, Any]] = []
    batch: list[int] = []
    with benchlib.postgres(args.database_url) as admin_url:
        info.update(benchlib.describe_server(admin_url, bool(args.database_url)))
        url = benchlib.recreate_database(admin_url, DATABASE)
        try:
            benchlib.install_queue_schema(url)
            with StandIn(delay_ms=0, record=True) as standin:
                for rep in range(1, args.repeat + 1):
                    chains += rounds_run(url, standin, args, rep)
                    batch.append(batch_run(url, standin, args))
        finally:
            benchlib.drop_database(admin_url, DATABASE)
    info["load_after"] = benchlib.load_average()
    text = report(chains, batch, info, args)
    path = benchlib.write_report("chain", text, args.output)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {path.name})")


if __name__ == "__main__":
    main()
