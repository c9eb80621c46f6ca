"""The built Lambda package, run the way Lambda runs it.

Once per session the package is built with the same make target `sam build` runs
(src/Makefile), into a temporary folder. It is checked as a package (what it ships, its size,
its bytecode), then run in a clean Python 3.13: a fresh virtualenv holding only `awslambdaric`
(the AWS Runtime Interface Client the Lambda images use), the package on PYTHONPATH as
/var/task is, started as Lambda starts it (`python -m awslambdaric handler.app.lambda_handler`)
against `RuntimeAPI` below, a small Lambda Runtime API server. The environment is the one
template.yaml gives the function, with this session's database and stand-in functions.

Two containers are run: the template's own configuration (tracing on, so the X-Ray SDK sends its
documents to a UDP socket of the test, and the PostgreSQL idempotency store), with boto3 and
botocore beside the package as the runtime provides them; and tracing and idempotency off with no
AWS SDK at all, which proves that such an invocation imports none of it.

The package is built for this machine's platform (PLATFORM=manylinux2014_<machine>): the arm64
package's one compiled extension, wrapt's, cannot load on an x86_64 machine (wrapt would quietly
fall back to its pure-Python code, which Lambda does not run). Everything else is what
`sam build` ships. Without Python 3.13 (python3.13 on PATH, or LAMBDA_PYTHON) the
tests are skipped; .ci/run finds one.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from handler.local.standin import StandIn
from handler.queue.store import QueueStore

from .conftest import SERVICE_ROLE_KEY

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
FUNCTION = "QueueWorkerFunction"
HANDLER = "handler.app.lambda_handler"
SUMMARY_KEYS = {"claimed", "completed", "retried", "dead_lettered", "released", "duration_ms"}
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer"})
MAX_UNZIPPED_BYTES = 15 * 1024 * 1024
AWSLAMBDARIC = "awslambdaric==4.2.2"
INVOKE_TIMEOUT = 60.0
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:queue-worker-test-worker"


def event_files() -> list[Path]:
    # env.json is the environment file for `sam local invoke --env-vars`, not an event.
    return sorted(p for p in EVENTS.glob("*.json") if p.name != "env.json")


# --------------------------------------------------------------------------------------------
# Python 3.13, the package, the runtime's virtualenv
# --------------------------------------------------------------------------------------------


def find_lambda_python() -> str | None:
    """The runtime's Python: LAMBDA_PYTHON, else python3.13 on PATH, if it runs and is 3.13."""
    candidate = os.environ.get("LAMBDA_PYTHON") or shutil.which("python3.13")
    if not candidate:
        return None
    check = subprocess.run(
        [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 13))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return candidate if check.stdout.strip() == "True" else None


@pytest.fixture(scope="session")
def lambda_python() -> str:
    python = find_lambda_python()
    if python is None:
        pytest.skip(
            "no Python 3.13 (python3.13 on PATH, or LAMBDA_PYTHON): the Lambda package is built "
            "and run by the runtime's Python"
        )
    return python


def host_platform() -> str:
    machine = platform.machine().lower()
    return f"manylinux2014_{'aarch64' if machine in ('aarch64', 'arm64') else machine}"


