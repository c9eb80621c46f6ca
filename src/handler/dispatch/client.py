"""The POST of one job to its function: URL, headers, body, and what came back.

Stock httpx 0.28 over its own transport (httpcore and h11: no HTTP parsing here). Each dispatch
thread has a connection pool of its own, created on first use and kept for the container's life:
one pool shared by 50 threads serialises them on its lock. What httpx is left to do, and what
it is told:

- TLS always verified, with one `ssl.SSLContext` for every thread: loading the CAs is slow
  (tens of milliseconds, more on a small Lambda), so it is done once per container.
- Redirects never followed: a redirect could carry the service role key to another host.
- The proxy environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY) is honoured: when it
  names a proxy, each thread sends through an `httpx.Client` built without a transport of ours,
  so httpx mounts its proxies as it always does; when it names none, through the transport such
  a client would use (`httpx.HTTPTransport`), without the client's per-request layer.
- Idle keep-alive connections expire before a server or a NAT would drop them (KEEPALIVE_S);
  httpcore also refuses to reuse an idle connection whose socket became readable (the peer
  closed it), and it retries on another connection only a request that provably never left
  (ConnectionNotAvailable). Nothing here retries: a request must not reach a function twice.
- One deadline bounds the whole call (deadline.py); an answer is read up to
  MAX_RESPONSE_BYTES, whatever its size or framing.
"""

import functools
import http.cookiejar
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote

import httpcore  # noqa: F401  # see below
import httpx

from handler.dispatch.deadline import LaneWatch, Phase, Watchdog
from handler.dispatch.outcomes import Outcome, classify_network_error, classify_response
from handler.dispatch.routes import Route
from handler.dispatch.tracecontext import TraceContext, TraceRoot, batch_root, call_context
from handler.queue.store import ClaimedJob

# httpx imports httpcore when it makes its first client. Imported above, with this module, it
# is paid for when the container starts rather than in a batch's first round, where every
# dispatch thread would wait for whichever imports it.

# A function's answer is read up to this much: enough for an error excerpt, bounded memory.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = b"queue-worker"
# Below the idle timeout of the servers and middleboxes a function may sit behind (Node's
# HTTP server closes idle connections after 5 s, load balancers after 60 s, NAT gateways after
# a few minutes): a connection is given up here before the peer could close it under a request
# being sent. It costs nothing: a lane's calls follow each other with no idle time in between,
# and invocations a minute apart could not share a connection below 60 s anyway.
KEEPALIVE_S = 4.0
_TIMEOUT_PHASES = ("connect", "read", "write", "pool")
# What a call cut at its deadline reports, by how far it got.
_TIMEOUT_ERRORS: dict[Phase, type[httpx.TimeoutException]] = {
    "connect": httpx.ConnectTimeout,
    "write": httpx.WriteTimeout,
    "read": httpx.ReadTimeout,
}


class Delivery(NamedTuple):
    """What one POST came back with."""

    outcome: Outcome
    latency_ms: float


def request_body(job: ClaimedJob) -> bytes:
    """The envelope and the payload as PostgreSQL rendered it. Written out rather than through
    json.dumps with compact separators, which builds a new encoder on every call (most of this
    function's time); only the job type can need escaping (ids are UUIDs, attempt an int)."""
    return (
        f'{{"job_id":"{job.id}","tenant_id":"{job.tenant_id}",'
        f'"job_type":{json.dumps(job.job_type)},"attempt":{job.attempt:d},'
        f'"payload":{job.payload_json}}}'
    ).encode()


def default_ssl_context() -> ssl.SSLContext:
    """httpx's own default: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR when set; always
    verifying certificates and host names."""
    return httpx.create_ssl_context()


def _read_bounded(response: httpx.Response) -> str:
    """The body as it came (no Content-Encoding is asked for, none is decoded), up to
    MAX_RESPONSE_BYTES: a huge answer costs no memory, and the rest of it is never read (closing
    the response then drops its connection)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")


class _NoCookies(http.cookiejar.CookieJar):
    """Keeps no cookie. The worker's requests are built whole and never carry the client's
    cookies, so storing what functions set would only cost time on every answer."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def _untraced_root() -> TraceRoot:
    return batch_root(environment_header="")


