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
