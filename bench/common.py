"""What every benchmark shares: test data, an emulator in its own process, measuring helpers.

The emulator runs in a child process (``bench.emuhost``) so that it has its own interpreter and
GIL: on a 2-core machine the client and the server each get a core, as they would in real life,
and the CPU each one spends can be read separately from ``/proc``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paiv_sync.config import Config, parse_config
from paiv_sync.images import check_image, make_png

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = ("cat0", "cat1", "cat2", "cat3", "cat4")
USER, PASSWORD = "admin", "passw0rd"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The smallest valid PNG the project makes; start-up benchmarks only need stat data to match.
TINY_PNG = make_png(1, 1, seed=0)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Figure:
    """One line of the results table.

    ``value`` is what paiv-sync achieved and ``baseline`` the limit measured in the same run
    (None when there is none); ``ratio`` is value/baseline (or baseline/value when lower is
    better, so above 1 is always "at least as good as the limit"); ``goal`` says what is asked
    and ``met`` whether it was reached.
    """

    name: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Section:
    """The figures of one benchmark and the details worth printing under the table."""

    title: str
    figures: list[Figure] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def say(self, line: str) -> None:
        self.details.append(line)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by linear interpolation."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------- test data


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def padded_png(seed: int, size: int) -> bytes:
    """A valid PNG of about ``size`` bytes: a small picture plus a private chunk of noise.

    The noise does not compress, like the pixels of a real photo; the chunk type ``prVt`` is
    ancillary and private, so every PNG reader skips it.
    """
    base = make_png(16, 16, seed=seed)
    iend = base[-12:]
    room = max(0, size - len(base) - 12)
    noise = random.Random(seed).randbytes(room)
    return base[:-12] + png_chunk(b"prVt", noise) + iend


def make_image_tree(root: Path, count: int, *, size: int = 30_000, seed: int = 0) -> list[Path]:
    """Write ``count`` distinct PNGs of about ``size`` bytes into ``root/<category>/``.

    Spread evenly over the five categories; sizes vary by ±20 % around ``size``. Returns the
    paths. Raises AssertionError if a generated file fails the project's own image check
    (checked on a sample, which is enough: every file is made the same way).
    """
    rng = random.Random(seed)
    paths: list[Path] = []
    for category in CATEGORIES:
        (root / category).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        category = CATEGORIES[index % len(CATEGORIES)]
        path = root / category / f"img{index:06d}.png"
        path.write_bytes(padded_png(seed * 1_000_003 + index, int(size * rng.uniform(0.8, 1.2))))
        paths.append(path)
    for path in paths[:: max(1, count // 20)]:
        problem = check_image(path)
        assert problem is None, f"{path}: generated image fails the check: {problem}"
    return paths


def make_stat_tree(root: Path, count: int, *, per_dir: int = 1000) -> list[str]:
    """Write ``count`` tiny PNGs under ``root/<category>/d<NNN>/``; return their rel paths.

    For start-up benchmarks, where only the directory entries and stat data matter.
    """
    rels: list[str] = []
    body = TINY_PNG
    for index in range(count):
        category = CATEGORIES[index % len(CATEGORIES)]
        sub = f"d{index // (per_dir * len(CATEGORIES)):03d}"
        rel = f"{category}/{sub}/f{index:07d}.png"
        path = os.path.join(root, rel)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)  # noqa: PTH120, PTH103 - str paths
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        rels.append(rel)
    return rels


def bare_walk(root: str) -> int:
    """The baseline of a scan: ``os.scandir`` every folder and stat every file; return the count."""
    count = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat(follow_symlinks=False)
                    count += 1
    return count


# --------------------------------------------------------------------------- configuration


def bench_config(
    url: str, roots: Sequence[Path], ledger: Path, **changes: Any
) -> tuple[Config, dict[str, Any]]:
    """A checked configuration feeding the emulator at ``url``; also its JSON form.

    ``changes`` replace top-level keys. Defaults are the product's except where a benchmark
    says otherwise.
    """
    data: dict[str, Any] = {
        "credentials": {"endpoint": url, "username": USER, "password": PASSWORD, "timeout": 60},
        "folders": [str(r) for r in roots],
        "dataset": {"name": "bench", "action": "append"},
        "model": {"name": "bench-model", "action": "nothing"},
        "ledger": str(ledger),
    }
    data.update(changes)
    return parse_config(data, source=None, env={}), data


# --------------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, in bytes."""
    result = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            result[key] = int(value.split()[0]) * 1024
    return result


def self_cpu_seconds() -> float:
    """CPU seconds used so far by this process, every thread included."""
    times = os.times()
    return times.user + times.system


# Children start in a neutral folder: ``python -m`` puts its working folder first on the path,
# which would make the work tree's paiv_sync win over a patched copy on PYTHONPATH.
CHILD_CWD = "/"


def child_env() -> dict[str, str]:
    """The environment for a child Python that must import ``bench`` and ``paiv_sync``."""
    env = dict(os.environ)
    # PYTHONPATH first: ``PYTHONPATH=/tmp/patched python bench/run.py`` measures a patched copy
    # of paiv_sync in the children too.
    parts = [p for p in (env.get("PYTHONPATH", ""), str(REPO)) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_child(module: str, args: Sequence[str], *, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m module args`` and return the JSON object it prints last on stdout.

    Raises RuntimeError with the child's stderr when it fails.
    """
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=CHILD_CWD,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class EmulatorProcess:
    """The emulator in a child process (``bench.emuhost``), reached over loopback.

    ``profile`` names a file where the child writes a cProfile of all its threads on stop.
    """

    def __init__(self, *, profile: Path | None = None) -> None:
        args = [sys.executable, "-m", "bench.emuhost"]
        if profile is not None:
            args += ["--profile", str(profile)]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=CHILD_CWD,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("serving "):
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.url = line.split()[1]
        self.root_url = self.url.rsplit("/api", 1)[0]
        self.pid = self._proc.pid

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the child (it writes its profile first, when asked to)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.root_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    def state(self) -> dict[str, Any]:
        """The introspection view (``GET /_emulator/state``)."""
        result: dict[str, Any] = self._call("GET", "/_emulator/state")
        return result

    def reset(self) -> None:
        """Forget every dataset, file and counter."""
        self._call("POST", "/_emulator/reset", {})

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return proc_memory(self.pid)


def stored_files(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file the emulator holds, over all datasets."""
    return [f for d in state["datasets"] for f in d["files"]]


def upload_requests(state: dict[str, Any]) -> int:
    """How many upload POSTs the emulator received."""
    return int(state["requests"].get("POST /datasets/{id}/files", 0))


def iso_to_epoch(text: str) -> float:
    """Parse the emulator's ``2024-01-01T00:00:00.123Z`` timestamps to epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """``with timed() as elapsed:`` … ``elapsed()`` gives the seconds since the block began."""
    started = time.perf_counter()
    yield lambda: time.perf_counter() - started


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
