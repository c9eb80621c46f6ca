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
import os
import platform
import statistics
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

RESULTS = Path(__file__).resolve().parent / "results"

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
    return f"00000000-0000-4000-8000-{seq % TENANTS:012d}"


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


def connect(url: str, *, timeout: float | None = None) -> Any:
    """A pg8000 native connection (autocommit), the way the worker makes them. ``timeout``
    (seconds) bounds every socket operation, so a long statement needs a long one."""
    import dataclasses

    from handler.queue import connection

    settings = connection.parse_database_url(url)
    if timeout is not None:
        settings = dataclasses.replace(settings, connect_timeout=timeout)
    return connection.connect(settings)


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
