"""What a function's answer means for the job: the README's outcome table, as a pure function.

Messages are the seed's, verbatim, so that existing dashboards and runbooks keep matching.
"""

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple

from handler.queue.store import OutcomeKind

StatusClass = Literal["2xx", "3xx", "4xx", "5xx", "network"]

# A Retry-After further out than this is taken as this: a job should not vanish for weeks.
MAX_RETRY_AFTER = timedelta(hours=24)
BODY_EXCERPT_CHARS = 300


class Outcome(NamedTuple):
    kind: OutcomeKind  # what settle_jobs records
    status: int | None  # the HTTP status, None when no response came back
    error: str | None = None
    retry_at: datetime | None = None
    opens_circuit: bool = False  # stop sending this batch's other jobs to this function
    timed_out: bool = False  # no answer within the call's time (a sign of an overloaded function)

    @property
    def status_class(self) -> StatusClass:
        if self.status is None:
            return "network"
        return _STATUS_CLASSES.get(self.status // 100, "5xx")


_STATUS_CLASSES: dict[int, StatusClass] = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def classify_response(
    function: str,
    status: int,
    headers: Mapping[str, str],
    body: str,
    *,
    now: datetime | None = None,
    secrets: tuple[str, ...] = (),
) -> Outcome:
    """The outcome of a response. `headers` is case-insensitive or lower-cased."""
    if 200 <= status < 300:
        return Outcome("completed", status)
    if status in (400, 422):
        return Outcome(
            "dead", status, f"Function rejected the job ({status}): {_excerpt(body, secrets)}"
        )
    if status in (401, 403):
        return Outcome(
            "failed",
            status,
            "Authorization failed. Check SUPABASE_SERVICE_ROLE_KEY configuration.",
            opens_circuit=True,
        )
    if status == 404:
        return Outcome(
            "failed",
            status,
            f"Edge Function not found. Verify function deployment: {function}",
            opens_circuit=True,
        )
    retry_after = _header(headers, "retry-after")
    if status == 429 or (status == 503 and retry_after is not None):
        return Outcome(
            "rate_limited",
            status,
            f"Rate limited by {function}",
            retry_at=parse_retry_after(retry_after, now or datetime.now(UTC)),
        )
    # 408, 5xx, and anything else unexpected (3xx, other 4xx): retry with backoff.
    return Outcome(
        "failed",
        status,
        f"Function execution failed: {status} {_excerpt(body, secrets)}. Check function logs.",
    )


def classify_network_error(
    function: str, error: BaseException, *, secrets: tuple[str, ...] = ()
) -> Outcome:
    """A timeout, a refused or dropped connection, or an answer that is not HTTP."""
    detail = _scrub(
        f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, secrets
    )
    return Outcome(
        "failed",
        None,
        f"Network error calling {function}: {detail}. Check Supabase infrastructure status.",
        timed_out=isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower(),
    )


def parse_retry_after(value: str | None, now: datetime) -> datetime | None:
    """Retry-After as delta-seconds or an HTTP date; None (use backoff) when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        # ASCII digits only (str.isdigit() takes "²", which int() refuses), and no int() of a
        # 5,000-digit string (refused since Python 3.11): anything past the cap is the cap.
        digits = value.lstrip("0") or "0"
        cap = int(MAX_RETRY_AFTER.total_seconds())
        seconds = cap if len(digits) > len(str(cap)) else min(int(digits), cap)
        return now + timedelta(seconds=seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when, now), now + MAX_RETRY_AFTER)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


_WHITESPACE = re.compile(r"\s+")
_DELTA_SECONDS = re.compile(r"[0-9]+", re.ASCII)


def _excerpt(body: str, secrets: tuple[str, ...]) -> str:
    # Scrub before cutting: a secret that straddles the cut would otherwise leave its beginning.
    # Scrub before and after folding whitespace: folding can make a secret appear.
    text = _scrub(_WHITESPACE.sub(" ", _scrub(body, secrets)).strip(), secrets)
    if len(text) > BODY_EXCERPT_CHARS:
        text = text[:BODY_EXCERPT_CHARS] + "…"
    return text or "(empty body)"


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # A function may echo the request back, Authorization header included.
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # Control characters (a NUL above all, which PostgreSQL text cannot hold) from an answer that
    # is not text must not break the settlement of the whole batch.
    return _CONTROL.sub("\N{REPLACEMENT CHARACTER}", text)
