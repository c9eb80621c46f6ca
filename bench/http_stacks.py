"""Which HTTP client stack should the worker use? Throughput and CPU per request.

Every stack keeps the httpx API, except one reference row:

1. ``httpx.AsyncClient`` (httpx 0.28, httpcore 1.0 + h11 over anyio), as installed, and again
   with ``sniffio`` importable (see ``install_sniffio_shim``),
2. ``httpx.AsyncClient`` over a minimal aiohttp transport (aiohttp's C parser, defined below),
3. a pool of 50 threads sharing one ``httpx.Client``,
4. the worker's: a pool of 50 threads, each with an ``httpx.Client`` of its own, through
   ``handler.dispatch.client.Dispatcher`` (its whole-call deadline included),
5. reference, not the httpx API: ``aiohttp.ClientSession`` used directly.

Each posts the worker's request (small JSON body, ``Authorization``, ``Idempotency-Key``) with 50
requests in flight to the stand-in (``handler.local.standin``, its own process), answering after 0 ms
and after 50 ms. Every measurement runs in a fresh child process: connections are opened by a
warm-up first, then ``time.perf_counter()`` and ``time.process_time()`` (all threads) bracket the
measured requests (a few thousand, or as many as start within MAX_RUN_S for slow stacks).
Repetitions are interleaved (rep 1 of every stack, then rep 2, ...), with the stack order rotated
each time; we report the median and the min-max. On a machine with two or more CPUs the stand-in
is pinned to one CPU and the client to another, so they never compete with each other.

Run (about 3 minutes; writes ``bench/results/http_stacks.md``)::

    python bench/http_stacks.py

``--quick`` runs one repetition with fewer requests (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import benchlib

CONCURRENCY = 50
DELAYS_MS = (0, 50)
REQUESTS = {0: 3000, 50: 2000}  # per measured run...
MAX_RUN_S = 2.5  # ...unless this runs out first: then no new requests start
WARMUP = 2 * CONCURRENCY
REPETITIONS = 3
TIMEOUT_S = 30.0
RESULTS = Path(__file__).resolve().parent / "results" / "http_stacks.md"

STACKS = {
    "httpx-async": "httpx.AsyncClient (0.28), as installed",
    "httpx-async-sniffio": "httpx.AsyncClient (0.28) + sniffio",
    "httpx-aiohttp": "httpx.AsyncClient + aiohttp transport",
    "httpx-threads": "httpx.Client, 50 threads",
    "ours": "httpx.Client per thread through handler's Dispatcher, 50 threads (the worker's)",
    "aiohttp-raw": "aiohttp.ClientSession (reference: not the httpx API)",
}
PACKAGES = ("httpx", "httpcore", "h11", "anyio", "aiohttp", "multidict")


# --------------------------------------------------------------------------------------------
# The requests
# --------------------------------------------------------------------------------------------


def job(n: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The worker's body and headers for job number n (Content-Type comes with json=)."""
    job_id = f"00000000-0000-4000-8000-{n:012d}"
    body = {
        "job_id": job_id,
        "tenant_id": "tenant-0042",
        "job_type": "thumbnail",
        "attempt": 1,
        "payload": {"object": f"s3://uploads/tenant-0042/{n}.png", "width": 320, "height": 240},
    }
    return body, {"Authorization": "Bearer bench-secret-key", "Idempotency-Key": job_id}


def claimed_job(n: int) -> Any:
    """The same job as ``job(n)``, as the worker holds it after a claim."""
    import uuid

    from handler.queue.store import ClaimedJob

    body, _ = job(n)
    return ClaimedJob(
        id=uuid.UUID(body["job_id"]),
        tenant_id=uuid.UUID(int=42),
        job_type=body["job_type"],
        payload_json=json.dumps(body["payload"]),
        attempt=1,
        rescued=False,
    )


# --------------------------------------------------------------------------------------------
# An httpx transport over aiohttp
# --------------------------------------------------------------------------------------------


