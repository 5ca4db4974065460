"""One registry of named plug-ins, used by every extension point.

Pipeline input formats (``asvr.pipeline.inputs``), tokenizer encoder kinds
(``asvr.tokenizer.encoders``), benchmark formats (``asvr.eval.formats``) and
preprocess modes (``asvr.tokenizer.preprocess``) each keep a :class:`Registry`:
entries register when their module is imported, and every module of the package whose name starts with the prefix is
imported once, on the first lookup, so adding an entry is one module that calls
``register`` (plus its test).  A name registered twice is an error, never a
silent replacement.

The built-ins are written the same way (one module each, registering itself);
``first`` names them in the order every listing shows (``--format`` choices,
error messages, auto-detection), whichever module happened to be imported
first; plug-ins follow in registration order.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self, what: str, package: str, prefix: str, reserved: tuple[str, ...] = (), first: tuple[str, ...] = ()
    ):
        self.what = what
        """What an entry is, for messages ("benchmark format")."""
        self.package = package
        self.prefix = prefix
        self.reserved = reserved
        """Names that can never be registered (e.g. ``auto``)."""
        self.first = first
        """Entries listed first, in this order (the built-ins)."""
        self._items: dict[str, T] = {}
        self._plugins_loaded = False

    def register(self, name: str, item: T) -> T:
        if name in self._items or name in self.reserved:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a throwaway one)."""
        del self._items[name]

    def registered(self) -> Iterator[T]:
        """The entries registered so far, without importing plug-ins (for checks inside ``register``)."""
        return iter(list(self._items.values()))

    def all(self) -> dict[str, T]:
        """name -> entry: the built-ins, then every ``<package>.<prefix>*`` module (imported once)."""
        if not self._plugins_loaded:
            self._plugins_loaded = True
            pkg = importlib.import_module(self.package)
            for m in pkgutil.iter_modules(pkg.__path__):
                if m.name.startswith(self.prefix):
                    importlib.import_module(f"{self.package}.{m.name}")
        if not self.first:
            return self._items
        head = {k: self._items[k] for k in self.first if k in self._items}
        return {**head, **{k: v for k, v in self._items.items() if k not in head}}
