"""Checks shared by the data pipeline tests."""

import json

import numpy as np


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def check_resume(make, total: int, at: int):
    """`total` batches of make() straight vs `at` batches, get_state (through JSON), a new make(), set_state and
    the rest: identical batches and stats. Returns (straight pipeline, its batches, the state)."""
    straight = make()
    expected = [next(straight) for _ in range(total)]
    first = make()
    for _ in range(at):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = make()
    resumed.set_state(state)
    assert all(same(next(resumed), b) for b in expected[at:])
    assert resumed.stats() == straight.stats()
    return straight, expected, state