def _environment_names_a_proxy() -> bool:
    """Whether httpx would mount a proxy for some URL: it reads urllib's getproxies() and mounts
    one for each of http, https and all that is set (NO_PROXY alone only exempts hosts)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


class _Lane:
    """A dispatch thread's way of sending (an httpx.Client, or the transport such a client would
    use), and what the watchdog knows of its calls."""

    __slots__ = ("close", "send", "watch")

    def __init__(
        self,
        send: Callable[[httpx.Request], httpx.Response],
        close: Callable[[], None],
        watch: LaneWatch,
    ) -> None:
        self.send = send
        self.close = close
        self.watch = watch


class Dispatcher:
    def __init__(
        self,
        base_url: str,
        service_role_key: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.set_service_role_key(service_role_key)
        if ssl_context is None:
            if httpx.URL(self.base_url).scheme == "https":
                ssl_context = default_ssl_context()
            else:
                # Over plain HTTP no TLS connection is ever made (redirects are not followed):
                # a context that trusts no CA costs nothing to make, where loading the CAs for
                # nothing would delay the first batch; were it ever used, it would refuse.
                ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ssl_context = ssl_context
        # Read once, as httpx reads the proxy environment once per client.
        self._proxied = _environment_names_a_proxy()
        self._local = threading.local()
        self._lanes: list[_Lane] = []
        self._lanes_lock = threading.Lock()
        self._watchdog = Watchdog()
        self._urls: dict[str, httpx.URL] = {}  # parsed once per function

    def _lane(self) -> _Lane:
        lane: _Lane | None = getattr(self._local, "lane", None)
        if lane is None:
            # One connection: a pool serves one thread, one call at a time.
            limits = httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_S
            )
            watch = LaneWatch(self._watchdog)
            if self._proxied:
                client = httpx.Client(
                    verify=self.ssl_context,
                    limits=limits,
                    follow_redirects=False,  # a redirect could carry the key elsewhere
                    trust_env=True,  # the proxy environment, mounted by httpx
                    cookies=_NoCookies(),
                )
                lane = _Lane(functools.partial(client.send, stream=True), client.close, watch)
            else:
                # The transport an httpx.Client would send through when no proxy is named
                # (httpx's own, configured as the client would configure it), called directly:
                # the client's per-request work (auth flow, redirect loop, cookie jar, request
                # log) is for features the worker does not use, and took a sixth of the CPU of
                # each call. A transport never follows redirects.
                transport = httpx.HTTPTransport(verify=self.ssl_context, limits=limits)
                lane = _Lane(transport.handle_request, transport.close, watch)
            self._local.lane = lane
            with self._lanes_lock:
                self._lanes.append(lane)
        return lane

    def set_service_role_key(self, key: str) -> None:
        """A rotated key takes effect from the next call on."""
        self._secrets = (key,)
        # A header carries printable ASCII only; h11 would refuse the key after connecting, and
        # its message would quote the key.
        if key.isascii() and key.isprintable() and key == key.strip():
            self._key_problem: str | None = None
            self._authorization = b"Bearer " + key.encode("ascii")
        else:
            self._key_problem = (
                "the service role key cannot be sent in an HTTP header: it must be printable "
                "ASCII without leading or trailing spaces; check SUPABASE_SERVICE_ROLE_KEY"
            )
            self._authorization = b""

    def url_for(self, route: Route) -> httpx.URL:
        url = self._urls.get(route.function)
        if url is None:
            # The route was validated as one plain segment; quote() is a second fence.
            url = httpx.URL(f"{self.base_url}/{quote(route.function, safe='')}")
            self._urls[route.function] = url  # a race only parses it twice
        return url

    def post(
        self, job: ClaimedJob, route: Route, timeout: float, trace: TraceContext | None = None
    ) -> Delivery:
        """Sends the job; never raises for what the function or the network did. `trace` is
        the call's trace context (a call without one starts a trace of its own)."""
        started = time.perf_counter()
        if trace is None:
            trace = call_context(_untraced_root())
        if self._key_problem is not None:
            outcome = classify_network_error(route.function, ValueError(self._key_problem))
            return Delivery(outcome, 0.0)
        lane = self._lane()
        url = self.url_for(route)
        body = request_body(job)
        call = lane.watch.begin(timeout)
        error: Exception | None = None
        try:
            # A Request built whole rather than through client.build_request, which would merge
            # (and re-parse) the URL and the client's default headers on every call; from a
            # stream, with its headers complete and in bytes, so httpx has nothing to add or
            # encode.
            request = httpx.Request(
                "POST",
                url,
                stream=httpx.ByteStream(body),
                headers=[
                    (b"Host", url.netloc),
                    (b"Content-Length", b"%d" % len(body)),
                    (b"Authorization", self._authorization),
                    (b"Content-Type", b"application/json"),
                    (b"Idempotency-Key", str(job.id).encode()),
                    (b"User-Agent", USER_AGENT),
                    *trace.headers(),
                ],
                extensions={
                    "timeout": dict.fromkeys(_TIMEOUT_PHASES, timeout),
                    "trace": lane.watch.trace,
                },
            )
            response = lane.send(request)
            try:
                text = _read_bounded(response)
            finally:
                response.close()
        except (httpx.HTTPError, OSError, ValueError) as exc:
            error = exc
        finally:
            expired = lane.watch.end(call)
        latency = (time.perf_counter() - started) * 1000
        if error is not None:
            if expired:
                # The watchdog cut the connection: what httpcore saw was the end of the stream.
                error = _TIMEOUT_ERRORS[call.phase](call.timeout_message())
            outcome = classify_network_error(route.function, error, secrets=self._secrets)
            return Delivery(outcome, latency)
        outcome = classify_response(
            route.function, response.status_code, response.headers, text, secrets=self._secrets
        )
        return Delivery(outcome, latency)

    def close(self) -> None:
        self._watchdog.close()
        with self._lanes_lock:
            for lane in self._lanes:
                lane.close()
            self._lanes.clear()
