"""Trace context for the functions: every POST carries a W3C `traceparent`, and the X-Ray trace
header when tracing is on, so that a function's own spans join the worker's trace
(docs/adr/0011-trace-context.md).

One trace per batch: the X-Ray trace the invocation belongs to when there is one (the tracer's
entity when tracing is on; otherwise the trace header the Lambda runtime puts in
`_X_AMZN_TRACE_ID`, which it sets with tracing off too), else a fresh random one. Each call has
a span id of its own: its X-Ray subsegment's id when tracing records it, else a random one.
"""

import os
import random
import secrets
from typing import Any, NamedTuple

XRAY_ENVIRONMENT_HEADER = "_X_AMZN_TRACE_ID"
_HEX = frozenset("0123456789abcdef")


class TraceRoot(NamedTuple):
    """The trace one batch's calls belong to."""

    trace_id: str  # 32 lowercase hex digits, not all zero (W3C)
    sampled: bool  # whether the trace is recorded upstream (W3C's "sampled" flag)
    parent: Any = None  # the X-Ray entity dispatch subsegments nest under; None: tracing off


class TraceContext(NamedTuple):
    """The trace headers of one call."""

    trace_id: str
    span_id: str  # 16 lowercase hex digits, not all zero: the call, as the function's parent
    sampled: bool
    xray: bool = False  # also send X-Amzn-Trace-Id (tracing is on)

    def headers(self) -> list[tuple[bytes, bytes]]:
        flags = "01" if self.sampled else "00"
        headers = [(b"traceparent", f"00-{self.trace_id}-{self.span_id}-{flags}".encode())]
        if self.xray:
            root = f"1-{self.trace_id[:8]}-{self.trace_id[8:]}"
            value = f"Root={root};Parent={self.span_id};Sampled={int(self.sampled)}"
            headers.append((b"X-Amzn-Trace-Id", value.encode()))
        return headers


def new_span_id() -> str:
    """16 random hex digits, never all zero. From the interpreter's generator, not the system's:
    a span id needs to be unique, not secret, and `os.urandom` gives up the interpreter's lock,
    which each call (of 50 lanes) would then wait to get back."""
    return f"{random.getrandbits(64) or 1:016x}"


def batch_root(parent: Any = None, environment_header: str | None = None) -> TraceRoot:
    """The batch's trace: the tracer's entity when tracing is on (`parent`), else the X-Ray trace
    header of the invocation (`_X_AMZN_TRACE_ID` when not given), else a new random trace."""
    if parent is not None:
        trace_id = w3c_trace_id(getattr(parent, "trace_id", None))
        if trace_id is not None:
            return TraceRoot(trace_id, bool(getattr(parent, "sampled", False)), parent)
    header = environment_header
    if header is None:
        header = os.environ.get(XRAY_ENVIRONMENT_HEADER)
    fields = _xray_header_fields(header or "")
    trace_id = w3c_trace_id(fields.get("Root"))
    if trace_id is not None:
        return TraceRoot(trace_id, fields.get("Sampled") == "1", parent)
    return TraceRoot(secrets.token_hex(16), False, parent)


def call_context(root: TraceRoot, entity: Any = None) -> TraceContext:
    """One call's context: under `entity` (its X-Ray subsegment, when tracing is on), whose id
    is then the span id; a subsegment the SDK does not record (a trace not sampled) has the id
    0000000000000000, which W3C forbids, so a random one stands in."""
    if entity is None:
        return TraceContext(root.trace_id, new_span_id(), root.sampled)
    span_id = getattr(entity, "id", None)
    sampled = bool(getattr(entity, "sampled", False))
    if not sampled or not _is_hex_id(span_id, 16):
        span_id = new_span_id()
    return TraceContext(root.trace_id, str(span_id), sampled, xray=True)


def w3c_trace_id(xray_root: str | None) -> str | None:
    """X-Ray's `1-5759e988-bd862e3fe1be46a994272793` as W3C's 32 hex digits (the same 128 bits,
    which is how X-Ray reads a W3C trace id); None when it is not one, or is all zero (the SDK's
    id for a trace it does not record)."""
    if not xray_root or len(xray_root) != 35:
        return None
    version, epoch, unique = xray_root[:1], xray_root[2:10], xray_root[11:]
    if version != "1" or xray_root[1] != "-" or xray_root[10] != "-":
        return None
    trace_id = (epoch + unique).lower()
    return trace_id if _is_hex_id(trace_id, 32) else None


def _xray_header_fields(header: str) -> dict[str, str]:
    """`Root=…;Parent=…;Sampled=1` as a mapping (unknown and malformed parts ignored)."""
    fields: dict[str, str] = {}
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields[key] = value
    return fields


def _is_hex_id(value: object, length: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == length
        and set(value) <= _HEX
        and value != "0" * length
    )
