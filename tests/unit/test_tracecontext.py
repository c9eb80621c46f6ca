"""The trace headers every POST carries: W3C traceparent always, X-Amzn-Trace-Id when tracing
is on, from the batch's trace (the X-Ray entity, the invocation's X-Ray header, or a new one)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from handler.dispatch import tracecontext
from handler.dispatch.tracecontext import (
    TraceContext,
    TraceRoot,
    batch_root,
    call_context,
    w3c_trace_id,
)

XRAY_ROOT = "1-5759e988-bd862e3fe1be46a994272793"
W3C_ID = "5759e988bd862e3fe1be46a994272793"
TRACEPARENT = re.compile(r"00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-(?P<flags>0[01])")


@dataclass
class Entity:
    """What the tracer's segments and subsegments expose to the trace context."""

    trace_id: str
    id: str
    sampled: bool


def traceparent(context: TraceContext) -> re.Match[str]:
    headers = dict(context.headers())
    match = TRACEPARENT.fullmatch(headers[b"traceparent"].decode())
    assert match is not None, headers
    return match


def test_an_xray_trace_id_is_the_same_128_bits_as_a_w3c_one() -> None:
    assert w3c_trace_id(XRAY_ROOT) == W3C_ID
    assert w3c_trace_id(XRAY_ROOT.upper().replace("1-", "1-", 1)) == W3C_ID


@pytest.mark.parametrize(
    "root",
    [
        None,
        "",
        "1-00000000-000000000000000000000000",  # the SDK's id for a trace it does not record
        "2-5759e988-bd862e3fe1be46a994272793",
        "1-5759e988-bd862e3fe1be46a99427279",
        "1_5759e988-bd862e3fe1be46a994272793",
        "1-5759e98g-bd862e3fe1be46a994272793",
    ],
)
def test_what_is_not_an_xray_trace_id_gives_none(root: str | None) -> None:
    assert w3c_trace_id(root) is None


def test_the_invocations_xray_header_gives_the_batch_its_trace_and_sampling() -> None:
    root = batch_root(environment_header=f"Root={XRAY_ROOT};Parent=53995c3f42cd8ad8;Sampled=1")
    assert root == TraceRoot(W3C_ID, True, None)
    unsampled = batch_root(environment_header=f"Root={XRAY_ROOT};Sampled=0;Lineage=a:1")
    assert unsampled == TraceRoot(W3C_ID, False, None)


def test_the_header_is_read_from_the_environment_the_lambda_runtime_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("_X_AMZN_TRACE_ID", f"Root={XRAY_ROOT};Sampled=1")
    assert batch_root().trace_id == W3C_ID
    monkeypatch.delenv("_X_AMZN_TRACE_ID")
    assert batch_root().trace_id != W3C_ID


@pytest.mark.parametrize("header", ["", "garbage", "Root=;Sampled=1", "Root=1-zz-zz;Sampled=1"])
def test_without_a_usable_header_each_batch_starts_a_random_unsampled_trace(header: str) -> None:
    first, second = batch_root(environment_header=header), batch_root(environment_header=header)
    assert re.fullmatch(r"[0-9a-f]{32}", first.trace_id)
    assert first.trace_id != second.trace_id
    assert not first.sampled


def test_the_tracers_entity_wins_over_the_environment() -> None:
    entity = Entity("1-6650a1b2-0123456789abcdef01234567", "53995c3f42cd8ad8", True)
    root = batch_root(entity, environment_header=f"Root={XRAY_ROOT};Sampled=0")
    assert root == TraceRoot("6650a1b20123456789abcdef01234567", True, entity)


def test_an_entity_without_a_real_trace_id_falls_back_to_the_environment() -> None:
    entity = Entity("1-00000000-000000000000000000000000", "0000000000000000", False)
    root = batch_root(entity, environment_header=f"Root={XRAY_ROOT};Sampled=0")
    assert root == TraceRoot(W3C_ID, False, entity)


def test_with_tracing_off_each_call_has_a_span_of_its_own_and_no_xray_header() -> None:
    root = TraceRoot(W3C_ID, True)
    contexts = [call_context(root) for _ in range(50)]
    spans = {traceparent(c)["span"] for c in contexts}
    assert len(spans) == 50
    assert all(traceparent(c)["trace"] == W3C_ID for c in contexts)
    assert all(traceparent(c)["flags"] == "01" for c in contexts)  # the upstream decision
    assert all(b"X-Amzn-Trace-Id" not in dict(c.headers()) for c in contexts)


def test_a_recorded_subsegment_is_the_functions_parent_in_both_headers() -> None:
    subsegment = Entity("1-5759e988-bd862e3fe1be46a994272793", "53995c3f42cd8ad8", True)
    context = call_context(TraceRoot(W3C_ID, True, object()), subsegment)
    headers = dict(context.headers())
    assert headers[b"traceparent"] == f"00-{W3C_ID}-53995c3f42cd8ad8-01".encode()
    assert headers[b"X-Amzn-Trace-Id"] == (
        f"Root={XRAY_ROOT};Parent=53995c3f42cd8ad8;Sampled=1".encode()
    )


def test_a_subsegment_the_sdk_does_not_record_gets_a_real_span_id_and_sampled_0() -> None:
    dummy = Entity(XRAY_ROOT, "0000000000000000", False)
    context = call_context(TraceRoot(W3C_ID, False, object()), dummy)
    match = traceparent(context)
    assert match["span"] != "0" * 16
    assert match["flags"] == "00"
    xray = dict(context.headers())[b"X-Amzn-Trace-Id"].decode()
    assert xray == f"Root={XRAY_ROOT};Parent={match['span']};Sampled=0"


def test_a_span_id_is_sixteen_hex_digits_and_never_all_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = {tracecontext.new_span_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", span) for span in ids)

    monkeypatch.setattr(tracecontext.random, "getrandbits", lambda bits: 0)
    assert tracecontext.new_span_id() == "0000000000000001"
