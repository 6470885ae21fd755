"""Debounce and batching with a fake clock: no real waiting."""

from __future__ import annotations

from paiv_sync.batcher import Debouncer, batches


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    threshold: int = 3, quiet: float = 10, max_delay: float = 60
) -> tuple[Debouncer, FakeClock]:
    clock = FakeClock()
    return Debouncer(threshold=threshold, quiet_time=quiet, max_delay=max_delay, clock=clock), clock


def test_below_threshold_never_flushes() -> None:
    deb, clock = make()
    deb.arrived("a")
    clock.now += 1000
    assert deb.ready({"a": 2}) == []
    assert deb.needed(2) == 1


def test_flushes_after_quiet_time_once_threshold_reached() -> None:
    deb, clock = make()
    for _ in range(3):
        deb.arrived("a")
    assert deb.ready({"a": 3}) == []
    clock.now += 9.9
    assert deb.ready({"a": 3}) == []
    assert deb.next_deadline({"a": 3}) == 1010.0
    clock.now += 0.1
    assert deb.ready({"a": 3}) == ["a"]


def test_steady_stream_cannot_postpone_past_max_delay() -> None:
    deb, clock = make(quiet=10, max_delay=30)
    deb.arrived("a")
    assert deb.ready({"a": 3}) == []  # threshold reached now
    for _ in range(29):
        clock.now += 1
        deb.arrived("a")
        assert deb.ready({"a": 3}) == []
    clock.now += 1
    deb.arrived("a")
    assert deb.ready({"a": 3}) == ["a"]
    deb.flushed("a")
    assert deb.ready({"a": 3}) == []


def test_categories_are_independent_and_force_flushes_all() -> None:
    deb, clock = make()
    deb.arrived("a")
    clock.now += 5
    deb.arrived("b")
    clock.now += 5
    assert deb.ready({"a": 3, "b": 3}) == ["a"]
    assert sorted(deb.ready({"a": 1, "b": 1, "c": 0}, force=True)) == ["a", "b"]


def test_batches_cut_in_order() -> None:
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches([], 3) == []
