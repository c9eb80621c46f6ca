"""Cold start: what importing the Lambda's module costs in the built package, and the memory
of one batch.

1. The package. src/Makefile's target (what `sam build` runs) builds it twice into temporary
   folders: for arm64, the deployed one, whose size is reported (unzipped, and zipped as SAM
   uploads it), and for this machine's platform, which the measurements run (the two differ in
   one compiled wheel, wrapt).
2. Import time, in a clean Python 3.13 (a fresh virtualenv with nothing installed, the package
   on PYTHONPATH as /var/task is, then boto3 and botocore as the runtime provides them, no
   bytecode written, as /var/task is read-only, and the Lambda's environment variables).
   ``import handler.app`` with tracing off and on, against importing only the modules it
   depends on at import time (everything outside ``handler`` that its modules import at module
   level, found with ``python -X importtime``, imported in the same order): the floor. The
   target is at most 1.1 times the floor. What the first invocation adds to that is measured
   too: the Tracer when tracing is on (it imports the X-Ray SDK), Powertools idempotency when
   IDEMPOTENCY_STORE is postgres (its package imports boto3 and the DynamoDB store), and the
   same package without its bytecode (what the package cost before it shipped any). Fresh
   processes, repetitions interleaved (the order reverses every other one); medians (min-max).
   A separate set of ``-X importtime`` runs gives the heaviest imports.
3. Nothing is done at import: after ``import handler.app`` the process has no thread besides the
   main one, no socket, and no worker (clients are made by the first invocation).
4. Memory. A fresh process (this one's interpreter, the source tree) runs one batch of 1,000
   jobs at 0 ms through ``handler.runtime.worker.Worker`` (as in ``bench/throughput.py``) and
   reports its peak resident set after the imports and after the batch; a second process does
   the same under ``tracemalloc`` for the peak of Python allocations during the batch. The peak
   resident set is the kernel's high-water mark of the process (``VmHWM``), not ``ru_maxrss``:
   Linux carries the parent's peak into a child across fork and exec, so a child of a big
   parent reports the parent's.

Run (about 3 minutes; needs Python 3.13: python3.13 on PATH, or --python; writes
``bench/results/cold_start.md``)::

    python bench/cold_start.py --database-url postgresql://postgres@localhost:5432/postgres

Without ``--database-url`` an embedded PostgreSQL in a temporary folder is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import benchlib

ROOT = Path(__file__).resolve().parent.parent
REPETITIONS = 10
MEMORY_REPETITIONS = 3
BATCH_JOBS = 1000
TARGET_RATIO = 1.1
DATABASE = "qw_bench_cold_start"
TIMED_IMPORT = (
    "{before}; import time; t = time.perf_counter(); {imports}; "
    "print(time.perf_counter() - t, time.process_time())"
)
# The Lambda's environment, as far as importing and tracing read it.
LAMBDA_ENV = {
    "LAMBDA_TASK_ROOT": "",  # the package folder, set below
    "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
    "AWS_LAMBDA_FUNCTION_NAME": "queue-worker-bench",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:9",  # nothing is sent by importing
    "POWERTOOLS_SERVICE_NAME": "queue-worker",
    "POWERTOOLS_METRICS_NAMESPACE": "QueueWorker",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
}


# --------------------------------------------------------------------------------------------
# The package and the clean interpreter
# --------------------------------------------------------------------------------------------


def find_python(given: str | None) -> str:
    candidate = given or os.environ.get("LAMBDA_PYTHON") or shutil.which("python3.13")
    if candidate:
        out = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.stdout.strip() == "True":
            return candidate
    raise SystemExit("needs Python 3.13: python3.13 on PATH, LAMBDA_PYTHON or --python")


def build_package(python: str, folder: Path, platform_tag: str) -> Path:
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-s",
            "-C",
            str(ROOT / "src"),
            "build-QueueWorkerFunction",
            f"ARTIFACTS_DIR={folder}",
            f"LAMBDA_PYTHON={python}",
            f"PLATFORM={platform_tag}",
        ],
        check=True,
        capture_output=True,
    )
    return folder


def host_platform() -> str:
    machine = platform.machine().lower()
    return f"manylinux2014_{'aarch64' if machine in ('aarch64', 'arm64') else machine}"


def package_size(folder: Path, scratch: Path) -> dict[str, Any]:
    """Bytes unzipped and zipped (deflate, as `sam deploy` zips a folder), files, modules."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    archive = scratch / "package.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(path, path.relative_to(folder))
    by_top: dict[str, int] = defaultdict(int)
    for path in files:
        top = path.relative_to(folder).parts[0]
        by_top[top.split("-")[0].removesuffix(".py")] += path.stat().st_size
    return {
        "unzipped": sum(p.stat().st_size for p in files),
        "zipped": archive.stat().st_size,
        "files": len(files),
        "modules": sum(1 for p in files if p.suffix == ".py"),
        "compiled": sum(1 for p in files if p.suffix == ".pyc"),
        "largest": sorted(by_top.items(), key=lambda item: -item[1])[:8],
    }


