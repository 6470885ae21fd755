"""Fault injection: decides, per ``/api`` request, which fault (if any) the emulator plays.

One seeded random generator drives every decision, and every request draws the same number
of values whatever the outcome, so a given seed and a given sequence of requests always
produce the same sequence of faults.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, replace

from paiv_sync.emulator.options import FaultOptions

log = logging.getLogger(__name__)

FAULT_KINDS = ("error", "drop", "store_then_drop", "rate_limit", "fail_in_200", "latency")

# The 5xx statuses a real deployment (the product or the proxy in front of it) answers with.
_ERROR_STATUSES = (500, 502, 503, 504)


@dataclass(frozen=True)
class FaultPlan:
    """What to do to one request.

    ``latency`` seconds are waited first. Then at most one of: answer 429 (``rate_limit``),
    answer ``error_status`` (5xx), ``drop`` the connection unanswered, answer 200 with
    ``result: fail`` without doing anything (``fail_in_200``, not used for uploads, whose
    files are decided one by one), or do the work and then drop (``store_then_drop``).
    """

    latency: float = 0.0
    rate_limit: bool = False
    error_status: int | None = None
    drop: bool = False
    fail_in_200: bool = False
    store_then_drop: bool = False


NO_FAULT = FaultPlan()


class FaultInjector:
    """Draws fault plans from the current ``FaultOptions`` and counts what it injected.

    Thread-safe: request handler threads call it concurrently.
    """

    def __init__(self, options: FaultOptions) -> None:
        """Take the initial fault options (the generator is seeded from ``options.seed``)."""
        self._lock = threading.Lock()
        self._options = options
        self._random = random.Random(options.seed)
        self._counts = dict.fromkeys(FAULT_KINDS, 0)
        self._injected = 0  # faults injected under the current options, for ``limit``

    @property
    def options(self) -> FaultOptions:
        """The fault options in force."""
        with self._lock:
            return self._options

    def configure(self, options: FaultOptions) -> None:
        """Replace the fault options and reseed the generator (counts are kept)."""
        with self._lock:
            self._options = options
            self._random = random.Random(options.seed)
            self._injected = 0
        log.info("emulator faults set: %s", options)

    def reset(self) -> None:
        """Zero the counts and reseed the generator from the current options."""
        with self._lock:
            self._counts = dict.fromkeys(FAULT_KINDS, 0)
            self._random = random.Random(self._options.seed)
            self._injected = 0

    def counts(self) -> dict[str, int]:
        """Return how many faults of each kind were injected so far."""
        with self._lock:
            return dict(self._counts)

    def plan(self, *, is_upload: bool, route: str | None = None) -> FaultPlan:
        """Draw the plan for one request (counting it); ``is_upload`` for file uploads.

        Uploads never get a whole-body ``fail_in_200``: their files are decided one by one by
        :meth:`fail_file`. ``route`` (``"METHOD /template"``) is checked against the options'
        ``routes``: a request the faults are not aimed at gets none.
        """
        with self._lock:
            opts = self._options
            # Always draw the same count of numbers so that the sequence stays reproducible.
            draws = [self._random.random() for _ in range(7)]
            if (route is not None and not opts.applies_to(route)) or self._spent():
                return NO_FAULT
            r_latency, r_limit, r_error, r_status, r_drop, r_fail, r_store = draws
            latency = opts.latency if opts.latency > 0 and r_latency < opts.latency_rate else 0.0
            plan = NO_FAULT
            if r_limit < opts.rate_limit_rate:
                plan = FaultPlan(rate_limit=True)
            elif r_error < opts.error_rate:
                status = _ERROR_STATUSES[int(r_status * len(_ERROR_STATUSES))]
                plan = FaultPlan(error_status=status)
            elif r_drop < opts.drop_rate:
                plan = FaultPlan(drop=True)
            elif not is_upload and r_fail < opts.fail_in_200_rate:
                plan = FaultPlan(fail_in_200=True)
            elif r_store < opts.store_then_drop_rate:
                plan = FaultPlan(store_then_drop=True)
            if latency:
                self._counts["latency"] += 1
                plan = replace(plan, latency=latency)
            self._count(plan)
            return plan

    def fail_file(self, route: str | None = None) -> bool:
        """Decide whether one uploaded file gets an injected ``fail`` entry (counting it).

        ``route`` as for :meth:`plan`.
        """
        with self._lock:
            draw = self._random.random()
            if (route is not None and not self._options.applies_to(route)) or self._spent():
                return False
            failed = draw < self._options.fail_in_200_rate
            if failed:
                self._counts["fail_in_200"] += 1
                self._injected += 1
            return failed

    def _spent(self) -> bool:
        """Whether the options' ``limit`` of faults is reached (the caller holds the lock)."""
        limit = self._options.limit
        return limit is not None and self._injected >= limit

    def retry_after(self) -> float:
        """Seconds to announce in ``Retry-After`` for an injected 429."""
        with self._lock:
            return self._options.retry_after

    def _count(self, plan: FaultPlan) -> None:
        if plan != NO_FAULT and replace(plan, latency=0.0) != NO_FAULT:
            self._injected += 1
        if plan.rate_limit:
            self._counts["rate_limit"] += 1
        elif plan.error_status is not None:
            self._counts["error"] += 1
        elif plan.drop:
            self._counts["drop"] += 1
        elif plan.fail_in_200:
            self._counts["fail_in_200"] += 1
        elif plan.store_then_drop:
            self._counts["store_then_drop"] += 1
