"""What the benchmarks in this folder share: the workload, the database, the machine, the report.

Not a benchmark itself. The scripts import it as a sibling module (``python bench/<script>.py``
puts this folder on ``sys.path``).

The workload: N jobs over 10 tenants and the 5 job types of the default routes, each job's
payload ``{"seq": i}``, so that every contender's deliveries can be matched to the jobs that were
enqueued (``seq`` 0..N-1, each exactly once) whatever ids its queue gives them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
QUEUE_SEARCH_PATH = "queue_worker, public"

# The default routes : job type -> function.
ROUTES = {
    "ingest_microsoft": "ingest-microsoft",
    "ingest_slack": "ingest-slack",
    "process_embeddings": "process-embeddings",
    "generate_digest": "daily-digest",
    "prioritize_activities": "prioritize-activities",
}
JOB_TYPES = tuple(ROUTES)
TENANTS = 10
SERVICE_ROLE_KEY = "bench-service-role-key"

# Job i belongs to tenant i % 10 and has type (i // 10) % 5: every tenant gets every type.
INSERT_JOBS_SQL = (
    "INSERT INTO queue_jobs (tenant_id, job_type, payload)"
    " SELECT ('00000000-0000-4000-8000-' || lpad((i % 10)::text, 12, '0'))::uuid,"
    " (CAST(:job_types AS text[]))[1 + (i / 10) % 5], jsonb_build_object('seq', i)"
    " FROM generate_series(0, :n - 1) AS i"
)


def tenant_id(seq: int) -> str:
    return tenant_uuid(seq % TENANTS)


def tenant_uuid(k: int) -> str:
    """Tenant number k's id, as the bulk inserts below make them."""
    return f"00000000-0000-4000-8000-{k:012d}"


# The same shape for any number of tenants and job types, pending (due now) or completed over the
# past week (history): job i belongs to tenant i % :tenants and has type (i / :tenants) % types.
_BULK_JOBS_SQL = (
    "INSERT INTO queue_jobs (tenant_id, job_type, payload, status, attempts, scheduled_at,"
    " locked_by, created_at, updated_at, completed_at)"
    " SELECT ('00000000-0000-4000-8000-' || lpad((i % p.tenants)::text, 12, '0'))::uuid,"
    " p.types[1 + (i / p.tenants) % cardinality(p.types)], jsonb_build_object('seq', i),"
    " CASE WHEN p.completed THEN 'completed' ELSE 'pending' END,"
    " CASE WHEN p.completed THEN 1 ELSE 0 END, x.t,"
    " CASE WHEN p.completed THEN 'queue-worker:history' END, x.t, x.t,"
    " CASE WHEN p.completed THEN x.t END"
    " FROM (SELECT CAST(:n AS int) AS n, CAST(:tenants AS int) AS tenants,"
    " CAST(:first AS int) AS first, CAST(:completed AS boolean) AS completed,"
    " CAST(:job_types AS text[]) AS types) AS p,"
    " generate_series(p.first, p.first + p.n - 1) AS i,"
    " LATERAL (SELECT CASE WHEN p.completed"
    " THEN now() - interval '7 days' + (i - p.first) * interval '7 days' / p.n"
    " ELSE now() END AS t) AS x"
)


def insert_jobs(
    conn: Any,
    n: int,
    *,
    tenants: int = TENANTS,
    job_types: Sequence[str] = JOB_TYPES,
    completed: bool = False,
    first: int = 0,
) -> None:
    """``n`` jobs in one statement, payloads ``{"seq": first..first+n-1}``: pending and due now,
    or (``completed``) finished over the past week, as history. Through the table's triggers,
    as any insert: the tenants' due times are kept."""
    conn.run(
        _BULK_JOBS_SQL,
        n=n,
        tenants=tenants,
        job_types=list(job_types),
        completed=completed,
        first=first,
    )


