"""Read-only records that hold a secret: the settings and where the database is.

A dataclass would compile its methods at every cold start, and a NamedTuple is a tuple, which a
JSON encoder writes out field by field, password included (docs/adr/0012-value-classes.md).
These are plain classes with `__slots__`: a subclass lists its fields in `__slots__`, writes an
`__init__` that takes them as keyword arguments and hands them to `_fill`, and names the fields
`repr` leaves out in `_hidden`.
"""

from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn, Self


class Frozen:
    __slots__: ClassVar[tuple[str, ...]] = ()
    _hidden: ClassVar[frozenset[str]] = frozenset()

    def _fill(self, values: Mapping[str, Any]) -> None:
        """Sets every field from `values` (an `__init__`'s `locals()`: its parameters)."""
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied, as `dataclasses.replace` makes one."""
        return type(self)(**{**self.fields(), **changes})

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if name not in self._hidden
        )
        return f"{type(self).__name__}({shown})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is read-only: make a copy with replace()")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is read-only")
