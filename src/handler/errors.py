"""Errors a user can act on: each says what is wrong and what to do, in one line.

`kind` sorts them for whoever reports them: the command line maps it to an exit status
(`EXIT_STATUS`), the Lambda logs it as one structured line. None of them carries a secret.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorKind = Literal["usage", "configuration", "unreachable", "refused"]

# usage and configuration: fix the command or the environment; unreachable: the database (or
# its network) is down, try again; refused: the queue said no to this request.
EXIT_STATUS: dict[ErrorKind, int] = {"usage": 2, "configuration": 2, "unreachable": 3, "refused": 1}


class UserError(Exception):
    """Something the user can fix. The message is the whole story (no traceback needed)."""

    kind: ClassVar[ErrorKind] = "configuration"


class ConfigurationError(UserError, ValueError):
    """A missing or malformed environment variable. The message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable} {problem}")
        self.variable = variable


class UsageError(UserError):
    """A command used in a way it cannot be (options that contradict each other, or the
    environment): the message says which and what to do instead."""

    kind: ClassVar[ErrorKind] = "usage"


class EventError(UserError, ValueError):
    """An invocation event that is not one of the accepted shapes. The message names the field."""

    kind: ClassVar[ErrorKind] = "usage"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"event field '{field}' {problem}")
        self.field = field


class SchemaError(UserError):
    """The database's queue schema is missing or older than this code: run `queue-worker
    migrate`. Only migrate changes the schema."""


class DatabaseUnavailableError(UserError, RuntimeError):
    """The database could not be reached, or the connection was lost. The message names where,
    never the credentials. `sqlstate`: the server's code, when it sent one (57P03: starting up,
    shutting down or recovering)."""

    kind: ClassVar[ErrorKind] = "unreachable"

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class DatabaseConfigurationError(ConfigurationError):
    """Connecting failed in a way only a change of settings mends: the server refused the
    password, the user or the database (`sqlstate` says which), or TLS could not be set up as
    sslmode and sslrootcert ask. `variable` names where the settings came from (DATABASE_URL,
    or DATABASE_SECRET_ARN for an RDS secret); the message is the whole line, never the
    password."""

    def __init__(self, variable: str, message: str, *, sqlstate: str | None = None) -> None:
        Exception.__init__(self, message)
        self.variable = variable
        self.sqlstate = sqlstate


class QueueRefusedError(UserError):
    """The queue's SQL API refused a request (a bad argument, a job that is not there): the
    message is the SQL function's own."""

    kind: ClassVar[ErrorKind] = "refused"

    def __init__(self, message: str, sqlstate: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
