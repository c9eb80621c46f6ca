"""The POST of one job to its function (DESIGN section 3): URL, headers, body, classification.

An `httpx2.Client` per dispatch thread, created once per container, each over a lean keep-alive
transport (see http_transport.py); TLS always verified. httpx2 is the maintained fork of httpx
with the same API; the README's benchmark says why this stack.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import httpx2

from handler.dispatch.http_transport import KeepAliveTransport
from handler.dispatch.outcomes import Outcome, classify_network_error, classify_response
from handler.dispatch.routes import Route
from handler.queue.store import ClaimedJob

# A function's answer is read up to this much: enough for an error excerpt, bounded memory.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "queue-worker"
_TIMEOUT_PHASES = ("connect", "read", "write", "pool")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one POST came back with."""

    outcome: Outcome
    latency_ms: float


def request_body(job: ClaimedJob) -> bytes:
    envelope = json.dumps(
        {
            "job_id": str(job.id),
            "tenant_id": str(job.tenant_id),
            "job_type": job.job_type,
            "attempt": job.attempt,
        },
        separators=(",", ":"),
    )
    return f'{envelope[:-1]},"payload":{job.payload_json}}}'.encode()


def _read_bounded(response: httpx2.Response) -> str:
    """The body, up to MAX_RESPONSE_BYTES: a huge answer costs no memory."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_RESPONSE_BYTES:
            break
    return b"".join(chunks)[:MAX_RESPONSE_BYTES].decode("utf-8", "replace")


class Dispatcher:
    def __init__(
        self,
        base_url: str,
        service_role_key: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = service_role_key
        self._secrets = (service_role_key,)
        # One context for all clients (loading the system's CAs costs ~0.2 s); always verifying.
        self._ssl = ssl_context or ssl.create_default_context()
        self._local = threading.local()
        self._clients: list[httpx2.Client] = []
        self._clients_lock = threading.Lock()
        self._urls: dict[str, httpx2.URL] = {}  # parsed once per function

    def _client(self) -> httpx2.Client:
        """The calling thread's client. One pool shared by many threads serialises them on its
        lock; a client per dispatch thread (one keep-alive connection each) does not."""
        client: httpx2.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx2.Client(
                transport=KeepAliveTransport(self._ssl),
                follow_redirects=False,  # a redirect could carry the key elsewhere
            )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def set_service_role_key(self, key: str) -> None:
        """A rotated key takes effect from the next call on."""
        self._key = key
        self._secrets = (key,)

    def url_for(self, route: Route) -> httpx2.URL:
        url = self._urls.get(route.function)
        if url is None:
            # The route was validated as one plain segment; quote() is a second fence.
            url = httpx2.URL(f"{self.base_url}/{quote(route.function, safe='')}")
            self._urls[route.function] = url  # a race only parses it twice
        return url

    def post(self, job: ClaimedJob, route: Route, timeout: float) -> Delivery:
        """Sends the job; never raises for what the function or the network did."""
        started = time.perf_counter()
        client = self._client()
        try:
            # A Request built whole rather than through client.build_request, which would
            # merge (and re-parse) the URL and the client's default headers on every call.
            request = httpx2.Request(
                "POST",
                self.url_for(route),
                content=request_body(job),
                headers={
                    "Authorization": f"Bearer {self._key}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": str(job.id),
                    "User-Agent": USER_AGENT,
                },
                extensions={"timeout": dict.fromkeys(_TIMEOUT_PHASES, timeout)},
            )
            response = client.send(request, stream=True)
            try:
                body = _read_bounded(response)
            finally:
                response.close()
        except (httpx2.HTTPError, OSError, ValueError) as exc:
            # ValueError: a header httpx2 cannot encode (a key that is not ASCII, say) is one.
            outcome = classify_network_error(route.function, exc, secrets=self._secrets)
            return Delivery(outcome, (time.perf_counter() - started) * 1000)
        latency = (time.perf_counter() - started) * 1000
        outcome = classify_response(
            route.function, response.status_code, response.headers, body, secrets=self._secrets
        )
        return Delivery(outcome, latency)

    def close(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
