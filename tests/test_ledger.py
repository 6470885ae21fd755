"""The ledger: states, batches, trainings, locking, persistence across reopen."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from paiv_sync import ledger as L
from paiv_sync.ledger import Ledger, LedgerError, LedgerLocked


def record(
    led: Ledger,
    rel: str,
    sha: str,
    *,
    category: str = "forest",
    dup: bool = True,
    size: int = 10,
    mtime: int = 1,
) -> L.Outcome:
    return led.record(
        root="/r",
        rel_path=rel,
        category=category,
        size=size,
        mtime_ns=mtime,
        sha256=sha,
        content_type="image/png",
        skip_duplicates=dup,
    )


@pytest.fixture
def led(tmp_path: Path):
    with Ledger(tmp_path / "state" / "ledger.sqlite3") as opened:
        yield opened


def test_new_file_is_pending_and_known_content_is_not_new(led: Ledger) -> None:
    first = record(led, "forest/a.png", "h1")
    assert first.new and first.row.state == L.PENDING and first.row.upload_name == "a.png"
    again = record(led, "forest/a.png", "h1", mtime=2)
    assert not again.new and again.row.mtime_ns == 2
    assert led.pending_counts() == {"forest": 1}


def test_duplicate_content_in_same_category_only(led: Ledger) -> None:
    record(led, "forest/a.png", "h1")
    assert record(led, "forest/b.png", "h1").row.state == L.DUPLICATE
    assert record(led, "city/c.png", "h1", category="city").row.state == L.PENDING
    assert record(led, "forest/d.png", "h1", dup=False).row.state == L.PENDING


def test_batch_lifecycle_counts_uploads(led: Ledger) -> None:
    ids = [record(led, f"forest/{i}.png", f"h{i}").row.id for i in range(3)]
    batch = led.begin_batch("forest", "ds1", ids)
    rows = led.batch_rows(batch)
    assert [r.state for r in rows] == [L.UPLOADING] * 3
    assert [r.id for r in led.in_doubt()] == ids
    # A second batch cannot take rows already in flight.
    assert led.batch_rows(led.begin_batch("forest", "ds1", ids)) == []
    assert led.mark_uploaded([(ids[0], "srv0"), (ids[1], None)]) == 2
    led.mark_rejected([(ids[2], "server said no")])
    assert led.uploads_total() == 2
    assert led.counts()["forest"][L.UPLOADED] == 2
    assert led.rejected()[0].reason == "server said no"
    assert led.get(ids[0]) is not None and led.get(ids[0]).server_file_id == "srv0"  # type: ignore[union-attr]


def test_mark_pending_returns_rows_and_forget_only_unsent(led: Ledger) -> None:
    a = record(led, "forest/a.png", "h1").row
    batch = led.begin_batch("forest", "ds", [a.id])
    led.mark_pending([a.id], reason="server unreachable")
    assert led.batch_rows(batch) == []
    assert led.pending()[0].reason == "server unreachable"
    led.begin_batch("forest", "ds", [a.id])
    led.mark_uploaded([(a.id, "x")])
    assert not led.forget(a.id)
    b = record(led, "forest/b.png", "h2").row
    assert led.forget(b.id)
    assert led.lookup("/r", "forest/b.png") is None


def test_new_content_after_upload_is_a_new_pending_image(led: Ledger) -> None:
    a = record(led, "forest/a.png", "h1").row
    led.begin_batch("forest", "ds", [a.id])
    led.mark_uploaded([(a.id, "x")])
    changed = record(led, "forest/a.png", "h2", mtime=5)
    assert changed.new and changed.row.state == L.PENDING and changed.row.sha256 == "h2"


def test_new_content_while_in_doubt_keeps_old_stat(led: Ledger) -> None:
    a = record(led, "forest/a.png", "h1").row
    led.begin_batch("forest", "ds", [a.id])
    out = record(led, "forest/a.png", "h2", mtime=9)
    assert not out.new
    row = led.get(a.id)
    assert row is not None and row.mtime_ns == 1 and row.state == L.UPLOADING


def test_trainings_and_uploads_since(led: Ledger) -> None:
    ids = [record(led, f"forest/{i}.png", f"h{i}").row.id for i in range(4)]
    led.begin_batch("forest", "ds", ids)
    led.mark_uploaded([(i, None) for i in ids[:3]])
    assert led.uploads_since_last_training() == 3
    t = led.training_requested(name="m-1", model_name="m", dataset_id="ds", pretrained_model=None)
    assert t.state == L.REQUESTING and led.uploads_since_last_training() == 0
    assert led.open_trainings() == [t]
    led.training_started(t.id, "task1")
    led.mark_uploaded([(ids[3], None)])
    assert led.uploads_since_last_training() == 1
    assert led.last_trained_task("m") is None
    led.training_finished(t.id, L.TRAINED)
    assert led.last_trained_task("m") == "task1"
    assert led.last_trained_task("other") is None
    t2 = led.training_requested(
        name="m-2", model_name="m", dataset_id="ds", pretrained_model="task1"
    )
    led.training_withdrawn(t2.id)
    assert led.uploads_since_last_training() == 1
    last = led.last_training()
    assert last is not None and last.name == "m-1"


def test_a_training_counts_exactly_the_uploads_before_its_request(led: Ledger) -> None:
    ids = [record(led, f"forest/{i}.png", f"h{i}").row.id for i in range(30)]
    led.begin_batch("forest", "ds", ids)
    led.mark_uploaded([(i, None) for i in ids[:12]])
    led.mark_uploaded([(i, None) for i in ids[12:24]])  # landed while the trainer decided
    first = led.training_requested(
        name="m-1", model_name="m", dataset_id="ds", pretrained_model=None
    )
    assert led.uploads_for(first) == 24
    led.mark_uploaded([(i, None) for i in ids[24:]])
    second = led.training_requested(
        name="m-2", model_name="m", dataset_id="ds", pretrained_model=None
    )
    assert led.uploads_for(second) == 6 and led.uploads_for(first) == 24


def test_uploads_to_a_dataset_that_is_gone_count_for_no_training(led: Ledger) -> None:
    ids = [record(led, f"forest/{i}.png", f"h{i}").row.id for i in range(5)]
    led.begin_batch("forest", "ds", ids)
    led.mark_uploaded([(i, None) for i in ids[:3]])
    assert led.uploads_since_last_training() == 3
    assert led.reset_for_new_dataset() == 5
    assert led.uploads_since_last_training() == 0
    led.begin_batch("forest", "new", ids[:2])
    led.mark_uploaded([(i, None) for i in ids[:2]])
    assert led.uploads_since_last_training() == 2
    assert led.uploads_total() == 5  # the metrics' counter goes on
    t = led.training_requested(name="m-1", model_name="m", dataset_id="new", pretrained_model=None)
    assert led.uploads_for(t) == 2 and led.uploads_since_last_training() == 0


def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led:
        a = record(led, "forest/a.png", "h1").row
        led.begin_batch("forest", "ds", [a.id])
        led.set_meta("dataset_id", "ds")
    with Ledger(path) as led:
        assert [r.rel_path for r in led.in_doubt()] == ["forest/a.png"]
        assert led.get_meta("dataset_id") == "ds"
        assert list(led.iter_stats("/r")) == [("forest/a.png", 10, 1, L.UPLOADING, None, None)]


def test_reset_for_new_dataset(led: Ledger) -> None:
    a = record(led, "forest/a.png", "h1").row
    led.begin_batch("forest", "ds", [a.id])
    led.mark_uploaded([(a.id, "x")])
    assert led.reset_for_new_dataset() == 1
    assert led.pending_counts() == {"forest": 1}


def test_second_process_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    with Ledger(path):
        code = (
            "import sys\nfrom pathlib import Path\n"
            "from paiv_sync.ledger import Ledger, LedgerLocked\n"
            "try:\n    Ledger(Path(sys.argv[1]))\n"
            "except LedgerLocked as e:\n    print(e)\n    sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 3
        assert "in use by another paiv-sync process" in proc.stdout
    # Released on close: a new open works.
    Ledger(path).close()


def test_same_process_second_open_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    with Ledger(path), pytest.raises(LedgerLocked):
        Ledger(path)


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LedgerError, match="cannot create the ledger"):
        Ledger(blocker / "sub" / "l.sqlite3")


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot be used"):
        Ledger(path)


def _items(rng: random.Random, count: int) -> list[L.NewFile]:
    """Files drawn from a small pool of paths and contents, so that paths and contents repeat."""
    items = []
    for _ in range(count):
        category = rng.choice(("forest", "city"))
        name = f"{rng.randrange(6)}.png"
        items.append(
            L.NewFile(
                "/r",
                f"{category}/{name}",
                category,
                rng.randrange(3),
                rng.randrange(3),
                f"h{rng.randrange(4)}",
                "image/png",
            )
        )
    return items


def _table(led: Ledger) -> list[tuple[object, ...]]:
    rows = led._query(
        "SELECT root, rel_path, category, size, mtime_ns, sha256, state, reason, batch_id "
        "FROM files ORDER BY rel_path"
    )
    replaced = led._query("SELECT category, sha256 FROM replaced_uploads ORDER BY id")
    return [tuple(r) for r in rows] + [tuple(r) for r in replaced]


@pytest.mark.parametrize("seed", range(40))
def test_record_many_takes_items_as_separate_calls_would(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    dup = rng.random() < 0.7
    with Ledger(tmp_path / "one.sqlite3") as one, Ledger(tmp_path / "many.sqlite3") as many:
        for round_ in range(4):
            items = _items(rng, rng.randrange(1, 12))
            singly = [one.record_many([item], skip_duplicates=dup)[0] for item in items]
            together = many.record_many(items, skip_duplicates=dup)
            assert [(o.new, o.row.state, o.row.reason, o.row.size) for o in together] == [
                (o.new, o.row.state, o.row.reason, o.row.size) for o in singly
            ], f"round {round_}"
            # The last row returned for each path is the row as stored.
            last = {o.row.rel_path: o.row for o in together}
            for row in last.values():
                assert many.get(row.id) == row
            assert _table(many) == _table(one)
            # Move some rows on, the same way in both ledgers: uploaded, or left in doubt.
            for led in (one, many):
                pending = led.pending()
                chosen = [r.id for r in pending[: len(pending) // 2]]
                batch = led.begin_batch("forest", "ds", chosen)
                rows = led.batch_rows(batch)
                led.mark_uploaded([(r.id, f"s{r.id}") for r in rows[: len(rows) // 2]])


def test_record_many_same_path_twice_in_one_call(led: Ledger) -> None:
    first, second = led.record_many(
        [
            L.NewFile("/r", "forest/a.png", "forest", 10, 1, "h1", "image/png"),
            L.NewFile("/r", "forest/a.png", "forest", 11, 2, "h2", "image/png"),
        ],
        skip_duplicates=True,
    )
    assert first.new and second.new and first.row.id == second.row.id
    assert led.get(first.row.id) == second.row
    assert led.pending_counts() == {"forest": 1}


def test_large_batches_are_marked_in_chunks(led: Ledger) -> None:
    # More rows than one statement takes host parameters for: batch_size goes up to 500.
    items = [
        L.NewFile("/r", f"forest/{i:04d}.png", "forest", 10, 1, f"h{i}", "image/png")
        for i in range(1200)
    ]
    outcomes = led.record_many(items, skip_duplicates=True)
    assert [o.row.rel_path for o in outcomes] == [i.rel_path for i in items]
    assert len({o.row.id for o in outcomes}) == 1200
    ids = [o.row.id for o in outcomes]
    batch = led.begin_batch("forest", "ds", ids)
    assert len(led.batch_rows(batch)) == 1200
    assert led.known_stats(("/r", i.rel_path) for i in items) == {
        ("/r", i.rel_path): (10, 1, None, None) for i in items
    }
    assert led.mark_uploaded([(fid, f"server-{fid}") for fid in ids]) == 1200
    assert led.mark_uploaded([(fid, "again") for fid in ids]) == 0
    stored = {r[0]: r[1] for r in led._query("SELECT id, server_file_id FROM files")}
    assert stored == {fid: f"server-{fid}" for fid in ids}
    assert led.uploads_total() == 1200


def test_recovered_rows_do_not_count_as_new_uploads(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as led:
        kept = record(led, "forest/a.png", "h1").row
    with Ledger(path) as led:
        led.set_meta("recovering", "1")
    with Ledger(path) as led:
        doubtful = record(led, "forest/b.png", "h2").row
        assert doubtful.state == L.UPLOADING and doubtful.reason == L.RECOVERED_REASON
        led.begin_batch("forest", "ds", [kept.id])
        assert led.mark_uploaded([(kept.id, "s1"), (doubtful.id, "s2")]) == 2
        assert led.uploads_total() == 1  # b was in the dataset before the rebuild


def test_ledger_leaves_no_file_open_after_close(tmp_path: Path) -> None:
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    before = len(list(fd_dir.iterdir()))
    for _ in range(3):
        with Ledger(tmp_path / "ledger.sqlite3") as led:
            record(led, "forest/a.png", "h1")
            led.set_meta("k", "v")  # a durable commit: syncs the log
            led.sync()
    assert len(list(fd_dir.iterdir())) == before


def test_a_durable_commit_waits_for_the_disk_without_holding_the_ledger(tmp_path: Path) -> None:
    syncing, disk_done = threading.Event(), threading.Event()

    class SlowDisk(Ledger):
        slow = False

        def sync(self) -> None:
            if self.slow:
                syncing.set()
                assert disk_done.wait(10)
            super().sync()

    with SlowDisk(tmp_path / "ledger.sqlite3") as led:
        a = record(led, "forest/a.png", "h1").row
        led.slow = True
        started = threading.Thread(target=led.begin_batch, args=("forest", "ds", [a.id]))
        started.start()
        assert syncing.wait(10)  # begin_batch committed and now waits for the disk ...
        other = threading.Thread(target=record, args=(led, "forest/b.png", "h2"))
        other.start()
        other.join(5)
        assert not other.is_alive()  # ... while another thread goes on with the ledger
        assert started.is_alive()  # and the batch is not reported begun before the sync
        disk_done.set()
        started.join(10)
        assert led.lookup("/r", "forest/a.png").state == L.UPLOADING  # type: ignore[union-attr]


def test_the_last_rows_of_a_batch_close_it_in_the_same_commit(led: Ledger) -> None:
    a = record(led, "forest/a.png", "h1").row
    batch = led.begin_batch("forest", "ds", [a.id])
    assert led._query("SELECT finished, outcome FROM batches WHERE id = ?", (batch,)) == [
        (None, None)
    ]
    assert led.mark_uploaded([(a.id, "s1")], durable=False, finish_batch=batch) == 1
    finished, outcome = led._query("SELECT finished, outcome FROM batches WHERE id = ?", (batch,))[
        0
    ]
    assert finished is not None and outcome == "done"


def test_a_ledger_of_an_earlier_version_gains_ctime_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    legacy = L._SCHEMA.replace("    ctime_ns       INTEGER,\n    inode          INTEGER,\n", "")
    assert "ctime_ns" not in legacy
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(legacy)
        db.execute(
            "INSERT INTO files (root, rel_path, category, upload_name, size, mtime_ns, sha256, "
            "state, first_seen, updated) VALUES ('/r', 'forest/a.png', 'forest', 'a.png', 10, "
            "1, 'h1', 'uploaded', 0, 0)"
        )
    with Ledger(path, readonly=True) as led:  # status, while the old service still runs
        row = led.lookup("/r", "forest/a.png")
        assert row is not None and row.stamp == (10, 1, None, None)
    with Ledger(path) as led:
        assert list(led.iter_stats("/r")) == [("forest/a.png", 10, 1, L.UPLOADED, None, None)]
        led.fill_stamps("/r", [("forest/a.png", 7, 42)])
        row = led.lookup("/r", "forest/a.png")
        assert row is not None and row.stamp == (10, 1, 7, 42)
        led.fill_stamps("/r", [("forest/a.png", 8, 43)])  # only rows that have none
        assert led.known_stats([("/r", "forest/a.png")]) == {("/r", "forest/a.png"): (10, 1, 7, 42)}


def test_batches_and_uploads_pick_their_rows_by_id_not_by_scanning_the_state_index(
    tmp_path: Path,
) -> None:
    # At a million pending rows, a batch's UPDATE planned on the state index read every
    # pending row (38 % of a 1M first ingest's time); by id it is one lookup per row. Planned
    # as the ledger runs them, without ANALYZE's statistics, the old statements chose the
    # state index.
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        rows = [
            L.NewFile(f"/r{i % 2}", f"c/{i}.png", "c", 1, i, f"h{i}", "image/png", None, None)
            for i in range(3000)
        ]
        ledger.record_many(rows, skip_duplicates=False)
        ledger.only_roots(["/r0", "/r1"])
        marks = L._marks(20)
        for sql, args in (
            (L._to_batch_sql(ledger._root_filter, 20), (1, 1, 1, "pending", "/r0", "/r1")),
            (f"SELECT COUNT(*) FROM files {L._in_state_by_id(marks)}", ("uploading",)),
            (f"UPDATE files SET state = ? {L._in_state_by_id(marks)}", ("x", "uploading")),
        ):
            plan = ledger._query("EXPLAIN QUERY PLAN " + sql, (*args, *range(1, 21)))
            details = " ".join(str(step[-1]) for step in plan)
            assert "INTEGER PRIMARY KEY" in details and "files_by_state" not in details, (
                sql,
                details,
            )
