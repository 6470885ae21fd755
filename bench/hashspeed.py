"""Figure 6: sha256 throughput of ``paiv_sync.hashing.sha256_file`` against ``sha256sum``.

Two sets, both read once before timing so the page cache is warm for both tools: many image-
sized files (where the cost of opening a file counts) and one large file (where the hashing
itself counts). ``sha256sum`` gets every file of a set in one process, as ``xargs`` would run
it; its process start is part of its time, as is the hashing loop's in Python. Best of three.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Figure, Section, human_bytes
from paiv_sync.hashing import sha256_file


def _best(runs: int, action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def _sha256sum(paths: list[str]) -> dict[str, str]:
    done = subprocess.run(["sha256sum", "--", *paths], capture_output=True, text=True, check=True)
    result = {}
    for line in done.stdout.splitlines():
        digest, _, name = line.partition("  ")
        result[name] = digest
    return result


def _hash_all(paths: list[str]) -> list[str]:
    return [sha256_file(p) for p in paths]


def _write(path: Path, size: int) -> None:
    block = os.urandom(1 << 20) if size >= 1 << 20 else os.urandom(size)
    with path.open("wb") as handle:
        left = size
        while left > 0:
            handle.write(block[:left])
            left -= len(block)


def run(work: Path, *, quick: bool) -> Section:
    """Run figure 6 and return its section of the report."""
    section = Section("6. Hashing")
    if shutil.which("sha256sum") is None:
        section.say("sha256sum is not installed; skipped")
        return section
    small_count = 500 if quick else 2000
    big_size = (64 if quick else 512) << 20
    folder = work / "hashing"
    folder.mkdir()
    small = [folder / f"s{index:05d}.png" for index in range(small_count)]
    for index, path in enumerate(small):
        path.write_bytes(os.urandom(30_000 + index % 1000))
    big = folder / "big.bin"
    _write(big, big_size)
    sets = (
        (f"{small_count} files of ~30 kB", [str(p) for p in small]),
        (f"1 file of {human_bytes(big_size)}", [str(big)]),
    )
    for label, paths in sets:
        total = sum(Path(p).stat().st_size for p in paths)
        expected = _sha256sum(paths)  # also warms the cache
        ours = {p: sha256_file(p) for p in paths}
        if ours != expected:
            raise AssertionError(f"{label}: sha256_file and sha256sum disagree")
        python = _best(3, functools.partial(_hash_all, paths))
        coreutils = _best(3, functools.partial(_sha256sum, paths))
        ours_rate, their_rate = total / python / 1e6, total / coreutils / 1e6
        section.say(
            f"{label} ({human_bytes(total)}): sha256_file {python:.3f} s = {ours_rate:.0f} MB/s, "
            f"sha256sum {coreutils:.3f} s = {their_rate:.0f} MB/s"
        )
        section.add(
            Figure(
                f"sha256, {label}",
                ours_rate,
                "MB/s",
                baseline=their_rate,
                ratio=ours_rate / their_rate,
                goal=">= 0.9x sha256sum",
                met=ours_rate / their_rate >= 0.9,
            )
        )
    shutil.rmtree(folder, ignore_errors=True)
    return section
