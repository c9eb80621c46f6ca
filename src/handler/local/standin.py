"""A local HTTP/1.1 server that stands in for the HTTP functions.

Tests, ``queue-worker demo`` and the benchmarks point ``FUNCTIONS_BASE_URL`` at it. It runs in its
own process so that it never competes with the worker under test for the GIL. The HTTP/1.1
protocol (parsing, framing, keep-alive, ``Connection: close``, chunked request bodies, ``Expect:
100-continue``) is the ``h11`` library's, over asyncio streams; this module only decides what to
answer.

Every request to ``/{function}`` is recorded, then answered with the first behaviour found in:

1. ``payload.simulate`` in the JSON body (the job's payload),
2. the behaviour configured for that function,
3. the default behaviour,
4. otherwise ``200 {"ok": true}`` after the server's ``delay_ms``.

A behaviour is a JSON object (see :class:`Behaviour`)::

    {"status": 503, "headers": {"Retry-After": "5"}, "fail_times": 2}

``fail_times: N`` applies the behaviour only to the first N requests carrying the same
``Idempotency-Key`` header; later ones get the plain 200 of step 4, so a test can script "fails
twice, then succeeds". ``max_in_flight: N`` answers ``429`` (with the behaviour's ``headers``,
e.g. a ``Retry-After``) at once to a request that arrives while N requests for the same function
are already being handled; requests within the limit get the rest of the behaviour, so
``{"max_in_flight": 8, "delay_ms": 50}`` is "a function that answers 429 to more than 8 calls in
flight". ``hang`` never answers (the connection stays open until the client goes away),
``garbage`` writes bytes that are not HTTP and closes, ``close`` closes without answering.
``delay_ms`` is waited before answering (or before ``garbage``/``close``). ``hold`` waits,
before anything else but ``max_in_flight``, until the test releases the held calls
(``StandIn.release()``): a test can act while calls are in flight, then let them answer.

Each recorded request carries ``received_at``, the server's ``time.time()`` when its head was
complete, and ``answered_at``, when the stand-in wrote its answer (or the garbage, or closed the
connection for ``close``); ``answered_at`` is null while the request is still being handled, and
for ``hang``.

Control goes over HTTP to reserved paths (never recorded, never counted):

- ``GET /__standin/requests``: everything received since start or the last reset, in order.
- ``GET /__standin/wait?count=N&timeout=S``: blocks until at least N requests have been received
  since the last reset, then answers as ``requests`` does; 408 when S seconds pass first.
- ``GET /__standin/stats``: per function, ``requests`` received since start or the last reset
  (recorded or not), ``in_flight`` now, and ``peak_in_flight``, the most in flight at once since
  start or the last reset. A request is in flight from when it has fully arrived until its answer
  goes out (for ``hang``: until its client goes away), so whoever has read an answer sees counts
  without that request; one refused by ``max_in_flight`` counts while it arrives, so the peak is
  what the client had in flight.
- ``POST /__standin/release``: lets every ``hold`` call answer, now and until the next reset.
- ``POST /__standin/reset``: forget requests, counts and peaks (a peak restarts from the calls
  still in flight), ``fail_times`` counters and configured behaviours (held calls are released
  first).
- ``POST /__standin/config`` with ``{"function": "name" | null, "behaviour": {...} | null}``:
  set (or, with a null behaviour, clear) a function's behaviour, or the default one.
- ``GET /__standin/config``: the configured behaviours.

In Python, use :class:`StandIn`::

    with StandIn(delay_ms=0) as functions:
        functions.configure("resize", {"status": 500, "fail_times": 2})
        ...  # post to f"{functions.base_url}/resize"
        assert functions.requests()[0].headers["idempotency-key"] == job_id
        functions.wait_for_requests(3)  # blocks until 3 requests came in (TimeoutError if not)
        assert functions.stats()["resize"].peak_in_flight <= 8

From a shell (benchmarks, ``sam local invoke``)::

    python -m handler.local.standin --port 8787 --delay-ms 0

This module uses the standard library and ``h11`` only (it runs as a plain script in its own
process, see :meth:`StandIn.start`).
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
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict
from urllib.parse import parse_qs

import h11

__all__ = ["Behaviour", "FunctionStats", "ReceivedRequest", "StandIn", "main"]

CONTROL_PREFIX = "/__standin/"
READY_PREFIX = "listening on "
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
# How long the client gives the server beyond a wait's own timeout to answer it.
WAIT_GRACE_S = 10.0
# h11 answers 431 to a request head still incomplete past this size (asyncio streams' default
# limit, which the stand-in had before h11).
MAX_HEAD_BYTES = 64 * 1024
READ_BYTES = 64 * 1024

_GARBAGE = b"\x00\xff\xfeTHIS IS NOT HTTP\x00\r\n\r\n\x07\x1b"
_FLAGS = ("hang", "garbage", "close")
_NO_BODY_STATUSES = frozenset({204, 304})
_MANAGED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"

# The answer to almost every request, built once: h11 validates a Response's headers when it is
# constructed, and the event is immutable, so one instance serves every connection.
_OK_BODY = h11.Data(data=json.dumps({"ok": True}).encode())
_OK_HEAD = h11.Response(
    status_code=200,
    headers=[(b"Content-Type", _JSON), (b"Content-Length", b"%d" % len(_OK_BODY.data))],
    reason=b"OK",
)
_END = h11.EndOfMessage()


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
    max_in_flight: int
    """Answer 429 (with ``headers``) at once when more than N requests for this function are
    being handled, this one included; the others get the rest of the behaviour."""


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
    received_at: float
    """The server's ``time.time()`` when the request head was complete."""
    answered_at: float | None
    """The server's ``time.time()`` when it wrote its answer (or the garbage, or closed the
    connection for ``close``); ``None`` while the request is being handled, and for ``hang``."""

    @property
    def function(self) -> str:
        """The function the request was addressed to: its path without ``/`` and query."""
        return _function_name(self.path)