@pytest.fixture(scope="session")
def package(lambda_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built by src/Makefile's target for this machine's platform."""
    folder = tmp_path_factory.mktemp("lambda-package") / "artifacts"
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT / "src"),
            f"build-{FUNCTION}",
            f"ARTIFACTS_DIR={folder}",
            f"LAMBDA_PYTHON={lambda_python}",
            f"PLATFORM={host_platform()}",
        ],
        check=True,
        capture_output=True,
    )
    return folder


@pytest.fixture(scope="session")
def runtime_python(lambda_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with awslambdaric and nothing else (not this project's)."""
    venv = tmp_path_factory.mktemp("lambda-runtime") / "venv"
    subprocess.run([lambda_python, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "install", AWSLAMBDARIC], check=True, capture_output=True)
    return python


@pytest.fixture(scope="session")
def runtime_sdk(lambda_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """boto3, botocore and s3transfer in a folder of their own, as the runtime provides them
    (/var/runtime, after the function's folder on sys.path); the version the tests use."""
    folder = tmp_path_factory.mktemp("lambda-runtime-sdk")
    subprocess.run(
        [
            lambda_python,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "--quiet",
            "install",
            "--no-compile",
            "--target",
            str(folder),
            f"boto3=={importlib.metadata.version('boto3')}",
        ],
        check=True,
        capture_output=True,
    )
    return folder


# --------------------------------------------------------------------------------------------
# The package as a package
# --------------------------------------------------------------------------------------------


def distributions(package: Path) -> dict[str, tuple[str, list[str]]]:
    """Shipped distributions: name -> (version, Requires-Dist lines)."""
    found = {}
    for metadata in package.glob("*.dist-info/METADATA"):
        dist = importlib.metadata.PathDistribution(metadata.parent)
        found[canonicalize_name(dist.metadata["Name"])] = (dist.version, dist.requires or [])
    return found


def test_the_package_ships_every_pinned_package_and_nothing_the_runtime_provides(
    package: Path,
) -> None:
    shipped = distributions(package)
    pinned = {
        canonicalize_name(Requirement(line.split("#")[0]).name)
        for line in (ROOT / "src" / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    }
    assert set(shipped) == pinned
    assert not RUNTIME_PROVIDED & set(shipped)
    assert not any((package / name).exists() for name in RUNTIME_PROVIDED)


def test_every_requirement_of_a_shipped_package_is_shipped_or_provided_by_the_runtime(
    package: Path,
) -> None:
    # Given the Lambda's interpreter: CPython 3.13 on Linux (the arm64 function's machine)
    environment = {
        "python_version": "3.13",
        "python_full_version": "3.13.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "aarch64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    shipped = distributions(package)
    extras = {
        canonicalize_name(r.name): r.extras
        for r in map(Requirement, _requirement_lines())
        if r.extras
    }
    missing = []
    for name, (_, requires) in shipped.items():
        for line in requires:
            requirement = Requirement(line)
            wanted = extras.get(name, set()) | {""}
            if requirement.marker is not None and not any(
                Marker(str(requirement.marker)).evaluate(environment | {"extra": extra})
                for extra in wanted
            ):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency in RUNTIME_PROVIDED:
                continue
            if dependency not in shipped or not requirement.specifier.contains(
                shipped[dependency][0], prereleases=True
            ):
                missing.append(f"{name} needs {requirement}")
    assert not missing


def _requirement_lines() -> list[str]:
    lines = (ROOT / "src" / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def test_the_package_holds_the_handler_without_handler_local(package: Path) -> None:
    assert (package / "handler" / "app.py").is_file()
    assert (package / "handler" / "queue" / "sql" / "migrations" / "0001_queue.sql").is_file()
    assert not (package / "handler" / "local").exists()
    assert not list(package.rglob("handler/local*"))


def test_every_module_has_bytecode_for_python_3_13_that_is_never_checked_against_its_source(
    package: Path, lambda_python: str
) -> None:
    magic = subprocess.run(
        [lambda_python, "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    sources = list(package.rglob("*.py"))
    assert len(sources) > 100
    wrong = []
    for source in sources:
        compiled = source.parent / "__pycache__" / f"{source.stem}.cpython-313.pyc"
        header = compiled.read_bytes()[:8] if compiled.exists() else b""
        # The header: the magic number, then the flags (0b01: hash-based, source not checked).
        if header[:4].hex() != magic or int.from_bytes(header[4:8], "little") != 0b01:
            wrong.append(str(source.relative_to(package)))
    assert not wrong


def test_the_package_is_at_most_15_mb_unzipped(package: Path, tmp_path: Path) -> None:
    files = [p for p in package.rglob("*") if p.is_file()]
    unzipped = sum(p.stat().st_size for p in files)
    archive = tmp_path / "package.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in files:
            zipped.write(path, path.relative_to(package))
    print(
        f"package: {unzipped / 1e6:.1f} MB unzipped, {archive.stat().st_size / 1e6:.1f} MB zipped"
    )
    assert unzipped <= MAX_UNZIPPED_BYTES
    assert archive.stat().st_size < unzipped


# The one import between Powertools modules that leaves what is shipped: it converts pydantic
# models, and pydantic is not shipped, so it cannot be reached.
POWERTOOLS_UNREACHABLE = {
    ("aws_lambda_powertools.shared.functions", "aws_lambda_powertools.event_handler.openapi.compat")
}


def test_every_import_between_shipped_powertools_modules_resolves(package: Path) -> None:
    # Given the Powertools modules the package ships (src/Makefile leaves unused utilities out)
    root = package / "aws_lambda_powertools"
    unresolved = []
    for source in root.rglob("*.py"):
        parts = source.relative_to(package).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package_parts = parts[:-1]
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(
                    package_parts[: len(package_parts) - node.level + 1] if node.level else []
                )
                names = [".".join([*base, *([node.module] if node.module else [])])]
            else:
                continue
            for name in names:
                if not name.startswith("aws_lambda_powertools"):
                    continue
                target = package.joinpath(*name.split("."))
                if (target / "__init__.py").is_file() or target.with_suffix(".py").is_file():
                    continue
                if (module, name) not in POWERTOOLS_UNREACHABLE:
                    unresolved.append(f"{module} imports {name}")
    # Then each names a module or package that is shipped
    assert not unresolved


# --------------------------------------------------------------------------------------------
# A Lambda Runtime API of our own, and a stand-in X-Ray daemon
# --------------------------------------------------------------------------------------------

API = "/2018-06-01/runtime"


@dataclass
class Invocation:
    request_id: str
    body: bytes
    trace_id: str
    deadline_ms: int
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str = ""  # "response" or "error"
    answer: Any = None
    xray_error_cause: Any = None  # what the runtime reports to X-Ray with an error


class RuntimeAPI:
    """The Lambda Runtime API as the runtime interface client uses it: GET .../invocation/next
    long-polls for the next event (with the request id, deadline, function ARN and trace id in
    its headers); POST .../invocation/{id}/response or .../error answers it (202); POST
    .../init/error reports a handler that could not be loaded (202)."""

    def __init__(self) -> None:
        self._pending: queue.Queue[Invocation | None] = queue.Queue()
        self._by_id: dict[str, Invocation] = {}
        self.init_errors: list[Any] = []
        self.init_failed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> RuntimeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._pending.put(None)  # frees a handler thread waiting in /next
        self._server.shutdown()
        self._server.server_close()

    def invoke(
        self, event: Any, *, alive: Callable[[], bool], timeout: float = INVOKE_TIMEOUT
    ) -> Invocation:
        """Queues one invocation and waits for its answer (or for the runtime to die)."""
        root = f"1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
        invocation = Invocation(
            request_id=str(uuid.uuid4()),
            body=json.dumps(event).encode(),
            trace_id=f"Root={root};Parent={uuid.uuid4().hex[:16]};Sampled=1",
            deadline_ms=int((time.time() + timeout) * 1000),
        )
        self._by_id[invocation.request_id] = invocation
        self._pending.put(invocation)
        deadline = time.monotonic() + timeout
        while not invocation.done.wait(0.5):
            if not alive() or self.init_failed.is_set():
                raise AssertionError(f"the runtime died; init errors: {self.init_errors}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer to invocation {invocation.request_id}")
        return invocation

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the client keeps its connection

            def log_message(self, format: str, *args: Any) -> None:
                del format, args  # quiet

            def do_GET(self) -> None:
                if self.path != f"{API}/invocation/next":
                    self._answer(404, {"errorMessage": f"unknown path {self.path}"})
                    return
                invocation = api._pending.get()
                if invocation is None:  # shutting down: the runtime is being stopped
                    api._pending.put(None)
                    self.close_connection = True
                    return
                self._answer(
                    200,
                    invocation.body,
                    {
                        "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                        "Lambda-Runtime-Trace-Id": invocation.trace_id,
                    },
                )

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                document = json.loads(body) if body else None
                parts = self.path.removeprefix(f"{API}/").split("/")
                if parts == ["init", "error"]:
                    api.init_errors.append(document)
                    api.init_failed.set()
                    self._answer(202, {"status": "OK"})
                    return
                if len(parts) == 3 and parts[0] == "invocation" and parts[1] in api._by_id:
                    invocation = api._by_id[parts[1]]
                    if parts[2] in ("response", "error"):
                        invocation.outcome = parts[2]
                        invocation.answer = document
                        cause = self.headers.get("Lambda-Runtime-Function-XRay-Error-Cause")
                        invocation.xray_error_cause = json.loads(cause) if cause else None
                        self._answer(202, {"status": "OK"})
                        invocation.done.set()
                        return
                self._answer(404, {"errorMessage": f"unknown path {self.path}"})

            def _answer(
                self, status: int, body: Any, headers: dict[str, str] | None = None
            ) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


class XRayDaemon:
    """A UDP socket where the X-Ray SDK sends its documents (AWS_XRAY_DAEMON_ADDRESS)."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._documents: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()
        return f"{host}:{port}"

    def __enter__(self) -> XRayDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            # Each datagram: a JSON header line, then one segment or subsegment document.
            _, _, document = data.partition(b"\n")
            with self._changed:
                self._documents.append(json.loads(document))
                self._changed.notify_all()

    def wait_for(
        self, found: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> list[dict[str, Any]]:
        """The documents received, once `found` holds for them."""
        with self._changed:
            if not self._changed.wait_for(lambda: found(self._documents), timeout):
                raise AssertionError(f"X-Ray documents not as expected: {self._documents}")
            return list(self._documents)


# --------------------------------------------------------------------------------------------
# The function's environment, from template.yaml
# --------------------------------------------------------------------------------------------

# The template's variables that this test sets itself, and those it leaves unset because they
# configure what it replaces (secrets by ARN, the Supabase URL behind FUNCTIONS_BASE_URL, the
# DynamoDB table of the default idempotency store) or are empty by default (the database's CA
# file and pool mode).
TEST_VALUES = ("DATABASE_URL", "FUNCTIONS_BASE_URL", "SUPABASE_SERVICE_ROLE_KEY")
LEFT_UNSET = (
    "DATABASE_SECRET_ARN",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
    "IDEMPOTENCY_TABLE",
    "DATABASE_SSLROOTCERT",
    "DATABASE_POOL_MODE",
)


def template_environment() -> dict[str, str]:
    """The function's Environment Variables, each parameter at its default."""
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.loads((ROOT / "template.yaml").read_text())
    parameters = template["Parameters"]
    variables = template["Resources"][FUNCTION]["Properties"]["Environment"]["Variables"]
    environment = {}
    for name, value in variables.items():
        if name in TEST_VALUES or name in LEFT_UNSET:
            continue
        if isinstance(value, dict) and set(value) == {"Ref"}:
            environment[name] = str(parameters[value["Ref"]]["Default"])
        elif isinstance(value, str):
            environment[name] = value
        else:
            raise AssertionError(f"{name}: the test does not know how to set {value!r}")
    return environment


def test_the_template_environment_is_understood_in_full() -> None:
    environment = template_environment()
    assert environment["POWERTOOLS_TRACE_DISABLED"] == "false"  # a deployment traces
    assert environment["IDEMPOTENCY_STORE"] == "dynamodb"  # replaced by postgres below


# --------------------------------------------------------------------------------------------
# A container: the runtime interface client running the package
# --------------------------------------------------------------------------------------------


@dataclass
class Container:
    api: RuntimeAPI
    process: subprocess.Popen[bytes]
    log: Path
    xray: XRayDaemon | None

    def alive(self) -> bool:
        return self.process.poll() is None

    def invoke(self, event: Any) -> Invocation:
        return self.api.invoke(event, alive=self.alive)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def container(
    runtime_python: Path,
    package: Path,
    environment: dict[str, str],
    log: Path,
    *,
    sdk: Path | None,
    xray: XRayDaemon | None,
) -> Iterator[Container]:
    with RuntimeAPI() as api:
        env = {
            # What Lambda sets in a python3.13 function's environment.
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "LAMBDA_TASK_ROOT": str(package),
            "_HANDLER": HANDLER,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
            "AWS_LAMBDA_RUNTIME_API": api.address,
            "AWS_LAMBDA_FUNCTION_NAME": "queue-worker-test-worker",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
            "AWS_LAMBDA_LOG_FORMAT": "JSON",
            "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/queue-worker-test-worker",
            "AWS_LAMBDA_LOG_STREAM_NAME": "2026/01/01/[$LATEST]test",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
            "AWS_XRAY_DAEMON_ADDRESS": xray.address if xray else "127.0.0.1:9",
            # The function's folder first, then the runtime's own packages, as in Lambda; and,
            # as there, nothing is written into it (/var/task is read-only).
            "PYTHONPATH": os.pathsep.join([str(package), *([str(sdk)] if sdk else [])]),
            "PYTHONDONTWRITEBYTECODE": "1",
        } | environment
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(runtime_python), "-m", "awslambdaric", HANDLER],
                cwd=package,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            yield Container(api, process, log, xray)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def function_environment(database_url: str, standin: StandIn, **overrides: str) -> dict[str, str]:
    return (
        template_environment()
        | {
            "DATABASE_URL": database_url,
            "FUNCTIONS_BASE_URL": standin.base_url,
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY,
            # The template's default store is DynamoDB, whose table this test does not have.
            "IDEMPOTENCY_STORE": "postgres",
        }
        | overrides
    )


@pytest.fixture(scope="module")
def traced_container(
    runtime_python: Path,
    package: Path,
    runtime_sdk: Path,
    database_url: str,
    standin_server: StandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    """The template's configuration: tracing on, the PostgreSQL idempotency store, boto3 beside
    the package as in Lambda."""
    log = tmp_path_factory.mktemp("traced-container") / "output.log"
    with (
        XRayDaemon() as xray,
        container(
            runtime_python,
            package,
            function_environment(database_url, standin_server),
            log,
            sdk=runtime_sdk,
            xray=xray,
        ) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def bare_container(
    runtime_python: Path,
    package: Path,
    database_url: str,
    standin_server: StandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Container]:
    """Tracing and idempotency off, and no AWS SDK at all: nothing may need one."""
    log = tmp_path_factory.mktemp("bare-container") / "output.log"
    environment = function_environment(
        database_url, standin_server, IDEMPOTENCY_STORE="off", POWERTOOLS_TRACE_DISABLED="true"
    )
    with container(runtime_python, package, environment, log, sdk=None, xray=None) as running:
        yield running


@pytest.fixture(params=["traced", "bare"])
def lambda_container(request: pytest.FixtureRequest) -> Container:
    return request.getfixturevalue(f"{request.param}_container")  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Invocations
# --------------------------------------------------------------------------------------------


def assert_summary(invocation: Invocation, container: Container) -> dict[str, Any]:
    assert invocation.outcome == "response", (invocation.answer, container.output()[-3000:])
    summary = invocation.answer
    assert isinstance(summary, dict)
    assert set(summary) >= SUMMARY_KEYS
    return summary


@pytest.mark.parametrize("path", event_files(), ids=lambda p: p.name)
def test_every_sample_event_runs_a_batch_in_the_lambda_runtime(
    path: Path, lambda_container: Container, queue: QueueStore, standin: StandIn
) -> None:
    # Given jobs due for the event's tenant (or any tenant), and one for another tenant
    event = json.loads(path.read_text())
    tenant = uuid.UUID(event["tenant_id"]) if "tenant_id" in event else uuid.uuid4()
    jobs = {queue.enqueue(tenant, job_type) for job_type in ("ingest_slack", "process_embeddings")}
    other = queue.enqueue(uuid.uuid4(), "generate_digest")
    if "tenant_id" not in event:
        jobs.add(other)
    # When the runtime is invoked with the event
    invocation = lambda_container.invoke(event)
    # Then it answers with the batch's summary, and every job it claimed was delivered
    summary = assert_summary(invocation, lambda_container)
    assert summary["claimed"] == summary["completed"] == len(jobs)
    delivered = {uuid.UUID(r.headers["idempotency-key"]) for r in standin.requests()}
    assert delivered == jobs
    if lambda_container.xray is not None:
        assert_one_dispatch_subsegment_per_job(lambda_container.xray, invocation, len(jobs))


def assert_one_dispatch_subsegment_per_job(
    xray: XRayDaemon, invocation: Invocation, jobs: int
) -> None:
    """In the invocation's trace: the handler's subsegment (Powertools' `## <handler>`), a child
    of the segment Lambda opened (the Parent of the trace header), and under it one closed
    subsegment per dispatch."""
    root, parent = (part.split("=", 1)[1] for part in invocation.trace_id.split(";")[:2])

    def handler_and_dispatches(
        documents: list[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        ours = [d for d in documents if d.get("trace_id") == root]
        handlers = [d for d in ours if d.get("parent_id") == parent]
        dispatches = [d for d in ours if d["name"].startswith("## dispatch ")]
        return handlers, dispatches

    def complete(documents: list[dict[str, Any]]) -> bool:
        handlers, dispatches = handler_and_dispatches(documents)
        return bool(handlers) and len(dispatches) >= jobs

    [handler], dispatches = handler_and_dispatches(xray.wait_for(complete))
    assert handler["name"].startswith("## ")
    assert len(dispatches) == jobs
    assert all(d["parent_id"] == handler["id"] and "end_time" in d for d in dispatches)


def test_a_bad_event_comes_back_as_an_error_document_and_the_runtime_goes_on(
    lambda_container: Container, queue: QueueStore, standin: StandIn
) -> None:
    # Given a due job
    job = queue.enqueue(uuid.uuid4(), "ingest_slack")
    # When an event with a malformed field is invoked
    bad = lambda_container.invoke({"max_jobs": "ten"})
    # Then the answer is Lambda's error document naming the field, and no job was touched
    assert bad.outcome == "error"
    assert bad.answer["errorType"] == "EventError"
    assert "max_jobs" in bad.answer["errorMessage"]
    assert bad.answer["requestId"] == bad.request_id
    assert bad.xray_error_cause["exceptions"][0]["type"] == "EventError"
    assert standin.requests() == []
    # And the same runtime process serves the next invocation
    good = lambda_container.invoke({})
    assert lambda_container.alive()
    assert assert_summary(good, lambda_container)["completed"] == 1
    assert [uuid.UUID(r.headers["idempotency-key"]) for r in standin.requests()] == [job]
