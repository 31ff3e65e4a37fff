"""The registries: passes, representations, targets, each filled by one package.

One ``Registry`` class and its one decorator (``@PASSES.register("quantize")``).  Each registry
names the package whose import fills it (its *provider*: ``passes`` lists every representation
and pass module, ``targets`` every backend), and imports that package on the first lookup, so
callers never import a package just for its side effect.  The provider is the one explicit
place where entries are listed; the core never imports it statically (imports go one way:
core <- passes, targets <- driver).
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from rewrite.core.errors import RewriteError

T = TypeVar("T")
_MISSING = object()


class Registry(Generic[T]):
    """name -> entry, filled by ``register`` at import of ``provider``."""

    def __init__(self, kind: str, provider: str, hint: str = ""):
        self.kind, self.provider, self.hint = kind, provider, hint
        self._entries: dict[str, T] = {}
        self._filled = False

    def register(self, name: str, wrap: Callable[[str, object], T] | None = None):
        """Decorator: record the decorated object (or ``wrap(name, obj)``) under ``name``; the
        object itself is returned unchanged."""

        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = wrap(name, obj) if wrap else obj
            return obj

        return deco

    def _fill(self) -> dict[str, T]:
        if not self._filled:
            importlib.import_module(self.provider)     # a partly imported provider returns at once
            self._filled = True
        return self._entries

    def get(self, name: str, default=_MISSING) -> T:
        """The entry ``name``; RewriteError listing the known names (or ``default``) when absent."""
        entries = self._fill()
        if name not in entries:
            if default is not _MISSING:
                return default
            raise RewriteError(f"unknown {self.kind} {name!r} (known: {', '.join(sorted(entries))}{self.hint})")
        return entries[name]

    def __getitem__(self, name: str) -> T:
        return self._fill()[name]

    def __setitem__(self, name: str, entry: T) -> None:
        """Set an entry directly (tests that register a throwaway one; ``register`` otherwise)."""
        self._fill()[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._fill())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._fill().items())

    def __contains__(self, name: str) -> bool:
        return name in self._fill()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._fill())
