"""The Registry behind every extension point (rules, aggregators, quantizers, model
builders): names and aliases, duplicates refused unless replace=True, one error style."""
import doctest

import pytest

from keras_coherence import _registry
from keras_coherence._registry import Registry, lowercase_name


def _colors():
    colors = Registry("color", normalize=lowercase_name)
    colors.add("#f00", "red", aliases=("rouge",))
    colors.add("#00f", "blue", "navy")
    return colors


def test_names_iterate_and_aliases_only_look_up():
    colors = _colors()
    assert list(colors) == ["red", "blue", "navy"] and len(colors) == 3
    assert colors["ROUGE "] == colors.lookup("Red") == "#f00"
    assert "rouge" in colors and [1] not in colors  # an unhashable key is no name
    assert dict(colors) == {"red": "#f00", "blue": "#00f", "navy": "#00f"}


def test_a_taken_name_is_refused_atomically_unless_replace():
    colors = _colors()
    colors.add("#f00", "red")  # the same thing again: nothing to refuse
    with pytest.raises(ValueError, match=r"The color name 'rouge' is taken by str; pick another name, or "
                                         r"pass replace=True to override it\."):
        colors.add("#c00", "crimson", aliases=("rouge",))
    assert "crimson" not in colors
    colors.add("#c00", "crimson", aliases=("rouge",), replace=True)
    assert colors["rouge"] == "#c00" and colors["red"] == "#f00"


def test_unknown_names_are_listed_with_close_matches():
    colors = _colors()
    with pytest.raises(ValueError, match=r"^Unknown color 'rogue'\. Known colors: red, blue, navy\. "
                                         r"Did you mean rouge\?$"):
        colors.lookup("rogue")
    assert colors.unknown("green") == "Unknown color 'green'. Known colors: red, blue, navy."


def test_deleting_a_name_drops_its_aliases():
    colors = _colors()
    del colors["red"]
    assert "rouge" not in colors and list(colors) == ["blue", "navy"]


def test_a_custom_duplicate_message():
    rules = Registry("rule", taken="{key_name} already has the {kind} {existing}; not {new}.")
    rules.add(object(), int)
    with pytest.raises(ValueError, match=r"^int already has the rule object; not str\.$"):
        rules.add("x", int)


def test_docstring_example():
    result = doctest.testmod(_registry, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
