"""The signal envelope: whatever a frame holds, parsing says what is wrong and never raises."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tether import signals

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["tube_id", "kind", "data", "conversation_id", "x"])
                      | st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_frame_gives_signals_and_errors_only(payload):
    good, errors = signals.parse_frame(json.dumps(payload))
    for signal in good:
        assert signals.validate_signal(signal) is signal
    items = payload if isinstance(payload, list) else [payload]
    assert len(good) + len(errors) in (len(items), 1)


@settings(max_examples=300, deadline=None)
@given(st.text() | st.binary())
def test_any_text_or_bytes_never_raises(text):
    good, errors = signals.parse_frame(text)
    assert isinstance(good, list) and isinstance(errors, list)


def test_deep_nesting_is_an_error_not_a_crash():
    assert signals.parse_frame("[" * 30_000) == ([], ["frame is nested too deeply"])


def test_one_array_frame_keeps_good_items_and_names_bad_ones():
    ok = signals.make_signal("t1", "c", signals.KEEPALIVE)
    good, errors = signals.parse_frame(json.dumps([ok, {"kind": "offer"}, ok]))
    assert good == [ok, ok] and errors == ["item 1: missing or empty 'tube_id'"]
