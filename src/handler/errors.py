"""Errors a user can act on: each names what to fix."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """A missing or malformed environment variable. The message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable


class EventError(ValueError):
    """An invocation event that is not one of the accepted shapes. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"event field '{field}' {problem}")
        self.field = field
