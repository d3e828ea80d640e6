"""SSL method registry: name -> :class:`~qgseg.methods.common.Method`.

Each method is one file here; adding a method means writing that file and adding one line to
``_MODULES`` below. ``--qw`` (quality weighting) and ``--qar-weight`` (quality-aware
regularisation) are switches the ssl task applies to any method, never copies of one.

The registry imports the method modules (and torch) only when a method is asked for, so that
configuration checks (``ssl.method``) answer without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from qgseg.errors import InputError

# name -> module of this package defining METHOD
_MODULES = {
    "sup": "sup", "pl-t": "pl_t", "pl-c": "pl_c", "pl": "pl", "mt": "mt", "ua-mt": "ua_mt",
    "ict": "ict", "cl": "cl", "cps": "cps", "qar": "qar",
}
NAMES: tuple[str, ...] = tuple(_MODULES)

__all__ = ["METHODS", "NAMES", "Method", "Part", "Step", "Context", "get_method", "qw_methods", "ramp_weight"]


def get_method(name: str):
    """The registered method ``name``; InputError listing the choices otherwise."""
    if name not in _MODULES:
        raise InputError(f"--method: unknown method '{name}'; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"qgseg.methods.{_MODULES[name]}").METHOD


def qw_methods() -> list[str]:
    """Methods whose pseudolabels g can judge (``--qw``)."""
    return [n for n in NAMES if get_method(n).pseudolabel]


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        return {n: get_method(n) for n in NAMES}
    if name in ("Context", "Method", "Part", "Step", "ramp_weight"):
        return getattr(importlib.import_module("qgseg.methods.common"), name)
    raise AttributeError(name)
