"""Logger, tracer and metrics: one instance each per container, imported everywhere.

Metric dimensions stay low-cardinality: `service` on every metric, plus `function` (and
`status_class`) on the per-function ones; never a tenant or a job id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "queue-worker")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "QueueWorker")

logger = Logger(service=SERVICE)
# No auto-patching: tracing every SQL statement and HTTP call of a batch would cost more than it
# tells; each dispatch gets its own subsegment instead (see delivery.py).
tracer = Tracer(service=SERVICE, auto_patch=False)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)


def emit_counts(counts: Mapping[str, int | float], unit: MetricUnit = MetricUnit.Count) -> None:
    for name, value in counts.items():
        metrics.add_metric(name=name, unit=unit, value=value)


def emit_per_function(
    latencies_ms: Mapping[str, list[float]], responses: Mapping[tuple[str, str], int]
) -> None:
    """DispatchLatency by function, DispatchResponses by function and status class.

    Each (function[, status class]) pair is its own EMF document, since dimensions apply to a
    whole document; they are flushed here, at the end of the batch.
    """
    for function, values in latencies_ms.items():
        per_function = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        per_function.add_dimension(name="function", value=function)
        for value in values:
            per_function.add_metric(
                name="DispatchLatency", unit=MetricUnit.Milliseconds, value=value
            )
        per_function.flush_metrics()
    for (function, status_class), count in responses.items():
        per_class = EphemeralMetrics(namespace=NAMESPACE, service=SERVICE)
        per_class.add_dimension(name="function", value=function)
        per_class.add_dimension(name="status_class", value=status_class)
        per_class.add_metric(name="DispatchResponses", unit=MetricUnit.Count, value=count)
        per_class.flush_metrics()
