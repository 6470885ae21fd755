"""Service definitions for this installation: a systemd unit (Linux) and a launchd plist (macOS).

``paiv-sync service systemd|launchd --config PATH`` prints one, filled in with the absolute path
of this installation's ``paiv-sync`` and of the configuration, ready to be saved where the
service manager looks for it (see ``docs/service.md``). The files in the repository's
``service-files/`` folder are this module's output for placeholder paths; a test keeps them in
step.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import string
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "KINDS",
    "example_files",
    "find_executable",
    "render_launchd",
    "render_systemd",
    "service_command",
]

KINDS = ("systemd", "launchd")

EXIT_OK, EXIT_USAGE = 0, 2

DEFAULT_LABEL = "org.paiv-sync.agent"

# The placeholders of the files in the repository's service-files/ folder.
EXAMPLE_EXECUTABLE = "/usr/local/bin/paiv-sync"
EXAMPLE_CONFIG = Path("/etc/paiv-sync/configuration.json")
EXAMPLE_LOG_DIR = Path("/Users/USER/Library/Logs/paiv-sync")

# Characters that may stand unquoted in a systemd command line. Anything else (blanks, quotes,
# backslashes, ";") is put in double quotes; "%" and "$" are escaped either way, since systemd
# expands specifiers and environment variables even inside quotes.
_SYSTEMD_SAFE = frozenset(string.ascii_letters + string.digits + "_@%+=:,./-$")

_UNIT_HEADER = """\
# {what} (see docs/service.md).
# Needs the system user paiv-sync (see User= below).
# Save as /etc/systemd/system/{file}, then:
#   systemctl daemon-reload && systemctl enable --now {name}
"""

_UNIT_BODY = """\
[Unit]
Description={description}
# The server is reached over the network; watched folders may live on network shares.
Wants=network-online.target
After=network-online.target remote-fs.target
# A share mounted elsewhere than the usual places can be waited for by path, e.g.
#RequiresMountsFor=/mnt/cameras

[Service]
# paiv-sync sends READY=1 once its start-up scan is done and the file observer runs,
# STATUS= with pending/uploaded counts, WATCHDOG=1 while healthy and STOPPING=1 on shutdown.
Type=notify
# Only the paiv-sync process itself may report; nothing it starts can speak for it.
NotifyAccess=main
ExecStart={exec_start}
# SIGHUP makes paiv-sync read its configuration again.
ExecReload=/bin/kill -HUP $MAINPID
# The first start scans and hashes every file already in the folders before READY=1; on a
# very large tree or a slow share, raise this (or set infinity).
TimeoutStartSec=30min
# SIGTERM makes paiv-sync finish or abandon its in-flight upload and exit 0 within this bound.
TimeoutStopSec=30
# No WATCHDOG=1 for this long (a hung process) and systemd restarts the service.
WatchdogSec=60
# Exit status 2 (configuration error) is restarted too, on purpose: a watched folder on a share
# that is not mounted yet is reported as missing, and a later try succeeds once it appears.
Restart=on-failure
RestartSec=15

# A dedicated system user (create it with: useradd --system --no-create-home --shell
# /usr/sbin/nologin paiv-sync) rather than DynamicUser=yes: the configuration with its password
# can then be owned by it with mode 600, access to the watched folders can be granted to a
# stable name (group membership, ACLs, uid= of a network mount), and the ledger keeps one owner.
User=paiv-sync
Group=paiv-sync
# Access to folders owned by another group, e.g.
#SupplementaryGroups=cameras
# The ledger, <configuration file name>.ledger.sqlite3, goes to /var/lib/paiv-sync
# ($STATE_DIRECTORY), which systemd creates for the user.
StateDirectory=paiv-sync
StateDirectoryMode=0700
# Secrets as systemd credentials instead of in the configuration (root-owned files, mode 600;
# paiv-sync reads $CREDENTIALS_DIRECTORY/password or $CREDENTIALS_DIRECTORY/api_key):
#LoadCredential=password:/etc/paiv-sync/password
#LoadCredential=api_key:/etc/paiv-sync/api_key
# The ledger and anything else paiv-sync creates are readable by its user only.
UMask=0077

