"""Figure 2: latency from a file's last write to the server holding it, in watch mode.

Upload threshold 1, quiet time 0. Files arrive one at a time, as a camera writes them (a hidden
temporary name, then a rename), spread over the categories at random intervals. The latency of
a file runs from the moment its rename returned to the ``created_at`` the emulator stamped when
it stored the file (same machine clock; the emulator keeps milliseconds, truncated, so each
figure may read up to 1 ms short). The overhead is that latency minus the settle time and the
quiet time: what the pipeline, the ledger and the HTTP round trip add.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from bench.common import (
    CATEGORIES,
    EmulatorProcess,
    Figure,
    Section,
    bench_config,
    iso_to_epoch,
    padded_png,
    percentile,
    stored_files,
)
from paiv_sync.service import Service

SETTLE = 0.25
QUIET = 0.0


def _write(root: Path, category: str, name: str, body: bytes) -> float:
    """Write a file as a camera would; return the wall-clock time its rename returned."""
    temp = root / category / f".{name}.tmp"
    temp.write_bytes(body)
    temp.rename(root / category / name)
    return time.time()


def _wait_for(emulator: EmulatorProcess, count: int, timeout: float) -> dict[str, float]:
    """Wait until the emulator holds ``count`` files; return ``name -> stored at`` (epoch)."""
    deadline = time.monotonic() + timeout
    while True:
        files = stored_files(emulator.state())
        if len(files) >= count:
            return {f["original_file_name"]: iso_to_epoch(f["created_at"]) for f in files}
        if time.monotonic() > deadline:
            raise AssertionError(f"latency: only {len(files)} of {count} files reached the server")
        time.sleep(0.1)


def run(work: Path, *, quick: bool) -> Section:
    """Run figure 2 and return its section of the report."""
    count = 60 if quick else 300
    section = Section("2. Latency (watch mode)")
    root = work / "latency"
    for category in CATEGORIES:
        (root / category).mkdir(parents=True, exist_ok=True)
    rng = random.Random(2)
    bodies = [padded_png(900_000 + i, 30_000) for i in range(count + len(CATEGORIES))]
    with EmulatorProcess() as emulator:
        config, _ = bench_config(
            emulator.url,
            [root],
            work / "latency.sqlite3",
            settle_time=SETTLE,
            time=QUIET,
            threshold={"upload": 1, "training": 1000},
            rescan_interval=0,
        )
        service = Service(config)
        thread = threading.Thread(target=service.run, name="bench-latency-service")
        thread.start()
        try:
            if not service.ready.wait(60):
                raise AssertionError("latency: the service did not become ready")
            # One file per category first, so creating the categories is not measured.
            for index, category in enumerate(CATEGORIES):
                _write(root, category, f"warm{index}.png", bodies[count + index])
            _wait_for(emulator, len(CATEGORIES), 60)
            written: dict[str, float] = {}
            started = time.perf_counter()
            for index in range(count):
                name = f"lat{index:05d}.png"
                written[name] = _write(root, rng.choice(CATEGORIES), name, bodies[index])
                time.sleep(rng.uniform(0.02, 0.08))
            stored = _wait_for(emulator, count + len(CATEGORIES), 120)
            elapsed = time.perf_counter() - started
        finally:
            service.stop()
            thread.join(60)
    latencies = [stored[name] - at for name, at in written.items()]
    overheads = [lat - SETTLE - QUIET for lat in latencies]
    p50, p99 = percentile(overheads, 50), percentile(overheads, 99)
    section.say(
        f"{count} files of 30 kB over {elapsed:.1f} s (one every 20-80 ms, random category); "
        f"settle_time {SETTLE:g} s, time {QUIET:g} s, upload threshold 1"
    )
    section.say(
        f"latency write→stored: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
        f"overhead (minus settle and quiet time): p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {max(overheads) * 1000:.0f} ms"
    )
    section.add(Figure("latency overhead p50", p50 * 1000, "ms"))
    section.add(Figure("latency overhead p99", p99 * 1000, "ms", goal="<= 50 ms", met=p99 <= 0.050))
    return section
