"""``--once``: the pipeline's stages in the ONCE mode, from the scan to the last upload.

Connect (a few tries), take in every file the scan offered, send every pending file, settle
what an upload left in doubt, start a training if one is due, and end with an exit code that
says whether everything was sent.
"""

from __future__ import annotations

import logging

from paiv_sync.errors import MviError
from paiv_sync.pipeline import Pipeline

log = logging.getLogger(__name__)

# Rounds of settling files in doubt (and files to look at again) before giving up for this run.
_SETTLE_ROUNDS = 3


def run_once(pipeline: Pipeline) -> int:
    """Run ``pipeline`` (built in the ONCE mode, its scan done) to the end; the exit code."""
    if not _connect(pipeline):
        return 1
    ledger, summary, progress = pipeline.ledger, pipeline.summary, pipeline.progress
    if progress is not None:
        # Everything there may be to send, known now, so the rate and ETA hold from the
        # start: pending rows, and the files the scan found new or changed. A file looked
        # at that needs no upload (unchanged, a duplicate, not an image, gone) drops out.
        files, size = ledger.pending_totals()
        candidates, candidate_bytes = pipeline.gate.totals()
        progress.start(total=(files + candidates, size + candidate_bytes))
    pipeline.intake.admit_all()
    # Batches dispatched while admitting first: a category still in flight would be skipped
    # by the final dispatch.
    pipeline.wait_uploads()
    pipeline.dispatch(force=True)
    pipeline.wait_uploads()
    _settle_in_doubt(pipeline)
    if pipeline.hold.fatal:
        return 1
    if progress is not None:
        progress.add(report=True)  # the final counts, after the last files dropped
    lost = pipeline.lost.is_set()
    if lost:
        log.error("uploads stopped before everything was sent; see the errors above")
    before = ledger.last_training()
    try:
        pipeline.trainer.step()
    except MviError as exc:
        log.error("training check failed: %s", exc)
    after = ledger.last_training()
    if after is not None and (before is None or after.id != before.id):
        summary.trainings_started.append(after.name)
    summary.pending_left = sum(ledger.pending_counts().values()) + len(ledger.in_doubt())
    log.info(
        "done: %d added, %d uploaded, %d duplicates skipped, %d rejected, %d still pending",
        summary.added,
        summary.uploaded,
        summary.duplicates,
        summary.rejected,
        summary.pending_left,
    )
    return 1 if summary.pending_left or summary.rejected or lost else 0


def _connect(pipeline: Pipeline) -> bool:
    """Connect: the mode's tries with back-off, as for any request.

    Each try runs in the connector thread, as in watch mode, so that a stop (Ctrl-C) is
    taken at once rather than after a request's timeout. A refused password or certificate
    is not tried again (it will not change by itself).
    """
    connection, stop = pipeline.connection, pipeline.stop_event
    tries = pipeline.mode.request_tries or 1
    for attempt in range(1, tries + 1):
        while not stop.is_set() and max(0.0, connection.next_try - pipeline.clock()) > 0:
            stop.wait(min(0.5, connection.next_try - pipeline.clock()))
        if stop.is_set() or connection.ensure():
            return connection.connected
        while connection.trying and not stop.wait(0.05):
            pass
        if connection.ensure():
            return True
        if connection.fatal or stop.is_set() or attempt == tries:
            return False
    return False


def _settle_in_doubt(pipeline: Pipeline) -> None:
    """Settle the files an upload left in doubt (the server failed mid-batch) against the
    server now, and send those it does not hold, rather than at the next run. Files to look
    at again (overwritten while they were sent) are taken in likewise."""
    stop, dispatcher = pipeline.stop_event, pipeline.dispatcher
    for _ in range(_SETTLE_ROUNDS):
        if pipeline.lost.is_set() or stop.is_set():
            return
        while not pipeline.inbox.empty():
            pipeline.pump(0.0)  # files to look at again; and the connector's wake-ups
        if not pipeline.ledger.in_doubt() and not len(pipeline.gate):
            return
        pipeline.intake.admit_all()
        dispatcher.resolve_orphans(now=True)
        while dispatcher.resolving and not stop.is_set():
            stop.wait(0.02)
            dispatcher.resolve_orphans()
        pipeline.dispatch(force=True)
        pipeline.wait_uploads()
