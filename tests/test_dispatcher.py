"""The dispatcher's flush rules, on a fake clock and a real ledger: no threads, no HTTP.

The pool records the jobs it is given instead of running them (what a job does is the
uploader's, tested end to end elsewhere); everything else is the real thing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.batcher import Debouncer
from paiv_sync.config import Config, parse_config
from paiv_sync.dispatcher import Dispatcher
from paiv_sync.heartbeats import Heartbeats
from paiv_sync.ledger import Ledger
from paiv_sync.pipeline import RunSummary, make_client
from paiv_sync.retry import RetryPolicy
from paiv_sync.uploader import Uploader


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _RecordingPool(ThreadPoolExecutor):
    """Takes jobs and keeps them, as finished futures, without running them."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.jobs: list[tuple[str, tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs.append((getattr(fn, "__name__", "?"), args))
        done: Future[Any] = Future()
        done.set_result(None)
        return done


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Any]:
    data = {
        "credentials": {"endpoint": "http://127.0.0.1:9/api", "username": "u", "password": "p"},
        "threshold": {"upload": 3, "training": 1000},
        "time": 10,
        "max_delay": 60,
        "batch_size": 2,
        "skip_duplicates": 0,
        "dataset": {"name": "tests"},
        "folders": [str(tmp_path)],
        "ledger": str(tmp_path / "state" / "ledger.sqlite3"),
    }
    config: Config = parse_config(data, source=None, env={})
    clock = _Clock()
    ledger = Ledger(config.ledger_path)
    stop = threading.Event()
    client = make_client(config, RetryPolicy(), stop_event=stop)
    uploader = Uploader(client, ledger, retry=RetryPolicy(), stop_event=stop)
    debouncer = Debouncer(threshold=3, quiet_time=10, max_delay=60, clock=clock)
    pool = _RecordingPool()
    state = {"connected": True, "writable": True}
    dispatcher = Dispatcher(
        config,
        ledger,
        uploader,
        debouncer,
        pool,
        tally=RunSummary(),
        progress=None,
        beats=Heartbeats(clock, stall_limit=60, job_limit=60),
        stop_event=stop,
        lost=threading.Event(),
        clock=clock,
        connected=lambda: state["connected"],
        may_write=lambda: state["writable"],
        on_ledger_failure=lambda exc: None,
        on_uploaded=lambda: None,
    )
    yield {
        "ledger": ledger,
        "clock": clock,
        "debouncer": debouncer,
        "pool": pool,
        "state": state,
        "dispatcher": dispatcher,
    }
    ledger.close()
    pool.shutdown()
    client.close()


def _add(parts: dict[str, Any], category: str, count: int, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + count):
        outcome = parts["ledger"].record(
            root="/r",
            rel_path=f"{category}/{i}.png",
            category=category,
            size=10,
            mtime_ns=i,
            sha256=f"{category}{i}",
            content_type="image/png",
            skip_duplicates=False,
        )
        parts["debouncer"].arrived(category)
        ids.append(outcome.row.id)
    parts["dispatcher"].changed()
    return ids