def shipped_versions(folder: Path) -> str:
    found = []
    for metadata in sorted(folder.glob("*.dist-info")):
        dist = importlib.metadata.PathDistribution(metadata)
        found.append(f"{dist.metadata['Name']} {dist.version}")
    return ", ".join(found)


def runtime_sdk(python: str, folder: Path) -> Path:
    """boto3, botocore and s3transfer, as the runtime provides them (compiled, as there)."""
    version = importlib.metadata.version("boto3")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(folder),
            f"boto3=={version}",
        ],
        check=True,
        capture_output=True,
    )
    return folder


class Interpreter:
    """A clean Python 3.13 with the package (and the runtime's SDK) on its path."""

    def __init__(self, venv: Path, package: Path, sdk: Path) -> None:
        self.python = str(venv / "bin" / "python")
        self.env = LAMBDA_ENV | {
            "LAMBDA_TASK_ROOT": str(package),
            "PYTHONPATH": os.pathsep.join([str(package), str(sdk)]),
        }

    def run(
        self, code: str, *, importtime: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [self.python, *(["-X", "importtime"] if importtime else []), "-c", code]
        out = subprocess.run(
            command, capture_output=True, text=True, check=False, env=self.env | (env or {})
        )
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"failed: {code[:200]}")
        return out


def import_code(modules: list[str]) -> str:
    return "; ".join(f"import {m}" for m in modules) or "pass"


# --------------------------------------------------------------------------------------------
# Import time
# --------------------------------------------------------------------------------------------


def importtime_rows(stderr: str) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, depth, module) per line of ``-X importtime``, in output order
    (a module is printed once its own imports are done, after them)."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line.split(":", 1)[1].split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        rows.append((int(self_us), int(cumulative_us), depth, name.strip()))
    return rows


def is_ours(module: str) -> bool:
    return module == "handler" or module.startswith("handler.")


def dependencies(rows: list[tuple[int, int, int, str]]) -> list[str]:
    """The modules outside ``handler`` that a handler module imports itself, in import order.
    Importing them (and so everything they import) is "our dependencies alone"."""
    parents: dict[int, str] = {}
    found: list[str] = []
    for _, _, depth, module in reversed(rows):  # a parent comes after its children
        parents[depth] = module
        parent = parents.get(depth - 1)
        if not is_ours(module) and parent is not None and is_ours(parent):
            found.append(module)
    found.reverse()
    return list(dict.fromkeys(found))


def open_sockets() -> dict[str, int]:
    """This process's sockets by family and type (e.g. ``AF_INET/SOCK_DGRAM``)."""
    import socket

    kinds: dict[str, int] = defaultdict(int)
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if not os.readlink(fd).startswith("socket:"):
                continue
            copy = socket.socket(fileno=os.dup(int(fd.name)))
        except OSError:
            continue
        kinds[f"{copy.family.name}/{copy.type.name}"] += 1
        copy.close()
    return dict(kinds)


def after_import_state(modules: list[str]) -> dict[str, Any]:
    """Runs in a child: what importing ``modules`` left behind."""
    import importlib

    for module in modules:
        importlib.import_module(module)
    app = sys.modules.get("handler.app")
    return {
        "threads": threading.active_count(),
        "sockets": open_sockets(),
        "worker_created": getattr(app, "_worker", None) is not None,
        "max_rss_mib": benchlib.peak_rss_mib(),
        "x_ray_imported": "aws_xray_sdk" in sys.modules,
        "boto3_imported": "boto3" in sys.modules,
    }


