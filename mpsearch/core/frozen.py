"""Read-only mappings for frozen results (:class:`FrozenDict`, :func:`freeze`).

A frozen dataclass stops its fields from being rebound, not a ``dict`` field from being
changed in place; results that hold mappings freeze them in ``__post_init__``. The standard
library's ``types.MappingProxyType`` cannot be pickled, and several of these results cross
process boundaries (the measured-sensitivity workers receive the calibration statistics), so
this is a ``dict`` that refuses every change and pickles, copies and serialises (JSON, pydantic)
as a plain ``dict`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn, TypeVar

__all__ = ["FrozenDict", "freeze", "freeze_fields"]

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(dict[K, V]):
    """A ``dict`` that cannot be changed after it is built."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self) -> tuple[type, tuple[dict[K, V]]]:
        return type(self), (dict(self),)

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"

    def copy(self) -> dict[K, V]:
        """A mutable copy."""
        return dict(self)


def freeze(m: Mapping[K, V] | None) -> FrozenDict[K, V]:
    """``m`` as a :class:`FrozenDict` (itself when it already is one; ``None``: empty)."""
    if isinstance(m, FrozenDict):
        return m
    return FrozenDict(m or {})


def freeze_fields(obj: object, *names: str) -> None:
    """Freeze the mapping fields ``names`` of a frozen dataclass, from its ``__post_init__``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, freeze(value))
