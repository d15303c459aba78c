"""Constants are converted to the declared type without guessing: "false" is False, "abc" is not an INT."""

from __future__ import annotations

import pytest

from engine import BOOLEAN, COMBO, FLOAT, INT, STRING, Input
from engine.coerce import CoercionError, coerce_constant

NUMBER = Input("n", INT, min=-10, max=10)
REAL = Input("x", FLOAT, min=0.0, max=1.5)
FLAG = Input("flag", BOOLEAN)
TEXT = Input("text", STRING)
CHOICE = Input("mode", COMBO, options=("fast", "slow", 8))


@pytest.mark.parametrize("spec, given, expected", [
    (NUMBER, 3, 3), (NUMBER, "7", 7), (NUMBER, " -2 ", -2), (NUMBER, 4.0, 4), (NUMBER, "5.0", 5),
    (Input("big", INT), "18446744073709551615", 18446744073709551615),
    (REAL, 1, 1.0), (REAL, "0.25", 0.25), (REAL, 1.5, 1.5),
    (FLAG, True, True), (FLAG, "false", False), (FLAG, "False", False), (FLAG, "TRUE", True), (FLAG, "0", False),
    (FLAG, "yes", True), (FLAG, "off", False), (FLAG, 1, True), (FLAG, 0, False),
    (TEXT, "hello", "hello"), (TEXT, "", ""), (TEXT, 12, "12"), (TEXT, 2.5, "2.5"),
    (CHOICE, "slow", "slow"), (CHOICE, 8, 8),
    (Input("anything", "*"), {"k": [1]}, {"k": [1]}),
])
def test_values_that_fit(spec, given, expected):
    value = coerce_constant(spec, given)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("spec, given, code, words", [
    (NUMBER, "abc", "invalid_input_type", "input 'n' expects a whole number, got 'abc'"),
    (NUMBER, 5.5, "invalid_input_type", "expects a whole number, got 5.5"),
    (NUMBER, True, "invalid_input_type", "expects a whole number, got True"),
    (NUMBER, None, "invalid_input_type", "expects a whole number, got None"),
    (NUMBER, "nan", "invalid_input_type", "whole number"),
    (NUMBER, -11, "value_smaller_than_min", "input 'n' is -11, below its minimum -10; use a value of at least -10"),
    (NUMBER, "11", "value_bigger_than_max", "input 'n' is 11, above its maximum 10; use a value of at most 10"),
    (REAL, "nan", "invalid_input_type", "input 'x' expects a finite number, got 'nan'"),
    (REAL, float("inf"), "invalid_input_type", "finite number"),
    (REAL, False, "invalid_input_type", "expects a number, got False"),
    (REAL, "1,5", "invalid_input_type", "finite number, got '1,5'"),
    (REAL, -0.5, "value_smaller_than_min", "below its minimum 0;"),
    (REAL, 2, "value_bigger_than_max", "above its maximum 1.5;"),
    (FLAG, "maybe", "invalid_input_type", "input 'flag' expects true or false, got 'maybe'"),
    (FLAG, 2, "invalid_input_type", "expects true or false, got 2"),
    (TEXT, None, "invalid_input_type", "input 'text' expects text, got None"),
    (TEXT, True, "invalid_input_type", "expects text, got True"),
    (CHOICE, "medium", "value_not_in_list", "input 'mode': 'medium' is not one of the options ['fast', 'slow', 8]"),
    (CHOICE, "8", "value_not_in_list", "'8' is not one of the options"),
])
def test_values_that_do_not_fit(spec, given, code, words):
    with pytest.raises(CoercionError) as info:
        coerce_constant(spec, given)
    assert info.value.code == code
    assert words in info.value.message


def test_long_option_lists_are_shortened_in_messages():
    spec = Input("file", COMBO, options=[f"f{i}.png" for i in range(40)])
    with pytest.raises(CoercionError) as info:
        coerce_constant(spec, "x.png")
    assert info.value.message.endswith("'f11.png' ...]")


def test_callable_options_receive_the_resources():
    spec = Input("file", COMBO, options=lambda resources: resources["files"])
    assert coerce_constant(spec, "b", {"files": ["a", "b"]}) == "b"
    with pytest.raises(CoercionError):
        coerce_constant(spec, "c", {"files": ["a", "b"]})


def test_without_limits_only_the_type_is_checked():
    assert coerce_constant(NUMBER, "500", check_limits=False) == 500
    assert coerce_constant(CHOICE, "anything", check_limits=False) == "anything"
    with pytest.raises(CoercionError) as info:
        coerce_constant(NUMBER, "abc", check_limits=False)
    assert info.value.code == "invalid_input_type"
