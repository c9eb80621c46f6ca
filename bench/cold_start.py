"""Cold start: what importing the Lambda's module costs, and the memory of one batch.

1. Import time. In fresh processes, ``import handler.app`` against importing only the modules
   it depends on at import time (everything outside ``handler`` that its modules import at module
   level, found with ``python -X importtime``, imported in the same order). The ratio is the cost
   of our own modules on top of our dependencies; the target is at most 1.1. Repetitions are
   interleaved (app, dependencies, app, ...); medians (min-max). A separate set of
   ``-X importtime`` runs gives the heaviest imports.
2. Nothing is done at import: after ``import handler.app`` the process has no thread besides the
   main one, no socket, and no worker (clients are made by the first invocation).
3. Memory. A fresh process runs one batch of 1,000 jobs at 0 ms through
   ``handler.worker.Worker`` (as in ``bench/throughput.py``) and reports its peak resident set
   after the imports and after the batch; a second process does the same under ``tracemalloc``
   for the peak of Python allocations during the batch. The peak resident set is the kernel's
   high-water mark of the process (``VmHWM``), not ``ru_maxrss``: Linux carries the parent's
   peak into a child across fork and exec, so a child of a big parent reports the parent's.

Run (about 2 minutes; writes ``bench/results/cold_start.md``)::

    python bench/cold_start.py --database-url postgresql://postgres@localhost:5432/postgres

Without ``--database-url`` an embedded PostgreSQL in a temporary folder is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import benchlib

REPETITIONS = 10
MEMORY_REPETITIONS = 3
BATCH_JOBS = 1000
TARGET_RATIO = 1.1
DATABASE = "qw_bench_cold_start"
PACKAGES = (
    "aws-lambda-powertools",
    "aws-xray-sdk",
    "boto3",
    "botocore",
    "httpx2",
    "pg8000",
    "cronsim",
)
TIMED_IMPORT = (
    "{before}; import time; t = time.perf_counter(); {imports}; "
    "print(time.perf_counter() - t, time.process_time())"
)


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


def run_python(
    code: str, *, importtime: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"failed: {code[:200]}")
    return out


def bytecode_env(cache: Path, *, write: bool) -> dict[str, str]:
    """The environment of a child whose bytecode cache is ``cache`` (``PYTHONPYCACHEPREFIX``):
    what was imported once with ``write`` loads from there, the rest is compiled each time."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def import_code(modules: list[str]) -> str:
    return "; ".join(f"import {m}" for m in modules) or "pass"


def timed_import(
    modules: list[str], env: dict[str, str], *, before: list[str] | None = None
) -> tuple[float, float]:
    """(wall seconds of importing ``modules``, CPU seconds of the whole process) in a fresh
    process that has imported ``before`` first (untimed)."""
    code = TIMED_IMPORT.format(before=import_code(before or []), imports=import_code(modules))
    wall, cpu = run_python(code, env=env).stdout.split()
    return float(wall), float(cpu)


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


MODES = {
    "app": "`import handler.app`, all bytecode cached",
    "app-compiled": "`import handler.app`, our modules compiled at each start",
    "deps": "its dependencies alone",
    "on-top": "`import handler.app` once its dependencies are imported (our modules only)",
    "nothing": "nothing (the interpreter's start)",
}