def job_type(seq: int) -> str:
    return JOB_TYPES[(seq // TENANTS) % len(JOB_TYPES)]


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str]:
    """The server every contender of a run uses: ``url`` (an admin URL: databases are created
    next to its own), or an embedded server in a temporary folder, removed afterwards."""
    if url:
        yield url
        return
    from handler.local import embedded

    with tempfile.TemporaryDirectory(prefix="qw-bench-") as folder:
        yield embedded.start(Path(folder) / "pgdata", temporary=True)


def database_url(admin_url: str, name: str) -> str:
    """The admin URL pointed at database ``name`` on the same server."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def connect(
    url: str, *, timeout: float | None = None, search_path: str | None = QUEUE_SEARCH_PATH
) -> Any:
    """A pg8000 native connection (autocommit), the way the worker makes them. ``timeout``
    (seconds) bounds every socket operation, so a long statement needs a long one. The queue's
    tables live in the schema ``queue_worker`` (migration 0005): the benchmarks' own SQL names
    them unqualified, so the session's ``search_path`` starts there (``None``: left as is)."""
    from handler.queue import connection

    settings = connection.parse_database_url(url)
    if timeout is not None:
        settings = settings.replace(connect_timeout=timeout)
    conn = connection.connect(settings)
    if search_path:
        conn.run(f"SET search_path TO {search_path}")
    return conn


def recreate_database(admin_url: str, name: str) -> str:
    """Drops and creates database ``name``; returns its URL."""
    conn = connect(admin_url)
    try:
        conn.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.run(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    conn = connect(admin_url)
    try:
        conn.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def install_queue_schema(url: str) -> None:
    """Our migrations (queue, idempotency store, schedules, maintenance)."""
    from handler.queue import migrations

    conn = connect(url)
    try:
        migrations.migrate(conn)
    finally:
        conn.close()


def server_version(url: str) -> str:
    conn = connect(url)
    try:
        return str(conn.run("SHOW server_version")[0][0]).split()[0]
    finally:
        conn.close()


def server_settings(url: str) -> str:
    conn = connect(url)
    try:
        rows = conn.run(
            "SELECT name, setting, unit FROM pg_settings WHERE name IN"
            " ('shared_buffers', 'synchronous_commit', 'fsync', 'max_connections') ORDER BY name"
        )
    finally:
        conn.close()
    shown = []
    for name, setting, unit in rows:
        if name == "shared_buffers" and unit == "8kB":
            shown.append(f"shared_buffers {int(setting) * 8 // 1024} MB")
        else:
            shown.append(f"{name} {setting}")
    return ", ".join(shown)


def postmaster_pid(url: str) -> int | None:
    """The server's main process when it runs on this machine (None otherwise): its children's
    CPU time, once they exit, is where a finished connection's backend CPU ends up."""
    conn = connect(url)
    try:
        backend = int(conn.run("SELECT pg_backend_pid()")[0][0])
    finally:
        conn.close()
    try:
        fields = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1])


# --------------------------------------------------------------------------------------------
# Processes and the machine
# --------------------------------------------------------------------------------------------


def cpu_seconds(pid: int, *, children: bool = False) -> float | None:
    """User + system CPU of a process (plus its reaped children's with ``children``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def source_version() -> str:
    """The commit of the code under test, and whether its source has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not commit:
        return "unknown"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return f"{commit}{' with uncommitted changes in src/' if dirty else ''}"


