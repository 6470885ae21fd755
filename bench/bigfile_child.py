"""Upload one big file in a fresh process: ``python -m bench.bigfile_child URL PATH``.

Prints one JSON line: RSS before the upload, peak RSS after it, seconds, and the server's
answer. A child process, so that its peak RSS is the upload's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import PASSWORD, USER, proc_memory
from paiv_sync.api import MviClient, UploadPart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    with MviClient(args.url, username=USER, password=PASSWORD, timeout=300) as client:
        client.authenticate()
        dataset_id = client.create_dataset("bigfile")
        category_id = client.ensure_category(dataset_id, "videos")
        before = proc_memory()
        started = time.perf_counter()
        results = client.upload(
            dataset_id,
            [UploadPart(args.path, args.path.name, "video/mp4")],
            category_name="videos",
            category_id=category_id,
        )
        seconds = time.perf_counter() - started
        after = proc_memory()
    print(
        json.dumps(
            {
                "rss_before": before["VmRSS"],
                "peak_before": before["VmHWM"],
                "peak_after": after["VmHWM"],
                "seconds": seconds,
                "ok": [r.ok for r in results],
                "fault": [r.fault for r in results],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
