"""One deadline for a whole HTTP call: connect, TLS, the request and the whole answer.

httpx's timeouts bound each network operation, and httpcore reads each phase's timeout once, at
the start of that phase: a server that trickles its answer (a byte of the status line every
100 ms, or a head that never ends) could hold a 1 s call for as long as it likes. So one watchdog
thread per dispatcher keeps the deadline of every call in flight, and at a call's deadline shuts
its socket down. The blocked read or write then returns at once, httpcore drops the connection,
and the caller reports a timeout.

Which socket a call may block on comes from httpcore's public `trace` request extension: its
`connect_tcp` and `start_tls` events hand over the network stream, whose
`get_extra_info("socket")` is the socket. A call on a reused keep-alive connection sees no such
event; its lane (the dispatch thread's client) remembers the socket of the connection it opened
last, which is the only one its pool can hand back (one thread, one origin, one call at a time).

Shutting down a socket whose call has finished would break the next call on that connection, so
a call is unregistered under the watchdog's lock before its caller sees the result, and the
watchdog only shuts down sockets of calls still registered, under the same lock.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from typing import Any, Literal

Phase = Literal["connect", "write", "read"]

_CONNECTED = ("connect_tcp.complete", "start_tls.complete")
_PHASES: dict[str, Phase] = {
    "http11.send_request_headers.started": "write",
    "http11.receive_response_headers.started": "read",
}


class Call:
    """One call under watch: its deadline, the socket it may block on, how far it got."""

    __slots__ = ("deadline", "dup", "expired", "phase", "sock", "timeout")

    def __init__(self, timeout: float, sock: socket.socket | None) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.sock = sock
        # A duplicate of a new connection's descriptor: the TLS handshake detaches the socket
        # object httpcore connected with, and the duplicate still reaches the same connection.
        self.dup: socket.socket | None = None
        self.expired = False
        self.phase: Phase = "connect"

    def timeout_message(self) -> str:
        doing = {
            "connect": "connecting",
            "write": "sending the request",
            "read": "waiting for the answer",
        }[self.phase]
        return f"timed out after {self.timeout:g} s {doing} (the call's whole deadline)"


class Watchdog:
    """Shuts down the socket of every call still in flight at its deadline; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._calls: set[Call] = set()
        self._wake_at = math.inf  # when the thread next looks (inf: it waits to be told)
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, timeout: float, sock: socket.socket | None) -> Call:
        """Registers a call that may block on `sock` (its lane's keep-alive connection)."""
        call = Call(timeout, sock)
        with self._cond:
            self._calls.add(call)
            if call.deadline < self._wake_at:
                # Calls' deadlines mostly come later than the one the thread waits for: then
                # nothing wakes it, and it wakes about once per timeout in all.
                self._wake_at = call.deadline
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=self._run, name="dispatch-deadlines", daemon=True
                    )
                    self._thread.start()
                self._cond.notify()
        return call

    def connected(self, call: Call, sock: socket.socket, *, new: bool) -> None:
        """The call now uses `sock` (`new`: a connection just opened, TLS not yet started)."""
        dup = None
        if new:
            # fromfd: a plain socket over a duplicate descriptor, whatever class `sock` is.
            with contextlib.suppress(OSError):
                dup = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        with self._cond:
            if dup is not None:
                if call.dup is not None:
                    call.dup.close()  # a second connection within one call
                call.dup = dup
                call.sock = dup
            elif call.dup is None:
                call.sock = sock
            if call.expired:
                _shut_down(call.sock)  # the deadline passed while connecting

    def finish(self, call: Call) -> bool:
        """Unregisters the call; True when its deadline passed while it was in flight."""
        with self._cond:
            self._calls.discard(call)
            expired = call.expired
        if call.dup is not None:
            call.dup.close()
        return expired

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                wake_at = math.inf
                for call in self._calls:
                    if call.expired:
                        continue
                    if call.deadline <= now:
                        call.expired = True
                        _shut_down(call.sock)
                    else:
                        wake_at = min(wake_at, call.deadline)
                self._wake_at = wake_at
                self._cond.wait(None if wake_at == math.inf else wake_at - now)
            self._thread = None


class LaneWatch:
    """One dispatch thread's side of the watchdog: its call in flight, and the socket of the
    connection it opened last. `trace` is the httpcore `trace` extension for its requests."""

    __slots__ = ("_watchdog", "call", "sock")

    def __init__(self, watchdog: Watchdog) -> None:
        self._watchdog = watchdog
        self.call: Call | None = None
        self.sock: socket.socket | None = None

    def begin(self, timeout: float) -> Call:
        call = self.call = self._watchdog.start(timeout, self.sock)
        return call

    def end(self, call: Call) -> bool:
        """True when the call's deadline passed while it was in flight."""
        self.call = None
        return self._watchdog.finish(call)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        call = self.call
        if call is None:
            return
        phase = _PHASES.get(event)
        if phase is not None:
            call.phase = phase
        elif event.endswith(_CONNECTED):
            sock: socket.socket | None = info["return_value"].get_extra_info("socket")
            if sock is not None:
                self.sock = sock
                self._watchdog.connected(call, sock, new=event.endswith(_CONNECTED[0]))


def _shut_down(sock: socket.socket | None) -> None:
    """The base class's shutdown, also for an SSLSocket: it ends the connection for every
    thread blocked on it without touching the TLS state that thread is using."""
    if sock is not None:
        # OSError: httpcore has closed that socket already (its descriptor is then -1, so no
        # other connection can be hit), or the peer has.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
