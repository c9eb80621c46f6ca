"""Which function a job type is POSTed to, and how many calls to it may be in flight at once."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from handler.errors import ConfigurationError

DEFAULT_ROUTES: Mapping[str, str] = {
    "ingest_microsoft": "ingest-microsoft",
    "ingest_slack": "ingest-slack",
    "process_embeddings": "process-embeddings",
    "generate_digest": "daily-digest",
    "prioritize_activities": "prioritize-activities",
}

# A function name is one plain path segment: no scheme, no slash, no dot-dot, no escapes.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


@dataclass(frozen=True, slots=True)
class Route:
    function: str
    max_in_flight: int | None = None  # None: only MAX_CONCURRENCY bounds it


def parse_routes(raw: str | None, *, variable: str = "JOB_ROUTES") -> dict[str, Route]:
    """The default routes plus JOB_ROUTES, a JSON object of job type to either a function name
    or {"function": name, "max_concurrency": n}."""
    routes = {job_type: Route(function) for job_type, function in DEFAULT_ROUTES.items()}
    if raw is None or not raw.strip():
        return routes
    try:
        overrides = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            variable, f"is not valid JSON ({exc.msg} at position {exc.pos})"
        ) from None
    if not isinstance(overrides, dict):
        raise ConfigurationError(
            variable, 'must be a JSON object such as {"job_type": "function-name"}'
        )
    for job_type, target in overrides.items():
        routes[job_type] = _route(job_type, target, variable)
    return routes


def _route(job_type: str, target: Any, variable: str) -> Route:
    where = f"[{job_type!r}]"
    if isinstance(target, str):
        return Route(_function_name(target, f"{variable}{where}"))
    if isinstance(target, dict):
        unknown = set(target) - {"function", "max_concurrency"}
        if unknown:
            raise ConfigurationError(f"{variable}{where}", f"has unknown keys {sorted(unknown)}")
        function = _function_name(target.get("function"), f"{variable}{where}.function")
        limit = target.get("max_concurrency")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(
                f"{variable}{where}.max_concurrency", "must be a whole number >= 1"
            )
        return Route(function, limit)
    raise ConfigurationError(
        f"{variable}{where}", 'must be a function name or {"function": ..., "max_concurrency": ...}'
    )


def _function_name(value: Any, variable: str) -> str:
    if not isinstance(value, str) or not _FUNCTION_NAME.fullmatch(value):
        raise ConfigurationError(
            variable,
            f"must be a plain function name (letters, digits, '-' and '_'), not {value!r}: "
            "a URL, a slash or '..' cannot be a route",
        )
    return value
