"""Package names imported on first use (PEP 562), so that importing a package stays cheap.

A package lists ``name -> defining module`` and installs the two functions this returns as
its module-level ``__getattr__`` and ``__dir__``; ``from package import name`` and
``package.name`` then import the defining module the first time and keep the value.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose globals are ``namespace``."""

    def __getattr__(name: str) -> Any:
        # Called only for names not yet in the namespace.
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    names = frozenset(public)

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
