"""frames.load parses once and refuses exactly the frames nested deeper than MAX_DEPTH, by
whichever of its paths (bracket count, array-of-objects shortcut, walk of the parsed value)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.signaling.frames import (
    MAX_DEPTH,
    load,
    nesting_depth_exceeds,
    read_frame,
    value_depth_exceeds,
)


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


_atoms = st.one_of(st.none(), st.booleans(), st.integers(),
                   st.text(alphabet="[]{}\"\\ab", max_size=6))
_values = st.recursive(
    _atoms,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_every_path_agrees_with_the_true_depth(value):
    text = json.dumps(value)
    too_deep = depth(value) > MAX_DEPTH
    assert value_depth_exceeds(value) == too_deep
    assert nesting_depth_exceeds(text) == too_deep
    payload, problem = load(text)
    if too_deep:
        assert payload is None and f"deeper than {MAX_DEPTH}" in problem
    else:
        assert problem is None and payload == value


def test_an_array_of_flat_objects_passes_and_one_nested_object_is_still_seen():
    flat = [{"tube_id": f"t{i}", "kind": "icecandidate", "data": "x"} for i in range(30)]
    assert load(json.dumps(flat)) == (flat, None)
    nested: dict = {"a": 1}
    for _ in range(MAX_DEPTH):
        nested = {"a": nested}
    payload, problem = load(json.dumps(flat[:-1] + [nested]))
    assert payload is None and "deeper" in problem
    # brackets inside strings are not containers, and do not hide real nesting either
    texty = [{"data": "[[[[{{{{"} for _ in range(3)]
    assert load(json.dumps(texty)) == (texty, None)


def test_hostile_depths_never_raise():
    for n in (MAX_DEPTH + 1, 900, 30_000):
        assert load("[" * n + "]" * n)[1] is not None
        assert load('{"a":' * n + "1" + "}" * n)[1] is not None
        assert load("[" * n)[1] is not None


def test_read_frame_validates_each_item_like_validate_signal():
    good = {"tube_id": "t", "kind": "icecandidate", "data": "c", "conversation_id": "x"}
    items = [good, {"kind": "icecandidate"}, {"tube_id": "t", "kind": "bogus"},
             {"tube_id": "t", "kind": "offer", "data": 5}, 7,
             {"tube_id": "t", "kind": "answer", "conversation_id": None}, {**good, "extra": [1]},
             {"tube_id": "t", "kind": []}, {"tube_id": ["t"], "kind": "offer"}]
    control, signals, errors = read_frame(json.dumps(items))
    assert control is None
    assert signals == [good, {**good, "extra": [1]}]
    assert [e.split(":")[0] for e in errors] == ["item 1", "item 2", "item 3", "item 4",
                                                 "item 5", "item 7", "item 8"]


# -- orjson gives json's answers -------------------------------------------------------


def json_answer(text: str | bytes):
    """What load() answered when it used only the standard library (value or 'error')."""
    try:
        value = json.loads(text)
    except RecursionError:
        return "error"
    except ValueError:
        return "error"
    return value


_numbers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 5, max_value=2**64 + 5),
    st.integers(min_value=-(2**63) - 5, max_value=-(2**63) + 5),
    st.integers(min_value=10**30, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
)
_strings = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _numbers, _strings),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_strings, inner, max_size=3),
    max_leaves=20,
)


def same(a, b) -> bool:
    """Equal, with NaN equal to itself and the types (int/float) the same throughout."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=500, deadline=None)
@given(_json_values, st.booleans())
def test_load_gives_the_standard_librarys_value_for_any_json(value, as_bytes):
    text = json.dumps(value)  # NaN, Infinity and big integers included
    payload, problem = load(text.encode() if as_bytes else text, limit=100)
    assert problem is None
    assert same(payload, json.loads(text))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}",:0123456789.-eE+ntrufalsNIy\\ud80\x00\xe9', max_size=30))
def test_load_accepts_and_refuses_exactly_what_json_does(text):
    payload, problem = load(text, limit=100)
    expected = json_answer(text)
    if expected == "error":
        assert payload is None and problem.startswith("frame is not valid JSON")
    else:
        assert problem is None and same(payload, expected)


def test_what_orjson_alone_gets_wrong_or_refuses():
    # integers beyond 64 bits stay integers (orjson alone makes them floats)
    assert load('{"seq":123456789012345678901234567890}') == (
        {"seq": 123456789012345678901234567890}, None)
    assert load("[-9223372036854775809]")[0] == [-9223372036854775809]
    assert load("[18446744073709551615]")[0] == [18446744073709551615]
    # lone surrogates, escaped or not, NaN and huge numbers: accepted as json accepts them
    assert load('{"data":"\\ud800"}') == ({"data": "\ud800"}, None)
    assert load('{"data":"\ud800"}') == ({"data": "\ud800"}, None)
    payload, problem = load("[NaN, Infinity, -Infinity, 1e400]")
    assert problem is None and payload[0] != payload[0] and payload[1:] == [
        float("inf"), float("-inf"), float("inf")]
    # and refusals keep json's wording, whatever orjson says
    payload, problem = load('{"a":')
    assert payload is None and problem.startswith("frame is not valid JSON: Expecting value")
    payload, problem = load(b'{"a":"\xff"}')
    assert payload is None and "can't decode byte 0xff" in problem
    # orjson's own depth limit (1024) is reported as ours
    for n in (MAX_DEPTH + 1, 1025, 5000):
        assert load(b"[" * n + b"]" * n)[1] == f"frame is nested deeper than {MAX_DEPTH} levels"
