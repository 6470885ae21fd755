"""Figure 1: ingest throughput, paiv-sync against a bare upload loop, and where the time goes.

The limit is a loop that POSTs the same files in the same batch size over one
``requests.Session``: no ledger, no hashing, no image check. paiv-sync runs ``--once`` (in this
process, so its phases can be timed and profiled, and as the CLI in a child process) and in
watch mode as users run it (``paiv-sync --config …`` in its own process, READY taken from its
notify socket, then the files renamed into the watched folder). Every run starts from an empty
emulator and a new ledger and must leave exactly the files on the server, once each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    CATEGORIES,
    CHILD_CWD,
    PASSWORD,
    USER,
    EmulatorProcess,
    Figure,
    Section,
    bench_config,
    child_env,
    human_bytes,
    iso_to_epoch,
    make_image_tree,
    median,
    proc_cpu_seconds,
    self_cpu_seconds,
    stored_files,
)
from bench.profiling import AllThreadsProfile, describe, merge
from paiv_sync.connection import Connection
from paiv_sync.intake import Intake
from paiv_sync.pipeline import Pipeline
from paiv_sync.service import Service

log = logging.getLogger(__name__)

BATCH_SIZE = 20
SETTLE = 0.1


@dataclass
class Run:
    """One ingest run: wall time, CPU of both sides, and phases when known."""

    label: str
    files: int
    seconds: float
    client_cpu: float
    server_cpu: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.files / self.seconds

    def line(self) -> str:
        return (
            f"{self.label}: {self.files} files in {self.seconds:.2f} s = {self.rate:.0f} files/s; "
            f"client CPU {self.client_cpu / self.seconds:.0%} of a core, "
            f"emulator CPU {self.server_cpu / self.seconds:.0%} of a core"
        )


def _check_server(emulator: EmulatorProcess, expected: int, label: str) -> None:
    state = emulator.state()
    held = len(stored_files(state))
    if held != expected or state["duplicates"]:
        raise AssertionError(
            f"{label}: the server holds {held} files ({len(state['duplicates'])} duplicated), "
            f"expected {expected} once each"
        )


def _grouped(paths: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(path.parent.name, []).append(path)
    return groups


def baseline(emulator: EmulatorProcess, paths: list[Path]) -> Run:
    """The limit: POST the files in batches over one session, nothing else."""
    emulator.reset()
    session = requests.Session()
    url = emulator.url
    try:
        login = session.post(
            f"{url}/tokens",
            json={"grant_type": "password", "username": USER, "password": PASSWORD},
            timeout=30,
        )
        session.headers["X-Auth-Token"] = login.json()["token"]
        dataset = session.post(f"{url}/datasets", json={"name": "baseline"}, timeout=30)
        dataset_id = dataset.json()["dataset_id"]
        cpu0, server0 = self_cpu_seconds(), emulator.cpu_seconds()
        started = time.perf_counter()
        for category, group in _grouped(paths).items():
            for i in range(0, len(group), BATCH_SIZE):
                chunk = group[i : i + BATCH_SIZE]
                handles = [path.open("rb") for path in chunk]
                try:
                    response = session.post(
                        f"{url}/datasets/{dataset_id}/files",
                        data={"category_name": category},
                        files=[
                            ("files", (p.name, h, "image/png"))
                            for p, h in zip(chunk, handles, strict=True)
                        ],
                        timeout=60,
                    )
                finally:
                    for handle in handles:
                        handle.close()
                results = response.json()["resultList"]
                if response.status_code != 200 or not all(
                    r["result"] == "success" for r in results
                ):
                    raise AssertionError(f"baseline upload failed: {response.text[:200]}")
        seconds = time.perf_counter() - started
        run = Run(
            "limit (bare loop)",
            len(paths),
            seconds,
            self_cpu_seconds() - cpu0,
            emulator.cpu_seconds() - server0,
        )
    finally:
        session.close()
    _check_server(emulator, len(paths), "baseline")
    return run


# What --once spends its time on, by the methods that do it (the pipeline's steps, intake's
# admission, the connection's login): (class, method, phase). Time spent in a timed method
# called from another is counted for the inner one only.
_PHASES: tuple[tuple[type, str, str], ...] = (
    (Pipeline, "scan_all", "scan"),
    (Connection, "try_now", "connect"),
    (Connection, "ensure", "connect"),
    (Intake, "admit_settled", "admit"),
    (Pipeline, "dispatch", "upload"),
    (Pipeline, "wait_uploads", "upload"),
)


@contextlib.contextmanager
def _instrumented() -> Iterator[dict[str, float]]:
    """Time the phases of a run by wrapping those methods while inside (benchmark only)."""
    spent: dict[str, float] = dict.fromkeys((phase for _, _, phase in _PHASES), 0.0)
    nested = threading.local()
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _PHASES]
    for (owner, name, method), (_, _, phase) in zip(originals, _PHASES, strict=True):

        def timed(
            self: Any,
            *args: Any,
            _method: Callable[..., Any] = method,
            _phase: str = phase,
            **kwargs: Any,
        ) -> Any:
            stack: list[float] = nested.__dict__.setdefault("inner", [])
            stack.append(0.0)
            started = time.perf_counter()
            try:
                return _method(self, *args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                inner = stack.pop()
                spent[_phase] += elapsed - inner
                if stack:
                    stack[-1] += elapsed

        setattr(owner, name, timed)
    try:
        yield spent
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)


def paiv_once(
    emulator: EmulatorProcess, root: Path, work: Path, count: int, *, profile: bool = False
) -> tuple[Run, list[str]]:
    """``--once`` in this process; returns the run and, with ``profile``, profile lines."""
    emulator.reset()
    ledger = work / f"once-{time.monotonic_ns()}.sqlite3"
    config, _ = bench_config(
        emulator.url, [root], ledger, batch_size=BATCH_SIZE, settle_time=SETTLE
    )
    service = Service(config, once=True)
    profiler = AllThreadsProfile() if profile else None
    cpu0, server0 = self_cpu_seconds(), emulator.cpu_seconds()
    started = time.perf_counter()
    if profiler is not None:
        profiler.start()
    with _instrumented() as spent:
        code = service.run()
    stats = profiler.stop() if profiler is not None else None
    seconds = time.perf_counter() - started
    run = Run(
        "paiv-sync --once (in-process)" + (" under cProfile" if profile else ""),
        count,
        seconds,
        self_cpu_seconds() - cpu0,
        emulator.cpu_seconds() - server0,
    )
    if code != 0 or service.summary.uploaded != count:
        raise AssertionError(
            f"--once exited {code} after uploading {service.summary.uploaded} of {count}"
        )
    _check_server(emulator, count, "--once")
    phases = {
        "open + scan + offer": spent["scan"],
        "log in + resolve dataset": spent["connect"],
        "check + hash + ledger (admit)": spent["admit"],
        "upload (dispatch + wait)": spent["upload"],
    }
    phases["settle wait + rest"] = seconds - sum(phases.values())
    run.phases = phases
    lines = describe(stats, "client (paiv-sync, all threads)", seconds) if stats else []
    return run, lines


def paiv_cli(emulator: EmulatorProcess, root: Path, work: Path, count: int) -> Run:
    """``paiv-sync --config … --once`` as a child process (start-up and imports included)."""
    emulator.reset()
    ledger = work / f"cli-{time.monotonic_ns()}.sqlite3"
    _, data = bench_config(emulator.url, [root], ledger, batch_size=BATCH_SIZE, settle_time=SETTLE)
    config_path = work / "cli-config.json"
    config_path.write_text(json.dumps(data))
    server0 = emulator.cpu_seconds()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            *("-m", "paiv_sync", "--config", str(config_path), "--once"),
            *("--log-level", "warning"),
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=CHILD_CWD,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise AssertionError(f"paiv-sync --once exited {done.returncode}: {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = Run(
        "paiv-sync --once (CLI process)",
        count,
        seconds,
        after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        emulator.cpu_seconds() - server0,
    )
    _check_server(emulator, count, "CLI --once")
    return run


def _server_total(session: requests.Session, url: str) -> int:
    response = session.get(f"{url}/datasets", timeout=30)
    return sum(int(d.get("total_file_count", 0)) for d in response.json())


def _wait_ready(sock: socket.socket, child: subprocess.Popen[str], timeout: float) -> None:
    """Wait for the child's ``READY=1`` on its notify socket (as systemd would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"watch mode: paiv-sync exited {child.returncode} before READY")
        sock.settimeout(0.2)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in message.split("\n"):
            return
    raise AssertionError(f"watch mode: paiv-sync was not ready within {timeout:g} s")


