import pytest

from vtc.budget import resolve_budget, split_budget


def test_rule():
    assert resolve_budget(64, 576) == 64
    assert resolve_budget(0.25, 576) == 144
    assert resolve_budget(1 / 9, 576) == 64
    assert resolve_budget(1.0, 576) == 576
    assert resolve_budget(0.001, 576) == 1  # never zero
    assert resolve_budget(0.3, 10) == 3  # no float-ceil surprise (0.3 * 10 = 3.0000000000000004)
    assert resolve_budget(0.25, 10) == 3  # 2.5 rounds half up


@pytest.mark.parametrize("bad", [0, -1, 577, 0.0, 1.01, float("nan"), -0.5])
def test_out_of_range(bad):
    with pytest.raises(ValueError, match="budget="):
        resolve_budget(bad, 576, who="x")


def test_float_that_looks_like_a_count_gets_a_hint():
    with pytest.raises(ValueError, match="did you mean the int 64"):
        resolve_budget(64.0, 576)


@pytest.mark.parametrize("bad", [True, "64", None])
def test_wrong_type(bad):
    with pytest.raises(TypeError, match="budget must be"):
        resolve_budget(bad, 576)


def test_split_budget():
    assert split_budget(10, [4, 4, 4]) == [4, 3, 3]
    assert split_budget(12, [4, 4, 4]) == [4, 4, 4]
    assert split_budget(5, [1, 100]) == [0, 5]
    assert sum(split_budget(577, [576, 576, 576])) == 577
    with pytest.raises(ValueError):
        split_budget(13, [4, 4, 4])
