"""Figures 3, 4 and 5: start-up with a full ledger, its peak memory, and the idle cost.

A tree of tiny files stands for images that were all uploaded before: the ledger is written
directly with SQL, every row ``uploaded`` with the file's real stamp (size, mtime, ctime and
inode), and the dataset
it names exists on the emulator. Each start-up runs in a fresh child process
(``bench.startup_child``), which proves that nothing was offered, hashed or added; the emulator
proves that nothing was sent.

- Start-up: seconds from ``Service.run()`` to ``Service.ready`` (median of three), against a
  bare ``os.scandir`` + ``stat`` walk of the same tree (median of three), both on a warm cache.
- Memory: peak RSS (VmHWM) of the child at READY, with the ledger holding the tree's rows, and
  with the ledger holding ten times as many rows (the extra rows are uploaded files no longer
  on disk: an honest stand-in for a 1M-file tree, which would take too long to create here).
- Idle: CPU seconds the child uses while idle after READY, between rescans (rescan every
  300 s, the default), as a share of one core.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    PASSWORD,
    USER,
    EmulatorProcess,
    Figure,
    Section,
    bare_walk,
    bench_config,
    human_bytes,
    make_stat_tree,
    median,
    run_child,
    upload_requests,
)
from paiv_sync.ledger import Ledger

DATASET = "bench"


def tree_stats(root: str) -> dict[str, tuple[int, int, int, int]]:
    """``rel_path -> (size, mtime_ns, ctime_ns, inode)`` of every file under ``root``."""
    result: dict[str, tuple[int, int, int, int]] = {}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, prefix + entry.name + "/"))
                else:
                    info = entry.stat(follow_symlinks=False)
                    result[prefix + entry.name] = (
                        info.st_size,
                        info.st_mtime_ns,
                        info.st_ctime_ns,
                        info.st_ino,
                    )
    return result


def build_ledger(
    path: Path,
    root: str,
    stats: dict[str, tuple[int, int, int, int]],
    *,
    extra: int,
    dataset_id: str,
) -> int:
    """Write a ledger whose rows say every file of ``stats`` (and ``extra`` more) is uploaded.

    Returns the number of rows.
    """
    Ledger(path).close()  # the schema, exactly as the service creates it
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        now = time.time()

        def rows() -> Any:
            for index, (rel, stamp) in enumerate(stats.items()):
                yield _row(root, rel, stamp, index, now)
            for index in range(extra):
                category = f"cat{index % 5}"
                rel = f"{category}/archive{index // 10_000:03d}/x{index:07d}.png"
                mtime_ns = 1_600_000_000_000_000_000 + index
                yield _row(root, rel, (4000, mtime_ns, mtime_ns, index + 1), index, now)

        db.executemany(
            "INSERT INTO files (root, rel_path, category, upload_name, size, mtime_ns, ctime_ns, "
            "inode, sha256, content_type, state, attempts, server_file_id, first_seen, updated, "
            "uploaded_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'image/png', 'uploaded', 1, ?, ?, ?, ?)",
            rows(),
        )
        total = len(stats) + extra
        for key, value in (
            ("dataset_id", dataset_id),
            ("dataset_config_name", DATASET),
            ("uploads_total", str(total)),
        ):
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return total


def _row(
    root: str, rel: str, stamp: tuple[int, int, int, int], index: int, now: float
) -> tuple[Any, ...]:
    name = rel.rsplit("/", 1)[-1]
    return (
        root,
        rel,
        rel.split("/", 1)[0],
        name,
        *stamp,
        f"{index:064x}",
        f"server-{index}",
        now,
        now,
        now,
    )


def create_dataset(url: str) -> str:
    """Create the dataset the ledgers name on the emulator at ``url``; return its id."""
    with requests.Session() as session:
        login = session.post(
            f"{url}/tokens",
            json={"grant_type": "password", "username": USER, "password": PASSWORD},
            timeout=30,
        )
        session.headers["X-Auth-Token"] = login.json()["token"]
        created = session.post(f"{url}/datasets", json={"name": DATASET}, timeout=30)
        return str(created.json()["dataset_id"])


def start_child(config_path: Path, idle: float = 0.0, settle: float = 2.0) -> dict[str, Any]:
    """Start the service in a child process on ``config_path``; return what it reported.

    Raises AssertionError when it offered, hashed, added or uploaded anything, or never
    connected: with a full ledger that would be work done again.
    """
    args = [str(config_path), "--settle", str(settle)]
    if idle:
        args += ["--idle", str(idle)]
    result = run_child("bench.startup_child", args)
    problems = [
        f"{key} = {result[key]}"
        for key in ("offered_at_ready", "in_gate", "added", "uploaded", "hashed")
        if result[key]
    ]
    if not result["connected"]:
        problems.append("never connected to the emulator")
    if problems:
        raise AssertionError(
            "start-up with a full ledger did work it should not: " + ", ".join(problems)
        )
    return result


def run(work: Path, *, quick: bool) -> Section:
    """Run figures 3, 4 and 5 and return their section of the report."""
    files = 20_000 if quick else 100_000
    idle_seconds = 20.0 if quick else 60.0
    section = Section("3-5. Start-up, memory, idle")
    root = work / "tree"
    root.mkdir()
    made = time.perf_counter()
    make_stat_tree(root, files)
    section.say(
        f"tree: {files} files in 5 categories x {files // 5000} folders of 1000; made in "
        f"{time.perf_counter() - made:.1f} s"
    )
    bare_walk(str(root))  # warm the cache
    walks = []
    for _ in range(3):
        started = time.perf_counter()
        counted = bare_walk(str(root))
        walks.append(time.perf_counter() - started)
    assert counted == files, f"the walk found {counted} files, expected {files}"
    walk = median(walks)

    with EmulatorProcess() as emulator:
        config, data = bench_config(emulator.url, [root], work / "startup.sqlite3")
        root_text = str(config.folders[0])
        stats = tree_stats(root_text)
        dataset_id = create_dataset(emulator.url)
        config_path = work / "startup.json"
        config_path.write_text(json.dumps(data))
        build_ledger(config.ledger_path, root_text, stats, extra=0, dataset_id=dataset_id)
        runs = [
            start_child(config_path),
            start_child(config_path),
            start_child(config_path, idle_seconds),
        ]
        ready = median([r["ready_seconds"] for r in runs])
        idle = runs[-1]

        big_ledger = work / "startup-big.sqlite3"
        big_data = dict(data, ledger=str(big_ledger))
        big_path = work / "startup-big.json"
        big_path.write_text(json.dumps(big_data))
        extra = files * 9
        made = time.perf_counter()
        rows = build_ledger(big_ledger, root_text, stats, extra=extra, dataset_id=dataset_id)
        section.say(
            f"big ledger: {rows} rows ({human_bytes(big_ledger.stat().st_size)}), "
            f"{extra} of them for files not on disk; written in {time.perf_counter() - made:.1f} s"
        )
        big = start_child(big_path)
        sent = upload_requests(emulator.state())
    if sent:
        raise AssertionError(f"start-up with a full ledger sent {sent} upload requests")

    readies = ", ".join(f"{r['ready_seconds']:.3f}" for r in runs)
    section.say(
        f"walk (os.scandir + stat): {', '.join(f'{w:.3f}' for w in walks)} s; "
        f"paiv-sync to READY: {readies} s; "
        f"no file offered, hashed, added or sent (checked)"
    )
    section.add(
        Figure(
            f"start-up to READY, {files // 1000}k files",
            ready,
            "s",
            baseline=walk,
            ratio=ready / walk,
            goal="<= 3x walk",
            met=ready <= 3 * walk,
        )
    )
    for label, result, rows_count in (
        (f"{files // 1000}k rows", runs[0], files),
        (f"{rows // 1000}k rows, {files // 1000}k files", big, rows),
    ):
        section.say(
            f"memory with {label}: RSS after imports {human_bytes(result['rss_before'])}, "
            f"peak at READY {human_bytes(result['peak_rss_at_ready'])}, ready in "
            f"{result['ready_seconds']:.2f} s"
        )
        section.add(
            Figure(
                f"peak RSS, ledger of {label}",
                result["peak_rss_at_ready"] / 1e6,
                "MB",
                goal="<= 100 MB at 1M rows" if rows_count >= 1_000_000 else "",
                met=result["peak_rss_at_ready"] <= 100e6 if rows_count >= 1_000_000 else None,
            )
        )
    share = idle["idle_cpu_seconds"] / idle["idle_seconds"] * 100
    section.say(
        f"idle: {idle['idle_cpu_seconds']:.3f} CPU s over {idle['idle_seconds']:.1f} s "
        f"with {files} files watched"
    )
    section.add(
        Figure(
            f"idle CPU, {files // 1000}k files watched",
            share,
            "% of a core",
            goal="< 0.5 %",
            met=share < 0.5,
        )
    )
    return section
