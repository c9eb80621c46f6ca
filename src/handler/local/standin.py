"""A local HTTP/1.1 server that stands in for the HTTP functions.

Tests, ``queue-worker demo`` and the benchmarks point ``FUNCTIONS_BASE_URL`` at it. It runs in its
own process so that it never competes with the worker under test for the GIL, and it speaks just
enough HTTP/1.1 (keep-alive, ``Content-Length`` bodies) to be fast: parsing is kept minimal.

Every request to ``/{function}`` is recorded, then answered with the first behaviour found in:

1. ``payload.simulate`` in the JSON body (the job's payload),
2. the behaviour configured for that function,
3. the default behaviour,
4. otherwise ``200 {"ok": true}`` after the server's ``delay_ms``.

A behaviour is a JSON object (see :class:`Behaviour`)::

    {"status": 503, "headers": {"Retry-After": "5"}, "fail_times": 2}

``fail_times: N`` applies the behaviour only to the first N requests carrying the same
``Idempotency-Key`` header; later ones get the plain 200 of step 4, so a test can script "fails
twice, then succeeds". ``hang`` never answers (the connection stays open until the client goes
away), ``garbage`` writes bytes that are not HTTP and closes, ``close`` closes without answering.
``delay_ms`` is waited before answering (or before ``garbage``/``close``). ``hold`` waits,
before anything else, until the test releases the held calls (``StandIn.release()``): a test can
act while calls are in flight, then let them answer.

Control goes over HTTP to reserved paths (never recorded):

- ``GET /__standin/requests``: everything received since start or the last reset, in order.
- ``GET /__standin/wait?count=N&timeout=S``: blocks until at least N requests have been received
  since the last reset, then answers as ``requests`` does; 408 when S seconds pass first.
- ``POST /__standin/release``: lets every ``hold`` call answer, now and until the next reset.
- ``POST /__standin/reset``: forget requests, ``fail_times`` counters and configured behaviours
  (held calls are released first).
- ``POST /__standin/config`` with ``{"function": "name" | null, "behaviour": {...} | null}``:
  set (or, with a null behaviour, clear) a function's behaviour, or the default one.
- ``GET /__standin/config``: the configured behaviours.

In Python, use :class:`StandIn`::

    with StandIn(delay_ms=0) as functions:
        functions.configure("resize", {"status": 500, "fail_times": 2})
        ...  # post to f"{functions.base_url}/resize"
        assert functions.requests()[0].headers["idempotency-key"] == job_id
        functions.wait_for_requests(3)  # blocks until 3 requests came in (TimeoutError if not)

From a shell (benchmarks, ``sam local invoke``)::

    python -m handler.standin --port 8787 --delay-ms 0

This module uses the standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict
from urllib.parse import parse_qs

__all__ = ["Behaviour", "ReceivedRequest", "StandIn", "main"]

CONTROL_PREFIX = "/__standin/"
READY_PREFIX = "listening on "
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
# How long the client gives the server beyond a wait's own timeout to answer it.
WAIT_GRACE_S = 10.0

_GARBAGE = b"\x00\xff\xfeTHIS IS NOT HTTP\x00\r\n\r\n\x07\x1b"
_FLAGS = ("hang", "garbage", "close")
_NO_BODY_STATUSES = frozenset({204, 304})
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class Behaviour(TypedDict, total=False):
    """How the stand-in answers a request; every key is optional."""

    status: int
    """HTTP status (200..599); default 200."""
    body: Any
    """A string is sent as ``text/plain``, anything else as JSON. Default: ``{"ok": true}`` for
    2xx/3xx, ``{"error": "simulated <status>"}`` otherwise."""
    headers: dict[str, str]
    """Extra response headers, e.g. ``{"Retry-After": "5"}``."""
    delay_ms: float
    """Wait this long before answering; overrides the server's ``delay_ms``."""
    hang: bool
    """Never answer; keep the connection open until the client goes away."""
    garbage: bool
    """Write bytes that are not HTTP, then close the connection."""
    close: bool
    """Close the connection without answering."""
    fail_times: int
    """Apply this behaviour to the first N requests per ``Idempotency-Key`` only, then 200."""
    hold: bool
    """Wait until ``StandIn.release()`` (or a reset) first, then answer as the rest says."""


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request the stand-in received."""

    method: str
    path: str
    """The request target as sent, e.g. ``/resize`` (with any query string)."""
    headers: dict[str, str]
    """Header names lower-cased; repeated headers joined with ``", "``."""
    body: Any
    """The body parsed as JSON, or its text when it is not JSON (``""`` when empty)."""

    @property
    def function(self) -> str:
        """The function the request was addressed to: its path without ``/`` and query."""
        return _function_name(self.path)


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


class _BehaviourError(ValueError):
    pass


def _function_name(target: str) -> str:
    return target.partition("?")[0].removeprefix("/")


def _validate(raw: object) -> dict[str, Any]:
    """Check a behaviour; raise _BehaviourError with a readable message when it is wrong."""
    if not isinstance(raw, dict):
        raise _BehaviourError(f"a behaviour must be a JSON object, not {raw!r}")
    unknown = set(raw) - Behaviour.__optional_keys__
    if unknown:
        raise _BehaviourError(
            f"unknown behaviour keys {sorted(unknown)}; known: {sorted(Behaviour.__optional_keys__)}"
        )
    status = raw.get("status", 200)
    if type(status) is not int or not 200 <= status <= 599:
        raise _BehaviourError(f"status must be an integer in 200..599, not {status!r}")
    headers = raw.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str | int | float) for k, v in headers.items()
    ):
        raise _BehaviourError(f"headers must map names to strings, not {headers!r}")
    for name, value in headers.items():
        if name.lower() in ("content-length", "transfer-encoding", "connection"):
            raise _BehaviourError(f"header {name!r} is managed by the stand-in")
        if not name or any(c in name for c in " :\r\n") or any(c in str(value) for c in "\r\n"):
            raise _BehaviourError(f"invalid header {name!r}: {value!r}")
    delay = raw.get("delay_ms", 0)
    if type(delay) not in (int, float) or delay < 0:
        raise _BehaviourError(f"delay_ms must be a number >= 0, not {delay!r}")
    for flag in (*_FLAGS, "hold"):
        if type(raw.get(flag, False)) is not bool:
            raise _BehaviourError(f"{flag} must be true or false, not {raw[flag]!r}")
    if sum(bool(raw.get(flag)) for flag in _FLAGS) > 1:
        raise _BehaviourError(f"at most one of {', '.join(_FLAGS)} may be true")
    fail_times = raw.get("fail_times", 0)
    if type(fail_times) is not int or fail_times < 0:
        raise _BehaviourError(f"fail_times must be an integer >= 0, not {fail_times!r}")
    try:
        json.dumps(raw.get("body"))
    except (TypeError, ValueError) as exc:
        raise _BehaviourError(f"body is not JSON-serialisable: {exc}") from None
    return dict(raw)


def _response(
    status: int,
    body: Any = None,
    headers: Mapping[str, object] | None = None,
    *,
    keep_alive: bool = True,
    head: bool = False,
) -> bytes:
    """Serialise a whole response: status line, headers and body."""
    if body is None:
        body = {"ok": True} if status < 400 else {"error": f"simulated {status}"}
    if isinstance(body, str):
        content_type, data = "text/plain; charset=utf-8", body.encode()
    else:
        content_type, data = "application/json", json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    extra = headers or {}
    if not any(name.lower() == "content-type" for name in extra):
        lines.append(f"Content-Type: {content_type}")
    if status in _NO_BODY_STATUSES:
        data = b""
    else:
        lines.append(f"Content-Length: {len(data)}")
    if not keep_alive:
        lines.append("Connection: close")
    lines.extend(f"{name}: {value}" for name, value in extra.items())
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + data


_OK = {True: _response(200, {"ok": True}), False: _response(200, {"ok": True}, keep_alive=False)}


def _decode_body(body: bytes) -> Any:
    if not body:
        return ""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


class _Server:
    """The stand-in's state and connection handler; lives in the server process."""

    def __init__(self, delay_ms: float, *, record: bool = True) -> None:
        self.delay_ms = delay_ms
        self.record = record
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        self.functions: dict[str, dict[str, Any]] = {}
        self.default: dict[str, Any] | None = None
        self.seen: dict[str | None, int] = {}
        self.writers: set[asyncio.StreamWriter] = set()
        self.count = 0  # function requests since start or the last reset (recorded or not)
        self.arrived = asyncio.Condition()  # notified on each request while someone waits
        self.waiters = 0
        self.released = asyncio.Event()  # set: `hold` calls answer

    def _reset(self) -> None:
        self.received.clear()
        self.seen.clear()
        self.functions.clear()
        self.default = None
        self.count = 0
        self.released.set()  # calls held until now answer; later ones are held again
        self.released = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception as exc:  # a bug here must not kill the server; say so and move on
            print(f"stand-in: internal error: {exc!r}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                writer.write(_response(500, {"error": repr(exc)}, keep_alive=False))
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read and answer one request; return whether to keep the connection open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests: the normal end of a keep-alive connection
        except asyncio.LimitOverrunError:
            writer.write(_response(431, {"error": "request head too large"}, keep_alive=False))
            return False
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
            writer.write(_response(400, {"error": "bad request line"}, keep_alive=False))
            return False
        method, target, version = request_line
        headers: dict[str, str] = {}
        for line in lines[1:-2]:
            name, colon, value = line.partition(":")
            if not colon:
                writer.write(_response(400, {"error": "bad header line"}, keep_alive=False))
                return False
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if "transfer-encoding" in headers:
            writer.write(_response(501, {"error": "send a Content-Length"}, keep_alive=False))
            return False
        body = b""
        length = headers.get("content-length")
        if length:
            if not length.isdigit():
                writer.write(_response(400, {"error": "bad Content-Length"}, keep_alive=False))
                return False
            body = await reader.readexactly(int(length))
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        if target.startswith(CONTROL_PREFIX + "wait") and method == "GET":
            writer.write(await self._wait(target, keep_alive=keep_alive))
            await writer.drain()
            return keep_alive
        if target.startswith(CONTROL_PREFIX):
            writer.write(self._control(method, target, body, keep_alive=keep_alive))
            await writer.drain()
            return keep_alive
        return await self._function(
            reader, writer, method, target, headers=headers, body=body, keep_alive=keep_alive
        )

    async def _function(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        *,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> bool:
        if self.record:
            self.received.append((method, target, headers, body))
        self.count += 1
        if self.waiters:
            async with self.arrived:
                self.arrived.notify_all()
        head_only = method == "HEAD"
        try:
            behaviour = self._resolve(target, headers, body)
        except _BehaviourError as exc:
            writer.write(
                _response(400, {"error": f"stand-in: {exc}"}, keep_alive=keep_alive, head=head_only)
            )
            await writer.drain()
            return keep_alive
        if behaviour is None:  # the common, fast path
            if self.delay_ms > 0:
                await asyncio.sleep(self.delay_ms / 1000)
            writer.write(
                _response(200, head=True, keep_alive=keep_alive) if head_only else _OK[keep_alive]
            )
            await writer.drain()
            return keep_alive
        if behaviour.get("hold"):
            await self.released.wait()
        if behaviour.get("hang"):
            while await reader.read(65536):
                pass  # drain whatever the client sends until it goes away
            return False
        delay = behaviour.get("delay_ms", self.delay_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if behaviour.get("garbage"):
            writer.write(_GARBAGE)
            await writer.drain()
            return False
        if behaviour.get("close"):
            return False
        writer.write(
            _response(
                behaviour.get("status", 200),
                behaviour.get("body"),
                behaviour.get("headers"),
                keep_alive=keep_alive,
                head=head_only,
            )
        )
        await writer.drain()
        return keep_alive

    def _resolve(self, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any] | None:
        behaviour: dict[str, Any] | None = None
        if b'"simulate"' in body:  # cheap test first: most bodies carry no simulate
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            payload = document.get("payload") if isinstance(document, dict) else None
            if isinstance(payload, dict) and "simulate" in payload:
                behaviour = _validate(payload["simulate"])
        if behaviour is None:
            behaviour = self.functions.get(_function_name(target), self.default)
            if behaviour is None:
                return None
        if "fail_times" in behaviour:
            key = headers.get("idempotency-key")
            count = self.seen.get(key, 0) + 1
            self.seen[key] = count
            if count > behaviour["fail_times"]:
                return None
        return behaviour

    def _requests_document(self) -> list[dict[str, Any]]:
        return [
            {"method": m, "path": p, "headers": h, "body": _decode_body(b)}
            for m, p, h, b in self.received
        ]

    async def _wait(self, target: str, *, keep_alive: bool) -> bytes:
        """GET /__standin/wait?count=N&timeout=S: answers once N requests have arrived since
        the last reset (woken by each arrival, no polling), or 408 after S seconds."""
        action, _, query = target.partition("?")
        if action != CONTROL_PREFIX + "wait":
            return _response(404, {"error": f"no GET {target}"}, keep_alive=keep_alive)
        params = parse_qs(query)
        try:
            count = int(params.get("count", ["1"])[-1])
            timeout = float(params.get("timeout", ["30"])[-1])
        except ValueError:
            count, timeout = -1, math.nan
        if count < 0 or not math.isfinite(timeout) or timeout <= 0:
            return _response(
                400,
                {"error": "wait needs count >= 0 and a finite timeout > 0 (seconds)"},
                keep_alive=keep_alive,
            )
        self.waiters += 1
        try:
            async with asyncio.timeout(timeout), self.arrived:
                await self.arrived.wait_for(lambda: self.count >= count)
        except TimeoutError:
            return _response(
                408,
                {
                    "error": f"{self.count} of {count} requests arrived in {timeout:g} s",
                    "received": self.count,
                },
                keep_alive=keep_alive,
            )
        finally:
            self.waiters -= 1
        return _response(200, self._requests_document(), keep_alive=keep_alive)

    def _control(self, method: str, target: str, body: bytes, *, keep_alive: bool) -> bytes:
        action = target.partition("?")[0].removeprefix(CONTROL_PREFIX)
        try:
            if (method, action) == ("GET", "requests"):
                result: Any = self._requests_document()
            elif (method, action) == ("POST", "reset"):
                self._reset()
                result = {"ok": True}
            elif (method, action) == ("POST", "release"):
                self.released.set()
                result = {"ok": True}
            elif (method, action) == ("POST", "config"):
                result = self._configure(json.loads(body or b"null"))
            elif (method, action) == ("GET", "config"):
                result = {"functions": self.functions, "default": self.default}
            else:
                return _response(404, {"error": f"no {method} {target}"}, keep_alive=keep_alive)
        except (_BehaviourError, ValueError) as exc:
            return _response(400, {"error": str(exc)}, keep_alive=keep_alive)
        return _response(200, result, keep_alive=keep_alive)

    def _configure(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict) or not {"function", "behaviour"} <= set(request):
            raise _BehaviourError('expected {"function": name or null, "behaviour": {...} or null}')
        function, raw = request["function"], request["behaviour"]
        if function is not None and not isinstance(function, str):
            raise _BehaviourError(f"function must be a string or null, not {function!r}")
        behaviour = None if raw is None else _validate(raw)
        if function is None:
            self.default = behaviour
        elif behaviour is None:
            self.functions.pop(function.removeprefix("/"), None)
        else:
            self.functions[function.removeprefix("/")] = behaviour
        return {"ok": True}


def _url_host(host: str) -> str:
    """The host to put in a URL that reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - mapping a wildcard bind to a reachable address
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _run(
    host: str, port: int, delay_ms: float, *, record: bool, exit_on_stdin_eof: bool
) -> None:
    state = _Server(delay_ms, record=record)
    bind = host
    if host not in ("", "0.0.0.0", "::"):  # noqa: S104 - binding where we were told to
        # Bind one address only: "localhost" may resolve to 127.0.0.1 and ::1, and with port 0
        # each would get a different port.
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        bind = str(infos[0][4][0])
    server = await asyncio.start_server(state.serve, bind, port, backlog=1024)
    bound_port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # signal handlers: not on Windows
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    if exit_on_stdin_eof:
        # The parent holds our stdin open; when it closes it (or dies), we exit: no orphans.
        def wait_for_eof() -> None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdin.buffer.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_eof, name="stdin-eof", daemon=True).start()
    shown_host = "0.0.0.0" if host in ("", "0.0.0.0") else _url_host(host)  # noqa: S104
    print(f"{READY_PREFIX}http://{shown_host}:{bound_port}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for writer in list(state.writers):
            writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m handler.standin",
        description="A local HTTP server standing in for the queue-worker's HTTP functions.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port; 0 picks a free one (8787)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="delay before each default answer (0)"
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not keep received requests (for long benchmark runs)",
    )
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _run(
                args.host,
                args.port,
                args.delay_ms,
                record=not args.no_record,
                exit_on_stdin_eof=args.exit_on_stdin_eof,
            )
        )
    return 0


# --------------------------------------------------------------------------------------------
# Client side: the process handle
# --------------------------------------------------------------------------------------------


class StandIn:
    """Runs the stand-in in a child process; use as a context manager.

    ``requests()``, ``reset()`` and ``configure*()`` talk to it over HTTP, so they see exactly
    what the server saw, and can be called from any thread.
    """

    def __init__(self, delay_ms: float = 0, host: str = "127.0.0.1", *, record: bool = True):
        self.delay_ms = delay_ms
        self.host = host
        self.record = record
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server process and wait until it listens."""
        if self._process is not None:
            raise RuntimeError("the stand-in is already running")
        command = [
            sys.executable,
            "-P",  # do not put this file's directory on sys.path: it would shadow the stdlib
            str(Path(__file__).resolve()),
            "--host",
            self.host,
            "--port",
            "0",
            "--delay-ms",
            repr(float(self.delay_ms)),
            "--exit-on-stdin-eof",
        ]
        if not self.record:
            command.append("--no-record")
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and file
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        if process.stdout is None:  # pragma: no cover - stdout=PIPE always sets it
            raise RuntimeError("no pipe to the stand-in")
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(START_TIMEOUT_S)
        line = process.stdout.readline().decode(errors="replace").strip() if ready else ""
        if not line.startswith(READY_PREFIX):
            self._process = process
            self._kill()
            raise RuntimeError(
                f"the stand-in did not start (exit code {process.returncode}, said {line!r})"
            )
        self._process = process
        self._port = int(line.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        """Stop the server process; safe to call twice."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()  # the server exits on EOF
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._kill()
        self._close_pipes(process)
        self._process = None

    def _kill(self) -> None:
        process = self._process
        if process is None:
            return
        process.kill()
        process.wait()
        self._close_pipes(process)
        self._process = None

    @staticmethod
    def _close_pipes(process: subprocess.Popen[bytes]) -> None:
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None or self._process is None:
            raise RuntimeError("the stand-in is not running: use it as a context manager")
        return self._port

    @property
    def base_url(self) -> str:
        """E.g. ``http://127.0.0.1:40123``; functions live at ``{base_url}/{function}``."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int:
        """The server process id (e.g. to pin it to a CPU or read its CPU time)."""
        if self._process is None:
            raise RuntimeError("the stand-in is not running")
        return self._process.pid

    # -- control -----------------------------------------------------------------------------

    def requests(self) -> list[ReceivedRequest]:
        """Every request received since start or the last reset, in order."""
        return [ReceivedRequest(**item) for item in self._call("GET", "requests")]

    def wait_for_requests(self, count: int, timeout: float = 30) -> list[ReceivedRequest]:
        """Block until at least ``count`` requests have been received since the last reset
        (the server answers when the last of them arrives), and return them all.

        Raises ``TimeoutError`` when fewer have arrived after ``timeout`` seconds.
        """
        status, result, data = self._exchange(
            "GET", f"wait?count={int(count)}&timeout={float(timeout)!r}", timeout=timeout
        )
        if status == 408:
            message = result.get("error") if isinstance(result, dict) else repr(data)
            raise TimeoutError(f"stand-in: {message}")
        self._check(status, result, data, "GET", "wait")
        return [ReceivedRequest(**item) for item in result]

    def release(self) -> None:
        """Let every call held by a ``hold`` behaviour answer, and later ones too, until the
        next reset."""
        self._call("POST", "release")

    def reset(self) -> None:
        """Forget received requests, ``fail_times`` counters and every configured behaviour.
        Calls still held by ``hold`` are released; later ones are held again."""
        self._call("POST", "reset")

    def configure(self, function: str, behaviour: Behaviour | Mapping[str, Any] | None) -> None:
        """Answer every request to ``/{function}`` this way (``None`` clears it).

        Raises ``ValueError`` when the server rejects the behaviour.
        """
        self._call("POST", "config", {"function": function, "behaviour": behaviour})

    def configure_default(self, behaviour: Behaviour | Mapping[str, Any] | None) -> None:
        """Answer requests to functions without their own behaviour this way (``None`` clears)."""
        self._call("POST", "config", {"function": None, "behaviour": behaviour})

    def _call(self, method: str, action: str, document: object = None) -> Any:
        status, result, data = self._exchange(method, action, document)
        self._check(status, result, data, method, action)
        return result

    def _exchange(
        self, method: str, action: str, document: object = None, *, timeout: float = 0
    ) -> tuple[int, Any, bytes]:
        host = _url_host(self.host).strip("[]")
        connection = http.client.HTTPConnection(
            host, self.port, timeout=max(START_TIMEOUT_S, timeout + WAIT_GRACE_S)
        )
        try:
            body = None if document is None else json.dumps(document).encode()
            headers = {} if body is None else {"Content-Type": "application/json"}
            connection.request(method, CONTROL_PREFIX + action, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        return response.status, json.loads(data) if data else None, data

    @staticmethod
    def _check(status: int, result: Any, data: bytes, method: str, action: str) -> None:
        if status == 400:
            message = result.get("error") if isinstance(result, dict) else repr(data)
            raise ValueError(f"stand-in: {message}")
        if status != 200:
            raise RuntimeError(f"stand-in answered {status} to {method} {action}: {data!r}")


if __name__ == "__main__":
    sys.exit(main())
