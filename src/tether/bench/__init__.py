"""``tether bench``: every speed figure of tether, measured side by side in one sitting.

Each figure is a function in its own module (``tcp``, ``aiortc_dc``, ``cli_tunnel``,
``demo``, ``keeper``, ``lab``, ``signaling``, ``managers``; ``relay`` is the relay's own
benchmark) that measures once and returns a dict of numbers; :mod:`.runner` calls them
round after round, interleaved, and :mod:`.stats` turns the samples into min / median /
max and the one JSON object of ``tether bench --json``. See docs/bench.md.
"""

from __future__ import annotations
