"""The command line: parse arguments, load the configuration, set up logging, run.

Exit codes: 0 done, 1 something failed at run time (see the log), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from paiv_sync import __version__
from paiv_sync.config import Config, ConfigError, load_config
from paiv_sync.progress import ProgressLine

if TYPE_CHECKING:
    from paiv_sync.service import Service

log = logging.getLogger("paiv_sync")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
STOP_TIMEOUT = 20.0  # seconds; systemd's TimeoutStopSec in service-files/ is larger

# syslog priorities for journald's "<N>" line prefixes.
_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    """journald adds its own timestamps; a ``<N>`` prefix sets the priority.

    journald reads each line as a record of its own, so every line of a multi-line record (a
    reason on the next line, a traceback) carries the prefix: ``journalctl -p err`` shows the
    error with its reason.
    """

    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        lines = super().format(record).splitlines() or [""]
        first = f"<{priority}>{record.name}: {lines[0]}"
        return "\n".join([first, *(f"<{priority}>  {line}" for line in lines[1:])])


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _rfc3339(created: float) -> str:
    """A record's time as RFC 3339 in UTC, with milliseconds: ``2026-12-03T14:05:07.123Z``."""
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _to_journal() -> bool:
    """Whether stderr is journald's stream: ``$JOURNAL_STREAM`` names its device and inode.

    A terminal or a file that inherited the variable from a unit's environment is not.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(sys.stderr.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


def setup_logging(level: str, fmt: str) -> None:
    """Send the package's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif _to_journal():
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("paiv_sync").setLevel(level.upper())


