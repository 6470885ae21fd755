"""One open per new file: images.inspect_image checks, names and hashes; the ledger helpers."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from paiv_sync.images import check_image, inspect_image, make_jpeg, make_png
from paiv_sync.ledger import PENDING, UPLOADED, Ledger


@pytest.mark.parametrize("padding", [0, 70_000, 3_000_000])  # whole in the head, or not
def test_hash_and_kind_match_a_separate_read(tmp_path: Path, padding: int) -> None:
    png = make_png(16, 16, seed=3)
    # A private chunk after IHDR makes the file as large as wanted and still complete.
    body = png[:33] + _chunk(b"prVt", os.urandom(padding)) + png[33:] if padding else png
    path = tmp_path / "a.png"
    path.write_bytes(body)
    seen = inspect_image(path)
    assert seen.problem is None
    assert seen.kind == "png"
    assert seen.sha256 == hashlib.sha256(body).hexdigest()
    jpeg = tmp_path / "b.jpg"
    jpeg.write_bytes(make_jpeg(seed=4))
    assert inspect_image(jpeg).kind == "jpeg"
    assert inspect_image(jpeg).sha256 == hashlib.sha256(jpeg.read_bytes()).hexdigest()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_problem_gives_the_same_reason_and_no_hash(tmp_path: Path) -> None:
    cases = {
        "empty.png": b"",
        "text.png": b"hello, world\n",
        "cut.png": make_png(16, 16, seed=1)[:-12],
        "cut.jpg": make_jpeg(seed=1)[:-2],
        "big.png": make_png(64, 64, seed=2),
    }
    for name, body in cases.items():
        path = tmp_path / name
        path.write_bytes(body)
        seen = inspect_image(path, max_size=1000)
        assert seen.problem is not None, name
        assert seen.problem == check_image(path, max_size=1000)
        assert seen.sha256 is None


def test_a_named_pipe_is_refused_without_waiting(tmp_path: Path) -> None:
    pipe = tmp_path / "camera.jpg"
    os.mkfifo(pipe)
    said: list[str | None] = []
    worker = threading.Thread(
        target=lambda: said.append(inspect_image(pipe).problem), name="test-inspect"
    )
    worker.start()
    worker.join(5)
    if worker.is_alive():
        with open(pipe, "wb"):  # release it, then fail
            pass
        worker.join(5)
        pytest.fail("inspect_image waited for a writer on a named pipe")
    assert said == ["not a regular file (a named pipe, socket or device)"]


def test_ledger_totals_known_stats_and_a_later_sync(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ids = []
        for i, size in enumerate((100, 250, 4000)):
            outcome = ledger.record(
                root="/r",
                rel_path=f"c/{i}.png",
                category="c",
                size=size,
                mtime_ns=i,
                sha256=f"{i:064x}",
                content_type="image/png",
                skip_duplicates=False,
            )
            ids.append(outcome.row.id)
        assert ledger.pending_totals() == (3, 4350)
        known = ledger.known_stats([("/r", "c/0.png"), ("/r", "c/2.png"), ("/r", "c/9.png")])
        assert known == {
            ("/r", "c/0.png"): (100, 0, None, None),
            ("/r", "c/2.png"): (4000, 2, None, None),
        }
        batch = ledger.begin_batch("c", "dataset", ids[:2])
        assert ledger.pending_totals() == (1, 4000)
        assert ledger.mark_uploaded([(ids[0], "s0"), (ids[1], "s1")], durable=False) == 2
        ledger.finish_batch(batch, "done")
        ledger.sync()
        assert ledger.uploads_total() == 2
    with Ledger(tmp_path / "ledger.sqlite3") as again:
        states = {row.id: row.state for row in (again.get(i) for i in ids) if row is not None}
        assert states == {ids[0]: UPLOADED, ids[1]: UPLOADED, ids[2]: PENDING}