def make_aiohttp_transport(limit: int) -> Any:
    """A minimal ``httpx.AsyncBaseTransport`` that sends requests with aiohttp.

    Whole bodies only (fine for small JSON); aiohttp does no decompression so httpx decodes
    exactly as it would with its own transport; aiohttp errors become httpx errors.
    """
    import aiohttp
    import httpx

    skip = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}

    class AiohttpTransport(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self._session: aiohttp.ClientSession | None = None
            self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

        def _get_session(self) -> aiohttp.ClientSession:
            if self._session is None:  # created lazily, inside the running event loop
                connector = aiohttp.TCPConnector(limit=limit, keepalive_timeout=30)
                self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
            return self._session

        def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
            t = request.extensions.get("timeout", {})
            key = (t.get("connect"), t.get("read"), t.get("pool"))
            timeout = self._timeouts.get(key)
            if timeout is None:
                timeout = aiohttp.ClientTimeout(
                    total=None, connect=key[2], sock_connect=key[0], sock_read=key[1]
                )
                self._timeouts[key] = timeout
            return timeout

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            body = await request.aread()
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in skip]
            try:
                async with self._get_session().request(
                    request.method,
                    str(request.url),
                    headers=headers,
                    data=body or None,
                    allow_redirects=False,
                    timeout=self._timeout(request),
                ) as response:
                    content = await response.read()
            except TimeoutError as exc:
                raise httpx.TimeoutException(str(exc) or "timed out", request=request) from exc
            except aiohttp.ClientConnectorError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            except aiohttp.ClientResponseError as exc:  # e.g. an unparseable response
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            except aiohttp.ClientError as exc:
                raise httpx.NetworkError(str(exc), request=request) from exc
            return httpx.Response(
                response.status,
                headers=response.raw_headers,
                content=content,
                extensions={
                    "http_version": b"HTTP/1.1",
                    "reason_phrase": (response.reason or "").encode(),
                },
            )

        async def aclose(self) -> None:
            if self._session is not None:
                await self._session.close()

    return AiohttpTransport()


# --------------------------------------------------------------------------------------------
# One measured run (in a child process)
# --------------------------------------------------------------------------------------------


def server_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) the stand-in process has used; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Brackets the measured requests; ``deadline`` stops starting new ones after MAX_RUN_S."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.deadline = float("inf")

    def __enter__(self) -> Meter:
        gc.collect()
        self.server0 = server_cpu_s(self.server_pid)
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.deadline = self.wall0 + MAX_RUN_S
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.deadline = float("inf")
        server1 = server_cpu_s(self.server_pid)
        self.server = None if self.server0 is None or server1 is None else server1 - self.server0


def run_async(
    make: Callable[[], Any], post: Callable[[Any, int], Awaitable[int]], n: int, meter: Meter
) -> list[int]:
    """CONCURRENCY coroutines, each posting its share of n requests one after the other."""

    async def main() -> list[int]:
        client = make()
        statuses: list[int] = []

        async def worker(start: int, count: int) -> None:
            for i in range(start, start + count):
                if time.perf_counter() > meter.deadline:
                    return
                statuses.append(await post(client, i))

        async def burst(offset: int, total: int) -> None:
            each = total // CONCURRENCY
            await asyncio.gather(*(worker(offset + k * each, each) for k in range(CONCURRENCY)))

        try:
            await burst(10**9, WARMUP)  # opens the 50 connections
            statuses.clear()
            with meter:
                await burst(0, n)
        finally:
            await client.aclose() if hasattr(client, "aclose") else await client.close()
        return statuses

    return asyncio.run(main())


def run_threads(
    make: Callable[[], Any], post: Callable[[Any, int], int], n: int, meter: Meter
) -> list[int]:
    """CONCURRENCY pool threads sharing one client, each posting its share of n requests."""
    client = make()
    statuses: list[int] = []
    lock = threading.Lock()

    def worker(start: int, count: int) -> None:
        mine = []
        for i in range(start, start + count):
            if time.perf_counter() > meter.deadline:
                break
            mine.append(post(client, i))
        with lock:
            statuses.extend(mine)

    def burst(pool: ThreadPoolExecutor, offset: int, total: int) -> None:
        each = total // CONCURRENCY
        futures = [pool.submit(worker, offset + k * each, each) for k in range(CONCURRENCY)]
        for future in futures:
            future.result()

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        try:
            burst(pool, 10**9, WARMUP)  # starts the threads, opens the connections
            statuses.clear()
            with meter:
                burst(pool, 0, n)
        finally:
            client.close()
    return statuses


def install_sniffio_shim() -> None:
    """Make ``import sniffio`` succeed, as it does wherever sniffio is installed.

    httpcore 1.0 imports sniffio inside a function called several times per request; recent
    anyio no longer depends on sniffio, so without it each call is a failed import that scans
    sys.path. Installing sniffio is the fix; this shim stands in for it.
    """
    if importlib.util.find_spec("sniffio") is not None:
        return

    class AsyncLibraryNotFoundError(RuntimeError):
        pass

    def current_async_library() -> str:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise AsyncLibraryNotFoundError("not in an event loop") from None
        return "asyncio"

    shim = types.ModuleType("sniffio")
    shim.current_async_library = current_async_library  # type: ignore[attr-defined]
    shim.AsyncLibraryNotFoundError = AsyncLibraryNotFoundError  # type: ignore[attr-defined]
    sys.modules["sniffio"] = shim


