"""parse_routes: the default routes, JOB_ROUTES overrides, and only plain
path segments as function names."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.dispatch.routes import DEFAULT_ROUTES, Route, parse_routes
from handler.errors import ConfigurationError

DESIGN_ROUTES = {
    "ingest_microsoft": "ingest-microsoft",
    "ingest_slack": "ingest-slack",
    "process_embeddings": "process-embeddings",
    "generate_digest": "daily-digest",
    "prioritize_activities": "prioritize-activities",
}


def route_error(raw: str) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as caught:
        parse_routes(raw)
    return caught.value


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_without_job_routes_the_five_default_routes_apply(raw: str | None) -> None:
    routes = parse_routes(raw)

    assert routes == {job_type: Route(function) for job_type, function in DESIGN_ROUTES.items()}
    assert dict(DEFAULT_ROUTES) == DESIGN_ROUTES


def test_default_routes_have_no_limit_of_their_own() -> None:
    assert all(route.max_in_flight is None for route in parse_routes(None).values())


def test_job_routes_override_a_default_and_keep_the_others() -> None:
    routes = parse_routes('{"generate_digest": "digest-v2"}')

    assert routes["generate_digest"] == Route("digest-v2")
    assert routes["ingest_slack"] == Route("ingest-slack")
    assert len(routes) == 5


def test_job_routes_add_a_new_job_type() -> None:
    routes = parse_routes('{"send_invoice": "billing_send-invoice2"}')

    assert routes["send_invoice"] == Route("billing_send-invoice2")
    assert len(routes) == 6


def test_object_form_sets_a_per_function_limit() -> None:
    routes = parse_routes(
        '{"process_embeddings": {"function": "process-embeddings", "max_concurrency": 4}}'
    )

    assert routes["process_embeddings"] == Route("process-embeddings", max_in_flight=4)


def test_object_form_without_a_limit_has_none() -> None:
    routes = parse_routes('{"x": {"function": "fn-x"}}')

    assert routes["x"] == Route("fn-x", None)


def test_errors_name_another_variable_when_asked() -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_routes('{"x": "a/b"}', variable="ROUTES_FILE")

    assert caught.value.variable == "ROUTES_FILE['x']"


def test_invalid_json_is_refused_with_its_position() -> None:
    error = route_error('{"x": }')

    assert error.variable == "JOB_ROUTES"
    assert str(error).startswith("JOB_ROUTES is not valid JSON (")
    assert "position 6" in str(error)


@pytest.mark.parametrize("raw", ["[]", '"fn"', "1", "true", "null"])
def test_json_that_is_not_an_object_is_refused(raw: str) -> None:
    error = route_error(raw)

    assert error.variable == "JOB_ROUTES"
    assert "must be a JSON object" in str(error)


@pytest.mark.parametrize("target", [1, None, True, ["fn"]])
def test_target_that_is_neither_a_name_nor_an_object_is_refused(target: Any) -> None:
    error = route_error(json.dumps({"x": target}))

    assert error.variable == "JOB_ROUTES['x']"
    assert "must be a function name or" in str(error)


def test_object_form_with_an_unknown_key_is_refused() -> None:
    error = route_error('{"x": {"function": "fn", "timeout": 5}}')

    assert error.variable == "JOB_ROUTES['x']"
    assert "unknown keys ['timeout']" in str(error)


def test_object_form_without_a_function_is_refused() -> None:
    error = route_error('{"x": {"max_concurrency": 2}}')

    assert error.variable == "JOB_ROUTES['x'].function"
    assert "must be a plain function name" in str(error)


@pytest.mark.parametrize("limit", [0, -3, 1.5, "2", True, [2]])
def test_object_form_with_a_bad_limit_is_refused(limit: Any) -> None:
    error = route_error(json.dumps({"x": {"function": "fn", "max_concurrency": limit}}))

    assert error.variable == "JOB_ROUTES['x'].max_concurrency"
    assert str(error) == "JOB_ROUTES['x'].max_concurrency must be a whole number >= 1"


@pytest.mark.parametrize(
    "name",
    [
        "a/b",
        "..",
        "../admin",
        "http://evil",
        "//evil.example.com",
        "%2e%2e",
        "fn%2Fother",
        "fn?x=1",
        "fn#x",
        "fn name",
        "fn\n",
        "-fn",
        "_fn",
        ".fn",
        "",
        "fünf",
        "a" * 129,
    ],
)
def test_function_name_that_is_not_a_plain_path_segment_is_refused(name: str) -> None:
    error = route_error(json.dumps({"x": name}))

    assert error.variable == "JOB_ROUTES['x']"
    assert str(error).startswith("JOB_ROUTES['x'] must be a plain function name")


def test_the_longest_accepted_function_name_is_128_characters() -> None:
    assert parse_routes(json.dumps({"x": "a" * 128}))["x"] == Route("a" * 128)


forbidden_fragment = st.sampled_from(["/", "..", ":", "%", " ", "\t", "\n", "\r", "\u00a0"])


@st.composite
def unsafe_names(draw: st.DrawFn) -> str:
    """Any text with a slash, dot-dot, colon, percent or whitespace somewhere, or a leading '-'."""
    before, after = draw(st.text(max_size=20)), draw(st.text(max_size=20))
    if draw(st.booleans()):
        return before + draw(forbidden_fragment) + after
    return "-" + before


@given(name=unsafe_names(), job_type=st.text(max_size=20))
def test_any_unsafe_function_name_is_refused(name: str, job_type: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_routes(json.dumps({job_type: name}))

    assert caught.value.variable == f"JOB_ROUTES[{job_type!r}]"


@given(name=unsafe_names())
def test_any_unsafe_function_name_is_refused_in_the_object_form_too(name: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_routes(json.dumps({"x": {"function": name, "max_concurrency": 1}}))

    assert caught.value.variable == "JOB_ROUTES['x'].function"


@given(
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,40}", fullmatch=True),
    limit=st.none() | st.integers(min_value=1, max_value=10_000),
)
def test_any_plain_segment_is_accepted_as_given(name: str, limit: int | None) -> None:
    routes = parse_routes(json.dumps({"x": {"function": name, "max_concurrency": limit}}))

    assert routes["x"] == Route(name, limit)


@pytest.mark.parametrize(
    ("rate", "per_second"),
    [("20/s", 20.0), ("600/min", 10.0), ("1800/h", 0.5), (5, 5.0), (2.5, 2.5), ("3 / second", 3.0)],
)
def test_a_route_may_carry_a_rate_in_calls_per_second_minute_or_hour(
    rate: object, per_second: float
) -> None:
    routes = parse_routes(json.dumps({"ingest_slack": {"function": "ingest-slack", "rate": rate}}))
    assert routes["ingest_slack"] == Route("ingest-slack", rate_per_second=per_second)


def test_a_routes_burst_needs_its_rate() -> None:
    route = parse_routes('{"a": {"function": "f", "rate": "10/s", "burst": 3}}')["a"]
    assert (route.rate_per_second, route.burst) == (10.0, 3.0)
    assert route.as_json() == {"function": "f", "rate": 10.0, "burst": 3.0, "max_concurrency": None}
    with pytest.raises(ConfigurationError, match=r"JOB_ROUTES\['a'\].burst needs a rate"):
        parse_routes('{"a": {"function": "f", "burst": 3}}')


@pytest.mark.parametrize("rate", ["fast", "10/day", "0/s", "-1", True, [10], "1e9"])
def test_a_bad_rate_names_the_route(rate: object) -> None:
    with pytest.raises(ConfigurationError, match=r"JOB_ROUTES\['a'\].rate"):
        parse_routes(json.dumps({"a": {"function": "f", "rate": rate}}))
