"""``paiv-sync demo``: the whole flow in half a minute, with no server and no configuration.

Starts the emulator on a free loopback port, makes a temporary folder tree, writes generated
images into three categories over a few seconds (the way a camera station would: a temporary
name, then a rename), runs the real service against the emulator with small thresholds, waits
until a model is trained, prints what the server holds, and cleans up.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from paiv_sync.config import parse_config
from paiv_sync.emulator import Emulator, EmulatorOptions
from paiv_sync.images import make_png
from paiv_sync.service import Service

log = logging.getLogger(__name__)

CATEGORIES = ("cats", "dogs", "birds")
IMAGES_PER_CATEGORY = 6
DEADLINE = 25.0


def _write_images(root: Path, stop: threading.Event) -> None:
    """Drop the demo images one by one, round-robin over the categories."""
    seed = 0
    for _ in range(IMAGES_PER_CATEGORY):
        for category in CATEGORIES:
            if stop.is_set():
                return
            seed += 1
            final = root / category / f"{category}-{seed:03d}.png"
            partial = final.with_suffix(".part")
            partial.write_bytes(make_png(48, 48, seed=seed))
            partial.replace(final)
            stop.wait(0.12)


def _summary(state: dict[str, Any]) -> list[str]:
    lines = []
    for dataset in state.get("datasets", []):
        per_category: dict[str, int] = {}
        for item in dataset.get("files", []):
            name = str(item.get("category_name"))
            per_category[name] = per_category.get(name, 0) + 1
        detail = ", ".join(f"{c}: {n}" for c, n in sorted(per_category.items()))
        lines.append(
            f"dataset {dataset.get('name')!r}: {len(dataset.get('files', []))} images ({detail})"
        )
    for task in state.get("tasks", []):
        base = (
            f", retrained from {task['pretrained_model']}" if task.get("pretrained_model") else ""
        )
        lines.append(
            f"model {task.get('name')!r} (task {task.get('_id')}): {task.get('status')}{base}"
        )
    duplicates = state.get("duplicates", [])
    lines.append(f"duplicates on the server: {len(duplicates)}")
    return lines


def run_demo() -> int:
    """Run the demo; return 0 when every image arrived once and a model was trained."""
    started = time.monotonic()
    # The emulator's own chatter would drown the service's log lines the demo is meant to show.
    logging.getLogger("paiv_sync.emulator").setLevel(logging.WARNING)
    emulator_options = EmulatorOptions(port=0, training_seconds=2.0)
    with (
        Emulator(emulator_options) as emulator,
        tempfile.TemporaryDirectory(prefix="paiv-sync-demo-") as tmp,
    ):
        root = Path(tmp, "images")
        for category in CATEGORIES:
            (root / category).mkdir(parents=True)
        config = parse_config(
            {
                "credentials": {
                    "endpoint": emulator.url,
                    "username": "admin",
                    "password": "passw0rd",
                },
                "recursive": 1,
                "threshold": {"upload": 5, "training": len(CATEGORIES) * IMAGES_PER_CATEGORY},
                "skip_duplicates": 1,
                "time": 1,
                "settle_time": 0.3,
                "poll_interval": 0.5,
                "dataset": {"name": "demo", "action": "append"},
                "model": {"name": "demo-model", "action": "retrain"},
                "folders": [str(root)],
                "ledger": str(Path(tmp, "ledger.sqlite3")),
            },
            source=None,
            env={},
        )
        print(f"paiv-sync demo: emulator at {emulator.url}, watching {root}")
        service = Service(config)
        codes: list[int] = []
        runner = threading.Thread(target=lambda: codes.append(service.run()), name="paiv-demo")
        runner.start()
        writer_stop = threading.Event()
        trained = False
        try:
            if not service.ready.wait(10):
                print("paiv-sync demo: the service did not start")
                return 1
            writer = threading.Thread(
                target=_write_images, args=(root, writer_stop), name="paiv-demo-writer"
            )
            writer.start()
            writer.join()
            while time.monotonic() - started < DEADLINE and runner.is_alive():
                tasks = emulator.state().get("tasks", [])
                last = service.ledger.last_training() if service.ledger is not None else None
                if any(t.get("status") == "trained" for t in tasks) and (
                    last is not None and last.state == "trained"
                ):
                    trained = True
                    break
                time.sleep(0.2)
        finally:
            writer_stop.set()
            service.stop()
            runner.join(30)
        state = emulator.state()
    print("paiv-sync demo: what the server holds")
    for line in _summary(state):
        print(f"  {line}")
    expected = len(CATEGORIES) * IMAGES_PER_CATEGORY
    held = sum(len(d.get("files", [])) for d in state.get("datasets", []))
    ok = trained and held == expected and not state.get("duplicates") and codes == [0]
    elapsed = time.monotonic() - started
    if ok:
        print(
            f"paiv-sync demo: {held} images uploaded exactly once and a model trained, "
            f"in {elapsed:.1f} s"
        )
        return 0
    print(
        f"paiv-sync demo: FAILED after {elapsed:.1f} s: {held} of {expected} images on the "
        f"server, model trained: {trained}"
    )
    return 1