def measure(stack: str, url: str, n: int, server_pid: int) -> dict[str, Any]:
    meter = Meter(server_pid)
    if stack == "httpx-async-sniffio":
        install_sniffio_shim()
    if stack in ("httpx-async", "httpx-async-sniffio", "httpx-aiohttp"):
        import httpx

        def make_async() -> Any:
            limits = httpx.Limits(
                max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY
            )
            if stack == "httpx-aiohttp":
                transport = make_aiohttp_transport(CONCURRENCY)
                return httpx.AsyncClient(transport=transport, timeout=TIMEOUT_S)
            return httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S)

        async def post_async(client: Any, i: int) -> int:
            body, headers = job(i)
            response = await client.post(url, json=body, headers=headers)
            return int(response.status_code)

        statuses = run_async(make_async, post_async, n, meter)
    elif stack == "httpx-threads":
        import httpx

        def make_sync() -> Any:
            limits = httpx.Limits(
                max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY
            )
            return httpx.Client(limits=limits, timeout=TIMEOUT_S)

        def post_sync(client: Any, i: int) -> int:
            body, headers = job(i)
            return int(client.post(url, json=body, headers=headers).status_code)

        statuses = run_threads(make_sync, post_sync, n, meter)
    elif stack == "ours":
        from handler.dispatch.client import Dispatcher
        from handler.dispatch.routes import Route

        base_url, _, function = url.rpartition("/")
        route = Route(function)

        def make_dispatcher() -> Any:
            # Each pool thread makes its own client on its first call, as the worker's do.
            return Dispatcher(base_url, "bench-secret-key")

        def post_dispatch(dispatcher: Any, i: int) -> int:
            delivery = dispatcher.post(claimed_job(i), route, TIMEOUT_S)
            return int(delivery.outcome.status or 0)

        statuses = run_threads(make_dispatcher, post_dispatch, n, meter)
    elif stack == "aiohttp-raw":
        import aiohttp

        def make_session() -> Any:
            connector = aiohttp.TCPConnector(limit=CONCURRENCY, keepalive_timeout=30)
            return aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)
            )

        async def post_raw(session: Any, i: int) -> int:
            body, headers = job(i)
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
                return int(response.status)

        statuses = run_async(make_session, post_raw, n, meter)
    else:
        raise SystemExit(f"unknown stack {stack!r}")
    return {
        "stack": stack,
        "requests": len(statuses),
        "errors": sum(status != 200 for status in statuses),
        "wall_s": meter.wall,
        "cpu_s": meter.cpu,
        "server_cpu_s": meter.server,
    }


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def fmt(values: list[float], digits: int) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