def paiv_watch_cli(emulator: EmulatorProcess, source: Path, work: Path, count: int) -> Run:
    """Watch mode as users run it: ``paiv-sync --config …`` in its own process.

    READY comes over a notify socket, as under systemd; then the files are renamed into the
    watched tree and the run ends when the server holds them all. The files are moved back.
    """
    emulator.reset()
    root = work / "watched-cli"
    for category in CATEGORIES:
        (root / category).mkdir(parents=True, exist_ok=True)
    ledger = work / f"watch-cli-{time.monotonic_ns()}.sqlite3"
    _, data = bench_config(
        emulator.url,
        [root],
        ledger,
        batch_size=BATCH_SIZE,
        settle_time=SETTLE,
        time=0,
        threshold={"upload": 1, "training": 1000},
        rescan_interval=0,
    )
    config_path = work / "watch-cli-config.json"
    config_path.write_text(json.dumps(data))
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    env = child_env()
    env["NOTIFY_SOCKET"] = str(notify_path)
    child = subprocess.Popen(
        [
            sys.executable,
            *("-m", "paiv_sync", "--config", str(config_path)),
            *("--log-level", "warning"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=CHILD_CWD,
    )
    session = requests.Session()
    moved: list[tuple[Path, Path]] = []
    try:
        _wait_ready(sock, child, 60)
        login = session.post(
            f"{emulator.url}/tokens",
            json={"grant_type": "password", "username": USER, "password": PASSWORD},
            timeout=30,
        )
        session.headers["X-Auth-Token"] = login.json()["token"]
        pairs = [
            (path, root / path.parent.name / path.name)
            for c in CATEGORIES
            for path in (source / c).iterdir()
        ]
        pairs.sort(key=lambda pair: pair[0].name)
        cpu0, server0 = proc_cpu_seconds(child.pid), emulator.cpu_seconds()
        started = time.time()
        for src, dst in pairs:
            src.rename(dst)
            moved.append((src, dst))
        deadline = time.monotonic() + 600
        # Seldom: every look costs the emulator work that the limit's run does not pay. The end
        # is taken from the server's own stamps, not from when this loop noticed it.
        while _server_total(session, emulator.url) < count:
            if time.monotonic() > deadline:
                raise AssertionError("watch mode: not every file reached the server in 600 s")
            if child.poll() is not None:
                raise AssertionError(f"watch mode: paiv-sync exited {child.returncode}")
            time.sleep(0.2)
        cpu = proc_cpu_seconds(child.pid) - cpu0
        server_cpu = emulator.cpu_seconds() - server0
        last = max(iso_to_epoch(f["created_at"]) for f in stored_files(emulator.state()))
        # created_at is truncated to the millisecond: add one back rather than flatter.
        seconds = last + 0.001 - started
        run = Run(
            f"paiv-sync watch mode, CLI process (settle {SETTLE:g} s, time 0)",
            count,
            seconds,
            cpu,  # the few idle moments until this loop noticed the end cost next to nothing
            server_cpu,
        )
    finally:
        child.terminate()
        try:
            _, stderr = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            _, stderr = child.communicate()
        sock.close()
        session.close()
        for src, dst in moved:
            dst.rename(src)
    if child.returncode != 0:
        raise AssertionError(f"watch mode: paiv-sync exited {child.returncode}: {stderr[-2000:]}")
    _check_server(emulator, count, "watch mode (CLI)")
    return run


def _ingest_figure(label: str, runs: list[Run], limits: list[Run]) -> Figure:
    """Median rate against the median limit; the ratio is the median of the rounds' ratios."""
    ratios = [entry.rate / limit.rate for entry, limit in zip(runs, limits, strict=True)]
    ratio = median(ratios)
    spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""
    return Figure(
        f"ingest {label}",
        median([entry.rate for entry in runs]),
        "files/s",
        baseline=median([limit.rate for limit in limits]),
        ratio=ratio,
        goal=">= 0.8x limit",
        met=ratio >= 0.8,
        note=spread,
    )


def run(work: Path, *, quick: bool) -> Section:
    """Run figure 1 and return its section of the report.

    The limit moves by a fifth between runs on a shared machine, so each round measures the
    limit and then every paiv-sync mode right after it; a mode's ratio is the median of its
    rounds' ratios.
    """
    count = 1000 if quick else 5000
    rounds = 1 if quick else 3
    section = Section("1. Ingest throughput")
    source = work / "images"
    started = time.perf_counter()
    paths = make_image_tree(source, count, size=30_000)
    total = sum(p.stat().st_size for p in paths)
    section.say(
        f"data: {count} PNGs, {human_bytes(total)} ({human_bytes(total / count)} each), "
        f"{len(CATEGORIES)} categories, batch size {BATCH_SIZE}, {rounds} rounds; made in "
        f"{time.perf_counter() - started:.1f} s"
    )
    limits: list[Run] = []
    modes: dict[str, list[Run]] = {"--once in-process": [], "--once CLI": [], "watch CLI": []}
    with EmulatorProcess() as emulator:
        # Warm the page cache and both processes once, untimed.
        baseline(emulator, paths[: min(200, count)])
        for _ in range(rounds):
            limits.append(baseline(emulator, paths))
            modes["--once in-process"].append(paiv_once(emulator, source, work, count)[0])
            modes["--once CLI"].append(paiv_cli(emulator, source, work, count))
            modes["watch CLI"].append(paiv_watch_cli(emulator, source, work, count))
    with EmulatorProcess(profile=work / "emulator.prof") as emulator:
        profiled, client_lines = paiv_once(emulator, source, work, count, profile=True)
        server_wall = profiled.seconds
    server_lines = describe(merge([str(work / "emulator.prof")]), "emulator", server_wall)
    for index, limit in enumerate(limits):
        section.say(f"round {index + 1}:")
        for entry in (limit, *(runs[index] for runs in modes.values())):
            section.say("  " + entry.line())
    section.say(profiled.line())
    once = modes["--once in-process"][-1]
    section.say(
        "--once phases (in-process, unprofiled, last round): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in once.phases.items())
    )
    for label, runs in modes.items():
        section.add(_ingest_figure(label, runs, limits))
    section.add(
        Figure(
            "emulator CPU during the limit run",
            median([limit.server_cpu / limit.seconds * 100 for limit in limits]),
            "% of a core",
            note="near 100 % = the emulator is the bottleneck",
        )
    )
    section.details += ["", *client_lines, "", *server_lines]
    return section
