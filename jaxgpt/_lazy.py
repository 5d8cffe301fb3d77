"""Lazy attributes of a package: names whose module imports JAX are loaded on first use, so that configs and
command-line parsing import a package without JAX."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def attributes(package: str, names: dict[str, str | None]) -> Callable[[str], Any]:
    """A module `__getattr__` that loads `name` from `names[name]` (a module path) the first time it is asked for;
    None names the package's own submodule `name`."""
    def __getattr__(name: str) -> Any:
        if name in names:
            if names[name] is None:
                return importlib.import_module(f"{package}.{name}")
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
