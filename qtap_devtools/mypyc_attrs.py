"""``mypyc_attr`` for the compiled modules, without mypy_extensions at run time.

mypyc reads ``@mypyc_attr(acyclic=True)`` at compile time: such a class is not
tracked by the cycle collector, so its instances are made and freed without
linking them into the collector's lists, and they do not count towards its
next collection.  Only for classes whose instances can never be in a reference
cycle (they hold scalars, bytes, JSON-like data, or other such instances): one
that were would never be freed.  Compiled, the decorator is not called; run as
Python (``QTAP_INTERPRETED=1``, or without a compiler) it does nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    T = TypeVar("T")

    def mypyc_attr(*_args: Any, **_attrs: Any) -> Callable[[T], T]:
        return lambda cls: cls

__all__ = ["mypyc_attr"]