def peak_rss_mib() -> float:
    """This process's peak resident set since it started its program: VmHWM. Not ru_maxrss,
    which on Linux carries the parent's peak across fork and exec (a child started by a big
    parent reports the parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def machine(packages: Iterable[str]) -> dict[str, str]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": nproc or str(os.cpu_count()),
        "cpu": cpu_model,
        "memory": memory,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "packages": ", ".join(versions),
        "source": source_version(),
    }


# --------------------------------------------------------------------------------------------
# Checking deliveries and formatting
# --------------------------------------------------------------------------------------------


def delivery_check(bodies: Sequence[Any], jobs: int) -> dict[str, int]:
    """Matches the stand-in's received bodies to seq 0..jobs-1: how many jobs were never
    delivered, and how many deliveries were repeats."""
    seen: Counter[int] = Counter()
    for body in bodies:
        payload = body.get("payload") if isinstance(body, dict) else None
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if isinstance(seq, int) and 0 <= seq < jobs:
            seen[seq] += 1
    return {
        "requests": len(bodies),
        "undelivered": jobs - len(seen),
        "repeats": sum(count - 1 for count in seen.values()),
        "foreign": len(bodies) - sum(seen.values()),
    }


def fmt(values: Sequence[float], digits: int) -> str:
    """Median (min-max)."""
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def windows(times: Iterable[float], width: float, start: float) -> list[int]:
    """How many of ``times`` fall in each window [start + k * width, start + (k + 1) * width)."""
    counts: Counter[int] = Counter(int((t - start) // width) for t in times if t >= start)
    return [counts.get(k, 0) for k in range(max(counts, default=-1) + 1)]


def met(ok: bool) -> str:
    return "met" if ok else "not met"


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

SHARED_MACHINE = (
    "The machine has 2 cores, shared with other engineers' work during these runs: "
    "measurements are interleaved and repeated so that the load matters less, and the load "
    "average is given before and after (and per run where it varies)."
)


def describe_server(admin_url: str, given: bool) -> dict[str, str]:
    return {
        "postgres": server_version(admin_url),
        "postgres_settings": server_settings(admin_url),
        "server": "given by --database-url" if given else "embedded",
    }


def machine_lines(info: dict[str, str]) -> list[str]:
    """The report's machine section, from ``machine()`` and ``describe_server()`` plus
    ``load_before`` and ``load_after``."""
    lines = [
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}), {info['memory']} RAM",
        f"- {info['python']} on {info['os']}",
        f"- queue-worker at commit {info['source']}",
        f"- {info['packages']}",
        f"- PostgreSQL {info['postgres']} ({info['server']}, on this machine): "
        f"{info['postgres_settings']}",
    ]
    if info.get("pgbouncer"):
        lines.append(f"- {info['pgbouncer']}")
    lines += [
        f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']}. "
        + SHARED_MACHINE,
        "",
    ]
    return lines


def command_line(script: str, args: Any, *, defaults: dict[str, Any] | None = None) -> str:
    """How the report was made: the script, ``--quick``, ``--database-url`` (never its value)
    and any option that differs from its default."""
    command = f"python bench/{script}"
    if getattr(args, "quick", False):
        command += " --quick"
    if getattr(args, "database_url", None):
        command += " --database-url <PostgreSQL URL>"
    for name, default in (defaults or {}).items():
        value = getattr(args, name)
        if value != default:
            command += f" --{name.replace('_', '-')} {value}"
    return command


def write_report(name: str, text: str, output: str | None) -> Path:
    path = Path(output) if output else RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def add_common_arguments(parser: Any) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL admin URL (default: an embedded server)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test, not a measurement")
    parser.add_argument("--output", help="where to write the report (default bench/results/)")


# --------------------------------------------------------------------------------------------
# The worker in a fresh process
# --------------------------------------------------------------------------------------------

STARTED_PREFIX = "bench-started "
RESULT_PREFIX = "bench-result "
SCHEDULED_EVENT = {"scheduled_time": "2026-12-01T12:00:00Z"}  # a scheduled run: it lingers


def worker_env(database_url: str, functions_url: str, **overrides: str) -> dict[str, str]:
    """The worker's environment for a benchmark: no idempotency store unless asked;
    ``overrides`` by variable name in any case (``run_mode="rounds"``)."""
    env = {
        "DATABASE_URL": database_url,
        "FUNCTIONS_BASE_URL": functions_url,
        "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
        "IDEMPOTENCY_STORE": "off",
        # The worker logs a line per job that did not complete; the benchmarks count outcomes
        # themselves.
        "POWERTOOLS_LOG_LEVEL": "ERROR",
    }
    env.update({name.upper(): value for name, value in overrides.items()})
    return env


class Invocation:
    """``Worker(parse_settings(env)).run(parse_event(event), remaining_seconds=...)`` in a child
    process of its own (``python bench/benchlib.py``), so that imports, pools and the GIL are
    its own. With ``repeat`` it starts the next invocation as each one returns (after
    ``idle_pause`` when one claimed nothing), until ``stop()``. With ``sample_every`` it records
    each function's adaptive limit at that interval, and every call's outcome as the worker saw
    it. Use as a context manager; ``result()`` is what the child reported."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        event: dict[str, Any] | None = None,
        remaining_seconds: float = 60.0,
        repeat: bool = False,
        idle_pause: float = 0.05,
        sample_every: float | None = None,
    ) -> None:
        self.spec = {
            "env": env,
            "event": event or {},
            "remaining_seconds": remaining_seconds,
            "repeat": repeat,
            "idle_pause": idle_pause,
            "sample_every": sample_every,
        }
        self._process: subprocess.Popen[str] | None = None
        self._started = threading.Event()
        self._started_at = 0.0
        self._result: dict[str, Any] | None = None
        self._output: deque[str] = deque(maxlen=40)
        self._readers: list[threading.Thread] = []

    def start(self) -> Invocation:
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._readers.append(reader)
        return self

    def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith(STARTED_PREFIX):
                self._started_at = float(json.loads(line[len(STARTED_PREFIX) :])["at"])
                self._started.set()
            elif line.startswith(RESULT_PREFIX):
                self._result = json.loads(line[len(RESULT_PREFIX) :])
            else:
                self._output.append(line.rstrip())
        self._started.set()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def wait_started(self, timeout: float = 60.0) -> float:
        """The child's clock (time.time()) when its first invocation began."""
        if not self._started.wait(timeout) or not self._started_at:
            raise RuntimeError("the worker process did not start:\n" + self.output())
        return self._started_at

    def stop(self) -> None:
        """A repeating child starts no further invocation (its stdin closes)."""
        if self._process is not None and self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()

    def result(self, timeout: float) -> dict[str, Any]:
        assert self._process is not None
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"the worker process did not finish within {timeout:.0f} s"
            ) from None
        for reader in self._readers:
            reader.join(10)
        if code != 0 or self._result is None:
            raise RuntimeError(f"the worker process failed (exit {code}):\n" + self.output())
        return self._result

    def output(self) -> str:
        return "\n".join(self._output)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> Invocation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.kill()


