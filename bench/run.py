"""Run the benchmarks and print a table: ``python bench/run.py [--quick] [--only 1,2,…]``.

Each figure is printed with the limit it is measured against (in the same run), the ratio and
the goal; the details under the table say how each was measured and where the time went.
Everything is written under a temporary folder in /tmp that is removed at the end (``--keep``
keeps it). ``--quick`` runs smaller sizes for a smoke run of about a minute.

To measure a patched copy of the package, put it first on the path:
``PYTHONPATH=/tmp/patched python bench/run.py`` (the children inherit it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make ``bench`` importable. Appended, not put
    # first, so that a patched copy of paiv_sync on PYTHONPATH wins over the work tree.
    del sys.path[0]
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench import bigfile, hashspeed, ingest, latency, startup
from bench.common import Figure, Section

BENCHMARKS: dict[str, Callable[..., Section]] = {
    "1": ingest.run,
    "2": latency.run,
    "3": startup.run,  # with 4 (memory) and 5 (idle): one tree, one ledger
    "6": hashspeed.run,
    "7": bigfile.run,
}
ALIASES = {"4": "3", "5": "3"}


def machine() -> list[str]:
    """Lines describing the machine and the code measured."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import paiv_sync

    return [
        f"machine: {os.cpu_count()} cores ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"paiv_sync from {Path(paiv_sync.__file__).parent}",
    ]


def _cell(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def table(figures: Sequence[Figure]) -> list[str]:
    """The results as a Markdown table."""
    rows = [("figure", "paiv-sync", "limit", "ratio", "goal", "met", "note")]
    for f in figures:
        met = "" if f.met is None else ("yes" if f.met else "NO")
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        rows.append(
            (f.name, _cell(f.value, f.unit), _cell(f.baseline, f.unit), ratio, f.goal, met, f.note)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if index == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks; return 0, or 1 when one of them failed to run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument(
        "--only", default="", help="comma-separated figure numbers (1-7), default all"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen = [ALIASES.get(n.strip(), n.strip()) for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(unknown)}; choose from 1-7")
    keys = [k for k in BENCHMARKS if not chosen or k in chosen]

    work = Path(tempfile.mkdtemp(prefix="paiv-bench-", dir="/tmp"))
    header = machine()
    print("\n".join(header), flush=True)
    sections: list[Section] = []
    failed = False
    started = time.perf_counter()
    try:
        for key in keys:
            folder = work / f"figure{key}"
            folder.mkdir()
            began = time.perf_counter()
            print(f"running figure {key} …", file=sys.stderr, flush=True)
            try:
                section = BENCHMARKS[key](folder, quick=args.quick)
            except Exception as exc:  # noqa: BLE001 - report it and go on with the others
                failed = True
                section = Section(f"figure {key} FAILED")
                section.say(f"{type(exc).__name__}: {exc}")
            section.say(f"(section took {time.perf_counter() - began:.0f} s)")
            sections.append(section)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    figures = [f for s in sections for f in s.figures]
    print()
    print("\n".join(table(figures)))
    for section in sections:
        print(f"\n## {section.title}")
        print("\n".join(section.details))
    print(f"\ntotal {time.perf_counter() - started:.0f} s{' (--quick)' if args.quick else ''}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": header,
                    "quick": args.quick,
                    "figures": [asdict(f) for f in figures],
                    "details": {s.title: s.details for s in sections},
                },
                indent=2,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
