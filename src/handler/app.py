"""The Lambda entry point: decorators, parse the event, run one batch, return the summary.

Whatever a user can cause (a bad event, bad configuration, an unreachable or unmigrated
database) ends the invocation with one structured log line that says what and what to do, and
an error whose report carries no traceback through the libraries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from handler.errors import UserError
from handler.operate.observability import logger, metrics, trace_lambda_handler
from handler.runtime.events import parse_event
from handler.runtime.settings import load_settings
from handler.runtime.worker import Worker, report

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

_worker: Worker | None = None  # one per container: clients and connections are reused


def _get_worker() -> Worker:
    global _worker  # noqa: PLW0603 - created once per container on purpose
    if _worker is None:
        _worker = Worker(load_settings())
    return _worker


def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        summary: dict[str, Any] = handle_invocation(event, context)
    except UserError as exc:
        logger.error(str(exc), extra={"error_kind": exc.kind, "error_type": type(exc).__name__})
        raise exc.with_traceback(None) from None
    return summary


@logger.inject_lambda_context(log_event=False, clear_state=True)
@trace_lambda_handler  # X-Ray only when tracing is on
@metrics.log_metrics
def handle_invocation(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    invocation = parse_event(event)  # a bad event fails here, before any job is touched
    logger.set_correlation_id(invocation.event_id or context.aws_request_id)
    logger.info(
        "Batch starting",
        extra={
            "source": invocation.source,
            "tenant_id": str(invocation.tenant_id) if invocation.tenant_id else None,
            "scheduled_time": invocation.scheduled_time.isoformat()
            if invocation.scheduled_time
            else None,
            "shard": f"{invocation.shard}/{invocation.shards}",
        },
    )
    worker = _get_worker()  # bad configuration fails here, naming the variable
    summary, backlog = worker.run(
        invocation,
        remaining_seconds=context.get_remaining_time_in_millis() / 1000,
        request_id=context.aws_request_id,
        lambda_context=context,
    )
    report(summary, backlog)
    return summary.as_dict()
