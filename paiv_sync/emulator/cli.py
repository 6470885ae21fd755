"""Command line of the MVI emulator: ``paiv-sync emulator …`` / ``python -m paiv_sync.emulator``.

Parses the options, starts the emulator, prints the URL it serves and runs until SIGINT or
SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType

from paiv_sync.emulator.options import (
    LOCKED_UPLOADS,
    TRAINING_OUTCOMES,
    EmulatorOptions,
    FaultOptions,
)
from paiv_sync.emulator.server import Emulator

log = logging.getLogger(__name__)

_DESCRIPTION = """\
A stand-in PowerAI Vision / Maximo Visual Inspection (MVI) server for tests, benchmarks and
demos: real HTTP(S) on loopback, state in memory, optional fault injection, and an
introspection endpoint (GET /_emulator/state) outside the API's base path.
"""

_EPILOG = """\
What follows the real product and what is our guess (see docs/emulator.md):
  [doc]    API keys sent as X-Auth-Token with no /tokens (MVI 8.x); 401, 404 and error
           bodies; classification needs 2 categories x 5 images.
  [client] POST /tokens (password grant), paths, JSON fields, multipart "files" parts,
           zip expansion, per-file resultList in a 400 when a file failed, user-metadata,
           newest-first listings with query terms and sortby, file size as a string and
           times in epoch ms, dltasks with usage "cic" / action "create" / pretrained_model,
           status training -> trained | failed, /trained-models, the transient 500 of a
           finishing task, "Could not find ..." 404s.
  [guess]  token lifetime; 429/5xx/drops (no rate limit is documented); a category_name
           unknown to the dataset is created on upload; duplicate category names are
           refused (400); a pretrained_model that is not a trained task gives 400; a second
           concurrent training is accepted (and counted); a method a path does not serve
           gives 404 (not 405);
           uploads into a locked dataset (--locked-uploads); dataset, category and task
           times are ISO 8601 UTC; .mp4 is accepted as a video. Routes it does not model
           answer 501.
  In API-key mode (--api-key given) /tokens answers 404 and --user is ignored.

