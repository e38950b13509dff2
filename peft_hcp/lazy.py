"""Packages whose public names load on first use (PEP 562), as diffusers' and transformers' do.

``peft_hcp`` and ``peft_hcp.adapters`` import nothing heavy themselves, so that the ``peft-hcp`` command
and ``from peft_hcp import X`` load only what they use.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable


def lazy_names(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose names ``exports`` lists by module.

    A subpackage or module of ``package`` is an attribute too, imported on first access (``peft_hcp.hub``), as
    it was when the package imported everything.
    """
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name in home:
            value = getattr(importlib.import_module(home[name]), name)
        elif (
            name.isidentifier()
            and not name.startswith("__")
            and importlib.util.find_spec(f"{package}.{name}") is not None
        ):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__
