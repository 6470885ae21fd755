"""The chaos run: thousands of files, every server fault, the client killed again and again.

``python -m bench.chaos [--files 3000] [--kills 20] [--seed 1]``

An emulator runs in this process with every fault it can inject switched on (5xx, dropped
connections, 429 with Retry-After, latency spikes, ``result: fail`` for single files, tokens
that expire every few seconds, and requests carried out whose answer is then dropped). The real
CLI (``python -m paiv_sync --config …``) runs as a child process and is killed with SIGKILL at
seeded random moments every few seconds, then started again, while files keep arriving in
three categories -- written in place, renamed from a temporary name, moved in from outside.
After the last kill, ``--once`` runs until it reports everything done (the faults stay on).

Two spells come on top, each lasting one and a half runs of the client: from a quarter of the
kills on, the server fails every file of every upload ("Internal error while storing the
file"); from half of them on, the disk holding the ledger is full (a 256 MB tmpfs mounted on
the state folder and filled; this spell needs root, and is skipped, said so, elsewhere).

Then it compares, per category and content hash, what was written with what the server holds,
prints files written, files on the server, duplicates, lost and kills survived, and exits 1
unless both duplicates and lost are 0 (2 when ``--once`` never finished).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from paiv_sync.emulator import Emulator, EmulatorOptions, FaultOptions
from paiv_sync.images import make_png

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = ("forest", "city", "sea")

# Every fault at once. Latency spikes stay below the client's read timeout (here 10 s): a
# request the server carries out after the client stopped waiting cannot be told from a lost
# one by any client (see paiv_sync/uploader.py), so it is no test of this one.
FAULTS = FaultOptions(
    error_rate=0.1,
    drop_rate=0.03,
    store_then_drop_rate=0.05,
    rate_limit_rate=0.03,
    retry_after=0.5,
    latency=1.0,
    latency_rate=0.03,
    fail_in_200_rate=0.02,
)
TOKEN_LIFETIME = 4.0
UPLOAD_ROUTE = "POST /datasets/{id}/files"
# The spells last this many runs of the client, less half of the last one.
SPELL_RUNS = 2


class LedgerDisk:
    """The state folder on a small tmpfs of its own, so that its disk can be filled."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.mounted = False
        self.filler = folder / "filler"
        self.skipped = ""  # why the disk-full spell cannot run here

    def mount(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.skipped = "needs root to mount a tmpfs"
            return
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(self.folder)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            self.skipped = done.stderr.decode(errors="replace").strip() or "mount failed"
            return
        self.mounted = True

    def fill(self) -> None:
        """Take every free byte (one file); :meth:`free` gives them back."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            block = b"\0" * (1 << 20)
            while block:
                try:
                    os.write(fd, block)
                except OSError:
                    block = block[: len(block) // 2]
        finally:
            os.close(fd)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        if self.mounted:
            self.free()
            subprocess.run(["umount", "-l", str(self.folder)], check=False)
            self.mounted = False


@dataclass
class Tally:
    """What happened during the run."""

    written: Counter[tuple[str, str]] = field(default_factory=Counter)
    kills: int = 0
    starts: int = 0
    once_runs: list[int] = field(default_factory=list)
    trainings: int = 0
    left: dict[str, int] = field(default_factory=dict)
    failing_seconds: float = 0.0  # the spell of a server failing every file
    failing_injected: int = 0
    full_seconds: float = 0.0  # the spell of a full ledger disk
    full_skipped: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--files", type=int, default=3000, help="files to write (%(default)s)")
    parser.add_argument(
        "--kills", type=int, default=20, help="SIGKILLs of the client, at least (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of everything (%(default)s)")
    parser.add_argument(
        "--gap",
        type=float,
        nargs=2,
        default=(3.0, 7.0),
        metavar=("MIN", "MAX"),
        help="seconds between a start and its kill, drawn uniformly (%(default)s)",
    )
    parser.add_argument("--workdir", type=Path, help="keep folders, ledger and logs here")
    args = parser.parse_args(argv)
    if args.files < 1 or args.kills < 0 or not 0 < args.gap[0] <= args.gap[1]:
        parser.error("--files must be >= 1, --kills >= 0, and 0 < MIN <= MAX for --gap")
    return args


def write_config(work: Path, emulator: Emulator, root: Path) -> Path:
    """The client's configuration (a production one, but quick to flush)."""
    config = {
        "credentials": {
            "endpoint": emulator.url,
            "username": "admin",
            "password": "passw0rd",
            "timeout": 10,
        },
        "recursive": 1,
        # Trainings run (and lock the dataset) while files keep arriving.
        "threshold": {"upload": 20, "training": 600},
        "skip_duplicates": 1,
        "time": 0.5,
        # Files arrive without a pause: flush at least every 2 s all the same.
        "max_delay": 2.0,
        "settle_time": 0.2,
        "batch_size": 50,
        "upload_workers": 2,
        "rescan_interval": 0,
        "dataset": {"name": "chaos", "action": "append"},
        "model": {"name": "chaos", "action": "retrain"},
        "folders": [str(root)],
        "ledger": str(work / "state" / "ledger.sqlite3"),
    }
    path = work / "config.json"
    path.write_text(json.dumps(config, indent=1))
    path.chmod(0o600)
    return path


class Client:
    """The CLI as a child process; every run appends to one log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAIV_")}
        with self.log_path.open("ab") as out:
            out.write(f"==== start {' '.join(args)}\n".encode())
            self.process = subprocess.Popen(
                [sys.executable, "-m", "paiv_sync", "--config", str(self.config), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    def kill(self) -> bool:
        """SIGKILL; return False when the process had already ended by itself."""
        assert self.process is not None
        alive = self.process.poll() is None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        with self.log_path.open("ab") as out:
            out.write(b"==== SIGKILL\n")
        return alive

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class Writer(threading.Thread):
    """Writes ``count`` unique images over ``seconds``, the ways cameras and people do."""

    def __init__(self, root: Path, outside: Path, count: int, seconds: float, seed: int) -> None:
        super().__init__(name="chaos-writer", daemon=True)
        self.root = root
        self.outside = outside
        self.count = count
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.written: Counter[tuple[str, str]] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        pause = self.seconds / self.count
        for i in range(self.count):
            if self.stop.wait(pause * self.rng.uniform(0.0, 2.0)):
                return
            category = self.rng.choice(CATEGORIES)
            folder = self.root / category
            if self.rng.random() < 0.2:
                folder = folder / f"day{self.rng.randrange(3)}"  # a sub-folder
            folder.mkdir(parents=True, exist_ok=True)
            body = make_png(16, 16, seed=10_000_000 + i)
            name = f"img{i:05d}.png"
            how = self.rng.random()
            if how < 0.5:  # a camera: temporary name, then rename
                temp = folder / f".{name}.part"
                temp.write_bytes(body)
                temp.replace(folder / name)
            elif how < 0.8:  # written in place, in two goes
                with (folder / name).open("wb") as handle:
                    handle.write(body[: len(body) // 2])
                    handle.flush()
                    handle.write(body[len(body) // 2 :])
            else:  # moved in from outside the watched tree
                self.outside.mkdir(parents=True, exist_ok=True)
                source = self.outside / name
                source.write_bytes(body)
                source.replace(folder / name)
            self.written[(category, hashlib.sha256(body).hexdigest())] += 1


def server_holds(emulator: Emulator) -> tuple[Counter[tuple[str, str]], int]:
    """``(category, sha256) -> copies`` over every dataset, and how many datasets there are."""
    held: Counter[tuple[str, str]] = Counter()
    state = emulator.state()
    for dataset in state["datasets"]:
        for item in dataset["files"]:
            held[(item["category_name"], item["sha256"])] += 1
    return held, len(state["datasets"])


def run(args: argparse.Namespace, work: Path) -> int:
    rng = random.Random(args.seed)
    root = work / "images"
    for category in CATEGORIES:
        (root / category).mkdir(parents=True, exist_ok=True)
    faults = dataclasses.replace(FAULTS, seed=args.seed)
    # The product's own answers on top of the faults: per-file refusals in a 400 (the default),
    # uploads refused with 423 while a training locks the dataset, the transient 500 of a task
    # that is finishing; listings are newest first while files arrive.
    options = EmulatorOptions(
        port=0,
        token_lifetime=TOKEN_LIFETIME,
        faults=faults,
        training_seconds=3.0,
        locked_uploads="423",
        finishing_error_rate=0.3,
    )
    tally = Tally()
    started = time.monotonic()
    disk = LedgerDisk(work / "state")
    disk.mount()
    tally.full_skipped = disk.skipped
    failing = dataclasses.replace(faults, fail_in_200_rate=1.0, routes=(UPLOAD_ROUTE,))
    failing_from, full_from = args.kills // 4, args.kills // 2
    with contextlib.ExitStack() as cleanup, Emulator(options) as emulator:
        cleanup.callback(disk.unmount)
        client = Client(write_config(work, emulator, root), work / "client.log")
        mean_gap = sum(args.gap) / 2
        # Files arrive during the first three quarters of the kill phase.
        writer = Writer(root, work / "outside", args.files, 0.75 * args.kills * mean_gap, args.seed)
        writer.start()
        try:
            spell_began = {"failing": 0.0, "full": 0.0}
            before = 0
            for number in range(args.kills):
                if number == failing_from:
                    before = emulator.state()["faults"]["fail_in_200"]
                    emulator.set_faults(failing)
                    spell_began["failing"] = time.monotonic()
                if disk.mounted and number == full_from:
                    disk.fill()
                    spell_began["full"] = time.monotonic()
                client.start()
                tally.starts += 1
                gap = rng.uniform(*args.gap)
                time.sleep(gap / 2)
                # A spell ends in the middle of a run: the running client has to find its way
                # back by itself, not only the next start.
                if number == failing_from + SPELL_RUNS - 1:
                    emulator.set_faults(faults)
                    tally.failing_seconds = time.monotonic() - spell_began["failing"]
                    tally.failing_injected = emulator.state()["faults"]["fail_in_200"] - before
                if disk.mounted and number == full_from + SPELL_RUNS - 1:
                    disk.free()
                    tally.full_seconds = time.monotonic() - spell_began["full"]
                time.sleep(gap / 2)
                if client.kill():
                    tally.kills += 1
                else:
                    log.warning("run %d ended by itself before its kill", number + 1)
            # Spells that the last kill cut short end here, before --once has to finish.
            if spell_began["failing"] and not tally.failing_seconds:
                emulator.set_faults(faults)
                tally.failing_seconds = time.monotonic() - spell_began["failing"]
                tally.failing_injected = emulator.state()["faults"]["fail_in_200"] - before
            if spell_began["full"] and not tally.full_seconds:
                disk.free()
                tally.full_seconds = time.monotonic() - spell_began["full"]
            writer.join()
            for _ in range(10):
                client.start("--once")
                tally.starts += 1
                tally.once_runs.append(client.wait(600))
                if tally.once_runs[-1] == 0:
                    break
        finally:
            writer.stop.set()
            client.ensure_dead()
        held, datasets = server_holds(emulator)
        injected = emulator.state()["faults"]
        requests = emulator.state()["requests"]
        tally.trainings = len(emulator.state()["tasks"])
        tally.left = ledger_leftovers(work / "state" / "ledger.sqlite3")  # before the unmount
    tally.written = writer.written
    elapsed = time.monotonic() - started
    return report(tally, held, datasets, injected, requests, work, elapsed)


def ledger_leftovers(path: Path) -> dict[str, int]:
    """Rows the ledger still holds ``uploading`` or ``rejected`` once the run is over."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(
            "SELECT state, COUNT(*) FROM files WHERE state IN ('uploading', 'rejected') "
            "GROUP BY state"
        ).fetchall()
    return {str(state): int(count) for state, count in rows}


