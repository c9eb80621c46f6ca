"""Logger, tracer and metrics: one instance each per container, imported everywhere.

Metric dimensions stay low-cardinality: `service` on every metric, plus `function` (and
`status_class`) on the per-function ones; never a tenant or a job id.

The tracer is made on first use, and only used when tracing is on: constructing Powertools'
Tracer imports the X-Ray SDK (and, through it, botocore), a third of a cold start's imports, even
when tracing is disabled (bench/results/cold_start.md).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.shared import constants
from aws_lambda_powertools.shared.functions import strtobool

from handler.errors import ConfigurationError

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "queue-worker")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "QueueWorker")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)

F = TypeVar("F", bound=Callable[..., Any])
_tracer: Tracer | None = None


def tracing_enabled() -> bool:
    """Whether Powertools would trace here, by its own rules (read at each call, as cheap as a
    few environment lookups): not when POWERTOOLS_TRACE_DISABLED is true, and only in Lambda
    (LAMBDA_TASK_ROOT set), not under `sam local` or Chalice's local mode. An empty
    POWERTOOLS_TRACE_DISABLED counts as unset (`sam local` passes a value it cannot resolve so)."""
    disabled = os.environ.get(constants.TRACER_DISABLED_ENV, "").strip() or "false"
    try:
        if strtobool(disabled):
            return False
    except ValueError:
        raise ConfigurationError(
            constants.TRACER_DISABLED_ENV, f"must be true or false, not {disabled!r}"
        ) from None
    in_lambda = bool(os.environ.get(constants.LAMBDA_TASK_ROOT_ENV))
    emulated = bool(
        os.environ.get(constants.SAM_LOCAL_ENV) or os.environ.get(constants.CHALICE_LOCAL_ENV)
    )
    return in_lambda and not emulated


def get_tracer() -> Tracer:
    """The container's Tracer, made (and the X-Ray SDK imported) on the first call."""
    global _tracer  # noqa: PLW0603 - one per container, made when first needed
    if _tracer is None:
        # No auto-patching: tracing every SQL statement and HTTP call of a batch would cost more
        # than it tells; each dispatch gets its own subsegment instead (see dispatch/guard.py).
        # `disabled` given, so that these rules decide rather than Powertools' own reading of the
        # same variables (which refuses an empty value).
        _tracer = Tracer(service=SERVICE, auto_patch=False, disabled=not tracing_enabled())
    return _tracer


def active_tracer() -> Tracer | None:
    """The Tracer when tracing is on; None, and nothing imported, when it is off."""
    if not tracing_enabled():
        return None
    tracer = get_tracer()
    return None if tracer.disabled else tracer


def trace_lambda_handler(handler: F) -> F:
    """Powertools' `capture_lambda_handler` (the "## lambda_handler" subsegment and its cold
    start annotation) around `handler` when tracing is on, decided at each call; the traced
    wrapper is made on the first traced call, so an untraced container never makes a Tracer."""
    traced: Callable[..., Any] | None = None

    @functools.wraps(handler)
    def wrapper(event: Any, context: Any) -> Any:
        nonlocal traced
        tracer = active_tracer()
        if tracer is None:
            return handler(event, context)
        if traced is None:
            traced = tracer.capture_lambda_handler(handler, capture_response=False)
        return traced(event, context)

    return cast(F, wrapper)


def emit_counts(counts: Mapping[str, int | float], unit: MetricUnit = MetricUnit.Count) -> None:
    for name, value in counts.items():
        metrics.add_metric(name=name, unit=unit, value=value)


def emit_per_function(
    latencies_ms: Mapping[str, list[float]],
    responses: Mapping[tuple[str, str], int],
    concurrency_limits: Mapping[str, float] | None = None,
) -> None:
    """DispatchLatency and ConcurrencyLimit (the adaptive limit of calls in flight the invocation
    ended with) by function, DispatchResponses by function and status class.

    Each (function[, status class]) pair is its own EMF document, since dimensions apply to a
    whole document; they are flushed here, at the end of the batch.
    """
    limits = concurrency_limits or {}
    for function in sorted(set(latencies_ms) | set(limits)):
        per_function = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        per_function.add_dimension(name="function", value=function)
        for value in latencies_ms.get(function, []):
            per_function.add_metric(
                name="DispatchLatency", unit=MetricUnit.Milliseconds, value=value
            )
        if function in limits:
            per_function.add_metric(
                name="ConcurrencyLimit", unit=MetricUnit.Count, value=round(limits[function], 2)
            )
        per_function.flush_metrics()
    for (function, status_class), count in responses.items():
        per_class = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        per_class.add_dimension(name="function", value=function)
        per_class.add_dimension(name="status_class", value=status_class)
        per_class.add_metric(name="DispatchResponses", unit=MetricUnit.Count, value=count)
        per_class.flush_metrics()
