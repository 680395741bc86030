"""A compute-once map that threads can share (:class:`Memo`).

The stages memoise costly per-layer results (quantized weights, GPTQ factors, quadratic
forms) in the object that owns them, and several of them run under a thread pool (the layer
errors of the sensitivity stage, the calibration collectors). A plain ``dict`` check-then-set
there lets two threads compute the same entry and one overwrite the other; a :class:`Memo`
computes each key once: a second thread asking for a key that is being computed waits for it.
Written here because ``functools.cache`` keys on the arguments of one function and is shared
by every instance, where these memos belong to one object and take the work as a callable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Memo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """``get(key, make)``: the value of ``key``, from ``make()`` the first time it is asked
    for. Thread-safe; ``make`` runs outside the map's lock (it may ask for other keys), and an
    exception leaves no entry behind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[K, V] = {}
        self._busy: dict[K, threading.Lock] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                return self._values[key]
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:
            with self._lock:
                if key in self._values:  # computed by the thread we waited for
                    return self._values[key]
            value = make()
            with self._lock:
                self._values[key] = value
                self._busy.pop(key, None)
            return value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
