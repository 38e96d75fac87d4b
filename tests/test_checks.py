import math

import pytest

from permkv.checks import check_ratio, positive_int


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "2", None])
def test_positive_int_rejects_what_is_not_an_int_at_least_one(value):
    with pytest.raises(ValueError, match=f"n must be an int >= 1, got {value!r}"):
        positive_int("n", value)


def test_positive_int_keeps_good_values_and_honours_the_minimum():
    assert positive_int("n", 3) == 3 and positive_int("depth", 0, 0) == 0
    with pytest.raises(ValueError, match="chunk must be an int >= 64, got 63"):
        positive_int("chunk", 63, 64)


@pytest.mark.parametrize("ratio", [0.5, 0, -8, math.inf, math.nan, False, "8", None])
def test_check_ratio_rejects_what_is_not_a_finite_number_at_least_one(ratio):
    with pytest.raises(ValueError, match="ratio must be a finite number >= 1"):
        check_ratio(ratio)


def test_check_ratio_returns_a_float():
    assert check_ratio(8) == 8.0 and isinstance(check_ratio(8), float) and check_ratio(1) == 1.0