def report(
    tally: Tally,
    held: Counter[tuple[str, str]],
    datasets: int,
    injected: dict[str, int],
    requests: dict[str, int],
    work: Path,
    elapsed: float,
) -> int:
    duplicates = sum((held - tally.written).values())
    lost = sum((tally.written - held).values())
    text = (work / "client.log").read_text(errors="replace")
    # "category 'x': N files were in doubt (…): S already on the server, …"
    doubts = [
        (int(m[1]), int(m[2]))
        for m in re.finditer(r"(\d+) files were in doubt[^:]*: (\d+) already", text)
    ]
    in_doubt = sum(n for n, _ in doubts)
    stored = sum(s for _, s in doubts)
    # "the server had stored S of N files of an unanswered upload" (at a start or running)
    found = [int(m[1]) for m in re.finditer(r"the server had stored (\d+) of", text)]
    print("paiv-sync chaos run")
    print(f"  files written        {sum(tally.written.values())}")
    print(f"  files on the server  {sum(held.values())} (in {datasets} dataset(s))")
    print(f"  duplicates           {duplicates}")
    print(f"  lost                 {lost}")
    print(f"  kills survived       {tally.kills} (SIGKILL), {tally.starts} starts")
    print(f"  --once to finish     exit codes {tally.once_runs}")
    print(f"  faults injected      {', '.join(f'{k} {v}' for k, v in sorted(injected.items()))}")
    print(f"  upload requests      {requests.get('POST /datasets/{id}/files', 0)}")
    print(
        f"  in doubt at a start  {in_doubt} files after a kill, {stored} of them found on the "
        "server (not sent again)"
    )
    print(
        f"  found already stored {sum(found)} files in {len(found)} checks of the dataset "
        "(after a kill or a lost answer): not sent again"
    )
    print(
        f"  server failing files {tally.failing_seconds:.0f} s, {tally.failing_injected} "
        "per-file failures injected (none may end rejected)"
    )
    if tally.full_skipped:
        print(f"  ledger disk full     skipped: {tally.full_skipped}")
    else:
        print(
            f"  ledger disk full     {tally.full_seconds:.0f} s: 'cannot write the ledger' said "
            f"{text.count('cannot write the ledger')} times, 'no space left' "
            f"{text.count('no space left on the device')} times, 'can be written again' "
            f"{text.count('can be written again')} times"
        )
    print(f"  trainings            {tally.trainings}")
    print(
        f"  ledger at the end    {tally.left.get('uploading', 0)} uploading, "
        f"{tally.left.get('rejected', 0)} rejected"
    )
    print(f"  wall time            {elapsed:.0f} s")
    if duplicates or lost or tally.left.get("uploading", 0) or tally.left.get("rejected", 0):
        print(f"FAILED: see {work} (client.log, state/ledger.sqlite3)")
        return 1
    if not tally.once_runs or tally.once_runs[-1] != 0:
        print(f"UNFINISHED: --once never reported everything done; see {work}/client.log")
        return 2
    print("OK: every file exactly once")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="chaos %(levelname)s %(message)s")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    work = Path(tempfile.mkdtemp(prefix="paiv-chaos-"))
    code = run(args, work)
    if code == 0:
        shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
