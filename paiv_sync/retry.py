"""The retry policy: which failures are tried again, how long to wait, and when to give up.

A :class:`RetryPolicy` is plain data (it comes from configuration); :func:`build_retrying`
turns it into a :class:`tenacity.Retrying` whose waits end at once when the service shuts
down, so a stop never has to sit out a 60 s back-off.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from paiv_sync.errors import TransientError

__all__ = ["RetryPolicy", "build_retrying", "is_retryable"]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failure that may succeed later.

    ``initial`` is the first wait in seconds, doubled on each further attempt up to
    ``maximum``; up to ``jitter`` seconds of random spread are added so that several
    clients do not hammer a recovering server in step. ``max_attempts`` counts every
    attempt including the first; ``None`` retries until the stop event is set.
    """

    initial: float = 0.5
    maximum: float = 60.0
    jitter: float = 1.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        """Reject values that would make the back-off meaningless.

        Raises ValueError naming the offending field.
        """
        if self.initial < 0:
            raise ValueError(f"retry initial wait must be >= 0, got {self.initial}")
        if self.maximum < self.initial:
            raise ValueError(
                f"retry maximum wait ({self.maximum}) must be >= the initial wait ({self.initial})"
            )
        if self.jitter < 0:
            raise ValueError(f"retry jitter must be >= 0, got {self.jitter}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"retry max_attempts must be >= 1 or None, got {self.max_attempts}")

    def delay(self, failures: int, hint: float | None = None) -> float:
        """The wait after ``failures`` failures in a row, for a loop that retries by itself.

        The server's ``hint`` (Retry-After) when it gave one, else ``initial`` doubled per
        failure after the first; at most ``maximum`` either way. The curve of the client's own
        retries (see build_retrying), without their jitter: such a loop is one per process.
        """
        if hint is not None and hint > 0:
            return min(hint, self.maximum)
        return min(self.initial * 2.0 ** min(max(0, failures - 1), 64), self.maximum)


def is_retryable(exc: BaseException) -> bool:
    """Return True when ``exc`` is a failure that may succeed later (a ``TransientError``).

    Takes any exception; returns False for everything that is not a ``TransientError`` or
    one of its subclasses (``AmbiguousError`` included — callers that must not resend a
    possibly processed request pass their own ``retry_if``).
    """
    return isinstance(exc, TransientError)


def _short_reason(exc: BaseException | None) -> str:
    """Return a few words saying why an attempt failed, for the retry log line."""
    if exc is None:
        return "no exception"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not text:
        return type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


@functools.cache
def _jitter_takes_multiplier() -> bool:
    """Whether this tenacity's ``wait_exponential_jitter`` has ``multiplier`` (asked once)."""
    return "multiplier" in inspect.signature(tenacity.wait_exponential_jitter).parameters


def _exponential_jitter(policy: RetryPolicy) -> tenacity.wait.wait_base:
    """Return tenacity's exponential-with-jitter wait for ``policy``.

    tenacity renamed ``initial`` to ``multiplier`` (9.x warns about the old name; older
    releases lack the new one), so pick whichever this tenacity understands.
    """
    if _jitter_takes_multiplier():
        return tenacity.wait_exponential_jitter(
            multiplier=policy.initial, max=policy.maximum, jitter=policy.jitter
        )
    return tenacity.wait_exponential_jitter(
        initial=policy.initial, max=policy.maximum, jitter=policy.jitter
    )


class _Hooks:
    """The wait, log and shutdown hooks of one ``Retrying``; remembers the last failure."""

    def __init__(
        self,
        policy: RetryPolicy,
        stop_event: threading.Event,
        logger: logging.Logger,
        what: str,
    ) -> None:
        self._backoff = _exponential_jitter(policy)
        self._max_attempts = policy.max_attempts
        self._stop_event = stop_event
        self._logger = logger
        self._what = what
        self._last: BaseException | None = None

    def wait(self, retry_state: tenacity.RetryCallState) -> float:
        """Wait what the server asked for (429 Retry-After), else back off exponentially."""
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)) and retry_after >= 0:
            return float(retry_after)
        return self._backoff(retry_state)

    def before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        """Log the failure and the coming wait at WARNING; remember the failure."""
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        self._last = exc
        seconds = retry_state.next_action.sleep if retry_state.next_action else 0.0
        attempt = retry_state.attempt_number + 1
        of = f" of {self._max_attempts}" if self._max_attempts is not None else ""
        self._logger.warning(
            "%s failed (%s); retrying in %.1f s (attempt %d%s)",
            self._what,
            _short_reason(exc),
            seconds,
            attempt,
            of,
        )

    def before(self, retry_state: tenacity.RetryCallState) -> None:
        """Refuse a further attempt once shutdown began during the wait.

        tenacity checks its stop condition only after an attempt has failed, so a stop that
        arrives during the wait would still cost one more request. Re-raising the failure
        that caused the wait gives the caller the same outcome as giving up.
        """
        last = self._last
        if retry_state.attempt_number > 1 and last is not None and self._stop_event.is_set():
            raise last


def build_retrying(
    policy: RetryPolicy,
    *,
    stop_event: threading.Event,
    retry_if: Callable[[BaseException], bool] = is_retryable,
    logger: logging.Logger,
    what: str,
    sleep: Callable[[float], None] | None = None,
) -> tenacity.Retrying:
    """Build a ``tenacity.Retrying`` that follows ``policy``.

    Takes the policy, the service's shutdown event, a predicate choosing which exceptions
    are retried (default :func:`is_retryable`), the logger for the WARNING line before each
    wait, ``what`` (the operation named in that line, e.g. ``"GET /datasets"``) and an
    optional ``sleep`` (tests pass a fake; by default tenacity's ``sleep_using_event`` on the
    stop event, so a shutdown ends the wait at once).

    Returns the ``Retrying``; calling it runs the function until it succeeds, raises an
    exception ``retry_if`` rejects, ``max_attempts`` is used up, or the stop event is set.
    When it gives up, the last exception propagates unchanged (never ``RetryError``).
    """
    hooks = _Hooks(policy, stop_event, logger, what)
    stop: tenacity.stop.stop_base = tenacity.stop_when_event_set(stop_event)
    if policy.max_attempts is not None:
        stop = tenacity.stop_after_attempt(policy.max_attempts) | stop

    return tenacity.Retrying(
        stop=stop,
        wait=hooks.wait,
        retry=tenacity.retry_if_exception(retry_if),
        before=hooks.before,
        before_sleep=hooks.before_sleep,
        sleep=sleep if sleep is not None else tenacity.nap.sleep_using_event(stop_event),
        reraise=True,
    )