On start it prints one line: "paiv-sync emulator serving URL" (plus "with certificate PATH"
in TLS mode), then serves until SIGINT or SIGTERM and exits 0.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator from the command line ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 after SIGINT/SIGTERM, 1 when it cannot serve; argparse exits
    with 2 on bad arguments.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        options = _options(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    emulator = Emulator(options)
    try:
        try:
            emulator.start()
        except OSError as exc:
            log.error("cannot serve on %s port %d: %s", options.host, options.port, exc)
            return 1
        line = f"paiv-sync emulator serving {emulator.url}"
        if emulator.cert_path is not None:
            line += f" with certificate {emulator.cert_path}"
        print(line, flush=True)
        # A timeout keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
        log.info("emulator: signal received, stopping")
    finally:
        emulator.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parser() -> argparse.ArgumentParser:
    defaults = EmulatorOptions()
    fault_defaults = FaultOptions()
    parser = argparse.ArgumentParser(
        prog="paiv-sync emulator",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve = parser.add_argument_group("serving")
    serve.add_argument("--host", default=defaults.host, help="address to bind (%(default)s)")
    serve.add_argument(
        "--port", type=int, default=defaults.port, help="port, 0 for a free one (%(default)s)"
    )
    serve.add_argument(
        "--base-path",
        default=defaults.base_path,
        help="the API's context root, e.g. /powerai-vision/api (%(default)s)",
    )
    serve.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a generated self-signed certificate (its path is printed)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="logging to stderr (%(default)s)",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument(
        "--user",
        action="append",
        metavar="NAME:PASSWORD",
        help="a user for POST /tokens, repeatable (default admin:passw0rd)",
    )
    auth.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="an API key, repeatable; switches to API-key mode (MVI 8.x: no /tokens)",
    )
    auth.add_argument(
        "--token-lifetime",
        type=float,
        metavar="SECONDS",
        help="tokens expire after this long [guess] (default: never)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--training-seconds",
        type=float,
        default=defaults.training_seconds,
        metavar="SECONDS",
        help="how long a task stays 'training' (%(default)s)",
    )
    training.add_argument(
        "--training-outcome",
        choices=TRAINING_OUTCOMES,
        default=defaults.training_outcome,
        help="how tasks end (%(default)s)",
    )
    product = parser.add_argument_group("how the product answers (defaults follow IBM's clients)")
    product.add_argument(
        "--upload-failure-status",
        type=int,
        default=defaults.upload_failure_status,
        metavar="STATUS",
        help="status of an upload in which some file failed (%(default)s; 200 = inside a 200)",
    )
    product.add_argument(
        "--locked-uploads",
        choices=LOCKED_UPLOADS,
        default=defaults.locked_uploads,
        help="an upload while a training locks the dataset [guess] (%(default)s)",
    )
    product.add_argument(
        "--finishing-error-rate",
        type=float,
        default=defaults.finishing_error_rate,
        metavar="SHARE",
        help="share of task status requests answered 500 as a task ends (%(default)s)",
    )
    product.add_argument(
        "--strict-tasks",
        action="store_true",
        help="refuse dltasks bodies without both usage cic and action create",
    )
    faults = parser.add_argument_group("fault injection (all off by default)")
    for flag, help_text in (
        ("--error-rate", "share of /api calls answered 500/502/503/504"),
        ("--drop-rate", "share of /api calls whose connection is closed unanswered"),
        (
            "--store-then-drop-rate",
            "share of /api calls carried out, then closed unanswered",
        ),
        ("--latency-rate", "share of /api calls delayed by --latency"),
        ("--rate-limit-rate", "share of /api calls answered 429 with Retry-After"),
        (
            "--fail-in-200-rate",
            "share answered 200 with result: fail (drawn per file for uploads)",
        ),
    ):
        faults.add_argument(flag, type=float, default=0.0, metavar="SHARE", help=help_text)
    faults.add_argument(
        "--latency",
        type=float,
        default=fault_defaults.latency,
        metavar="SECONDS",
        help="added delay (%(default)s)",
    )
    faults.add_argument(
        "--retry-after",
        type=float,
        default=fault_defaults.retry_after,
        metavar="SECONDS",
        help="Retry-After of injected 429s (%(default)s)",
    )
    faults.add_argument("--seed", type=int, help="seed for reproducible faults")
    faults.add_argument(
        "--fault-route",
        action="append",
        metavar="'METHOD /route'",
        help="aim the faults at this route only, e.g. 'POST /dltasks'; repeatable "
        "(default: every /api route)",
    )
    return parser


def _options(args: argparse.Namespace) -> EmulatorOptions:
    """Build EmulatorOptions from parsed arguments. Raises ValueError on a bad value."""
    users: dict[str, str] = {}
    for entry in args.user or ():
        name, sep, password = entry.partition(":")
        if not sep or not name:
            # Never echo the value: it holds a password.
            raise ValueError("--user: expected NAME:PASSWORD")
        users[name] = password
    faults = FaultOptions(
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
        store_then_drop_rate=args.store_then_drop_rate,
        latency=args.latency,
        latency_rate=args.latency_rate,
        rate_limit_rate=args.rate_limit_rate,
        retry_after=args.retry_after,
        fail_in_200_rate=args.fail_in_200_rate,
        seed=args.seed,
        routes=tuple(args.fault_route or ()),
    )
    base = EmulatorOptions()
    return EmulatorOptions(
        host=args.host,
        port=args.port,
        base_path=args.base_path,
        tls=args.tls,
        users=users or base.users,
        api_keys=tuple(args.api_key or ()),
        token_lifetime=args.token_lifetime,
        training_seconds=args.training_seconds,
        training_outcome=args.training_outcome,
        faults=faults,
        upload_failure_status=args.upload_failure_status,
        locked_uploads=args.locked_uploads,
        finishing_error_rate=args.finishing_error_rate,
        strict_tasks=args.strict_tasks,
    )