# --------------------------------------------------------------------------------------------
# Memory of one batch
# --------------------------------------------------------------------------------------------


def batch_child(url: str, functions: str, store: str, *, trace: bool) -> dict[str, Any]:
    """Runs in a child: one batch of BATCH_JOBS through the Worker."""
    from handler.runtime.events import parse_event
    from handler.runtime.settings import parse_settings
    from handler.runtime.worker import Worker

    rss_imports = benchlib.peak_rss_mib()
    if trace:
        import tracemalloc

        tracemalloc.start()
    env = {
        "DATABASE_URL": url,
        "FUNCTIONS_BASE_URL": functions,
        "SUPABASE_SERVICE_ROLE_KEY": benchlib.SERVICE_ROLE_KEY,
        "MAX_JOBS_PER_TENANT": "100000",
        "MAX_JOBS_PER_RUN": str(BATCH_JOBS),
        "MAX_CONCURRENCY": "50",
        "IDEMPOTENCY_STORE": store,
    }
    worker = Worker(parse_settings(env))
    started = time.perf_counter()
    summary, _ = worker.run(parse_event({}), remaining_seconds=600, request_id="cold-start")
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "completed": summary.completed,
        "seconds": seconds,
        "rss_imports_mib": rss_imports,
        "rss_peak_mib": benchlib.peak_rss_mib(),
    }
    if trace:
        import tracemalloc

        result["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 1024 / 1024
    worker.close()
    return result


def memory_runs(admin_url: str, repetitions: int) -> list[dict[str, Any]]:
    from handler.local.standin import StandIn

    url = benchlib.recreate_database(admin_url, DATABASE)
    benchlib.install_queue_schema(url)
    runs = []
    try:
        with StandIn(delay_ms=0, record=False) as standin:
            for rep in range(1, repetitions + 1):
                for store in ("off", "postgres"):
                    for trace in (False, True):
                        conn = benchlib.connect(url)
                        # The queue's own schema once migrations move it there, else public.
                        conn.run("SET search_path TO queue_worker, public")
                        conn.run("TRUNCATE queue_jobs, queue_idempotency")
                        conn.run(
                            benchlib.INSERT_JOBS_SQL,
                            job_types=list(benchlib.JOB_TYPES),
                            n=BATCH_JOBS,
                        )
                        conn.run("VACUUM ANALYZE queue_jobs")
                        conn.close()
                        command = [
                            sys.executable,
                            __file__,
                            "--batch-child",
                            url,
                            standin.base_url,
                            store,
                        ]
                        if trace:
                            command.append("--trace")
                        out = subprocess.run(command, capture_output=True, text=True, check=False)
                        if out.returncode != 0:
                            sys.stderr.write(out.stderr[-3000:])
                            raise SystemExit("the batch child failed")
                        result = json.loads(out.stdout.strip().splitlines()[-1])
                        result.update(rep=rep, store=store, trace=trace)
                        runs.append(result)
                        print(f"memory rep {rep} store {store} trace {trace}: {result}", flush=True)
    finally:
        benchlib.drop_database(admin_url, DATABASE)
    return runs


# --------------------------------------------------------------------------------------------
# The driver and the report
# --------------------------------------------------------------------------------------------

TRACING_OFF = {"POWERTOOLS_TRACE_DISABLED": "true"}
TRACING_ON = {"POWERTOOLS_TRACE_DISABLED": "false"}
MAKE_TRACER = "from handler.operate import observability; observability.get_tracer()"
IMPORT_IDEMPOTENCY = "import handler.dispatch.idempotency"

MODES = {
    "app": "`import handler.app`, tracing off",
    "app-traced": "`import handler.app`, tracing on",
    "deps": "its dependencies alone: the floor",
    "on-top": "`import handler.app` once its dependencies are imported (our modules only)",
    "tracer": "first traced invocation: the Tracer (X-Ray SDK), after `import handler.app`",
    "idempotency": "first invocation with `IDEMPOTENCY_STORE=postgres`: Powertools idempotency "
    "(with boto3), after `import handler.app`",
    "no-bytecode": "`import handler.app`, tracing off, the same package without its bytecode",
    "nothing": "nothing (the interpreter's start)",
}


def drive(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    python = find_python(args.python)
    info = benchlib.machine(())
    info["load_before"] = benchlib.load_average()
    info["python"] = subprocess.run(
        [python, "-c", "import platform; print('CPython', platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="qw-cold-start-") as scratch:
        folder = Path(scratch)
        print("building the package (arm64, and for this machine)", flush=True)
        deployed = build_package(python, folder / "arm64", "manylinux2014_aarch64")
        sizes = {"arm64": package_size(deployed, folder)}
        package = build_package(python, folder / "host", host_platform())
        sizes["host"] = package_size(package, folder)
        info["packages"] = shipped_versions(package)
        unbuilt = folder / "no-bytecode"
        shutil.copytree(package, unbuilt, ignore=shutil.ignore_patterns("__pycache__"))
        sdk = runtime_sdk(python, folder / "runtime-sdk")
        subprocess.run([python, "-m", "compileall", "-q", str(sdk)], check=True)
        subprocess.run([python, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
        clean = Interpreter(folder / "venv", package, sdk)
        without_bytecode = Interpreter(folder / "venv", unbuilt, sdk)

        rows = importtime_rows(
            clean.run("import handler.app", importtime=True, env=TRACING_OFF).stderr
        )
        deps = dependencies(rows)
        print(f"{len(deps)} modules imported directly by handler modules: {', '.join(deps)}")
        # mode -> (interpreter, environment, statements before the clock, timed statements)
        plan: dict[str, tuple[Interpreter, dict[str, str], str, str]] = {
            "app": (clean, TRACING_OFF, "", "import handler.app"),
            "app-traced": (clean, TRACING_ON, "", "import handler.app"),
            "deps": (clean, TRACING_OFF, "", import_code(deps)),
            "on-top": (clean, TRACING_OFF, import_code(deps), "import handler.app"),
            "tracer": (clean, TRACING_ON, "import handler.app", MAKE_TRACER),
            "idempotency": (clean, TRACING_OFF, "import handler.app", IMPORT_IDEMPOTENCY),
            "no-bytecode": (without_bytecode, TRACING_OFF, "", "import handler.app"),
            "nothing": (clean, TRACING_OFF, "", "pass"),
        }
        timings: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        breakdowns: dict[str, list[list[tuple[int, int, int, str]]]] = defaultdict(list)
        loads = []
        for rep in range(1, args.repetitions + 1):
            order = list(MODES) if rep % 2 else list(reversed(MODES))
            for mode in order:
                interpreter, env, before, timed = plan[mode]
                code = TIMED_IMPORT.format(before=before or "pass", imports=timed)
                wall, cpu = interpreter.run(code, env=env).stdout.split()
                timings[mode].append((float(wall), float(cpu)))
            for what, env, code in (
                ("app", TRACING_OFF, "import handler.app"),
                ("tracer", TRACING_ON, f"import handler.app; {MAKE_TRACER}"),
                ("idempotency", TRACING_OFF, f"import handler.app; {IMPORT_IDEMPOTENCY}"),
            ):
                breakdowns[what].append(
                    importtime_rows(clean.run(code, importtime=True, env=env).stderr)
                )
            loads.append(benchlib.load_average())
            print(
                f"rep {rep}: "
                + ", ".join(f"{mode} {timings[mode][-1][0] * 1000:.0f} ms" for mode in MODES)
                + f", load {loads[-1]}",
                flush=True,
            )
        state = {
            what: json.loads(
                clean.run(
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    "import cold_start, json; "
                    f"print(json.dumps(cold_start.after_import_state({mods!r})))",
                    env=env,
                ).stdout
            )
            for what, mods, env in (
                ("app", ["handler.app"], TRACING_OFF),
                ("app-traced", ["handler.app"], TRACING_ON),
                ("deps", deps, TRACING_OFF),
            )
        }
    with benchlib.postgres(args.database_url) as admin_url:
        info["postgres"] = benchlib.server_version(admin_url)
        memory = memory_runs(admin_url, args.memory_repetitions)
    info["load_after"] = benchlib.load_average()
    text = report(
        info,
        args,
        deps=deps,
        sizes=sizes,
        timings=timings,
        breakdowns=breakdowns,
        loads=loads,
        state=state,
        memory=memory,
    )
    out_path = Path(args.output) if args.output else benchlib.RESULTS / "cold_start.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"\n{text}\n({time.perf_counter() - started:.0f} s; written to {out_path.name})")


def heaviest(
    breakdowns: list[list[tuple[int, int, int, str]]], deps: list[str]
) -> dict[str, list[tuple[str, float]]]:
    """Medians over the runs: self time by top-level package, cumulative time of each direct
    dependency, self time of each of our modules."""
    found: dict[str, dict[str, list[float]]] = {
        "packages": defaultdict(list),
        "direct": defaultdict(list),
        "ours": defaultdict(list),
    }
    for rows in breakdowns:
        package_ms: dict[str, float] = defaultdict(float)
        for self_us, cumulative_us, _, module in rows:
            package_ms[module.split(".", 1)[0]] += self_us / 1000
            if is_ours(module):
                found["ours"][module].append(self_us / 1000)
            if module in deps:
                found["direct"][module].append(cumulative_us / 1000)
        for package, ms in package_ms.items():
            found["packages"][package].append(ms)
    return {
        kind: sorted(((k, statistics.median(v)) for k, v in values.items()), key=lambda x: -x[1])
        for kind, values in found.items()
    }


def added(
    breakdowns: list[list[tuple[int, int, int, str]]], base: list[list[tuple[int, int, int, str]]]
) -> list[tuple[str, float]]:
    """Self time by top-level package of the modules `breakdowns` import beyond `base`."""
    known = {module for rows in base for *_, module in rows}
    totals: dict[str, list[float]] = defaultdict(list)
    for rows in breakdowns:
        package_ms: dict[str, float] = defaultdict(float)
        for self_us, _, _, module in rows:
            if module not in known:
                package_ms[module.split(".", 1)[0]] += self_us / 1000
        for package, ms in package_ms.items():
            totals[package].append(ms)
    return sorted(((k, statistics.median(v)) for k, v in totals.items()), key=lambda x: -x[1])


def sockets_text(sockets: dict[str, int]) -> str:
    if not sockets:
        return "no socket"
    return ", ".join(
        f"{n} {kind.upper()} socket{'s' if n > 1 else ''}" for kind, n in sockets.items()
    )


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    *,
    deps: list[str],
    sizes: dict[str, dict[str, Any]],
    timings: dict[str, list[tuple[float, float]]],
    breakdowns: dict[str, list[list[tuple[int, int, int, str]]]],
    loads: list[str],
    state: dict[str, Any],
    memory: list[dict[str, Any]],
) -> str:
    wall = {mode: [t[0] * 1000 for t in timings[mode]] for mode in MODES}
    cpu = {mode: [t[1] * 1000 for t in timings[mode]] for mode in MODES}

    def ratio(mode: str) -> tuple[float, float, float]:
        paired = [a / d for a, d in zip(wall[mode], wall["deps"], strict=True)]
        return (
            statistics.median(wall[mode]) / statistics.median(wall["deps"]),
            min(paired),
            max(paired),
        )

    off, on = ratio("app"), ratio("app-traced")
    deps_ms = statistics.median(wall["deps"])
    direct_ratio = (deps_ms + statistics.median(wall["on-top"])) / deps_ms
    heavy = heaviest(breakdowns["app"], deps)
    ours_ms = sum(ms for _, ms in heavy["ours"])
    total_ms = statistics.median(sum(r[0] for r in rows) / 1000 for rows in breakdowns["app"])
    tracer_adds = added(breakdowns["tracer"], breakdowns["app"])
    idempotency_adds = added(breakdowns["idempotency"], breakdowns["app"])
    arm64, host = sizes["arm64"], sizes["host"]
    command = "python bench/cold_start.py"
    if args.database_url:
        command += " --database-url <PostgreSQL URL>"

    def state_text(what: str) -> str:
        s = state[what]
        return (
            f"{s['threads']} thread(s), {sockets_text(s['sockets'])}, X-Ray SDK imported: "
            f"{'yes' if s['x_ray_imported'] else 'no'}, boto3 imported: "
            f"{'yes' if s['boto3_imported'] else 'no'}, peak RSS {s['max_rss_mib']:.0f} MiB"
        )

    lines = [
        "# Cold start: the Lambda package, its import time and the memory of one batch",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}), {info['memory']} RAM",
        f"- {info['python']} (the package's and the measurements'), on {info['os']}; "
        f"queue-worker at commit {info['source']}",
        f"- In the package: {info['packages']}",
        f"- PostgreSQL {info['postgres']} (for the batch)",
        f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']}; "
        f"during the import runs {min(loads)}-{max(loads)}. Other work shares this machine.",
        "",
        "## The package",
        "",
        "Built by `make -C src build-QueueWorkerFunction` (what `sam build` runs), in a "
        "temporary folder:",
        "",
        "| platform | unzipped | zipped | files | modules (each with bytecode) |",
        "|---|---:|---:|---:|---:|",
        f"| arm64 (deployed) | {mb(arm64['unzipped'])} | {mb(arm64['zipped'])} "
        f"| {arm64['files']:,} | {arm64['modules']:,} ({arm64['compiled']:,}) |",
        f"| {platform.machine()} (measured below) | {mb(host['unzipped'])} "
        f"| {mb(host['zipped'])} | {host['files']:,} | {host['modules']:,} "
        f"({host['compiled']:,}) |",
        "",
        "Largest parts of the arm64 package, unzipped: "
        + ", ".join(f"`{name}` {mb(size)}" for name, size in arm64["largest"])
        + ".",
        "",
        "## Method",
        "",
        "- A clean Python 3.13: a fresh virtualenv with nothing installed; on `PYTHONPATH` the "
        "package (as `/var/task` is), then boto3 and botocore installed apart, as the runtime "
        "provides them; `PYTHONDONTWRITEBYTECODE=1`, as `/var/task` is read-only; "
        "`LAMBDA_TASK_ROOT` and the other variables Lambda sets, so tracing is on unless "
        "`POWERTOOLS_TRACE_DISABLED=true`.",
        "- Each measurement is a fresh `python -c` process that times its imports with "
        "`time.perf_counter()`; it also reports its whole CPU time (interpreter start "
        "included).",
        '- The floor, "its dependencies alone": `import` of the '
        f"{len(deps)} modules outside `handler` that handler modules import at module level, "
        "in the order they import them (found with `-X importtime`; everything those import "
        'comes with them). The difference is the cost of our own modules; the row "once its '
        'dependencies are imported" measures it directly (a process imports the dependencies, '
        "then times `import handler.app`).",
        "- The first invocation's extras are timed in a process that has imported "
        "`handler.app`: making the Tracer (tracing on), importing "
        "`handler.dispatch.idempotency` (a PostgreSQL or DynamoDB store).",
        f"- {args.repetitions} repetitions, interleaved (the order reverses every other "
        "repetition); median (min-max). The heaviest imports are medians over as many "
        "`-X importtime` runs (it adds its own overhead, so its totals run higher).",
        "",
        "## Import time",
        "",
        "| what | ms | process CPU, ms |",
        "|---|---:|---:|",
        *[
            f"| {label} | {benchlib.fmt(wall[mode], 0) if mode != 'nothing' else ''} "
            f"| {benchlib.fmt(cpu[mode], 0)} |"
            for mode, label in MODES.items()
        ],
        "",
        f"Ratio `import handler.app` / its dependencies: **{direct_ratio:.2f}** measured "
        "directly (the dependencies' time plus what `import handler.app` adds once they are "
        "imported: a difference measured in one process, not between two noisy totals); "
        f"target ≤ {TARGET_RATIO}: {'met' if direct_ratio <= TARGET_RATIO else 'NOT met'}. "
        f"Between fresh processes: tracing off {off[0]:.2f} (per repetition "
        f"{off[1]:.2f}-{off[2]:.2f}), tracing on {on[0]:.2f} ({on[1]:.2f}-{on[2]:.2f}); from "
        f"the `-X importtime` self times: our modules take {ours_ms:.0f} ms of "
        f"{total_ms:.0f} ms, {total_ms / (total_ms - ours_ms):.2f}. The spread of the "
        "fresh-process ratios is the other load on this machine, not the code.",
        "",
        "Tracing on or off, `import handler.app` imports the same modules: the Tracer is made by "
        "the first traced invocation. What that first invocation imports beyond "
        "`handler.app`, self time by package (median of the `-X importtime` runs):",
        "",
        "- tracing on, the Tracer: "
        + ", ".join(f"`{p}` {ms:.0f} ms" for p, ms in tracer_adds[:6])
        + ".",
        "- `IDEMPOTENCY_STORE=postgres` (or `dynamodb`): "
        + ", ".join(f"`{p}` {ms:.0f} ms" for p, ms in idempotency_adds[:6])
        + ". Powertools' idempotency package imports boto3 and its DynamoDB store in its "
        "`__init__`, whichever store is used; with `IDEMPOTENCY_STORE=off` none of it is "
        "imported.",
        "",
        f"After `import handler.app`, tracing off: {state_text('app')}; tracing on: "
        f"{state_text('app-traced')}. After importing the dependencies alone: "
        f"{state_text('deps')}. The worker, its database connection, HTTP clients and dispatch "
        "threads are made on the first invocation and reused after.",
        "",
        "### Heaviest imports (`import handler.app`, tracing off)",
        "",
        "Self time by top-level package (all its modules):",
        "",
        "| package | ms |",
        "|---|---:|",
        *[f"| `{p}` | {ms:.0f} |" for p, ms in heavy["packages"][:15]],
        "",
        "Direct dependencies of our modules, cumulative time (what each one brings in, the "
        "first time it is imported):",
        "",
        "| module | ms |",
        "|---|---:|",
        *[f"| `{d}` | {ms:.0f} |" for d, ms in heavy["direct"][:15]],
        "",
        f"Our own modules, self time (all {len(heavy['ours'])}: {ours_ms:.0f} ms of "
        f"{total_ms:.0f} ms under `-X importtime`), the heaviest:",
        "",
        "| module | ms |",
        "|---|---:|",
        *[f"| `{m}` | {ms:.1f} |" for m, ms in heavy["ours"][:8]],
        "",
        f"All {len(deps)} direct dependencies, in import order: "
        + ", ".join(f"`{d}`" for d in deps)
        + ".",
        "",
        f"## Memory of one batch ({BATCH_JOBS:,} jobs, 0 ms per request)",
        "",
        "A fresh process (the development environment's Python and the source tree, not the "
        "package), `Worker(...).run(...)` with `MAX_CONCURRENCY=50`, against "
        "`handler.local.standin`; peak RSS: the process's high-water mark (`VmHWM`; "
        "`ru_maxrss` would carry the parent's peak into the child); traced peak from "
        f"`tracemalloc` in a separate run (Python allocations only). {args.memory_repetitions} "
        "repetitions; median (min-max).",
        "",
        "| idempotency store | peak RSS after imports, MiB | peak RSS after the batch, MiB "
        "| traced Python peak during the batch, MiB | batch s | completed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for store in ("off", "postgres"):
        plain = [m for m in memory if m["store"] == store and not m["trace"]]
        traced = [m for m in memory if m["store"] == store and m["trace"]]
        if not plain:
            continue
        lines.append(
            f"| {store} | {benchlib.fmt([m['rss_imports_mib'] for m in plain], 0)} "
            f"| {benchlib.fmt([m['rss_peak_mib'] for m in plain], 0)} "
            f"| {benchlib.fmt([m['traced_peak_mib'] for m in traced], 1) if traced else 'n/a'} "
            f"| {benchlib.fmt([m['seconds'] for m in plain], 2)} "
            f"| {min(m['completed'] for m in plain):,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--repeat", "--repetitions", dest="repetitions", type=int, default=REPETITIONS
    )
    parser.add_argument("--memory-repetitions", type=int, default=MEMORY_REPETITIONS)
    parser.add_argument("--python", help="the Python 3.13 to build and measure with")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL admin URL (default: an embedded server)",
    )
    parser.add_argument("--output", help="where to write the report (default bench/results/)")
    parser.add_argument(
        "--batch-child", nargs=3, metavar=("URL", "FUNCTIONS", "STORE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_child:
        url, functions, store = args.batch_child
        print(json.dumps(batch_child(url, functions, store, trace=args.trace)))
        return
    drive(args)


if __name__ == "__main__":
    main()
