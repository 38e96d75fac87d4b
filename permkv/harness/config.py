"""Experiment configs from notebook parameters.

Each experiment has a config dataclass (a comment per default, checked in `__post_init__`). A
notebook's Papermill `parameters` cell holds the same names in upper case; `from_params` maps one
onto the other once, so that no notebook copies its parameters into a dict by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import TypeVar

T = TypeVar("T")


def from_params(cls: type[T], namespace: Mapping[str, object]) -> T:
    """Build `cls` from upper-case names in `namespace` (field `n_samples` reads `N_SAMPLES`).

    A field without a default must be present; a missing one raises ValueError naming it."""
    values, missing = {}, []
    for f in fields(cls):
        name = f.name.upper()
        if name in namespace:
            values[f.name] = namespace[name]
        elif f.default is MISSING and f.default_factory is MISSING:
            missing.append(name)
    if missing:
        raise ValueError(f"{cls.__name__} needs the parameters {missing}")
    return cls(**values)
