"""Package attributes loaded on first use (PEP 562).

A stage package re-exports its stage module's names, but importing the package must stay cheap: Ray
workers import `pipelines.dedup` to unpickle a function of `pipelines.dedup.near_dup`, and an eager
`from pipelines.dedup.stage import ...` there pulled torch (via evaluate) into every worker, about 1.5 s of
CPU each on a 2-core machine, paid again by every fresh worker of every stage.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, module: str, names: list[str]) -> Callable[[str], Any]:
    """A module-level __getattr__ for `package` that imports `module` when one of `names` is first read."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