def _jobs(parts: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    jobs: list[tuple[str, tuple[Any, ...]]] = parts["pool"].jobs
    return jobs


def test_a_category_goes_once_its_threshold_is_reached_and_it_is_quiet(
    parts: dict[str, Any],
) -> None:
    dispatcher, clock = parts["dispatcher"], parts["clock"]
    parts["debouncer"].threshold = 4  # above the batch size of 2: no full batch goes early
    _add(parts, "forest", 2)
    clock.now += 100
    dispatcher.dispatch(force=False)
    assert _jobs(parts) == []  # below the threshold, however quiet
    ids = _add(parts, "forest", 3, start=2)
    parts["debouncer"].threshold = 6
    dispatcher.dispatch(force=False)
    assert _jobs(parts) == []  # 5 pending: below the threshold, and not quiet
    parts["debouncer"].threshold = 5
    dispatcher.dispatch(force=False)
    assert len(_jobs(parts)) == 2  # at the threshold, not quiet: its two full batches go now
    on_their_way = [i for _, (_, chunk) in _jobs(parts) for i in chunk]
    parts["ledger"].begin_batch("forest", "ds", on_their_way)  # as the jobs would
    dispatcher.collect()
    clock.now += 10
    dispatcher.dispatch(force=False)
    sent = [args for name, args in _jobs(parts)]
    assert [name for name, _ in _jobs(parts)] == ["_upload_job"] * 3  # then the tail, quiet
    assert sorted(i for _, chunk in sent for i in chunk) == sorted([*range(1, 3), *ids])
    assert {category for category, _ in sent} == {"forest"}


def test_a_steady_stream_sends_its_full_batches_at_once_and_its_tail_when_quiet(
    parts: dict[str, Any],
) -> None:
    # A camera station writing without pause never leaves a quiet time: its full batches go
    # as they fill up (batches of 2 here), not after max_delay; the tail waits for quiet.
    dispatcher, clock = parts["dispatcher"], parts["clock"]
    sent: list[int] = []
    for i in range(7):
        _add(parts, "forest", 1, start=i)
        clock.now += 0.5  # a file every half second: never quiet for 10 s
        dispatcher.dispatch(force=False)
        dispatcher.collect()
        sent = [i for _, (_, chunk) in _jobs(parts) for i in chunk]
        ledger = parts["ledger"]
        for file_id in sent:  # what was handed over is on its way: no longer pending
            ledger.begin_batch("forest", "ds", [file_id])
    assert len(sent) == 6, "the full batches waited"
    assert all(len(chunk) == 2 for _, (_, chunk) in _jobs(parts))
    clock.now += 10
    dispatcher.dispatch(force=False)
    assert len([i for _, (_, chunk) in _jobs(parts) for i in chunk]) == 7  # the tail, quiet


def test_a_category_in_flight_is_not_sent_again_until_its_jobs_are_collected(
    parts: dict[str, Any],
) -> None:
    dispatcher, clock = parts["dispatcher"], parts["clock"]
    _add(parts, "forest", 3)
    dispatcher.dispatch(force=True)
    assert len(_jobs(parts)) == 2
    assert set(dispatcher.inflight) == {"forest"}
    dispatcher.dispatch(force=True)  # the rows are still pending (no job ran): not again
    assert len(_jobs(parts)) == 2
    assert dispatcher.collect() is True  # the last jobs ended: uploads went quiet
    assert dispatcher.inflight == {}
    clock.now += 100
    dispatcher.dispatch(force=True)
    assert len(_jobs(parts)) == 4


def test_nothing_goes_while_disconnected_or_while_the_ledger_cannot_be_written(
    parts: dict[str, Any],
) -> None:
    dispatcher, state = parts["dispatcher"], parts["state"]
    _add(parts, "forest", 3)
    state["connected"] = False
    dispatcher.dispatch(force=True)
    state["connected"], state["writable"] = True, False
    dispatcher.dispatch(force=True)
    assert _jobs(parts) == []
    state["writable"] = True
    dispatcher.dispatch(force=True)
    assert len(_jobs(parts)) == 2


def test_files_back_from_an_interrupted_upload_do_not_wait_for_the_threshold_again(
    parts: dict[str, Any],
) -> None:
    dispatcher, ledger = parts["dispatcher"], parts["ledger"]
    ids = _add(parts, "forest", 1)
    batch = ledger.begin_batch("forest", "ds", ids)
    ledger.mark_pending(ids)  # sent once, then back (not stored): attempts > 0
    ledger.finish_batch(batch, "returned")
    dispatcher.changed()
    dispatcher.dispatch(force=False)  # 1 file, threshold 3, not quiet: it goes all the same
    assert [(name, args[0]) for name, args in _jobs(parts)] == [("_upload_job", "forest")]
