"""Config fields with a help text and a unit (the `streamtrain fit` flags are generated from them), and the
checks every config dataclass runs in `__post_init__`. Imports nothing of the package but errors."""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any

from streamtrain.errors import UserError

__all__ = ["option", "flag_name", "check_finite_floats"]


def option(default: Any, help: str, unit: str = "", flag: bool = True, inf_ok: bool = False,
           repeat: bool = False) -> Any:
    """A config field. `inf_ok`: a float field where +inf means "no limit"; every other float must be finite.
    `repeat`: a str field whose flag may be given several times; its value is then a list of str."""
    return field(default=default, metadata={"help": help, "unit": unit, "flag": flag, "inf_ok": inf_ok,
                                            "repeat": repeat})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finite_floats(obj: Any) -> None:
    """Reject NaN (which compares false with every bound, so range checks let it through) and +-inf in every
    float field of the dataclass `obj`, except +inf where the field allows it."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if value == math.inf and f.metadata.get("inf_ok"):
            continue
        raise UserError(f"{flag_name(f.name)} must be a finite number, got {value}")