# Sandboxing. The whole file system is read-only for paiv-sync (ProtectSystem=strict) except
# its state directory; watched folders anywhere, including network shares under /mnt or /media,
# stay visible and readable. If "ledger" in the configuration points elsewhere, allow it:
#ReadWritePaths=/srv/paiv-sync
NoNewPrivileges=yes
ProtectSystem=strict
# Kept: read-only, not "yes", since watched folders may live in home directories.
ProtectHome=read-only
PrivateTmp=yes
# /dev/rtc stays readable (the one device left, by ProtectClock=): reading a clock is harmless.
PrivateDevices=yes
DevicePolicy=closed
# Mounts made on the host later (automounted shares) still propagate into the service.
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# Kept: no ProcSubset=pid, which would hide /proc/sys, where OpenSSL looks for FIPS mode
# (/proc/sys/crypto/fips_enabled).
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
# Kept: no PrivateUsers=yes. It needs kernel user namespaces, which some hardened hosts turn
# off (the service would not start), and shows the owners of watched files as "nobody".
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A refused system call fails with EPERM (an error paiv-sync logs) instead of killing it.
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=
# Kept: AF_INET/AF_INET6 reach the MVI server; AF_UNIX is the notification socket (and the
# journal). The server's address is not known here, so there is no IPAddressDeny=; add
#IPAddressDeny=any
#IPAddressAllow=10.1.2.3
# Likewise kept: the host's network (PrivateNetwork=no) and root directory (no RootDirectory=).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
"""


def render_systemd(*, executable: str, config_path: Path, instance: bool = False) -> str:
    """Return the text of a systemd service unit that runs paiv-sync.

    Takes ``executable``, the command that starts paiv-sync as POSIX shell words (usually one
    absolute path, as ``find_executable`` returns; ``/usr/bin/python3 -m paiv_sync`` works
    too), and ``config_path``, the absolute path of the configuration. With ``instance`` the
    unit is a template (``paiv-sync@.service``): instance ``NAME`` reads ``NAME.json`` from
    the configuration's folder.

    Raises ValueError when the command is empty or not absolute, when ``config_path`` is
    relative, or when a path holds a line break or other control character.
    """
    words = _command(executable)
    config = _absolute_config(config_path)
    if instance:
        config_word = _systemd_word(f"{config.parent}/", keep="%i.json")
        name = "paiv-sync@NAME"
        description = "paiv-sync (%i): feed folders of images into an MVI classification dataset"
        header = _UNIT_HEADER.format(
            what="paiv-sync as a systemd template unit: instance NAME reads the configuration\n"
            f"# {config.parent}/NAME.json",
            file="paiv-sync@.service",
            name=name,
        )
    else:
        config_word = _systemd_word(str(config))
        name = "paiv-sync"
        description = "paiv-sync: feed folders of images into an MVI classification dataset"
        header = _UNIT_HEADER.format(
            what="paiv-sync as a systemd unit, made by `paiv-sync service systemd`",
            file="paiv-sync.service",
            name=name,
        )
    program, *arguments = words
    exec_start = " ".join(
        [
            _systemd_word(program, command=True),
            *(_systemd_word(w) for w in arguments),
            "--config",
            config_word,
        ]
    )
    return header + _UNIT_BODY.format(description=description, exec_start=exec_start)


def render_launchd(
    *,
    executable: str,
    config_path: Path,
    label: str = DEFAULT_LABEL,
    log_dir: Path | None = None,
) -> str:
    """Return the text of a launchd property list (an agent) that runs paiv-sync.

    Takes ``executable`` and ``config_path`` as ``render_systemd`` does, the job's ``label``,
    and ``log_dir``, the folder of its log file ``<label>.log`` (default
    ``~/Library/Logs/paiv-sync``; launchd does not create it). The result is valid XML that
    ``plistlib.loads`` reads back.

    Raises ValueError for an empty label and as ``render_systemd`` does.
    """
    words = _command(executable)
    config = _absolute_config(config_path)
    if not label.strip():
        raise ValueError("the launchd label must not be empty")
    folder = log_dir if log_dir is not None else Path.home() / "Library" / "Logs" / "paiv-sync"
    log_file = str(folder / f"{label}.log")
    _check_printable(log_file)
    job: dict[str, Any] = {
        "Label": label,
        "ProgramArguments": [*words, "--config", str(config)],
        "RunAtLoad": True,
        # Restart after a crash or a non-zero exit, not after a clean stop (exit 0).
        "KeepAlive": {"SuccessfulExit": False},
        # At most one start per 30 s, so a persistent error does not spin.
        "ThrottleInterval": 30,
        # SIGTERM, then SIGKILL after this long: paiv-sync exits well within it.
        "ExitTimeOut": 30,
        # Low CPU and I/O priority: hashing a large tree must not slow the Mac down.
        "ProcessType": "Background",
        # paiv-sync logs to stderr; stdout stays quiet. One file keeps the story in order.
        "StandardOutPath": log_file,
        "StandardErrorPath": log_file,
    }
    text = plistlib.dumps(job, fmt=plistlib.FMT_XML, sort_keys=False).decode("utf-8")
    # plistlib writes no comments; one after the DOCTYPE says where this came from.
    # (An XML comment must not contain "--", hence no option names.)
    comment = (
        "<!-- paiv-sync as a launchd agent, made by `paiv-sync service launchd` "
        "(see docs/service.md).\n"
        f"     Save as ~/Library/LaunchAgents/{label}.plist and create {folder},\n"
        f"     then: launchctl bootstrap gui/$(id -u) ~/Library/LaunchAgents/{label}.plist -->\n"
    )
    if "--" in comment[4:-4]:
        # A label or folder with "--" would break the XML; leave the comment out then.
        return text
    head, sep, rest = text.partition("<plist ")
    return head + comment + sep + rest


def example_files() -> dict[str, str]:
    """Return the repository's ``service-files/`` folder as it should be: file name → text.

    These are the renderings for placeholder paths (``/usr/local/bin/paiv-sync``,
    ``/etc/paiv-sync/configuration.json``). To refresh the folder after changing this module::

        python -c 'from paiv_sync.servicefiles import example_files as e; from pathlib import
        Path; [Path("service-files", n).write_text(t) for n, t in e().items()]'
    """
    return {
        "paiv-sync.service": render_systemd(
            executable=EXAMPLE_EXECUTABLE, config_path=EXAMPLE_CONFIG
        ),
        "paiv-sync@.service": render_systemd(
            executable=EXAMPLE_EXECUTABLE, config_path=EXAMPLE_CONFIG, instance=True
        ),
        f"{DEFAULT_LABEL}.plist": render_launchd(
            executable=EXAMPLE_EXECUTABLE, config_path=EXAMPLE_CONFIG, log_dir=EXAMPLE_LOG_DIR
        ),
    }


def find_executable() -> str:
    """Return the command that starts this installation's paiv-sync, as POSIX shell words.

    That is the running program when it is the ``paiv-sync`` console script (so the unit runs
    the installation that printed it, whatever else is on ``PATH``); else the real absolute path
    of the ``paiv-sync`` found on ``PATH``; else ``<this Python> -m paiv_sync``. A path that
    needs quoting is quoted (``shlex.quote``).
    """
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if (
        argv0 is not None
        and argv0.name == "paiv-sync"
        and argv0.is_file()
        and os.access(argv0, os.X_OK)
    ):
        return shlex.quote(str(argv0.resolve()))
    found = shutil.which("paiv-sync")
    if found:
        return shlex.quote(str(Path(found).resolve()))
    # sys.executable is deliberately not resolved: in a virtual environment it is a symlink,
    # and following it would leave the environment (and its installed packages) behind.
    return shlex.join([str(Path(sys.executable).absolute()), "-m", "paiv_sync"])


def service_command(kind: str, config_path: Path, *, out: TextIO = sys.stdout) -> int:
    """Print the service definition of ``kind`` (``systemd`` or ``launchd``) to ``out``.

    ``config_path`` is made absolute (relative to the working directory, ``~`` expanded) and
    must name an existing file. Returns 0; or 2, with a message on stderr, for an unknown kind
    or a configuration path that does not exist or is not a file.
    """
    if kind not in KINDS:
        sys.stderr.write(
            f"paiv-sync service: unknown service manager {kind!r}; choose one of "
            f"{', '.join(KINDS)}\n"
        )
        return EXIT_USAGE
    # normpath, not resolve(): a symlinked configuration stays the name the user chose, so
    # pointing the link elsewhere later takes effect without a new unit.
    config = Path(os.path.normpath(config_path.expanduser().absolute()))
    if not config.exists():
        sys.stderr.write(f"paiv-sync service: {config}: the configuration file does not exist\n")
        return EXIT_USAGE
    if not config.is_file():
        sys.stderr.write(f"paiv-sync service: {config}: not a file; give the configuration file\n")
        return EXIT_USAGE
    try:
        executable = find_executable()
        if kind == "systemd":
            text = render_systemd(executable=executable, config_path=config)
        else:
            text = render_launchd(executable=executable, config_path=config)
    except ValueError as exc:
        sys.stderr.write(f"paiv-sync service: {exc}\n")
        return EXIT_USAGE
    out.write(text)
    out.flush()
    return EXIT_OK


def _command(executable: str) -> list[str]:
    try:
        words = shlex.split(executable)
    except ValueError as exc:
        raise ValueError(f"the command {executable!r} cannot be split into words: {exc}") from exc
    if not words:
        raise ValueError("the paiv-sync command is empty")
    if not Path(words[0]).is_absolute():
        raise ValueError(f"the paiv-sync command must start with an absolute path, got {words[0]}")
    for word in words:
        _check_printable(word)
    return words


def _absolute_config(config_path: Path) -> Path:
    if not config_path.is_absolute():
        raise ValueError(f"the configuration path must be absolute, got {config_path}")
    _check_printable(str(config_path))
    return config_path


def _check_printable(text: str) -> None:
    # A line break would end the line of the unit file and start another directive.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"{text!r} holds a control character (a line break?)")


def _systemd_word(text: str, *, command: bool = False, keep: str = "") -> str:
    """Quote ``text`` as one word of a systemd command line; ``keep`` is appended verbatim.

    ``command`` marks the first word, the program: systemd expands ``$VARIABLES`` only in the
    arguments after it, so only they need ``$`` doubled. ``keep`` carries specifiers meant for
    systemd (``%i``), which must not be escaped.
    """
    escaped = text.replace("%", "%%")
    if not command:
        escaped = escaped.replace("$", "$$")
    if all(c in _SYSTEMD_SAFE for c in text):
        return escaped + keep
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}{keep}"'