def drive(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    info = benchlib.machine(PACKAGES)
    info["load_before"] = benchlib.load_average()
    with tempfile.TemporaryDirectory(prefix="qw-bytecode-") as folder:
        # Two bytecode caches: one holds every module handler.app imports; the other only its
        # dependencies, so that our own modules are compiled from source at each start (as in
        # a package shipped without bytecode to a read-only file system).
        everything, dependencies_only = Path(folder) / "all", Path(folder) / "deps"
        run_python("import handler.app", env=bytecode_env(everything, write=True))
        rows = importtime_rows(
            run_python(
                "import handler.app", importtime=True, env=bytecode_env(everything, write=False)
            ).stderr
        )
        deps = dependencies(rows)
        print(f"{len(deps)} modules imported directly by handler modules: {', '.join(deps)}")
        run_python(import_code(deps), env=bytecode_env(dependencies_only, write=True))
        envs = {
            "app": bytecode_env(everything, write=False),
            "app-compiled": bytecode_env(dependencies_only, write=False),
            "deps": bytecode_env(everything, write=False),
            "on-top": bytecode_env(everything, write=False),
            "nothing": bytecode_env(everything, write=False),
        }
        modules = {
            "app": ["handler.app"],
            "app-compiled": ["handler.app"],
            "deps": deps,
            "on-top": ["handler.app"],
            "nothing": [],
        }
        timings: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
        breakdowns = []
        loads = []
        for rep in range(1, args.repetitions + 1):
            order = list(MODES) if rep % 2 else list(reversed(MODES))
            for mode in order:
                before = deps if mode == "on-top" else None
                timings[mode].append(timed_import(modules[mode], envs[mode], before=before))
            breakdowns.append(
                importtime_rows(
                    run_python("import handler.app", importtime=True, env=envs["app"]).stderr
                )
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
                run_python(
                    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    "import cold_start, json; "
                    f"print(json.dumps(cold_start.after_import_state({mods!r})))",
                    env=envs["app"],
                ).stdout
            )
            for what, mods in (("app", ["handler.app"]), ("deps", deps))
        }
    with benchlib.postgres(args.database_url) as admin_url:
        info["postgres"] = benchlib.server_version(admin_url)
        memory = memory_runs(admin_url, args.memory_repetitions)
    info["load_after"] = benchlib.load_average()
    text = report(
        info,
        args,
        deps=deps,
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


def sockets_text(sockets: dict[str, int]) -> str:
    if not sockets:
        return "no socket"
    return ", ".join(
        f"{n} {kind.upper()} socket{'s' if n > 1 else ''}" for kind, n in sockets.items()
    )


def report(
    info: dict[str, str],
    args: argparse.Namespace,
    *,
    deps: list[str],
    timings: dict[str, list[tuple[float, float]]],
    breakdowns: list[list[tuple[int, int, int, str]]],
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

    cached, compiled = ratio("app"), ratio("app-compiled")
    deps_ms = statistics.median(wall["deps"])
    direct_ratio = (deps_ms + statistics.median(wall["on-top"])) / deps_ms
    heavy = heaviest(breakdowns, deps)
    ours_ms = sum(ms for _, ms in heavy["ours"])
    total_ms = statistics.median(sum(r[0] for r in rows) / 1000 for rows in breakdowns)
    app_state, deps_state = state["app"], state["deps"]
    command = "python bench/cold_start.py"
    if args.database_url:
        command += " --database-url <PostgreSQL URL>"
    lines = [
        "# Cold start: import time and the memory of one batch",
        "",
        f"Generated by `{command}` on {dt.date.today().isoformat()}.",
        "",
        "## Machine",
        "",
        f"- CPUs (`nproc`): {info['nproc']} ({info['cpu']}), {info['memory']} RAM",
        f"- {info['python']} on {info['os']}; queue-worker at commit {info['source']}",
        f"- {info['packages']}",
        f"- PostgreSQL {info['postgres']} (for the batch)",
        f"- load average (1 min) before / after: {info['load_before']} / {info['load_after']}; "
        f"during the import runs {min(loads)}-{max(loads)}. Other work shares this machine.",
        "",
        "## Method",
        "",
        "- Each measurement is a fresh `python -c` process that times its imports with "
        "`time.perf_counter()`; it also reports its whole CPU time (interpreter start "
        "included).",
        "- `handler.app`: `import handler.app`. Dependencies alone: `import` of the "
        f"{len(deps)} modules outside `handler` that handler modules import at module level, "
        "in the order they import them (found with `-X importtime`; everything those import "
        'comes with them). The difference is the cost of our own modules; the row "once its '
        'dependencies are imported" measures it directly (a process imports the dependencies, '
        "then times `import handler.app`).",
        "- Bytecode: the children use a bytecode cache of their own (`PYTHONPYCACHEPREFIX`), "
        'filled beforehand. "All bytecode cached": every module, ours included, loads '
        'compiled. "Our modules compiled at each start": only the dependencies are cached, '
        "our modules are compiled from source every time, which is what a cold start pays when "
        "the package ships without `__pycache__` to a read-only file system (and what a "
        "process pays under `PYTHONDONTWRITEBYTECODE`).",
        f"- {args.repetitions} repetitions, interleaved (the order reverses every other "
        "repetition); median (min-max). The heaviest imports are medians over as many "
        "`-X importtime` runs with all bytecode cached (it adds its own overhead, so its "
        "totals run higher).",
        "",
        "## Import time",
        "",
        "| what | import, ms | process CPU, ms |",
        "|---|---:|---:|",
        *[
            f"| {label} | {benchlib.fmt(wall[mode], 0) if mode != 'nothing' else ''} "
            f"| {benchlib.fmt(cpu[mode], 0)} |"
            for mode, label in MODES.items()
        ],
        "",
        f"Ratio `handler.app` / dependencies: **{direct_ratio:.2f}** measured directly (the "
        "dependencies' time plus what `import handler.app` adds once they are imported: a "
        "difference measured in one process, not between two noisy totals); target ≤ "
        f"{TARGET_RATIO}: {'met' if direct_ratio <= TARGET_RATIO else 'NOT met'}. Between fresh "
        f"processes, all bytecode cached: {cached[0]:.2f} (per repetition "
        f"{cached[1]:.2f}-{cached[2]:.2f}); with our modules compiled at each start: "
        f"{compiled[0]:.2f} ({compiled[1]:.2f}-{compiled[2]:.2f}); from the `-X importtime` "
        f"self times: our modules take {ours_ms:.0f} ms of {total_ms:.0f} ms, "
        f"{total_ms / (total_ms - ours_ms):.2f}. The spread of the fresh-process ratios is the "
        "other load on this machine, not the code.",
        "",
        f"After `import handler.app`: {app_state['threads']} thread(s), "
        f"{sockets_text(app_state['sockets'])}, worker created: "
        f"{'yes' if app_state['worker_created'] else 'no'}, peak RSS "
        f"{app_state['max_rss_mib']:.0f} MiB. After importing the dependencies alone: "
        f"{deps_state['threads']} thread(s), {sockets_text(deps_state['sockets'])}, peak RSS "
        f"{deps_state['max_rss_mib']:.0f} MiB"
        + (
            " (the socket is the X-Ray SDK's: importing `aws_xray_sdk.core`, which "
            "Powertools' Tracer does, makes its global recorder and the UDP emitter socket)"
            if app_state["sockets"] == deps_state["sockets"] and app_state["sockets"]
            else ""
        )
        + ". The worker, its database connection, HTTP clients and dispatch threads are made "
        "on the first invocation and reused after.",
        "",
        "### Heaviest imports",
        "",
        "Self time by top-level package (all its modules), median of the `-X importtime` runs:",
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
        "A fresh process, `Worker(...).run(...)` with `MAX_CONCURRENCY=50`, against "
        "`handler.local.standin`; peak RSS: the process's high-water mark (`VmHWM`; `ru_maxrss` "
        "would carry the parent's peak into the child); traced peak from "
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