def wait_for_linger(url: str, timeout: float = 60.0) -> str:
    """Waits until some invocation lingers (queue_linger holds a worker); its worker id."""
    conn = connect(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = conn.run("SELECT worker_id FROM queue_worker.queue_linger WHERE id = 1")
            if rows and rows[0][0]:
                return str(rows[0][0])
            time.sleep(0.02)
    finally:
        conn.close()
    raise RuntimeError(f"no invocation lingered within {timeout:.0f} s")


def end_linger(url: str) -> None:
    """Ends a lingering invocation as the next tick would: takes the linger over (the lingerer
    is notified, or sees it at its next poll, and returns), then lets go of it."""
    from handler.queue.store import QueueStore

    conn = connect(url)
    try:
        store = QueueStore(conn)
        store.take_linger("bench-next-tick", store.now(), 5.0)
        store.release_linger("bench-next-tick")
    finally:
        conn.close()


def reset_queue(url: str) -> None:
    """Every job, tenant, route, function state, limit and linger of the queue forgotten."""
    conn = connect(url, timeout=600)
    try:
        conn.run(
            "TRUNCATE queue_jobs, queue_jobs_dead_letter, queue_job_dependencies,"
            " queue_idempotency, queue_tenants, queue_tenant_limits, queue_routes,"
            " queue_functions"
        )
        conn.run("UPDATE queue_linger SET worker_id = NULL, started_at = NULL, until = NULL")
    finally:
        conn.close()


def vacuum(url: str, *tables: str) -> None:
    conn = connect(url, timeout=1800)
    try:
        for table in tables or ("queue_jobs", "queue_tenants"):
            conn.run(f"VACUUM ANALYZE {table}")
        conn.run("CHECKPOINT")
    finally:
        conn.close()


def _invoke(spec: dict[str, Any]) -> None:
    """In the child: the invocation(s), then one line of JSON."""
    from handler.runtime.events import parse_event
    from handler.runtime.settings import parse_settings
    from handler.runtime.worker import Worker

    recorder = _Recorder(spec["sample_every"]) if spec["sample_every"] else None
    stop = threading.Event()
    if spec["repeat"]:

        def wait_for_eof() -> None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdin.read()
            stop.set()

        threading.Thread(target=wait_for_eof, daemon=True).start()
    worker = Worker(parse_settings(spec["env"]))
    invocation = parse_event(spec["event"])
    cpu0 = time.process_time()
    started = time.time()
    print(STARTED_PREFIX + json.dumps({"at": started}), flush=True)
    runs: list[dict[str, Any]] = []
    while True:
        begun = time.time()
        summary, backlog = worker.run(
            invocation,
            remaining_seconds=spec["remaining_seconds"],
            request_id=f"bench-{os.getpid()}-{len(runs)}",
        )
        runs.append(
            {
                **summary.as_dict(),
                "started_at": begun,
                "ended_at": time.time(),
                "concurrency_limits": summary.concurrency_limits,
                "responses": {f"{f} {c}": n for (f, c), n in summary.responses.items()},
                "due_after": backlog.due_now,
            }
        )
        if not spec["repeat"] or stop.is_set():
            break
        if summary.claimed == 0 and stop.wait(spec["idle_pause"]):
            break
    result: dict[str, Any] = {
        "started_at": started,
        "ended_at": time.time(),
        "cpu_s": time.process_time() - cpu0,
        "peak_rss_mib": peak_rss_mib(),
        "runs": runs,
    }
    if recorder is not None:
        result.update(recorder.finish())
    worker.close()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class _Recorder:
    """Watches the worker's adaptive limits (in the child): each function's limit and calls in
    flight every ``every`` seconds, and every call's outcome and latency (as the worker measured
    it) when its slot is given back. It only reads: the limits behave as they would unwatched."""

    def __init__(self, every: float) -> None:
        from handler.dispatch import concurrency

        self.every = every
        self.instances: list[Any] = []
        self.samples: list[tuple[float, str, float, int]] = []
        self.calls: list[tuple[float, int | None, str, float | None]] = []
        self._done = threading.Event()
        recorder = self
        original_init = concurrency.FunctionLimits.__init__
        original_release = concurrency.AdaptiveLimit.release

        def init(limits: Any, *args: Any, **kwargs: Any) -> None:
            original_init(limits, *args, **kwargs)
            recorder.instances.append(limits)

        def release(limit: Any, outcome: Any, latency_ms: float | None, **kwargs: Any) -> None:
            if outcome is not None:
                recorder.calls.append((time.time(), outcome.status, outcome.kind, latency_ms))
            original_release(limit, outcome, latency_ms, **kwargs)

        concurrency.FunctionLimits.__init__ = init  # type: ignore[method-assign,assignment]
        concurrency.AdaptiveLimit.release = release  # type: ignore[method-assign,assignment]
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            if not self.instances:
                continue
            limits = self.instances[-1]
            now = time.time()
            for function, value in limits.current().items():
                self.samples.append((now, function, value, limits.of(function).in_flight))

    def finish(self) -> dict[str, Any]:
        self._done.set()
        return {"samples": self.samples, "calls": self.calls}


# --------------------------------------------------------------------------------------------
# PgBouncer
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def pgbouncer(server_url: str, *, pool_size: int) -> Iterator[Any]:
    """The tests' PgBouncer (tests/pgbouncer.py) in transaction mode in front of the server:
    ``.url_like(url)`` is a database's URL through it."""
    import shutil

    if not (shutil.which("pgbouncer") or Path("/usr/sbin/pgbouncer").exists()):
        raise SystemExit("PgBouncer is not installed (the Debian package pgbouncer)")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.pgbouncer import PgBouncer

    with PgBouncer(server_url, pool_size=pool_size) as running:
        yield running


def pgbouncer_version() -> str:
    import shutil

    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


if __name__ == "__main__":
    _invoke(json.loads(sys.argv[1]))