def _common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=default,
        metavar="PATH",
        help="the configuration file (JSON)",
    )
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS if suppress else "info",
        type=str.lower,  # DEBUG and debug alike
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    parser.add_argument(
        "--log-format",
        default=argparse.SUPPRESS if suppress else "text",
        choices=["text", "json"],
        help="default: text",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``paiv-sync``."""
    parser = argparse.ArgumentParser(
        prog="paiv-sync",
        description="Watch category folders and feed their images into an MVI / PowerAI Vision "
        "classification dataset; train when enough have arrived.",
        epilog="Without a command, runs the service in the foreground until SIGINT/SIGTERM.",
    )
    parser.add_argument("--version", action="version", version=f"paiv-sync {__version__}")
    _common(parser, suppress=False)
    parser.add_argument(
        "--health-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /healthz and Prometheus /metrics on PORT (of health_host, 127.0.0.1 unless "
        "the configuration says otherwise)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="reconcile, upload everything pending (ignoring the upload "
        "threshold), start a training if due, and exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="say per category what a run (with --once: a --once run) would upload, what the "
        "dataset already holds, what would be rejected and whether a training would start; "
        "upload, request and record nothing",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="validate the configuration and try the server")
    _common(check, suppress=True)
    status = commands.add_parser(
        "status",
        help="show where every category's files stand",
        epilog="example: paiv-sync status --config configuration.json --json | jq .totals",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="one JSON object (its fields are described in README.md, 'status --json')",
    )
    _common(status, suppress=True)
    rebind = commands.add_parser(
        "rebind",
        help="keep the ledger when the server's address or the dataset's name has changed",
    )
    _common(rebind, suppress=True)
    retry = commands.add_parser(
        "retry",
        help="send again the files the server failed to store (with --rejected: every "
        "rejected file); run it while the service is stopped",
    )
    retry.add_argument(
        "--rejected",
        action="store_true",
        help="also the files the server refused and those rejected before upload (checked "
        "again at the next scan)",
    )
    _common(retry, suppress=True)
    demo = commands.add_parser("demo", help="a self-contained run against the built-in emulator")
    _common(demo, suppress=True)
    init = commands.add_parser(
        "init",
        help="write a starting configuration (mode 600) to fill in",
        description="Write a starting configuration, every optional key shown and commented "
        "out, with what the options give filled in. It never overwrites a file. Secrets are "
        "not taken on the command line: put the password in the file, in $PAIV_PASSWORD or in "
        "a password_file.",
        epilog="example: paiv-sync init --endpoint https://mvi.example.com/api --username "
        "admin --dataset parts --folder /data/images",
    )
    init.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=Path("configuration.json"),
        help="where to write it (default: ./configuration.json)",
    )
    init.add_argument("--endpoint", help="the server's URL, e.g. https://host/powerai-vision")
    init.add_argument("--username", help="the user name (password login)")
    init.add_argument(
        "--api-key", action="store_true", help="log in with an API key (MVI 8.x) instead"
    )
    init.add_argument("--dataset", help="the dataset's name (the model is named after it)")
    init.add_argument(
        "--folder",
        action="append",
        default=[],
        help="a root folder with one folder per category (repeat for more)",
    )
    _common(init, suppress=True)
    service = commands.add_parser(
        "service", help="print a systemd unit or launchd agent filled in for this installation"
    )
    service.add_argument("kind", choices=["systemd", "launchd"])
    _common(service, suppress=True)
    commands.add_parser(
        "emulator", help="run the stand-in MVI server (see: emulator --help)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``paiv-sync`` with ``argv`` (default: the process arguments); return the exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`paiv-sync status | head -2`): not an error of ours. Point
        # stdout at nothing, so the interpreter's last flush at exit does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["emulator"]:
        from paiv_sync.emulator.cli import main as emulator_main

        return emulator_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    setup_logging(args.log_level, args.log_format)
    if args.command == "demo":
        return _demo(args)
    if args.command == "init":
        return _init(args)
    if args.config is None:
        from paiv_sync.init import find_config

        args.config, said = find_config(os.environ, Path.cwd())
        if args.config is None:
            print(
                f"paiv-sync: {said}; give --config PATH, or write one with: paiv-sync init "
                "(or try: paiv-sync demo)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        log.info("%s", said)
    if args.command == "service":
        from paiv_sync.servicefiles import service_command

        return service_command(args.kind, args.config)
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if args.dry_run:
        if args.command is not None:
            print(f"paiv-sync: error: --dry-run is not for {args.command}", file=sys.stderr)
            return EXIT_USAGE
        from paiv_sync.dryrun import dry_run

        return dry_run(config, once=args.once, out=sys.stdout)
    if args.command == "check":
        return _check(config)
    if args.command == "status":
        from paiv_sync.status import status_command

        return status_command(config, as_json=args.json)
    if args.command == "rebind":
        return _rebind(config)
    if args.command == "retry":
        return _retry(config, rejected=args.rejected)
    port = args.health_port if args.health_port is not None else config.health_port
    return _run(config, once=args.once, health_port=port)


def _load(path: Path) -> Config | None:
    """The configuration at ``path``, its warnings logged; None after saying what is wrong."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.warnings:
            print(line, file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return None
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


def _demo(args: argparse.Namespace) -> int:
    from paiv_sync.demo import run_demo

    if args.config is not None:
        print(
            "paiv-sync: error: demo runs against its own emulator and takes no --config; "
            "to run against your server: paiv-sync --config PATH",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return run_demo()


def _init(args: argparse.Namespace) -> int:
    from paiv_sync.init import starting_config, write_config

    path: Path = args.path
    data = starting_config(
        endpoint=args.endpoint,
        username=args.username,
        dataset=args.dataset,
        folders=args.folder,
        api_key_mode=args.api_key,
    )
    try:
        write_config(path, data)
    except FileExistsError:
        print(f"paiv-sync init: {path} exists; not overwritten", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"paiv-sync init: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    secret = "API key" if args.api_key else "password"
    print(f"wrote {path} (only you can read it)")
    print(
        "next: replace what still holds a <placeholder>, put the "
        f"{secret} in it (or in ${'PAIV_API_KEY' if args.api_key else 'PAIV_PASSWORD'}), "
        f"then run: paiv-sync check --config {path}"
    )
    return EXIT_OK


class _ClearProgress(logging.Filter):
    """Wipes the progress line before each log record goes to the terminal."""

    def __init__(self, line: ProgressLine) -> None:
        super().__init__()
        self._line = line

    def filter(self, record: logging.LogRecord) -> bool:
        self._line.clear()
        return True


# The service's threads (watcher, pipeline, upload workers) mostly wait on the disk, the network
# and each other; each time one comes back from a wait it needs the interpreter lock, which the
# one running may keep for up to the switch interval (5 ms by default). With 1 ms, watch-mode
# ingest went from 0.63-0.68x to 0.81-0.82x of the bare upload loop in bench/run.py --only 1
# (BENCHMARKS.md, round 3); --once moved within its noise.
SWITCH_INTERVAL = 0.001


def _run(config: Config, *, once: bool, health_port: int | None = None) -> int:
    from paiv_sync.sdnotify import Notifier
    from paiv_sync.service import Service

    sys.setswitchinterval(SWITCH_INTERVAL)
    notifier = Notifier()
    progress: ProgressLine | None = None
    handlers: list[logging.Handler] = []
    clearer: _ClearProgress | None = None
    if once:
        tty = sys.stderr.isatty()
        progress = ProgressLine(sys.stderr, tty=tty)
        if tty:
            clearer = _ClearProgress(progress)
            handlers = list(logging.getLogger().handlers)
            for handler in handlers:
                handler.addFilter(clearer)
    service = Service(
        config,
        once=once,
        notify=notifier,
        watchdog_interval=notifier.watchdog_interval(),
        progress=progress,
    )

    interrupted = _handle_signals(service)
    health = None
    if health_port is not None and not once:
        from paiv_sync.health import HealthServer

        try:
            health = HealthServer(service, host=config.health_host, port=health_port).start()
        except OSError as exc:
            log.error("cannot serve health and metrics on port %d: %s", health_port, exc)
            return EXIT_FAILED
    try:
        code = service.run()
    finally:
        if progress is not None:
            progress.finish()
        if clearer is not None:
            for handler in handlers:
                handler.removeFilter(clearer)
        if health is not None:
            health.stop()
        notifier.close()
    log.info("stopped")
    if once and signal.SIGINT in interrupted:
        return EXIT_INTERRUPTED  # a --once run cut short by Ctrl-C, as shells expect
    return code


def _handle_signals(service: Service) -> list[int]:
    """SIGTERM and SIGINT stop ``service``, SIGHUP reloads it; returns the stop signals seen."""
    interrupted: list[int] = []

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        interrupted.append(signum)
        service.stop()
        # A clean stop takes a few seconds at most. Should it ever hang, print every thread's
        # stack (so the cause can be found) and exit rather than wait for a SIGKILL.
        faulthandler.dump_traceback_later(STOP_TIMEOUT, exit=True)

    def on_reload(_signum: int, _frame: FrameType | None) -> None:
        log.info("received SIGHUP; reloading the configuration")
        service.request_reload()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_reload)
    return interrupted


def _check(config: Config) -> int:
    from paiv_sync.api import MviError, newest
    from paiv_sync.pipeline import make_client
    from paiv_sync.retry import RetryPolicy

    print(f"configuration {config.source}: valid")
    who = "an API key" if config.auth_mode == "api_key" else f"user {config.username}"
    print(f"server: {config.base_url} ({who})")
    client = make_client(config, RetryPolicy(initial=0.5, maximum=2.0, max_attempts=2))
    try:
        client.authenticate()
        print("authentication: ok")
        same_name = [d for d in client.list_datasets() if d.get("name") == config.dataset_name]
    except MviError as exc:
        print(f"server: {exc}")
        return EXIT_FAILED
    finally:
        client.close()
    if config.dataset_action == "create":
        print(f"dataset: a new dataset {config.dataset_name}-<date-time> will be created at start")
    elif same_name:
        chosen = newest(same_name)
        print(
            f"dataset: {config.dataset_name!r} found (id {chosen.get('_id')}, "
            f"{chosen.get('total_file_count', '?')} files)"
        )
    else:
        print(f"dataset: {config.dataset_name!r} not found; it will be created at start")
    for folder in config.folders:
        print(f"folder: {folder}")
    print(f"ledger: {config.ledger_path}")
    return EXIT_OK


def _rebind(config: Config) -> int:
    """Record the configuration's server and dataset name in its ledger, keeping every row."""
    from paiv_sync.ledger import Ledger, LedgerError

    if not config.ledger_path.exists():
        print(f"rebind: no ledger at {config.ledger_path}: nothing to keep", file=sys.stderr)
        return EXIT_FAILED
    try:
        ledger = Ledger(config.ledger_path)
    except LedgerError as exc:
        print(f"rebind: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        before = ledger.get_meta("endpoint"), ledger.get_meta("dataset_config_name")
        ledger.bind(endpoint=config.base_url, dataset_name=config.dataset_name)
        if config.source is not None:
            ledger.set_meta("config_path", str(Path(os.path.abspath(config.source))))  # noqa: PTH100
    finally:
        ledger.close()
    print(f"ledger: {config.ledger_path}")
    print(f"server: {before[0] or '(none recorded)'} -> {config.base_url}")
    print(f"dataset: {before[1] or '(none recorded)'} -> {config.dataset_name}")
    print("the ledger keeps every file it recorded; the dataset it fed is looked up by its id")
    return EXIT_OK


def _retry(config: Config, *, rejected: bool) -> int:
    """Put rejected files back in line for the next run of the service."""
    from paiv_sync.ledger import Ledger, LedgerError, LedgerLocked

    if not config.ledger_path.exists():
        print(f"retry: no ledger at {config.ledger_path}: nothing to retry", file=sys.stderr)
        return EXIT_FAILED
    try:
        ledger = Ledger(config.ledger_path)
    except LedgerLocked as exc:
        print(
            f"retry: {exc}. Stop the service first (systemctl stop paiv-sync), or just restart "
            "it: a restart sends the files the server failed to store again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except LedgerError as exc:
        print(f"retry: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        again, checked = ledger.retry_rejected(refused_too=rejected)
    finally:
        ledger.close()
    print(f"{again} files will be sent again at the next run")
    if rejected:
        print(f"{checked} files rejected before upload will be checked again at the next scan")
    return EXIT_OK