@dataclass(frozen=True, slots=True)
class FunctionStats:
    """What the stand-in counted for one function (``GET /__standin/stats``)."""

    requests: int
    """Requests received since start or the last reset, recorded or not."""
    in_flight: int
    """Requests being handled now (delayed, held, hanging); one leaves just before its answer
    goes out."""
    peak_in_flight: int
    """The most requests handled at once since start or the last reset, counting those that
    ``max_in_flight`` answered 429."""


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
        if name.lower() in _MANAGED_HEADERS:
            raise _BehaviourError(f"header {name!r} is managed by the stand-in")
        try:  # h11 checks names and values against the HTTP grammar when building a Response
            h11.Response(status_code=status, headers=[(name, str(value))])
        except (h11.LocalProtocolError, UnicodeEncodeError):
            raise _BehaviourError(f"invalid header {name!r}: {value!r}") from None
    delay = raw.get("delay_ms", 0)
    if type(delay) not in (int, float) or not 0 <= delay < math.inf:
        raise _BehaviourError(f"delay_ms must be a finite number >= 0, not {delay!r}")
    for flag in (*_FLAGS, "hold"):
        if type(raw.get(flag, False)) is not bool:
            raise _BehaviourError(f"{flag} must be true or false, not {raw[flag]!r}")
    if sum(bool(raw.get(flag)) for flag in _FLAGS) > 1:
        raise _BehaviourError(f"at most one of {', '.join(_FLAGS)} may be true")
    fail_times = raw.get("fail_times", 0)
    if type(fail_times) is not int or fail_times < 0:
        raise _BehaviourError(f"fail_times must be an integer >= 0, not {fail_times!r}")
    limit = raw.get("max_in_flight", 1)
    if type(limit) is not int or limit < 1:
        raise _BehaviourError(f"max_in_flight must be an integer >= 1, not {limit!r}")
    try:
        json.dumps(raw.get("body"))
    except (TypeError, ValueError) as exc:
        raise _BehaviourError(f"body is not JSON-serialisable: {exc}") from None
    return dict(raw)


