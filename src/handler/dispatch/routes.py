"""Which function a job type is POSTed to, how many calls to it may be in flight at once, and at
what rate it may be called (shared by every invocation: the claim takes the function's tokens)."""

import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

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


# A rate: "20/s", "600/min", "1000/h", or a plain number of calls per second.
_RATE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute|h|hour))?\s*", re.IGNORECASE
)
_PER_SECOND = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


class Route(NamedTuple):
    function: str
    max_in_flight: int | None = None  # None: only MAX_CONCURRENCY bounds it
    rate_per_second: float | None = None  # None: no rate limit
    burst: float | None = None  # the bucket's size; None: half a second's worth, at least 1

    def as_json(self) -> dict[str, Any]:
        """As the SQL records it (record_routes)."""
        return {
            "function": self.function,
            "rate": self.rate_per_second,
            "burst": self.burst,
            "max_concurrency": self.max_in_flight,
        }


def parse_routes(raw: str | None, *, variable: str = "JOB_ROUTES") -> dict[str, Route]:
    """The default routes plus JOB_ROUTES, a JSON object of job type to either a function name
    or {"function": name, "max_concurrency": n, "rate": "20/s", "burst": n} (every key but
    function optional)."""
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
        unknown = set(target) - {"function", "max_concurrency", "rate", "burst"}
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
        rate = parse_rate(target.get("rate"), f"{variable}{where}.rate")
        burst = target.get("burst")
        if burst is not None and (
            isinstance(burst, bool) or not isinstance(burst, int | float) or not 1 <= burst <= 1e6
        ):
            raise ConfigurationError(
                f"{variable}{where}.burst", "must be a number from 1 to 1000000"
            )
        if burst is not None and rate is None:
            raise ConfigurationError(f"{variable}{where}.burst", "needs a rate")
        return Route(function, limit, rate, float(burst) if burst is not None else None)
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


def parse_rate(value: Any, variable: str) -> float | None:
    """Calls per second from "20/s", "600/min", "1000/h" or a number (per second); None for
    None. Raises ConfigurationError naming `variable`. The command line's `tenants set --rate`
    takes the same syntax."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigurationError(variable, 'must be a rate such as "20/s", "600/min" or "1000/h"')
    match = _RATE.fullmatch(str(value))
    if match is None:
        raise ConfigurationError(
            variable, f'must be a rate such as "20/s", "600/min" or "1000/h", not {value!r}'
        )
    per_second = float(match.group(1)) / _PER_SECOND[(match.group(2) or "s").lower()]
    if not 0 < per_second <= 1e6:
        raise ConfigurationError(variable, "must be more than 0 and at most 1,000,000 per second")
    return per_second
