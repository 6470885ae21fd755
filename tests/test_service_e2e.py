"""End to end: real folders, a real watchdog observer, real HTTP to the emulator.

Every test asserts what the server really holds, through the emulator's introspection.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from paiv_sync.api import MviClient, UploadPart
from paiv_sync.emulator import Emulator, EmulatorOptions
from paiv_sync.ledger import Ledger
from tests.e2e import (
    config_for,
    running,
    server_count,
    server_files,
    sha,
    write_image,
)
from tests.helpers import wait_until


def test_images_in_three_categories_arrive_exactly_once(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 3, "training": 1000})
    expected = {}
    with running(config):
        seed = 0
        for category in ("forest", "city", "sea"):
            for i in range(4):
                seed += 1
                body = write_image(root / category / f"img{i}.png", seed)
                expected[(category, sha(body))] = 1
        wait_until(lambda: server_count(emulator) >= len(expected), timeout=20)
    held = server_files(emulator)
    assert dict(held) == expected
    assert emulator.state()["duplicates"] == []
    uploads = emulator.state()["requests"].get("POST /datasets/{id}/files", 0)
    assert uploads <= 6, "files should travel in batches, not one POST each"
    with Ledger(config.ledger_path) as ledger:
        outcomes = ledger._query("SELECT outcome FROM batches WHERE finished IS NOT NULL")
        assert outcomes and {o for (o,) in outcomes} == {"done"}  # every batch closed
        assert ledger._query("SELECT COUNT(*) FROM batches WHERE finished IS NULL") == [(0,)]


def test_below_threshold_stays_pending_and_status_reports_it(
    emulator: Emulator, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_for(emulator, root, threshold={"upload": 5, "training": 1000})
    with running(config) as runner:
        for i in range(3):
            write_image(root / "forest" / f"f{i}.png", i)
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.pending_counts().get("forest") == 3, timeout=10)
        # Quiet time passes many times over: still below the threshold, nothing is sent.
        threading.Event().wait(config.quiet_time * 3)
        assert server_count(emulator) == 0
    from paiv_sync.status import status_command

    assert status_command(config) == 0
    out = capsys.readouterr().out
    forest = next(line for line in out.splitlines() if line.startswith("forest"))
    assert forest.split()[1:3] == ["3", "0"]  # pending 3, uploading 0


def test_slowly_written_file_is_uploaded_complete(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000}, settle_time=0.5)
    body = write_image(root.parent / "source.png", 99, via_rename=False)
    target = root / "sea" / "slow.png"
    with running(config):
        with target.open("wb") as handle:
            for start in range(0, len(body), 16):
                handle.write(body[start : start + 16])
                handle.flush()
                os.fsync(handle.fileno())
                threading.Event().wait(0.05)  # a slow writer, not a synchronisation
        wait_until(lambda: server_count(emulator) == 1, timeout=15)
    assert dict(server_files(emulator)) == {("sea", sha(body)): 1}


def test_file_moved_in_and_tree_moved_in_are_picked_up(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
    outside = root.parent / "outside"
    with running(config):
        single = write_image(outside / "one.png", 1, via_rename=False)
        (outside / "one.png").replace(root / "city" / "one.png")
        tree = outside / "newcat"
        bodies = [
            write_image(tree / "deep" / f"n{i}.png", 10 + i, via_rename=False) for i in range(3)
        ]
        tree.replace(root / "newcat")
        wait_until(lambda: server_count(emulator) == 4, timeout=15)
    held = server_files(emulator)
    assert held[("city", sha(single))] == 1
    assert all(held[("newcat", sha(b))] == 1 for b in bodies)


def test_restart_uploads_new_files_and_resends_nothing(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    with running(config):
        for i in range(4):
            write_image(root / "forest" / f"a{i}.png", i)
        wait_until(lambda: server_count(emulator) == 4, timeout=15)
    for i in range(3):
        write_image(root / "city" / f"b{i}.png", 100 + i)
    before = emulator.state()["requests"].get("POST /datasets/{id}/files", 0)
    with running(config):
        wait_until(lambda: server_count(emulator) == 7, timeout=15)
    held = server_files(emulator)
    assert sum(held.values()) == 7 and max(held.values()) == 1
    after = emulator.state()["requests"].get("POST /datasets/{id}/files", 0)
    assert after - before <= 2


def test_skip_duplicates_same_content_twice(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    with running(config):
        body = write_image(root / "forest" / "a.png", 7)
        (root / "forest" / "copy-of-a.png").write_bytes(body)
        write_image(root / "forest" / "b.png", 8)
        (root / "city" / "same-as-a.png").write_bytes(body)  # another category: uploaded
        write_image(root / "city" / "c.png", 9)
        wait_until(lambda: server_count(emulator) == 4, timeout=15)
    held = server_files(emulator)
    assert held[("forest", sha(body))] == 1
    assert held[("city", sha(body))] == 1


def test_skip_duplicates_checks_the_server_at_startup(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    # Another host already uploaded these files; this one has a fresh ledger.
    first = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    for i in range(2):
        write_image(root / "sea" / f"s{i}.png", 50 + i)
    with running(first):
        wait_until(lambda: server_count(emulator) == 2, timeout=15)
    second = config_for(
        emulator,
        root,
        threshold={"upload": 1, "training": 1000},
        ledger=str(tmp_path / "other-host.sqlite3"),
    )
    with running(second) as runner:
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.counts().get("sea", {}).get("duplicate") == 2, timeout=15)
    assert server_count(emulator) == 2


def test_unreadable_and_non_image_files_are_rejected_not_uploaded(
    emulator: Emulator, root: Path
) -> None:
    config = config_for(emulator, root, threshold={"upload": 1, "training": 1000})
    with running(config) as runner:
        (root / "forest" / "notes.jpg").write_text("not an image at all")
        (root / "forest" / "empty.png").write_bytes(b"")
        (root / "stray.png").write_bytes(b"")  # directly in the root: skipped with a warning
        good = write_image(root / "forest" / "good.png", 3)
        wait_until(lambda: server_count(emulator) == 1, timeout=15)
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: len(ledger.rejected()) == 2, timeout=10)
        reasons = {r.rel_path: r.reason for r in ledger.rejected()}
    assert dict(server_files(emulator)) == {("forest", sha(good)): 1}
    assert "not an image" in (reasons["forest/notes.jpg"] or "")
    assert "empty" in (reasons["forest/empty.png"] or "")


def _training_config(emulator: Emulator, root: Path, action: str, ledger: str | None = None):
    changes: dict[str, object] = {
        "threshold": {"upload": 5, "training": 10},
        "model": {"name": "clf", "action": action, "strategy": {"max_iter": 100}},
    }
    if ledger:
        changes["ledger"] = ledger
    return config_for(emulator, root, **changes)


def _fill(root: Path, start: int, per_category: int = 5) -> None:
    for category in ("forest", "city"):
        for i in range(per_category):
            write_image(
                root / category / f"{category}{start + i}.png",
                start * 100 + i + (0 if category == "forest" else 50),
            )


@pytest.mark.parametrize("mode", ["409", "423", "accept"])
def test_files_dropped_while_a_training_locks_the_dataset_upload_after_it(
    root: Path, mode: str
) -> None:
    options = EmulatorOptions(port=0, training_seconds=120, locked_uploads=mode)
    with Emulator(options) as emulator, running(_training_config(emulator, root, "train")):
        _fill(root, 0)
        wait_until(lambda: emulator.state()["tasks"], timeout=20, message="a training started")
        for i in range(5):
            write_image(root / "forest" / f"late{i}.png", 900 + i)
        if mode != "accept":
            wait_until(
                lambda: emulator.state()["faults"].get("locked", 0) >= 2,
                timeout=20,
                message="uploads refused while locked, and tried again",
            )
            assert server_count(emulator) == 10
            emulator.finish_trainings()
        wait_until(lambda: server_count(emulator) == 15, timeout=20, message="late files sent")
        assert emulator.state()["duplicates"] == []


def test_train_sends_create_without_pretrained_model(emulator: Emulator, root: Path) -> None:
    with running(_training_config(emulator, root, "train")):
        _fill(root, 0)
        wait_until(lambda: emulator.state()["tasks"], timeout=20)
        wait_until(lambda: emulator.state()["tasks"][0]["status"] == "trained", timeout=20)
    (task,) = emulator.state()["tasks"]
    assert task["usage"] == "cic" and task["action"] == "create"
    assert task["pretrained_model"] in (None, "")
    assert task["strategy"] == {"max_iter": 100}
    assert task["name"].startswith("clf-") and len(task["name"]) == len("clf-20261123-201500")


def test_nothing_never_trains(emulator: Emulator, root: Path) -> None:
    with running(_training_config(emulator, root, "nothing")):
        _fill(root, 0)
        wait_until(lambda: server_count(emulator) == 10, timeout=20)
        threading.Event().wait(0.5)
    assert emulator.state()["tasks"] == []


def test_retrain_uses_last_model_across_restart_one_training_at_a_time(
    emulator: Emulator, root: Path
) -> None:
    config = _training_config(emulator, root, "retrain")
    with running(config):
        _fill(root, 0)
        wait_until(
            lambda: [t for t in emulator.state()["tasks"] if t["status"] == "trained"], timeout=20
        )
    first = emulator.state()["tasks"][0]
    assert first["pretrained_model"] in (None, "")
    with running(config):
        _fill(root, 1)
        wait_until(lambda: len(emulator.state()["tasks"]) == 2, timeout=20)
        wait_until(lambda: emulator.state()["tasks"][-1]["status"] == "trained", timeout=20)
    tasks = sorted(emulator.state()["tasks"], key=lambda t: t["created_at"])
    assert tasks[1]["pretrained_model"] == first["_id"]
    assert emulator.state()["concurrent_trainings_max"] == 1


def test_retrain_on_a_new_ledger_starts_from_the_newest_trained_model_on_the_server(
    emulator: Emulator, root: Path, tmp_path: Path
) -> None:
    # Two models trained by someone else (the web UI, another station); this ledger knows none.
    emulator.set_options(training_seconds=0)
    client = MviClient(emulator.url, username="admin", password="passw0rd", timeout=5)
    with client:
        dataset = client.create_dataset("tests")
        parts = []
        for category in ("forest", "city"):
            for i in range(5):
                path = tmp_path / "elsewhere" / f"{category}{i}.png"
                write_image(path, 500 + i + (50 if category == "city" else 0))
                parts.append((category, UploadPart(path, path.name, "image/png")))
        for category in ("forest", "city"):
            chosen = [p for c, p in parts if c == category]
            client.upload(dataset, chosen, category_name=category, category_id=None)
        older = client.start_training(dataset, "older")
        newer = client.start_training(dataset, "newer", pretrained_model=older)
    emulator.set_options(training_seconds=0.5)
    with running(_training_config(emulator, root, "retrain")):
        _fill(root, 0)
        wait_until(lambda: len(emulator.state()["tasks"]) == 3, timeout=20)
    third = emulator.state()["tasks"][2]
    assert third["pretrained_model"] == newer
    assert emulator.state()["requests"]["GET /trained-models"] >= 1


def test_uploads_during_training_lead_to_exactly_one_more(root: Path) -> None:
    with Emulator(EmulatorOptions(port=0, training_seconds=2.0)) as emulator:
        config = _training_config(emulator, root, "retrain")
        with running(config):
            _fill(root, 0)
            wait_until(lambda: emulator.state()["tasks"], timeout=20)
            _fill(root, 1)
            _fill(root, 2)  # twice the threshold while the first task trains
            wait_until(lambda: len(emulator.state()["tasks"]) == 2, timeout=30)
            wait_until(
                lambda: all(t["status"] == "trained" for t in emulator.state()["tasks"]), timeout=30
            )
            threading.Event().wait(0.5)
        state = emulator.state()
    assert len(state["tasks"]) == 2
    assert state["concurrent_trainings_max"] == 1


def test_expired_token_mid_run_reauthenticates(root: Path) -> None:
    with Emulator(EmulatorOptions(port=0, token_lifetime=0.5)) as emulator:
        config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
        with running(config):
            write_image(root / "forest" / "a.png", 1)
            write_image(root / "forest" / "b.png", 2)
            wait_until(lambda: server_count(emulator) == 2, timeout=15)
            issued = emulator.state()["tokens_issued"]
            # Expired for the server (a lifetime of 0.5 s passes while the service idles, or
            # is cut short here): either way the next request meets a 401.
            emulator.revoke_tokens()
            write_image(root / "city" / "c.png", 3)
            write_image(root / "city" / "d.png", 4)
            wait_until(lambda: server_count(emulator) == 4, timeout=15)
        assert emulator.state()["tokens_issued"] > issued


def test_server_down_at_start_then_up(root: Path) -> None:
    probe = Emulator(EmulatorOptions(port=0)).start()
    config = config_for(probe, root, threshold={"upload": 1, "training": 1000})
    port = int(probe.root_url.rsplit(":", 1)[1])
    probe.stop()
    # Nothing listens there now: the service must keep the file pending and wait, not crash.
    with running(config) as runner:
        body = write_image(root / "forest" / "a.png", 1)
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: ledger.pending_counts().get("forest") == 1, timeout=10)
        assert runner.thread.is_alive()
        with Emulator(EmulatorOptions(port=port)) as emulator:
            wait_until(lambda: server_count(emulator) == 1, timeout=15)
            assert dict(server_files(emulator)) == {("forest", sha(body)): 1}


def test_ledger_survives_and_in_doubt_rows_resolve(emulator: Emulator, root: Path) -> None:
    config = config_for(emulator, root, threshold={"upload": 2, "training": 1000})
    with running(config):
        for i in range(2):
            write_image(root / "forest" / f"a{i}.png", i)
        wait_until(lambda: server_count(emulator) == 2, timeout=15)
    # Pretend the service died after the server stored the files but before the ledger knew.
    with Ledger(config.ledger_path) as ledger:
        rows = [ledger.lookup(str(root), f"forest/a{i}.png") for i in range(2)]
        ids = [r.id for r in rows if r is not None]
        ledger._query("UPDATE files SET state = 'uploading' WHERE id IN (?, ?)", ids)
    with running(config) as runner:
        ledger2 = runner.service.ledger
        assert ledger2 is not None
        wait_until(lambda: ledger2.counts()["forest"]["uploaded"] == 2, timeout=15)
    assert server_count(emulator) == 2


def test_a_nas_share_sends_only_its_images_with_ignore_rules(
    emulator: Emulator, root: Path
) -> None:
    # A Synology share as users have it: thumbnails in @eaDir beside the images, a recycle
    # bin in the root; and the user's own rules, in the configuration and a .paivignore.
    expected = {}
    for i in range(3):
        expected[("forest", sha(write_image(root / "forest" / f"f{i}.png", i)))] = 1
        write_image(root / "forest" / "@eaDir" / f"f{i}.png" / "SYNOPHOTO_THUMB_S.png", 50 + i)
    write_image(root / "#recycle" / "forest" / "deleted.png", 60)
    write_image(root / "forest" / "rejects" / "r.png", 61)
    (root / "city" / ".paivignore").write_text("*_raw.png\n")
    write_image(root / "city" / "c_raw.png", 62)
    config = config_for(
        emulator, root, threshold={"upload": 1, "training": 1000}, ignore=["rejects/"]
    )
    with running(config) as runner:
        wait_until(lambda: server_count(emulator) >= 3, timeout=20)
        # While it runs, the watcher's events meet the same rules; a real image written
        # after the ignored ones, in the same folder, is the sign that they were looked at.
        write_image(root / "forest" / "@eaDir" / "late.png" / "SYNOPHOTO_THUMB_M.png", 70)
        write_image(root / "forest" / "rejects" / "late.png", 71)
        write_image(root / "city" / "late_raw.png", 72)
        expected[("city", sha(write_image(root / "city" / "late.png", 73)))] = 1
        wait_until(lambda: server_count(emulator) >= 4, timeout=20)
        ledger = runner.service.ledger
        assert ledger is not None
        wait_until(lambda: not ledger.pending_counts(), timeout=10)
        recorded = {rel for rel, *_ in ledger.iter_stats(str(root))}
    assert dict(server_files(emulator)) == expected
    assert recorded == {"forest/f0.png", "forest/f1.png", "forest/f2.png", "city/late.png"}
    categories = {c["name"] for d in emulator.state()["datasets"] for c in d["categories"]}
    assert categories == {"forest", "city"}