def _response(
    conn: h11.Connection,
    status: int,
    body: Any = None,
    headers: Mapping[str, object] | None = None,
    *,
    head_only: bool = False,
    close: bool = False,
) -> bytes:
    """A whole response, status line to end of body, framed by h11 (which also adds
    ``Connection: close`` when the client asked for it)."""
    if body is None:
        body = {"ok": True} if status < 400 else {"error": f"simulated {status}"}
    if isinstance(body, str):
        content_type, data = _TEXT, body.encode()
    else:
        content_type, data = _JSON, json.dumps(body).encode()
    extra = headers or {}
    fields: list[tuple[bytes, bytes]] = []
    if not any(name.lower() == "content-type" for name in extra):
        fields.append((b"Content-Type", content_type))
    if status not in _NO_BODY_STATUSES:
        fields.append((b"Content-Length", b"%d" % len(data)))
    if close:
        fields.append((b"Connection", b"close"))
    # Names and values were checked against h11's grammar (ASCII) when the behaviour was.
    fields.extend(
        (name.encode("ascii"), str(value).encode("ascii")) for name, value in extra.items()
    )
    out = conn.send(
        h11.Response(status_code=status, headers=fields, reason=_REASONS.get(status, b""))
    )
    if not head_only and status not in _NO_BODY_STATUSES:
        out += conn.send(h11.Data(data=data))
    return out + conn.send(_END)


def _decode_body(body: bytes) -> Any:
    if not body:
        return ""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


