"""Figure 7: a big video file uploads with flat memory on both sides.

One ``.mp4`` (an ``ftyp`` box, then incompressible bytes) is sent with ``MviClient.upload`` from
a fresh child process (``bench.bigfile_child``). The client's growth is its peak RSS after the
upload minus its RSS before; the emulator's is its peak RSS after minus before (a fresh
emulator, so no earlier benchmark's peak hides in it). The server must hold the file with the
right size and sha256.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from bench.common import EmulatorProcess, Figure, Section, human_bytes, run_child, stored_files
from paiv_sync.hashing import sha256_file


def make_video(path: Path, size: int) -> None:
    """Write ``size`` bytes that the emulator takes for an MP4: an ``ftyp`` box, then noise."""
    header = struct.pack(">I", 24) + b"ftypmp42" + b"\x00\x00\x00\x00" + b"mp42isom"
    block = os.urandom(4 << 20)
    with path.open("wb") as handle:
        handle.write(header)
        left = size - len(header)
        while left > 0:
            handle.write(block[:left])
            left -= len(block)


def run(work: Path, *, quick: bool) -> Section:
    """Run figure 7 and return its section of the report."""
    size = (100 if quick else 500) * 1_000_000
    section = Section("7. Big file")
    path = work / "big-video.mp4"
    make_video(path, size)
    digest = sha256_file(path)
    with EmulatorProcess() as emulator:
        server_before = emulator.memory()
        result = run_child("bench.bigfile_child", [emulator.url, str(path)])
        server_after = emulator.memory()
        held = stored_files(emulator.state())
    path.unlink()
    if result["ok"] != [True]:
        raise AssertionError(f"the big upload failed: {result['fault']}")
    if len(held) != 1 or held[0]["size"] != size or held[0]["sha256"] != digest:
        raise AssertionError(f"the server does not hold the big file intact: {held}")
    client_growth = result["peak_after"] - result["rss_before"]
    server_growth = server_after["VmHWM"] - server_before["VmRSS"]
    rate = size / result["seconds"] / 1e6
    section.say(
        f"{human_bytes(size)} .mp4 in {result['seconds']:.2f} s ({rate:.0f} MB/s); client RSS "
        f"{human_bytes(result['rss_before'])} before, peak {human_bytes(result['peak_after'])} "
        f"after; emulator RSS {human_bytes(server_before['VmRSS'])} before, peak "
        f"{human_bytes(server_after['VmHWM'])} after; stored intact (size and sha256 checked)"
    )
    limit = 20e6
    section.add(
        Figure(
            f"client peak RSS growth, {human_bytes(size)} upload",
            client_growth / 1e6,
            "MB",
            goal="flat (< 20 MB)",
            met=client_growth < limit,
        )
    )
    section.add(
        Figure(
            f"emulator peak RSS growth, {human_bytes(size)} upload",
            server_growth / 1e6,
            "MB",
            goal="flat (< 20 MB)",
            met=server_growth < limit,
        )
    )
    section.add(Figure("big upload throughput", rate, "MB/s"))
    return section
