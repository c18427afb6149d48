"""Offloaded payloads stream: peak memory stays near the payload's size, not a multiple of it.

Runs :mod:`benchmarks.memory` (each phase in a fresh process, Linux's high-water mark reset
just before it) on a 64 MB payload, plain and encrypted. Produce is measured on top of the
value the task already returned; consume from nothing to the value in hand.
"""

from __future__ import annotations

import pytest

from benchmarks.memory import MB, measure


@pytest.mark.slow
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_a_big_offloaded_payload_needs_at_most_about_twice_its_size(encrypt: bool) -> None:
    produce, consume = measure(64 * MB, encrypt)
    assert produce["phase"] == "produce" and consume["phase"] == "consume"
    # Producing adds about one copy (the JSON text) to the value; json.dumps would add two.
    assert produce["ratio"] <= 1.5, produce
    # Consuming holds the text and the value being built from it, never the bytes as well.
    assert consume["ratio"] <= 2.5, consume
