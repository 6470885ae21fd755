"""Run the emulator in its own process for the benchmarks: ``python -m bench.emuhost``.

Prints ``serving URL`` and serves until SIGTERM/SIGINT or until stdin closes. With
``--profile PATH`` every thread is profiled and the merged profile is written to PATH on stop.
Logs only warnings: a log line per upload would be the benchmark's own cost, not the server's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from bench.profiling import AllThreadsProfile
from paiv_sync.emulator import Emulator, EmulatorOptions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", help="write a cProfile of all threads here on stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="emulator %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    profiler = AllThreadsProfile() if args.profile else None
    if profiler is not None:
        profiler.start()
    emulator = Emulator(EmulatorOptions(port=0, training_seconds=0.5))
    emulator.start()
    try:
        print(f"serving {emulator.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        emulator.stop()
        if profiler is not None:
            profiler.stop().dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
