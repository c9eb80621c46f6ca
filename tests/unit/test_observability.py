"""When tracing is on, and what importing the handler leaves unimported.

The tracer is made lazily, so the rules for "tracing is on" are ours to apply; they must stay
Powertools' own (POWERTOOLS_TRACE_DISABLED, LAMBDA_TASK_ROOT, AWS_SAM_LOCAL, Chalice's local
mode), which these specifications compare against Powertools' own reading of the environment.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from aws_lambda_powertools import Tracer

from handler.errors import ConfigurationError
from handler.operate import observability

VARIABLES = (
    "POWERTOOLS_TRACE_DISABLED",
    "LAMBDA_TASK_ROOT",
    "AWS_SAM_LOCAL",
    "AWS_CHALICE_CLI_MODE",
)
VALUES = {
    "POWERTOOLS_TRACE_DISABLED": (None, "true", "false", "1", "0", "TRUE"),
    "LAMBDA_TASK_ROOT": (None, "/var/task"),
    "AWS_SAM_LOCAL": (None, "true"),
    "AWS_CHALICE_CLI_MODE": (None, "true"),
}


@pytest.mark.parametrize(
    "environment",
    [dict(zip(VARIABLES, combo, strict=True)) for combo in itertools.product(*VALUES.values())],
    ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items() if v is not None) or "none",
)
def test_tracing_is_on_exactly_where_powertools_would_trace(
    environment: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an environment
    for name, value in environment.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    # When both decide
    ours = observability.tracing_enabled()
    theirs = not Tracer._is_tracer_disabled()
    # Then they agree
    assert ours == theirs


def test_an_empty_trace_disabled_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given what `sam local` passes for a variable it cannot resolve, in a Lambda environment
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "")
    monkeypatch.setenv("LAMBDA_TASK_ROOT", "/var/task")
    monkeypatch.delenv("AWS_SAM_LOCAL", raising=False)
    monkeypatch.delenv("AWS_CHALICE_CLI_MODE", raising=False)
    # Then tracing is on, as with the variable unset
    assert observability.tracing_enabled()


def test_a_malformed_trace_disabled_is_a_configuration_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "sometimes")
    with pytest.raises(ConfigurationError, match=r"POWERTOOLS_TRACE_DISABLED.*true or false"):
        observability.tracing_enabled()


def test_outside_lambda_there_is_no_active_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDA_TASK_ROOT", raising=False)
    monkeypatch.delenv("POWERTOOLS_TRACE_DISABLED", raising=False)
    assert observability.active_tracer() is None


# Heavy modules a cold start must not import unless the invocation uses them. Powertools' own
# package imports botocore's top-level module (a fraction of a millisecond: it registers a
# user-agent hook on botocore sessions), never its submodules, which the X-Ray SDK and boto3 load.
HEAVY = ("aws_xray_sdk", "boto3", "botocore.", "s3transfer")
IDEMPOTENCY = ("aws_lambda_powertools.utilities.idempotency", "handler.dispatch.idempotency")


def after_importing_the_handler(expression: str, env: dict[str, str]) -> Any:
    """`expression` (JSON-ready, with json, sys and dataclasses imported) evaluated by a fresh
    interpreter after `import handler.app` in `env`."""
    code = f"import dataclasses, json, sys, handler.app; print(json.dumps({expression}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k not in VARIABLES} | env,
    )
    return json.loads(out.stdout)


def imported_by_handler(env: dict[str, str]) -> set[str]:
    """The modules a fresh interpreter has after `import handler.app` in `env`."""
    return set(after_importing_the_handler("sorted(sys.modules)", env))


@pytest.mark.parametrize(
    "env",
    [
        {"POWERTOOLS_TRACE_DISABLED": "true", "LAMBDA_TASK_ROOT": "/var/task"},
        {"LAMBDA_TASK_ROOT": "/var/task"},  # tracing on: still nothing until the first call
        {},
    ],
    ids=["tracing-disabled", "tracing-on", "outside-lambda"],
)
def test_importing_the_handler_imports_neither_x_ray_nor_boto3_nor_idempotency(
    env: dict[str, str],
) -> None:
    modules = imported_by_handler(env)
    assert not {m for m in modules if m.startswith(HEAVY + IDEMPOTENCY)}
    assert "handler.app" in modules  # the import did run


def test_importing_the_handler_creates_no_dataclass() -> None:
    # The value classes a cold start makes at import are NamedTuples or plain classes, not
    # dataclasses: `dataclass` compiles the methods it writes when the class is created, which
    # bytecode cannot save (docs/adr/0012-value-classes.md).
    made = dict(
        after_importing_the_handler(
            "[(f'{name}.{cls.__qualname__}', dataclasses.is_dataclass(cls))"
            " for name, module in list(sys.modules.items()) if name.startswith('handler')"
            " for cls in vars(module).values()"
            " if isinstance(cls, type) and cls.__module__ == name]",
            {"POWERTOOLS_TRACE_DISABLED": "true"},
        )
    )
    assert "handler.runtime.settings.Settings" in made  # the scan sees the classes
    assert [name for name, is_dataclass in made.items() if is_dataclass] == [], (
        "a dataclass made at import costs every cold start a compile: use a NamedTuple or a "
        "plain class (docs/adr/0012-value-classes.md)"
    )


def test_no_namedtuple_made_at_import_has_annotations_left_as_text() -> None:
    # A NamedTuple turns an annotation that is still text (`from __future__ import annotations`)
    # into a ForwardRef, which compiles it: about 110 us more per class at every cold start
    # (docs/adr/0012-value-classes.md). The modules that define them evaluate their annotations.
    found = after_importing_the_handler(
        "{f'{name}.{cls.__qualname__}': sorted(field for field, hint in"
        " cls.__annotations__.items() if type(hint).__name__ == 'ForwardRef')"
        " for name, module in list(sys.modules.items()) if name.startswith('handler')"
        " for cls in vars(module).values()"
        " if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, '_fields')"
        " and cls.__module__ == name}",
        {"POWERTOOLS_TRACE_DISABLED": "true"},
    )
    assert {name: hints for name, hints in found.items() if hints} == {}
    assert "handler.queue.store.ClaimedJob" in found  # the scan itself works


def test_the_linger_and_the_fan_out_are_imported_only_when_used() -> None:
    modules = imported_by_handler({"POWERTOOLS_TRACE_DISABLED": "true"})
    assert {"handler.batch.linger", "handler.operate.fanout"} & modules == set()
    assert "handler.batch.runner" in modules
