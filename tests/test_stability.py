"""The stability gate with a fake clock and a fake stat: no real waiting."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from paiv_sync.stability import Settled, StabilityGate


class FakeFs:
    def __init__(self) -> None:
        self.files: dict[str, tuple[int, int]] = {}

    def stat(self, path: str) -> Any:
        if path not in self.files:
            raise FileNotFoundError(path)
        size, mtime = self.files[path]
        return SimpleNamespace(st_size=size, st_mtime_ns=mtime)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[StabilityGate, FakeFs, FakeClock]:
    fs, clock = FakeFs(), FakeClock()
    return StabilityGate(2.0, clock, fs.stat), fs, clock


def test_unchanged_file_settles_after_settle_time() -> None:
    gate, fs, clock = make()
    fs.files["a"] = (10, 1)
    gate.offer("a", 10, 1)
    clock.now = 1.9
    assert gate.due() == []
    clock.now = 2.0
    assert gate.due() == [Settled("a", 10, 1)]
    assert len(gate) == 0


def test_growing_file_waits_until_it_stops() -> None:
    gate, fs, clock = make()
    fs.files["a"] = (10, 1)
    gate.offer("a", 10, 1)
    for step in range(1, 5):
        clock.now = step * 2.0
        fs.files["a"] = (10 + step, 1 + step)
        assert gate.due() == []
    clock.now = 9.9
    assert gate.due() == []
    clock.now = 10.0
    assert gate.due() == [Settled("a", 14, 5)]


def test_vanished_file_is_reported_gone() -> None:
    gate, _fs, clock = make()
    gone: list[Settled] = []
    gate.offer("a", 1, 1)
    gate.offer("b", 7, 2)
    assert gate.totals() == (2, 8)
    clock.now = 3
    _fs.files["b"] = (7, 2)
    assert gate.due(on_gone=gone.append) == [Settled("b", 7, 2)]
    assert gone == [Settled("a", 1, 1)] and "a" not in gate


def test_repeated_offers_do_not_restart_the_clock() -> None:
    gate, fs, clock = make()
    fs.files["a"] = (1, 1)
    gate.offer("a", 1, 1)
    clock.now = 1.5
    gate.offer("a", 1, 1)
    clock.now = 2.0
    assert gate.due() == [Settled("a", 1, 1)]
    assert gate.next_due() is None


def test_an_old_mtime_settles_at_the_next_look_a_recent_one_waits() -> None:
    fs, clock = FakeFs(), FakeClock()
    wall_now = 1_000_000.0
    gate = StabilityGate(2.0, clock, fs.stat, wall=lambda: wall_now)
    old_mtime = int((wall_now - 3600) * 1e9)
    recent_mtime = int((wall_now - 10) * 1e9)  # older than settle, within the skew allowance
    fs.files["old"] = (5, old_mtime)
    fs.files["recent"] = (5, recent_mtime)
    gate.offer("old", 5, old_mtime)
    gate.offer("recent", 5, recent_mtime)
    assert gate.due() == [Settled("old", 5, old_mtime)]
    clock.now = 2.0
    assert gate.due() == [Settled("recent", 5, recent_mtime)]
