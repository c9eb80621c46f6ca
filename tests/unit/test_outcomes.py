"""classify_response / classify_network_error: the README's outcome table, row by row, and
the properties that hold for any answer a function can give."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import get_args

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from handler.dispatch.outcomes import (
    BODY_EXCERPT_CHARS,
    MAX_RETRY_AFTER,
    Outcome,
    classify_network_error,
    classify_response,
    parse_retry_after,
)
from handler.queue.store import OutcomeKind

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
FUNCTION = "ingest-slack"
SECRET = "eyJhbGciOiJIUzI1NiJ9-service-role"
RESPONSE_KINDS = {"completed", "failed", "dead", "rate_limited"}


def classify(status: int, body: str = "", headers: dict[str, str] | None = None) -> Outcome:
    return classify_response(FUNCTION, status, headers or {}, body, now=NOW, secrets=(SECRET,))


def test_response_kinds_are_outcome_kinds() -> None:
    assert set(get_args(OutcomeKind)) >= RESPONSE_KINDS


# --- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_completes_the_job(status: int) -> None:
    outcome = classify(status, body='{"ok": false}')

    assert outcome == Outcome("completed", status)
    assert outcome.status_class == "2xx"


@pytest.mark.parametrize("status", [400, 422])
def test_400_and_422_dead_letter_the_job_as_rejected(status: int) -> None:
    outcome = classify(status, body='{"error": "payload.tenant is required"}')

    assert outcome.kind == "dead"
    assert outcome.status == status
    assert outcome.error is not None
    assert outcome.error.startswith(f"Function rejected the job ({status})")
    assert "payload.tenant is required" in outcome.error
    assert not outcome.opens_circuit
    assert outcome.retry_at is None


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_retry_and_open_the_circuit(status: int) -> None:
    outcome = classify(status, body="bad jwt")

    assert outcome.kind == "failed"
    assert outcome.status == status
    assert outcome.opens_circuit
    assert outcome.error == "Authorization failed. Check SUPABASE_SERVICE_ROLE_KEY configuration."


def test_404_retries_opens_the_circuit_and_names_the_function() -> None:
    outcome = classify(404, body="Not Found")

    assert outcome.kind == "failed"
    assert outcome.opens_circuit
    assert outcome.error == f"Edge Function not found. Verify function deployment: {FUNCTION}"


def test_429_with_retry_after_seconds_reschedules_then() -> None:
    outcome = classify(429, headers={"Retry-After": "120"})

    assert outcome.kind == "rate_limited"
    assert outcome.status == 429
    assert outcome.retry_at == NOW + timedelta(seconds=120)
    assert outcome.error == f"Rate limited by {FUNCTION}"
    assert not outcome.opens_circuit


def test_429_with_retry_after_http_date_reschedules_then() -> None:
    when = NOW + timedelta(minutes=7)

    outcome = classify(429, headers={"retry-after": format_datetime(when, usegmt=True)})

    assert outcome.kind == "rate_limited"
    assert outcome.retry_at == when


def test_429_without_retry_after_is_rate_limited_with_backoff() -> None:
    outcome = classify(429)

    assert outcome.kind == "rate_limited"
    assert outcome.retry_at is None
    assert outcome.error == f"Rate limited by {FUNCTION}"


def test_503_with_retry_after_is_rate_limited() -> None:
    outcome = classify(503, headers={"RETRY-AFTER": "30"})

    assert outcome.kind == "rate_limited"
    assert outcome.retry_at == NOW + timedelta(seconds=30)
    assert outcome.error == f"Rate limited by {FUNCTION}"


@pytest.mark.parametrize("status", [503, 408, 500, 502, 504])
def test_408_and_5xx_retry_with_the_body_excerpt(status: int) -> None:
    outcome = classify(status, body="upstream\n\n  exploded")

    assert outcome.kind == "failed"
    assert outcome.retry_at is None
    assert not outcome.opens_circuit
    assert outcome.error == (
        f"Function execution failed: {status} upstream exploded. Check function logs."
    )


def test_empty_body_is_said_to_be_empty() -> None:
    outcome = classify(500, body="   ")

    assert outcome.error == "Function execution failed: 500 (empty body). Check function logs."


@pytest.mark.parametrize("status", [301, 302, 405, 409, 418])
def test_other_statuses_retry_with_backoff(status: int) -> None:
    outcome = classify(status, body="odd")

    assert outcome.kind == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith(f"Function execution failed: {status} odd")


def test_network_error_names_function_and_error() -> None:
    outcome = classify_network_error(FUNCTION, TimeoutError("read timed out"))

    assert outcome.kind == "failed"
    assert outcome.status is None
    assert outcome.status_class == "network"
    assert outcome.error == (
        f"Network error calling {FUNCTION}: TimeoutError: read timed out. "
        "Check Supabase infrastructure status."
    )


def test_network_error_without_text_names_its_type() -> None:
    outcome = classify_network_error(FUNCTION, ConnectionRefusedError())

    assert outcome.error == (
        f"Network error calling {FUNCTION}: ConnectionRefusedError. "
        "Check Supabase infrastructure status."
    )


# --- secrets and long bodies -----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422, 500, 503])
def test_secret_echoed_in_the_body_is_scrubbed(status: int) -> None:
    outcome = classify(status, body=f'{{"headers": {{"authorization": "Bearer {SECRET}"}}}}')

    assert outcome.error is not None
    assert SECRET not in outcome.error
    assert "Bearer ***" in outcome.error


def test_secret_in_a_network_error_is_scrubbed() -> None:
    error = OSError(f"proxy refused Authorization: Bearer {SECRET}")

    outcome = classify_network_error(FUNCTION, error, secrets=(SECRET,))

    assert outcome.error is not None
    assert SECRET not in outcome.error
    assert "Bearer ***" in outcome.error


def test_secret_cut_by_the_excerpt_leaves_no_beginning_behind() -> None:
    body = "x" * (BODY_EXCERPT_CHARS - 10) + " " + SECRET  # the cut falls 9 characters in

    outcome = classify(500, body=body)

    assert outcome.error is not None
    assert SECRET[:6] not in outcome.error


def test_long_body_is_cut_to_the_excerpt_length() -> None:
    outcome = classify(500, body="y" * 10_000)

    assert outcome.error is not None
    assert f"{'y' * BODY_EXCERPT_CHARS}…. Check function logs." in outcome.error
    assert "y" * (BODY_EXCERPT_CHARS + 1) not in outcome.error


# --- Retry-After -----------------------------------------------------------------------------


def test_retry_after_is_capped_at_a_day() -> None:
    assert parse_retry_after("999999999", NOW) == NOW + MAX_RETRY_AFTER


def test_retry_after_of_thousands_of_digits_is_capped_not_an_error() -> None:
    assert parse_retry_after("9" * 5000, NOW) == NOW + MAX_RETRY_AFTER


def test_retry_after_zero_means_now() -> None:
    assert parse_retry_after(" 0 ", NOW) == NOW


def test_retry_after_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == NOW


def test_retry_after_date_far_ahead_is_capped_at_a_day() -> None:
    assert parse_retry_after("Fri, 01 Jan 9999 00:00:00 GMT", NOW) == NOW + MAX_RETRY_AFTER


@pytest.mark.parametrize(
    "value", ["soon", "-5", "1.5", "²", "٣٠", "", "Wed, 21 Oct 99999 07:28:00 GMT", "+30"]
)
def test_malformed_retry_after_falls_back_to_backoff(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_absent_retry_after_falls_back_to_backoff() -> None:
    assert parse_retry_after(None, NOW) is None


# --- properties ------------------------------------------------------------------------------

retry_after_values = st.one_of(
    st.text(max_size=40),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.text(alphabet=string.digits, min_size=1, max_size=20),
    st.integers(min_value=4000, max_value=6000).map(lambda n: "9" * n),  # past int()'s limit
    st.text(alphabet=st.characters(categories=["Nd", "No"]), min_size=1, max_size=5),
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ).map(lambda d: format_datetime(d, usegmt=True)),
    st.datetimes().map(format_datetime),
)
header_maps = st.dictionaries(
    st.one_of(st.sampled_from(["Retry-After", "retry-after", "RETRY-AFTER"]), st.text(max_size=20)),
    retry_after_values,
    max_size=4,
)
secrets = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=12, max_size=60)
bodies = st.text(max_size=2000)
now_values = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def bodies_with_secret(draw: st.DrawFn, secret: str) -> str:
    """Bodies that often echo the secret, anywhere, possibly several times."""
    parts = draw(st.lists(st.one_of(st.text(max_size=400), st.just(secret)), max_size=6))
    return "".join(parts)


@given(
    status=st.integers(min_value=100, max_value=599),
    headers=header_maps,
    body=bodies,
    secret=secrets,
    now=now_values,
    data=st.data(),
)
def test_any_response_is_classified_without_raising(
    *,
    status: int,
    headers: dict[str, str],
    body: str,
    secret: str,
    now: datetime,
    data: st.DataObject,
) -> None:
    assume(secret not in FUNCTION)
    body = body + data.draw(bodies_with_secret(secret))

    outcome = classify_response(FUNCTION, status, headers, body, now=now, secrets=(secret,))

    assert outcome.kind in RESPONSE_KINDS
    assert outcome.status == status
    assert (outcome.kind == "completed") == (200 <= status < 300)
    if outcome.retry_at is not None:
        assert now <= outcome.retry_at <= now + timedelta(hours=24)
    if outcome.kind != "completed":
        assert outcome.error
    assert secret not in (outcome.error or "")


@example(value="²", now=NOW)
@example(value="9" * 5000, now=NOW)
@given(value=retry_after_values, now=now_values)
def test_retry_after_is_none_or_within_a_day(value: str, now: datetime) -> None:
    when = parse_retry_after(value, now)

    assert when is None or now <= when <= now + MAX_RETRY_AFTER


@given(message=st.text(max_size=300), secret=secrets, data=st.data())
def test_network_errors_never_show_the_secret(
    message: str, secret: str, data: st.DataObject
) -> None:
    assume(secret not in FUNCTION)
    error = ConnectionError(message + data.draw(bodies_with_secret(secret)))

    outcome = classify_network_error(FUNCTION, error, secrets=(secret,))

    assert outcome.kind == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith(f"Network error calling {FUNCTION}: ")
    assert secret not in outcome.error