class _Record:
    """One received request as the server keeps it; ``answered_at`` is filled in later. The
    headers stay as h11 parsed them until someone asks: decoding them costs more than the rest
    of the bookkeeping, and most requests are never looked at one by one."""

    __slots__ = ("answered_at", "body", "fields", "method", "received_at", "target")

    def __init__(
        self,
        method: str,
        target: str,
        fields: Sequence[tuple[bytes, bytes]],
        body: bytes,
        received_at: float,
    ) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.received_at = received_at
        self.answered_at: float | None = None

    def headers(self) -> dict[str, str]:
        """Names lower-cased (h11 does that), repeated headers joined with ", "."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in self.fields:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    def document(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.target,
            "headers": self.headers(),
            "body": _decode_body(self.body),
            "received_at": self.received_at,
            "answered_at": self.answered_at,
        }


class _Counts:
    """One function's counts: requests since reset, in flight now, peak since reset."""

    __slots__ = ("in_flight", "peak", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.peak = 0


class _Server:
    """The stand-in's state and connection handler; lives in the server process."""

    def __init__(self, delay_ms: float, *, record: bool = True) -> None:
        self.delay_ms = delay_ms
        self.record = record
        self.received: list[_Record] = []
        self.functions: dict[str, dict[str, Any]] = {}
        self.default: dict[str, Any] | None = None
        self.seen: dict[str | None, int] = {}
        self.counts: dict[str, _Counts] = {}
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
        # Calls still in flight stay counted (they will leave); everything else starts again.
        self.counts = {name: c for name, c in self.counts.items() if c.in_flight}
        for counts in self.counts.values():
            counts.requests = 0
            counts.peak = counts.in_flight
        self.released.set()  # calls held until now answer; later ones are held again
        self.released = asyncio.Event()

    # -- connections -------------------------------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: requests in turn until either side closes (h11 decides keep-alive)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.writers.add(writer)
        try:
            while (request := await self._read_request(conn, reader, writer)) is not None:
                if not await self._answer(conn, reader, writer, request):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break  # Connection: close from either side, or HTTP/1.0
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if not conn.trailing_data[1]:  # a client that went away mid-request gets no answer
                self._refuse(conn, writer, exc.error_status_hint, str(exc))
        except ConnectionError:
            pass  # the client went away
        except asyncio.CancelledError:
            # The server is stopping with this call in flight (a held or hanging one). Ended
            # quietly: Python 3.11's StreamReaderProtocol reports a handler that ends cancelled
            # as an "Exception in callback" traceback on stderr, which would land in the
            # output of whoever started the stand-in.
            pass
        except Exception as exc:  # a bug here must not kill the server; say so and move on
            print(f"stand-in: internal error: {exc!r}", file=sys.stderr, flush=True)
            self._refuse(conn, writer, 500, repr(exc))
        finally:
            self.writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_request(
        conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes, float] | None:
        """The next request with its whole body and the time its head was complete; ``None``
        when the client closed the connection between requests."""
        request: h11.Request | None = None
        received_at = 0.0
        chunks: list[bytes] = []
        if not conn.trailing_data[0]:  # nothing buffered: h11 can only ask for more, so read
            conn.receive_data(await reader.read(READ_BYTES))
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                return request, b"".join(chunks), received_at
            elif isinstance(event, h11.Request):
                request = event
                received_at = time.time()
            elif event is h11.NEED_DATA:
                if conn.client_is_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                conn.receive_data(await reader.read(READ_BYTES))
            else:  # ConnectionClosed; PAUSED cannot happen: each cycle ends before the next read
                return None

    @staticmethod
    def _refuse(
        conn: h11.Connection, writer: asyncio.StreamWriter, status: int, message: str
    ) -> None:
        """Answer a request that cannot be served, if an answer can still be sent."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # part of an answer is out already: closing is all that is left
        with contextlib.suppress(Exception):
            writer.write(_response(conn, status, {"error": message}, close=True))

    async def _answer(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        received: tuple[h11.Request, bytes, float],
    ) -> bool:
        """Answer one request; return whether the connection may serve another."""
        request, body, received_at = received
        method = request.method.decode("ascii")
        target = request.target.decode("ascii")  # h11 accepts only ASCII targets
        if target.startswith(CONTROL_PREFIX):
            if method == "GET" and target.partition("?")[0] == CONTROL_PREFIX + "wait":
                status, document = await self._wait(target)
            else:
                status, document = self._control(method, target, body)
            writer.write(_response(conn, status, document, head_only=method == "HEAD"))
            await writer.drain()
            return True
        record = _Record(method, target, request.headers, body, received_at)
        if self.record:
            self.received.append(record)
        self.count += 1
        if self.waiters:
            async with self.arrived:
                self.arrived.notify_all()
        function = _function_name(target)
        counts = self.counts.get(function)
        if counts is None:
            counts = self.counts[function] = _Counts()
        counts.requests += 1
        counts.in_flight += 1
        counts.peak = max(counts.peak, counts.in_flight)
        try:
            answer = await self._function(conn, reader, record, counts, head_only=method == "HEAD")
        finally:
            # Out of flight before the answer goes out: whoever has the answer sees the count
            # without it.
            counts.in_flight -= 1
        if answer is None:  # hang: never answered, and the client has gone
            return False
        data, keep_alive = answer
        record.answered_at = time.time()  # before the write: never later than the client has it
        writer.write(data)  # nothing at all for `close`
        await writer.drain()
        return keep_alive

    async def _function(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        record: _Record,
        counts: _Counts,
        *,
        head_only: bool,
    ) -> tuple[bytes, bool] | None:
        """What to write for a function request and whether the connection stays open (``b""``
        and ``False``: close without answering); ``None`` for ``hang``, once the client left."""
        try:
            behaviour = self._resolve(record)
        except _BehaviourError as exc:
            return _response(conn, 400, {"error": f"stand-in: {exc}"}, head_only=head_only), True
        if behaviour is None:  # the common, fast path
            if self.delay_ms > 0:
                await asyncio.sleep(self.delay_ms / 1000)
            return self._ok(conn, head_only=head_only), True
        limit = behaviour.get("max_in_flight")
        if limit is not None and counts.in_flight > limit:
            error = {"error": f"stand-in: more than {limit} requests in flight"}
            return _response(conn, 429, error, behaviour.get("headers"), head_only=head_only), True
        if behaviour.get("hold"):
            await self.released.wait()
        if behaviour.get("hang"):
            while await reader.read(READ_BYTES):
                pass  # drain whatever the client sends until it goes away
            return None
        delay = behaviour.get("delay_ms", self.delay_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if behaviour.get("garbage"):
            return _GARBAGE, False  # not HTTP on purpose (a broken server), so not through h11
        if behaviour.get("close"):
            return b"", False
        status = behaviour.get("status", 200)
        body, headers = behaviour.get("body"), behaviour.get("headers")
        if status == 200 and body is None and not headers:
            return self._ok(conn, head_only=head_only), True
        return _response(conn, status, body, headers, head_only=head_only), True

    @staticmethod
    def _ok(conn: h11.Connection, *, head_only: bool) -> bytes:
        """The plain ``200 {"ok": true}``, from the prebuilt events."""
        if head_only:
            return conn.send(_OK_HEAD) + conn.send(_END)
        return conn.send(_OK_HEAD) + conn.send(_OK_BODY) + conn.send(_END)

    def _resolve(self, record: _Record) -> dict[str, Any] | None:
        body = record.body
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
            behaviour = self.functions.get(_function_name(record.target), self.default)
            if behaviour is None:
                return None
        if "fail_times" in behaviour:
            key = record.headers().get("idempotency-key")
            count = self.seen.get(key, 0) + 1
            self.seen[key] = count
            if count > behaviour["fail_times"]:
                return None
        return behaviour

    # -- control -----------------------------------------------------------------------------

    def _requests_document(self) -> list[dict[str, Any]]:
        return [record.document() for record in self.received]

    def _stats_document(self) -> dict[str, Any]:
        return {
            "functions": {
                name: {"requests": c.requests, "in_flight": c.in_flight, "peak_in_flight": c.peak}
                for name, c in sorted(self.counts.items())
            }
        }

    async def _wait(self, target: str) -> tuple[int, Any]:
        """GET /__standin/wait?count=N&timeout=S: answers once N requests have arrived since
        the last reset (woken by each arrival, no polling), or 408 after S seconds."""
        params = parse_qs(target.partition("?")[2])
        try:
            count = int(params.get("count", ["1"])[-1])
            timeout = float(params.get("timeout", ["30"])[-1])
        except ValueError:
            count, timeout = -1, math.nan
        if count < 0 or not math.isfinite(timeout) or timeout <= 0:
            return 400, {"error": "wait needs count >= 0 and a finite timeout > 0 (seconds)"}
        self.waiters += 1
        try:
            async with asyncio.timeout(timeout), self.arrived:
                await self.arrived.wait_for(lambda: self.count >= count)
        except TimeoutError:
            return 408, {
                "error": f"{self.count} of {count} requests arrived in {timeout:g} s",
                "received": self.count,
            }
        finally:
            self.waiters -= 1
        return 200, self._requests_document()

    def _control(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        action = target.partition("?")[0].removeprefix(CONTROL_PREFIX)
        try:
            if (method, action) == ("GET", "requests"):
                result: Any = self._requests_document()
            elif (method, action) == ("GET", "stats"):
                result = self._stats_document()
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
                return 404, {"error": f"no {method} {target}"}
        except (_BehaviourError, ValueError) as exc:
            return 400, {"error": str(exc)}
        return 200, result

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
        prog="python -m handler.local.standin",
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

    def stats(self) -> dict[str, FunctionStats]:
        """Per function: requests since start or the last reset, in flight now, and the peak in
        flight (see ``GET /__standin/stats``)."""
        document = self._call("GET", "stats")
        return {
            name: FunctionStats(
                requests=counts["requests"],
                in_flight=counts["in_flight"],
                peak_in_flight=counts["peak_in_flight"],
            )
            for name, counts in document["functions"].items()
        }

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
