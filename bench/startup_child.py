"""One service start-up in a fresh process: ``python -m bench.startup_child CONFIG.json``.

Prints one JSON line: seconds to READY, RSS after imports and peak RSS at READY, what the
service did after connecting (files offered, added, hashed) and, with ``--idle S``, the CPU
seconds it used over S idle seconds. A child process, so that peak RSS and CPU are the
service's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paiv_sync.intake as intake_module
from bench.common import proc_memory, self_cpu_seconds
from paiv_sync.cli import SWITCH_INTERVAL
from paiv_sync.config import parse_config
from paiv_sync.service import Service


def _in_gate(service: Service) -> int:
    """Files seen that have not settled yet (the service runs: its gate is there)."""
    gate = service.gate
    if gate is None:
        raise SystemExit("bench: the service has no stability gate while it runs")
    return len(gate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--idle", type=float, default=0.0, help="idle seconds to measure")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to watch after READY")
    args = parser.parse_args()
    config = parse_config(json.loads(args.config.read_text()), source=None, env={})
    sys.setswitchinterval(SWITCH_INTERVAL)  # as `paiv-sync` runs the service
    hashed: list[str] = []
    real_inspect = getattr(intake_module, "inspect_image", None)
    if not callable(real_inspect):
        # Patching a name intake no longer reads would count 0 files hashed whatever happens.
        raise SystemExit("bench: paiv_sync.intake no longer calls inspect_image; fix the hook")

    def counting_inspect(path: Any, max_size: int | None = None) -> Any:
        hashed.append(str(path))
        return real_inspect(path, max_size)

    # Counting, not changing: the benchmark must prove that no file is read (checked and
    # hashed, in one open) again.
    intake_module.inspect_image = counting_inspect  # type: ignore[attr-defined]
    rss_before = proc_memory()["VmRSS"]
    service = Service(config)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(service.run()), name="bench-service")
    started = time.perf_counter()
    thread.start()
    try:
        if not service.ready.wait(600):
            raise SystemExit("the service did not become ready within 600 s")
        ready = time.perf_counter() - started
        memory_at_ready = proc_memory()
        offered_at_ready = _in_gate(service)
        deadline = time.monotonic() + 60
        while service.dataset_id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        # A few rounds of the main loop after connecting: a file wrongly taken as new would
        # be in the gate, hashed or uploaded by now.
        time.sleep(args.settle)
        result: dict[str, Any] = {
            "ready_seconds": ready,
            "rss_before": rss_before,
            "rss_at_ready": memory_at_ready["VmRSS"],
            "peak_rss_at_ready": memory_at_ready["VmHWM"],
            "offered_at_ready": offered_at_ready,
            "in_gate": _in_gate(service),
            "added": service.summary.added,
            "uploaded": service.summary.uploaded,
            "hashed": len(hashed),
            "connected": service.dataset_id is not None,
        }
        if args.idle:
            cpu0 = self_cpu_seconds()
            wall0 = time.perf_counter()
            time.sleep(args.idle)
            result["idle_cpu_seconds"] = self_cpu_seconds() - cpu0
            result["idle_seconds"] = time.perf_counter() - wall0
        result["peak_rss"] = proc_memory()["VmHWM"]
    finally:
        service.stop()
        thread.join(120)
    result["exit_code"] = codes[0] if codes else None
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