def report(runs: list[dict[str, Any]], info: dict[str, str], args: argparse.Namespace) -> str:
    lines = [
        "# HTTP client stacks: throughput and CPU per request",
        "",
        f"Generated by `python bench/http_stacks.py{' --quick' if args.quick else ''}` "
        f"on {dt.date.today().isoformat()}.",
        "",
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']})",
        f"- {info['python']} on {info['os']}",
        f"- {info['packages']}",
        f"- pinning: {info['pinning']}",
        f"- load average (1 min) before / after the run: {info['load_before']} / "
        f"{info['load_after']} (other processes share this machine: wall-clock figures are "
        "noisier than CPU figures)",
        "",
        "## Method",
        "",
        f"- {CONCURRENCY} requests in flight; POST of the worker's JSON body (~220 bytes) with "
        '`Authorization` and `Idempotency-Key`, response `{"ok": true}`.',
        "- Server: `handler.local.standin` in its own process, answering after 0 ms or 50 ms.",
        f"- Each measurement: a fresh process, {WARMUP} warm-up requests (opens the "
        "connections), then "
        + ", ".join(f"{REQUESTS_RUN[d]:,} requests at {d} ms" for d in DELAYS_MS)
        + f", or as many as start within {MAX_RUN_S:g} s when a stack is slower. Pools sized "
        "to 50 connections, all kept alive; timeouts 30 s.",
        "- `+ sniffio`: httpcore 1.0 imports `sniffio` several times per request; anyio no "
        "longer depends on it, so where it is not installed (as here) every call is a failed "
        "import. That row makes it importable, as `pip install sniffio` would.",
        "- CPU ms/request: `time.process_time()` of the client process (all its threads) over "
        "the measured requests, divided by their number. Client busy: that CPU time over the "
        "wall time (near 100%: the client is CPU-bound; well below it at 0 ms: the client "
        "was waiting for a CPU that other processes held). 1-core ceiling: 1000 / CPU ms "
        "per request (capped by the 50 ms ceiling), the throughput the stack would reach "
        "with a CPU to itself; it depends much less on the other load than requests/s does. "
        "Stand-in CPU: the server process's share of one CPU during the run (it was not the "
        "bottleneck if well below 100%).",
        f"- {args.repetitions} repetitions, interleaved, stack order rotated; median (min-max).",
        f"- At 50 ms the ceiling is {CONCURRENCY} / 0.050 s = {CONCURRENCY * 20:,} requests/s.",
        "",
        "## Results",
        "",
        "| stack | server delay | requests/s | client CPU ms/request | 1-core ceiling, req/s "
        "| client busy | stand-in CPU | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for delay in DELAYS_MS:
        for stack, label in STACKS.items():
            mine = [r for r in runs if r["stack"] == stack and r["delay_ms"] == delay]
            if not mine:
                continue
            rps = [r["requests"] / r["wall_s"] for r in mine]
            cpu = [1000 * r["cpu_s"] / r["requests"] for r in mine]
            server = [
                r["server_cpu_s"] / r["wall_s"] for r in mine if r["server_cpu_s"] is not None
            ]
            server_text = f"{100 * statistics.median(server):.0f}%" if server else "n/a"
            busy = statistics.median(r["cpu_s"] / r["wall_s"] for r in mine)
            errors = sum(r["errors"] for r in mine)
            ceiling = 1000 / statistics.median(cpu)
            if delay:
                ceiling = min(ceiling, CONCURRENCY * 1000 / delay)
            lines.append(
                f"| {label} | {delay} ms | {fmt(rps, 0)} | {fmt(cpu, 3)} | {ceiling:,.0f} "
                f"| {100 * busy:.0f}% | {server_text} | {errors} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| rep | server delay | stack | requests | wall s | client CPU s | requests/s "
        "| CPU ms/request | client busy | load |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rep']} | {r['delay_ms']} ms | {r['stack']} | {r['requests']:,} "
            f"| {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['requests'] / r['wall_s']:,.0f} "
            f"| {1000 * r['cpu_s'] / r['requests']:.3f} | {100 * r['cpu_s'] / r['wall_s']:.0f}% "
            f"| {r['load']} |"
        )
    return "\n".join(lines) + "\n"


REQUESTS_RUN = dict(REQUESTS)


def drive(args: argparse.Namespace) -> None:
    from handler.local.standin import StandIn

    if args.quick:
        REQUESTS_RUN.update(dict.fromkeys(DELAYS_MS, 500))
    stacks = [s for s in STACKS if not args.stacks or s in args.stacks]
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_cpu: int | None = None
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with StandIn(delay_ms=0, record=False) as standin:
        if len(cpus) >= 2:
            os.sched_setaffinity(standin.pid, {cpus[-1]})
            client_cpu = cpus[0]
            info["pinning"] = f"stand-in on CPU {cpus[-1]}, client on CPU {cpus[0]}"
        else:
            info["pinning"] = "none (fewer than 2 CPUs)"
        url = f"{standin.base_url}/thumbnail"
        for rep in range(1, args.repetitions + 1):
            for delay in DELAYS_MS:
                standin.configure_default({"delay_ms": delay} if delay else None)
                shift = (rep - 1) % len(stacks)
                for stack in stacks[shift:] + stacks[:shift]:
                    command = [
                        sys.executable,
                        __file__,
                        "--measure",
                        stack,
                        "--url",
                        url,
                        "--requests",
                        str(REQUESTS_RUN[delay]),
                        "--server-pid",
                        str(standin.pid),
                    ]
                    if client_cpu is not None:
                        command += ["--cpu", str(client_cpu)]
                    out = subprocess.run(command, capture_output=True, text=True, check=False)
                    if out.returncode != 0:
                        sys.stderr.write(out.stderr)
                        raise SystemExit(f"{stack} failed at {delay} ms")
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    result.update(rep=rep, delay_ms=delay, load=benchlib.load_average())
                    runs.append(result)
                    print(
                        f"rep {rep} {delay:>2} ms {stack:<15} "
                        f"{result['requests'] / result['wall_s']:>7,.0f} req/s "
                        f"{1000 * result['cpu_s'] / result['requests']:.3f} CPU ms/req "
                        f"errors {result['errors']}",
                        flush=True,
                    )
    info["load_after"] = benchlib.load_average()
    text = report(runs, info, args)
    out_path = Path(args.output) if args.output else RESULTS
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {out_path.name})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 500 requests")
    parser.add_argument("--repetitions", type=int, default=REPETITIONS)
    parser.add_argument("--stacks", nargs="*", choices=list(STACKS), help="a subset of stacks")
    parser.add_argument("--output", help="where to write the report (default bench/results/)")
    # Internal: one measurement in this (child) process.
    parser.add_argument("--measure", choices=list(STACKS), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        print(json.dumps(measure(args.measure, args.url, args.requests, args.server_pid)))
        return
    if args.quick:
        args.repetitions = 1
    drive(args)


if __name__ == "__main__":
    main()
