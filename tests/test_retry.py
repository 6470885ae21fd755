"""The retry policy: which failures are retried, the waits, giving up, and shutdown."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import pytest
import tenacity

from paiv_sync.api import AmbiguousError, AuthError, MviError, RequestError, TransientError
from paiv_sync.retry import RetryPolicy, build_retrying, is_retryable

LOG = logging.getLogger("test_retry")


class Flaky:
    """A callable that raises the given exceptions in turn, then returns "done"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def transient(n: int) -> list[BaseException]:
    return [TransientError(f"failure {i}", status=503) for i in range(n)]


def make(
    policy: RetryPolicy,
    stop: threading.Event | None = None,
    retry_if: Callable[[BaseException], bool] = is_retryable,
) -> tuple[list[float], tenacity.Retrying]:
    """Return a Retrying with a fake sleep, and the list the fake sleep records waits in."""
    waits: list[float] = []
    retrying = build_retrying(
        policy,
        stop_event=stop or threading.Event(),
        retry_if=retry_if,
        logger=LOG,
        what="GET /things",
        sleep=waits.append,
    )
    return waits, retrying


def test_retries_transient_errors_with_exponential_waits() -> None:
    waits, retrying = make(RetryPolicy(initial=1.0, maximum=100.0, jitter=0.0))
    flaky = Flaky(*transient(4))

    assert retrying(flaky) == "done"

    assert flaky.calls == 5
    assert waits == [1.0, 2.0, 4.0, 8.0]


def test_waits_are_capped_and_jittered() -> None:
    policy = RetryPolicy(initial=1.0, maximum=5.0, jitter=0.5)
    waits, retrying = make(policy)

    assert retrying(Flaky(*transient(8))) == "done"

    bases = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
    for wait, base in zip(waits, bases, strict=True):
        assert min(base, 5.0) <= wait <= min(base + 0.5, 5.0)
    assert waits[-1] == 5.0


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    waits, retrying = make(RetryPolicy(initial=0.1, maximum=1.0, jitter=0.0, max_attempts=3))
    failures = transient(5)
    flaky = Flaky(*failures)

    with pytest.raises(TransientError) as caught:
        retrying(flaky)

    assert caught.value is failures[2]  # the last one, not a tenacity RetryError
    assert flaky.calls == 3
    assert len(waits) == 2


@pytest.mark.parametrize(
    "error", [AuthError("refused"), RequestError("bad"), ValueError("bug"), MviError("x")]
)
def test_permanent_errors_are_not_retried(error: BaseException) -> None:
    waits, retrying = make(RetryPolicy())
    flaky = Flaky(error)

    with pytest.raises(type(error)):
        retrying(flaky)

    assert flaky.calls == 1
    assert waits == []


def test_is_retryable() -> None:
    assert is_retryable(TransientError("down"))
    assert is_retryable(AmbiguousError("maybe stored"))
    assert not is_retryable(MviError("generic"))
    assert not is_retryable(AuthError("no"))
    assert not is_retryable(OSError("disk"))


def test_custom_retry_if() -> None:
    waits, retrying = make(
        RetryPolicy(jitter=0.0), retry_if=lambda exc: not isinstance(exc, AmbiguousError)
    )
    flaky = Flaky(TransientError("refused"), AmbiguousError("answer lost"))

    with pytest.raises(AmbiguousError):
        retrying(flaky)

    assert flaky.calls == 2
    assert len(waits) == 1


def test_retry_after_from_the_server_replaces_the_backoff() -> None:
    waits, retrying = make(RetryPolicy(initial=1.0, maximum=60.0, jitter=0.0))
    flaky = Flaky(
        TransientError("slow down", status=429, retry_after=7.5),
        TransientError("down", status=503),
    )

    assert retrying(flaky) == "done"

    assert waits == [7.5, 2.0]


def test_retries_until_success_without_an_attempt_limit() -> None:
    waits, retrying = make(RetryPolicy(initial=0.5, maximum=3.0, jitter=0.0))
    flaky = Flaky(*transient(50))

    assert retrying(flaky) == "done"

    assert flaky.calls == 51
    assert max(waits) == 3.0


def test_a_stop_event_set_before_ends_after_the_first_failure() -> None:
    stop = threading.Event()
    stop.set()
    waits, retrying = make(RetryPolicy(), stop)
    flaky = Flaky(*transient(3))

    with pytest.raises(TransientError):
        retrying(flaky)

    assert flaky.calls == 1
    assert waits == []


def test_a_stop_during_the_wait_prevents_another_attempt() -> None:
    stop = threading.Event()
    failures = transient(3)
    flaky = Flaky(*failures)

    def sleep(seconds: float) -> None:
        stop.set()  # shutdown arrives while waiting

    retrying = build_retrying(RetryPolicy(), stop_event=stop, logger=LOG, what="x", sleep=sleep)

    with pytest.raises(TransientError) as caught:
        retrying(flaky)

    assert caught.value is failures[0]
    assert flaky.calls == 1


def test_the_default_sleep_ends_at_once_on_shutdown() -> None:
    stop = threading.Event()
    retrying = build_retrying(
        RetryPolicy(initial=60.0, maximum=60.0), stop_event=stop, logger=LOG, what="x"
    )
    flaky = Flaky(*transient(3))
    timer = threading.Timer(0.05, stop.set)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(TransientError):
            retrying(flaky)
    finally:
        timer.cancel()
        timer.join()

    assert time.monotonic() - started < 5.0  # not the 60 s back-off
    assert flaky.calls == 1


def test_logs_each_retry_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="test_retry")
    waits, retrying = make(RetryPolicy(initial=2.3, maximum=10.0, jitter=0.0, max_attempts=3))

    assert retrying(Flaky(TransientError("the server failed", status=503))) == "done"

    assert waits == [2.3]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert caplog.records[0].getMessage() == (
        "GET /things failed (HTTP 503); retrying in 2.3 s (attempt 2 of 3)"
    )


def test_log_reason_for_plain_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="test_retry")
    waits, retrying = make(RetryPolicy(initial=1.0, jitter=0.0), retry_if=lambda exc: True)

    assert retrying(Flaky(OSError("disk hiccup"))) == "done"
    assert waits == [1.0]

    assert caplog.records[0].getMessage() == (
        "GET /things failed (disk hiccup); retrying in 1.0 s (attempt 2)"
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"initial": -1.0},
        {"initial": 2.0, "maximum": 1.0},
        {"jitter": -0.1},
        {"max_attempts": 0},
    ],
)
def test_policy_rejects_nonsense(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="retry"):
        RetryPolicy(**fields)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.initial = 3.0  # type: ignore[misc]


def test_one_back_off_curve_for_loops_that_retry_by_themselves() -> None:
    policy = RetryPolicy(initial=0.5, maximum=8.0, jitter=1.0)
    assert [policy.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert policy.delay(0) == 0.5 and policy.delay(10_000) == 8.0  # no overflow
    assert policy.delay(3, hint=1.5) == 1.5  # the server's Retry-After
    assert policy.delay(3, hint=120.0) == 8.0  # but never beyond the maximum
    assert policy.delay(3, hint=0.0) == 2.0
