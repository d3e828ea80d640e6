"""SSL method registry: name -> :class:`~qgseg.methods.common.Method`.

Each method is one file here; adding a method means writing that file (its ``METHOD`` record
holds everything about it: label, description, losses, extra modules, config defaults) and adding
one line to ``REGISTRY`` below. ``--qw`` (quality weighting) and ``--qar-weight``
(quality-aware regularisation) are switches the ssl task applies to any method, never copies of one.

The registry imports the method modules (and torch) only when a method is asked for, so that
the list of names (help texts, the ``ssl.method`` check) needs no torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qgseg.errors import InputError

if TYPE_CHECKING:
    from qgseg.methods.common import Method

# name -> module defining METHOD: a module of this package, or a dotted module path
REGISTRY: dict[str, str] = {
    "sup": "sup",
    "pl-t": "pl_t",
    "pl-c": "pl_c",
    "pl": "pl",
    "mt": "mt",
    "ua-mt": "ua_mt",
    "ict": "ict",
    "cl": "cl",
    "cps": "cps",
    "qar": "qar",
}

__all__ = ["METHODS", "NAMES", "REGISTRY", "Method", "Part", "Step", "Context", "get_method", "method_names",
           "qw_methods", "ramp_weight"]


def method_names() -> tuple[str, ...]:
    """The registered method names, in registry order (no torch import)."""
    return tuple(REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; InputError listing the choices otherwise."""
    if name not in REGISTRY:
        raise InputError(f"--method: unknown method '{name}'; choose one of {', '.join(method_names())}")
    module = REGISTRY[name]
    return importlib.import_module(module if "." in module else f"qgseg.methods.{module}").METHOD


def qw_methods() -> list[str]:
    """Methods whose pseudolabels g can judge (``--qw``)."""
    return [n for n in method_names() if get_method(n).pseudolabel]


def __getattr__(name: str) -> Any:
    if name == "NAMES":
        return method_names()
    if name == "METHODS":
        return {n: get_method(n) for n in method_names()}
    if name in ("Context", "Method", "Part", "Step", "ramp_weight"):
        return getattr(importlib.import_module("qgseg.methods.common"), name)
    raise AttributeError(name)
