"""Turning JSON constants into the value an input declares, without guessing.

`"false"` is False for a BOOLEAN, `"12"` is 12 for an INT, `"abc"` for an INT is an error, `5.5` for an INT is
an error (not a silent 5). Each function returns the coerced value or raises `CoercionError(code, message)`
with one of ComfyUI's error codes.
"""

from __future__ import annotations

import itertools
import math
import reprlib
from typing import Any

from .spec import BOOLEAN, COMBO, FLOAT, INT, STRING, Input

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class CoercionError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def coerce_constant(spec: Input, value: Any, resources: Any = None, *, check_limits: bool = True) -> Any:
    """Check and convert a constant given for `spec`; raise CoercionError when it does not fit. Without
    `check_limits` only the type is checked (not min/max, not combo options): ComfyUI leaves those to a node's
    VALIDATE_INPUTS when it names the input."""
    kind = spec.type
    if kind == INT:
        number = _to_int(value, spec.name)
        if check_limits:
            _check_range(spec, number)
        return number
    if kind == FLOAT:
        number = _to_float(value, spec.name)
        if check_limits:
            _check_range(spec, number)
        return number
    if kind == BOOLEAN:
        return _to_bool(value, spec.name)
    if kind == STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise CoercionError("invalid_input_type", f"input {spec.name!r} expects text, got {_show(value)}")
    if kind == COMBO and not check_limits:
        return value
    if kind == COMBO:
        options = spec.combo_options(resources)
        if value not in options:
            shown = ", ".join(repr(o) for o in list(options)[:12]) + (" ..." if len(options) > 12 else "")
            raise CoercionError("value_not_in_list",
                                f"input {spec.name!r}: {_show(value)} is not one of the options [{shown}]")
        return value
    return value


def _to_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise CoercionError("invalid_input_type", f"input {name!r} expects a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return int(value)
        raise CoercionError("invalid_input_type", f"input {name!r} expects a whole number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float == int(as_float):
                return int(as_float)
    raise CoercionError("invalid_input_type", f"input {name!r} expects a whole number, got {_show(value)}")


def _to_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise CoercionError("invalid_input_type", f"input {name!r} expects a number, got {value!r}")
    number: float | None = None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise CoercionError("invalid_input_type", f"input {name!r} expects a finite number, got {_show(value)}")
    return number


def _to_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise CoercionError("invalid_input_type", f"input {name!r} expects true or false, got {_show(value)}")


def _check_range(spec: Input, number: float) -> None:
    if spec.min is not None and number < spec.min:
        raise CoercionError("value_smaller_than_min",
                            f"input {spec.name!r} is {number}, below its minimum {_num(spec.min)}; "
                            f"use a value of at least {_num(spec.min)}")
    if spec.max is not None and number > spec.max:
        raise CoercionError("value_bigger_than_max",
                            f"input {spec.name!r} is {number}, above its maximum {_num(spec.max)}; "
                            f"use a value of at most {_num(spec.max)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value: Any) -> str:
    return short_repr(value, 60)


def short_repr(value: Any, limit: int) -> str:
    """repr(value) in at most `limit` characters, without ever writing out all of a huge or deep value."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlevel = 3
    text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


REPLY_ITEMS = 200  # a received value with more items (or a longer text) is echoed as a short repr


def reply_value(value: Any) -> Any:
    """The value as received when it is small, else a short repr: an error reply never echoes a huge input."""
    stack, budget = [value], REPLY_ITEMS
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0 or (isinstance(item, str) and len(item) > 1000):
            return short_repr(value, 200)
        if isinstance(item, dict):
            stack.extend(itertools.islice(itertools.chain.from_iterable(item.items()), budget + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend(itertools.islice(item, budget + 1))
    return value
